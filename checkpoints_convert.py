"""
Convert Hugging Face checkpoints to nanoskip checkpoint directories and back.

    python checkpoints_convert.py --from_hf HF_DIR --out DIR     # TinyLlama/Llama, Phi-3, OPT, Bloom/Bloomz
    python checkpoints_convert.py --from_gguf FILE.gguf --out DIR  # llama.cpp's GGUF, Llama architecture
    python checkpoints_convert.py --to_hf DIR --out HF_DIR       # loads with transformers' AutoModelForCausalLM

Input: config.json with single or sharded safetensors (model.safetensors.index.json), or
pytorch_model.bin (loaded with weights_only=True). One name table per family maps our tensor names to
transformers'; a list means the transformers tensors are concatenated along dim 0 into ours. The
expected transformers names and shapes come from exporting an empty (meta-device) model, so import
and export share one table. A GGUF file is read through the same table: its metadata becomes a
transformers config and its tensors, dequantized by the `gguf` package, transformers tensors (as
transformers' modeling_gguf_pytorch_utils.py loads them). Output goes to a temporary directory renamed
into place at the end: a failed conversion leaves nothing behind.
"""
import argparse
import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import savedir
from configurator import run_main
from model import Config, Transformer
from tokenizer import TOKENIZER_FILES, load_tokenizer

# our name -> transformers name(s); "{i}" is the layer index
LLAMA = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attn.wqkv.weight": ["model.layers.{i}.self_attn.q_proj.weight",
                                    "model.layers.{i}.self_attn.k_proj.weight",
                                    "model.layers.{i}.self_attn.v_proj.weight"],
    "layers.{i}.attn.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp.w_gate_up.weight": ["model.layers.{i}.mlp.gate_proj.weight",
                                        "model.layers.{i}.mlp.up_proj.weight"],
    "layers.{i}.mlp.w_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
PHI3 = {
    **LLAMA,
    "layers.{i}.attn.wqkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",   # already [Q; K; V]
    "layers.{i}.mlp.w_gate_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",  # already [gate; up]
}
OPT = {
    "tok_emb.weight": "model.decoder.embed_tokens.weight",
    "pos_emb.weight": "model.decoder.embed_positions.weight",
    "proj_in.weight": "model.decoder.project_in.weight",
    "proj_out.weight": "model.decoder.project_out.weight",
    "norm.weight": "model.decoder.final_layer_norm.weight",
    "norm.bias": "model.decoder.final_layer_norm.bias",
    "lm_head.weight": "lm_head.weight",
}
for p in ("weight", "bias"):
    OPT.update({
        f"layers.{{i}}.attn_norm.{p}": f"model.decoder.layers.{{i}}.self_attn_layer_norm.{p}",
        f"layers.{{i}}.attn.wqkv.{p}": [f"model.decoder.layers.{{i}}.self_attn.{x}_proj.{p}" for x in "qkv"],
        f"layers.{{i}}.attn.wo.{p}": f"model.decoder.layers.{{i}}.self_attn.out_proj.{p}",
        f"layers.{{i}}.mlp_norm.{p}": f"model.decoder.layers.{{i}}.final_layer_norm.{p}",
        f"layers.{{i}}.mlp.w_up.{p}": f"model.decoder.layers.{{i}}.fc1.{p}",
        f"layers.{{i}}.mlp.w_down.{p}": f"model.decoder.layers.{{i}}.fc2.{p}",
    })
BLOOM = {"tok_emb.weight": "transformer.word_embeddings.weight", "lm_head.weight": "lm_head.weight"}
for p in ("weight", "bias"):
    BLOOM.update({
        f"emb_norm.{p}": f"transformer.word_embeddings_layernorm.{p}",
        f"layers.{{i}}.attn_norm.{p}": f"transformer.h.{{i}}.input_layernorm.{p}",
        f"layers.{{i}}.attn.wqkv.{p}": f"transformer.h.{{i}}.self_attention.query_key_value.{p}",  # per head
        f"layers.{{i}}.attn.wo.{p}": f"transformer.h.{{i}}.self_attention.dense.{p}",
        f"layers.{{i}}.mlp_norm.{p}": f"transformer.h.{{i}}.post_attention_layernorm.{p}",
        f"layers.{{i}}.mlp.w_up.{p}": f"transformer.h.{{i}}.mlp.dense_h_to_4h.{p}",
        f"layers.{{i}}.mlp.w_down.{p}": f"transformer.h.{{i}}.mlp.dense_4h_to_h.{p}",
        f"norm.{p}": f"transformer.ln_f.{p}",
    })
