"""
Convert Hugging Face checkpoints to nanoskip checkpoint directories and back.

    python checkpoints_convert.py --from_hf HF_DIR --out DIR     # TinyLlama/Llama, Phi-3, OPT, Bloom/Bloomz
    python checkpoints_convert.py --to_hf DIR --out HF_DIR       # loads with transformers' AutoModelForCausalLM

Input: config.json with single or sharded safetensors (model.safetensors.index.json), or
pytorch_model.bin (loaded with weights_only=True). One name table per family maps our tensor names to
transformers'; a list means the transformers tensors are concatenated along dim 0 into ours. The
expected transformers names and shapes come from exporting an empty (meta-device) model, so import
and export share one table. Output goes to a temporary directory renamed into place at the end:
a failed conversion leaves nothing behind.
"""
import argparse
import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from configurator import run_main
from model import Config, Transformer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

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


def config_from_hf(hf, block_size=None):
    kind = hf.get("model_type")
    if kind not in NAME_MAPS:
        raise ValueError(f"unsupported model_type {kind!r} (supported: {', '.join(NAME_MAPS)})")
    for key in SIZE_KEYS:  # before any division by them
        if key in hf and not (isinstance(hf[key], int) and hf[key] >= 1):
            raise ValueError(f"{key}={hf[key]!r}: must be an integer >= 1")
    common = dict(vocab_size=hf["vocab_size"], family=kind, tie_embeddings=hf.get("tie_word_embeddings", kind in ("opt", "bloom")),
                  bos_id=first_id(hf.get("bos_token_id"), 1), eos_id=first_id(hf.get("eos_token_id"), 2))
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


def config_to_hf(cfg):
    common = {"model_type": cfg.family, "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": None, "torch_dtype": "float32"}
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

def prepare_out_dir(out):
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"output directory {out} exists and is not empty")
    tmp = f"{out.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def finish_out_dir(tmp, out, src, files=TOKENIZER_FILES):
    for f in files:
        if os.path.isfile(os.path.join(src, f)):
            shutil.copyfile(os.path.join(src, f), os.path.join(tmp, f))
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked before)
    os.replace(tmp, out)


def from_hf(hf_dir, out, block_size=None):
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{hf_dir} has no config.json")
    try:
        hf = json.load(open(cfg_path))
        if not isinstance(hf, dict):
            raise ValueError("must hold a JSON object")
        cfg = config_from_hf(hf, block_size)
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing key {e.args[0]!r}") from None
    except ValueError as e:  # bad JSON, or a value config_from_hf or Config.validate refuses
        raise ValueError(f"{cfg_path}: {e}") from None
    ckpt = HFCheckpoint(hf_dir, cfg.family)
    check_tensors(ckpt, cfg)
    tmp = prepare_out_dir(out)
    try:
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
        finish_out_dir(tmp, out, hf_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg


def export_tokenizer(ckpt_dir, out, cfg):
    """Write the checkpoint's tokenizer (tokenizer.model or tokenizer.json) as a transformers tokenizer whose
    special tokens are the checkpoint's bos/eos ids and which puts bos first, as train.py and sample.py encode,
    and generation_config.json with those ids (transformers' generate stops at eos as sample.py does; ids of a
    padded vocabulary's rows past the tokenizer are suppressed, as sample.py never generates them). A
    sentencepiece model is converted by transformers (SpmConverter, which needs protobuf)."""
    try:
        from tokenizers.processors import TemplateProcessing
        from transformers import GenerationConfig, PreTrainedTokenizerFast
    except ImportError:
        raise ValueError("--to_hf needs transformers: pip install transformers") from None
    backend = None
    if any(os.path.isfile(os.path.join(ckpt_dir, f)) for f in ("tokenizer.model", "tokenizer.json")):
        backend = PreTrainedTokenizerFast.from_pretrained(ckpt_dir).backend_tokenizer
    padding = list(range(backend.get_vocab_size(), cfg.vocab_size)) if backend else []  # never generated
    GenerationConfig(bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
                     suppress_tokens=padding or None).save_pretrained(out)
    if backend is None:
        return
    bos, eos = backend.id_to_token(cfg.bos_id), backend.id_to_token(cfg.eos_id)
    if bos is None or eos is None:
        raise ValueError(f"the tokenizer in {ckpt_dir} has no token for bos id {cfg.bos_id} or eos id {cfg.eos_id}")
    backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                special_tokens=[(bos, cfg.bos_id)])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos).save_pretrained(out)


def to_hf(ckpt_dir, out):
    model = Transformer.from_pretrained(ckpt_dir)
    cfg = model.cfg
    tmp = prepare_out_dir(out)
    try:
        state = {k: v.contiguous() for k, v in to_hf_tensors(model.state_dict(), cfg)}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg), f, indent=2)
        export_tokenizer(ckpt_dir, tmp, cfg)
        finish_out_dir(tmp, out, ckpt_dir, files=())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description="Convert checkpoints between transformers and nanoskip.")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from_hf", help="transformers checkpoint directory to import")
    direction.add_argument("--to_hf", help="nanoskip checkpoint directory to export")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--block_size", type=int, default=None, help="context length (default: from the config)")
    args = parser.parse_args()
    if args.block_size is not None and args.block_size < 1:
        raise ValueError(f"--block_size {args.block_size}: must be >= 1")
    if args.from_hf:
        cfg = from_hf(args.from_hf, args.out, args.block_size)
        print(f"wrote {args.out}: {cfg.family}, {cfg.n_layer} layers, d {cfg.n_embd}")
    else:
        to_hf(args.to_hf, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