NAME_MAPS = {"llama": LLAMA, "phi3": PHI3, "opt": OPT, "bloom": BLOOM}
# tensors transformers keeps in checkpoints that carry no weights
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.masked_bias", "attn.bias")


# ---- configs ----

def rope_from_hf(hf):
    """(theta, rope_scaling) from transformers 4 (rope_theta + rope_scaling) or 5 (rope_parameters) configs."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    if kind == "default":
        return theta, None
    kind = {"su": "longrope"}.get(kind, kind)
    if kind in ("longrope", "llama3") and "original_max_position_embeddings" not in params:
        params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    return theta, {"rope_type": kind, **params}


def first_id(value, default):
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else value


SIZE_KEYS = ("vocab_size", "hidden_size", "n_embed", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
             "num_key_value_heads", "intermediate_size", "ffn_dim", "max_position_embeddings", "head_dim")


def end_ids(*values):
    """Every id of transformers' eos_token_id values (an int or a list, in config.json and
    generation_config.json), in order, each once."""
    ids = []
    for value in values:
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def config_from_hf(hf, block_size=None, generation=None):
    """Our Config from transformers' config.json `hf` (and generation_config.json's eos ids, if any)."""
    kind = hf.get("model_type")
    if kind not in NAME_MAPS:
        raise ValueError(f"unsupported model_type {kind!r} (supported: {', '.join(NAME_MAPS)})")
    for key in SIZE_KEYS:  # before any division by them
        if key in hf and not (isinstance(hf[key], int) and hf[key] >= 1):
            raise ValueError(f"{key}={hf[key]!r}: must be an integer >= 1")
    common = dict(vocab_size=hf["vocab_size"], family=kind, tie_embeddings=hf.get("tie_word_embeddings", kind in ("opt", "bloom")),
                  bos_id=first_id(hf.get("bos_token_id"), 1), eos_id=first_id(hf.get("eos_token_id"), 2))
    ends = end_ids(hf.get("eos_token_id"), (generation or {}).get("eos_token_id"))
    common["end_ids"] = [i for i in ends if i != common["eos_id"]] or None
    if kind in ("llama", "phi3"):
        if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{kind}: biases and activations other than silu are not supported")
        n_head = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // n_head):
            raise ValueError(f"{kind}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
        theta, scaling = rope_from_hf(hf)
        return Config(**common, n_layer=hf["num_hidden_layers"], n_head=n_head,
                      n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
                      intermediate_size=hf["intermediate_size"], block_size=block_size or hf["max_position_embeddings"],
                      rope_theta=theta, rope_scaling=scaling, max_position_embeddings=hf["max_position_embeddings"],
                      norm_eps=hf["rms_norm_eps"],
                      sliding_window=hf.get("sliding_window")).validate()
    if kind == "opt":
        if hf.get("activation_function", "relu") != "relu" or not hf.get("layer_norm_elementwise_affine", True):
            raise ValueError("opt: only relu and affine layer norms are supported")
        pre = hf.get("do_layer_norm_before", True)
        return Config(**common, n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                      n_kv_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], intermediate_size=hf["ffn_dim"],
                      block_size=hf["max_position_embeddings"], norm="layernorm", norm_eps=1e-5,
                      norm_position="pre" if pre else "post", final_norm=pre and not hf.get("_remove_final_layer_norm", False),
                      pos_emb="learned", pos_offset=2, mlp="relu", bias=hf.get("enable_bias", True),
                      emb_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"]).validate()
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ValueError("bloom: apply_residual_connection_post_layernorm=True is not supported")
    n_head = hf.get("n_head", hf.get("num_attention_heads"))
    n_embd = hf.get("hidden_size", hf.get("n_embed"))
    return Config(**common, n_layer=hf.get("n_layer", hf.get("num_hidden_layers")), n_head=n_head, n_kv_head=n_head,
                  n_embd=n_embd, intermediate_size=4 * n_embd, block_size=block_size or hf.get("seq_length", 2048),
                  norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos_emb="alibi", mlp="gelu_tanh",
                  bias=True, emb_norm=True).validate()


def eos_token_id(cfg):
    """transformers' eos_token_id: eos_id, or the list of every end id."""
    return cfg.eos_ids if len(cfg.eos_ids) > 1 else cfg.eos_id


def config_to_hf(cfg):
    common = {"model_type": cfg.family, "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": cfg.bos_id, "eos_token_id": eos_token_id(cfg), "pad_token_id": None,
              "torch_dtype": "float32"}
    if cfg.family in ("llama", "phi3"):
        rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})}
        hf = {**common, "architectures": ["LlamaForCausalLM" if cfg.family == "llama" else "Phi3ForCausalLM"],
              "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size,
              "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "num_key_value_heads": cfg.n_kv_head,
              "max_position_embeddings": cfg.max_position_embeddings or cfg.block_size,
              "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "rope_theta": cfg.rope_theta,
              "rope_parameters": rope, "sliding_window": cfg.sliding_window}
        if "original_max_position_embeddings" in rope:
            hf["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        return hf
    if cfg.family == "opt":
        return {**common, "architectures": ["OPTForCausalLM"], "hidden_size": cfg.n_embd, "ffn_dim": cfg.intermediate_size,
                "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
                "max_position_embeddings": cfg.block_size, "do_layer_norm_before": cfg.norm_position == "pre",
                "_remove_final_layer_norm": cfg.norm_position == "pre" and not cfg.final_norm,
                "word_embed_proj_dim": cfg.emb_dim or cfg.n_embd, "enable_bias": cfg.bias,
                "activation_function": "relu", "pad_token_id": 1}
    return {**common, "architectures": ["BloomForCausalLM"], "hidden_size": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "layer_norm_epsilon": cfg.norm_eps, "seq_length": cfg.block_size}


# ---- tensors ----

def bloom_qkv_to_ours(t, cfg):
    """Bloom fuses per head [h, (q,k,v), hd, ...]; ours is [Q; K; V]: w.view(H, 3, hd, C).transpose(0, 1)."""
    return t.reshape(cfg.n_head, 3, cfg.head_dim, -1).transpose(0, 1).reshape(t.shape)


def bloom_qkv_to_hf(t, cfg):
    return t.reshape(3, cfg.n_head, cfg.head_dim, -1).transpose(0, 1).reshape(t.shape)


def split_sizes(name, cfg):
    """Sizes along dim 0 of the transformers tensors concatenated into our tensor `name`."""
    if ".wqkv." in name:
        return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    return [cfg.intermediate_size, cfg.intermediate_size]  # w_gate_up


def our_to_hf_names(cfg):
    """{our tensor name: [transformers names]} for this config, only for tensors our model has."""
    table = NAME_MAPS[cfg.family]
    with torch.device("meta"):
        ours = set(Transformer(cfg).state_dict())
    mapping = {}
    for our_t, hf_t in table.items():
        hf_list = hf_t if isinstance(hf_t, list) else [hf_t]
        for i in range(cfg.n_layer if "{i}" in our_t else 1):
            name = our_t.format(i=i)
            if name in ours:
                mapping[name] = [h.format(i=i) for h in hf_list]
    return mapping


def to_hf_tensors(state, cfg):
    """Our state dict -> transformers state dict (a generator of (name, tensor))."""
    for name, hf_names in our_to_hf_names(cfg).items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        t = state[name]
        if cfg.family == "bloom" and ".wqkv." in name:
            t = bloom_qkv_to_hf(t, cfg)
        parts = t.split(split_sizes(name, cfg)) if len(hf_names) > 1 else [t]
        yield from zip(hf_names, parts)


def expected_hf_shapes(cfg):
    with torch.device("meta"):
        state = Transformer(cfg).state_dict()
    return {name: tuple(t.shape) for name, t in to_hf_tensors(state, cfg)}


def canonical(name, family):
    """Older checkpoints name OPT tensors "decoder.*" and Bloom's without "transformer."."""
    if family == "opt" and name.startswith("decoder."):
        return "model." + name
    if family == "bloom" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


# ---- reading checkpoints ----

class HFCheckpoint:
    """Tensors of a transformers checkpoint directory, read one at a time (safetensors are memory-mapped)."""

    def __init__(self, hf_dir, family):
        self.files = {}  # canonical name -> file
        index = next((os.path.join(hf_dir, f) for f in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                      if os.path.isfile(os.path.join(hf_dir, f))), None)
        if index:
            try:
                weight_map = json.load(open(index))["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid checkpoint index ({e})") from None
            for shard in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(hf_dir, shard)):
                    raise ValueError(f"{index} refers to missing shard {shard}")
            shards = sorted({os.path.join(hf_dir, s) for s in weight_map.values()})
        elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
            shards = [os.path.join(hf_dir, "model.safetensors")]
        elif os.path.isfile(os.path.join(hf_dir, "pytorch_model.bin")):
            shards = [os.path.join(hf_dir, "pytorch_model.bin")]
        else:
            raise FileNotFoundError(f"{hf_dir} has no model.safetensors, sharded index or pytorch_model.bin")
        self.handles = {}
        for shard in shards:
            self.handles[shard] = self._open(shard)
            for name in self.handles[shard].keys():
                if not name.endswith(IGNORED_SUFFIXES):
                    self.files[canonical(name, family)] = (shard, name)

    @staticmethod
    def _open(path):
        if path.endswith(".bin"):
            try:
                return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # truncated zip, or a pickle that is not plain tensors
                raise ValueError(f"{path}: cannot load as weights-only torch file ({type(e).__name__})") from None
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: corrupt safetensors file ({e})") from None

    def get(self, name):
        shard, raw = self.files[name]
        handle = self.handles[shard]
        if isinstance(handle, dict):
            return handle[raw]
        try:
            return handle.get_tensor(raw)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{shard}: corrupt safetensors file, cannot read {raw} ({e})") from None

    def shape(self, name):
        shard, raw = self.files[name]
        handle = self.handles[shard]
        return tuple(handle[raw].shape) if isinstance(handle, dict) else tuple(handle.get_slice(raw).get_shape())


def check_tensors(ckpt, cfg):
    """Every expected tensor present with the right shape, and nothing unexpected."""
    expected = expected_hf_shapes(cfg)
    if cfg.tie_embeddings:
        ckpt.files.pop("lm_head.weight", None)  # a tied head is filled from the embedding
    missing = [n for n in expected if n not in ckpt.files]
    if missing:
        raise ValueError(f"checkpoint is missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(ckpt.files) - set(expected))
    if extra:
        raise ValueError(f"checkpoint has unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, shape in expected.items():
        if ckpt.shape(name) != shape:
            raise ValueError(f"tensor {name} has shape {list(ckpt.shape(name))}, expected {list(shape)}")


# ---- the two directions ----

def copy_files(src, dst, files=TOKENIZER_FILES):
    for f in files:
        if os.path.isfile(os.path.join(src, f)):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


def read_json(path):
    """A JSON object from `path`, or {} if there is no such file; ValueError (one line) if it is not one."""
    if not os.path.isfile(path):
        return {}
    try:
        value = json.load(open(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    return value


def from_hf(hf_dir, out, block_size=None):
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{hf_dir} has no config.json")
    generation = read_json(os.path.join(hf_dir, "generation_config.json"))
    try:
        cfg = config_from_hf(read_json(cfg_path), block_size, generation)
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing key {e.args[0]!r}") from None
    except ValueError as e:  # a value config_from_hf or Config.validate refuses
        raise ValueError(e if str(e).startswith(cfg_path) else f"{cfg_path}: {e}") from None
    ckpt = HFCheckpoint(hf_dir, cfg.family)
    check_tensors(ckpt, cfg)
    savedir.save_once(out, savedir.CONVERTED, lambda nxt: save_converted(ckpt, cfg, nxt) or copy_files(hf_dir, nxt),
                      inputs=[("source", hf_dir)])
    return cfg


def save_converted(ckpt, cfg, tmp):
    """Our weights from the transformers tensors of `ckpt` (checked by check_tensors), saved into tmp."""
    state = {}
    for name, hf_names in tqdm(our_to_hf_names(cfg).items(), desc="converting", leave=False):
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        t = torch.cat([ckpt.get(h) for h in hf_names]) if len(hf_names) > 1 else ckpt.get(hf_names[0])
        if cfg.family == "bloom" and ".wqkv." in name:
            t = bloom_qkv_to_ours(t, cfg)
        state[name] = t.contiguous()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_weights(state)  # validates names and shapes once more against the model
    model.save_pretrained(tmp)


# ---- GGUF (llama.cpp) ----

# GGUF metadata key (after "<arch>.") -> transformers config key (transformers' integrations/ggml.py)
GGUF_CONFIG = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
               "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
               "rope.dimension_count": "head_dim", "rope.freq_base": "rope_theta",
               "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
               "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size"}
GGUF_FAMILIES = {"llama": "llama"}  # GGUF architecture -> our family


def gguf_value(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, block_size=None):
    """A transformers config dict from GGUF metadata, then our Config (config_from_hf). End ids: eos, and
    llama.cpp's end-of-turn and end-of-message tokens where the file names them."""
    arch = gguf_value(reader, "general.architecture")
    if arch not in GGUF_FAMILIES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_FAMILIES)})")
    hf = {"model_type": GGUF_FAMILIES[arch], "rope_theta": 10000.0,
          "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors)}
    for key, name in GGUF_CONFIG.items():
        if f"{arch}.{key}" in reader.fields:
            hf[name] = gguf_value(reader, f"{arch}.{key}")
    hf.setdefault("vocab_size", len(reader.fields["tokenizer.ggml.tokens"].data))
    hf.setdefault("max_position_embeddings", block_size or 2048)
    scaling = gguf_value(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(f"GGUF rope scaling {scaling!r} (or a rope_freqs tensor) is not supported")
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": gguf_value(reader, f"{arch}.rope.scaling.factor")}
    hf["bos_token_id"] = gguf_value(reader, "tokenizer.ggml.bos_token_id", 1)
    hf["eos_token_id"] = end_ids(*(gguf_value(reader, f"tokenizer.ggml.{k}_token_id")
                                   for k in ("eos", "eot", "eom"))) or 2
    return config_from_hf(hf, block_size)


class GGUFCheckpoint:
    """The tensors of a GGUF file under transformers' names, dequantized to float32 by the `gguf` package,
    with llama.cpp's interleaving of query and key rows undone (transformers' LlamaTensorProcessor)."""

    def __init__(self, reader, cfg):
        import gguf
        arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items()
                    if name == gguf_value(reader, "general.architecture"))
        names = gguf.get_tensor_name_map(arch, cfg.n_layer)
        tensors = {t.name: t for t in reader.tensors}
        self.cfg, self.files = cfg, {}
        for hf_name in expected_hf_shapes(cfg):
            base, suffix = hf_name.rsplit(".", 1)
            gguf_name = f"{names.get_name(base)}.{suffix}"
            if gguf_name in tensors:
                self.files[hf_name] = tensors[gguf_name]

    def get(self, name):
        from gguf.quants import dequantize
        t = self.files[name]
        try:
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        except (NotImplementedError, ValueError) as e:
            raise ValueError(f"GGUF tensor {t.name}: cannot dequantize {t.tensor_type.name} ({e})") from None
        w = w.reshape(self.shape(name))
        heads = {".q_proj.": self.cfg.n_head, ".k_proj.": self.cfg.n_kv_head}
        for part, n_head in heads.items():
            if part in name:  # rows [h, d/2, 2] (llama.cpp interleaves the rotary halves) -> [h, 2, d/2]
                w = w.reshape(n_head, w.shape[0] // n_head // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        return w

    def shape(self, name):
        return tuple(int(n) for n in reversed(self.files[name].shape))  # GGUF lists dims innermost first


def read_gguf(path):
    try:
        import gguf
    except ImportError:
        raise ValueError("--from_gguf needs the package gguf: pip install gguf") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, struct.error, IndexError... for a damaged file
        raise ValueError(f"{path}: not a valid GGUF file ({type(e).__name__}: {str(e)[:120]})") from None


def gguf_tokenizer(path, tmp):
    """tokenizer.json, tokenizer_config.json and chat_template.jinja as transformers builds them from the
    file (from_pretrained(gguf_file=...)): vocabulary, merges, control tokens as special tokens, bos added
    or not (the post-processor), the chat template."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError("--from_gguf needs transformers for the tokenizer: pip install transformers") from None
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    tok.save_pretrained(tmp)
    for name in ("special_tokens_map.json",):  # what transformers 4 writes beside; the config holds it
        if os.path.isfile(os.path.join(tmp, name)):
            os.remove(os.path.join(tmp, name))


def from_gguf(path, out, block_size=None):
    reader = read_gguf(path)
    try:
        cfg = config_from_gguf(reader, block_size)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    ckpt = GGUFCheckpoint(reader, cfg)
    check_tensors(ckpt, cfg)
    savedir.save_once(out, savedir.CONVERTED, lambda nxt: save_converted(ckpt, cfg, nxt) or gguf_tokenizer(path, nxt))
    return cfg


def export_tokenizer(ckpt_dir, out, cfg):
    """Write the checkpoint's tokenizer (tokenizer.json, else tokenizer.model) as a transformers tokenizer that
    encodes as sample.py does (tokenizer.py: the same prefix, bos or none; a sentencepiece model's space prefix
    kept, as transformers' LlamaTokenizer keeps it), with the checkpoint's bos/eos tokens, special tokens and chat
    template, and generation_config.json with every end id (transformers' generate stops where sample.py does;
    ids of a padded vocabulary's rows past the tokenizer are suppressed, as sample.py never generates them). A
    sentencepiece model is converted by transformers (SpmConverter, which needs protobuf)."""
    try:
        from tokenizers.processors import TemplateProcessing
        from transformers import GenerationConfig, PreTrainedTokenizerFast
    except ImportError:
        raise ValueError("--to_hf needs transformers: pip install transformers") from None
    backend = tok = None
    if any(os.path.isfile(os.path.join(ckpt_dir, f)) for f in ("tokenizer.model", "tokenizer.json")):
        tok = load_tokenizer(ckpt_dir, cfg.bos_id, cfg.eos_id)
        backend = PreTrainedTokenizerFast.from_pretrained(ckpt_dir).backend_tokenizer
        if tok.sp is not None and dummy_prefix(tok.sp):
            keep_space_prefix(backend)
    padding = list(range(backend.get_vocab_size(), cfg.vocab_size)) if backend else []  # never generated
    GenerationConfig(bos_token_id=cfg.bos_id, eos_token_id=eos_token_id(cfg),
                     suppress_tokens=padding or None).save_pretrained(out)
    if backend is None:
        return
    bos, eos = backend.id_to_token(cfg.bos_id), backend.id_to_token(cfg.eos_id)
    if bos is None or eos is None:
        raise ValueError(f"the tokenizer in {ckpt_dir} has no token for bos id {cfg.bos_id} or eos id {cfg.eos_id}")
    prefix = [(backend.id_to_token(i), i) for i in tok.prefix]
    first = "".join(f"{t} " for t, _ in prefix)
    backend.post_processor = TemplateProcessing(single=f"{first}$A", pair=f"{first}$A {first}$B",
                                                special_tokens=sorted(set(prefix)))
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                            chat_template=tok.chat_template).save_pretrained(out)


def dummy_prefix(sp):
    """Whether a sentencepiece model puts a space before each text (add_dummy_prefix: Llama's do)."""
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return proto.normalizer_spec.add_dummy_prefix


def keep_space_prefix(backend):
    """transformers' generic sentencepiece conversion drops add_dummy_prefix; put it back as sentencepiece
    applies it, before every text (transformers' GGUF phi3_tokenizer does the same; LlamaTokenizer's Metaspace
    skips it on a text that starts with a space), and strip it again when decoding."""
    from tokenizers import decoders, normalizers
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])


def to_hf(ckpt_dir, out):
    model = Transformer.from_pretrained(ckpt_dir)
    cfg = model.cfg

    def write(nxt):
        state = {k: v.contiguous() for k, v in to_hf_tensors(model.state_dict(), cfg)}
        save_file(state, os.path.join(nxt, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(nxt, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg), f, indent=2)
        export_tokenizer(ckpt_dir, nxt, cfg)
    savedir.save_once(out, savedir.EXPORT, write, inputs=[("source", ckpt_dir)])


def main():
    parser = argparse.ArgumentParser(description="Convert checkpoints between transformers and nanoskip.")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from_hf", help="transformers checkpoint directory to import")
    direction.add_argument("--from_gguf", help="GGUF file (llama.cpp) to import")
    direction.add_argument("--to_hf", help="nanoskip checkpoint directory to export")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--block_size", type=int, default=None, help="context length (default: from the config)")
    args = parser.parse_args()
    if args.block_size is not None and args.block_size < 1:
        raise ValueError(f"--block_size {args.block_size}: must be >= 1")
    if args.from_hf or args.from_gguf:
        cfg = (from_hf(args.from_hf, args.out, args.block_size) if args.from_hf else
               from_gguf(args.from_gguf, args.out, args.block_size))
        print(f"wrote {args.out}: {cfg.family}, {cfg.n_layer} layers, d {cfg.n_embd}")
    else:
        to_hf(args.to_hf, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
