"""Converted checkpoints reproduce transformers' logits; the converter's errors are one line each.

Reference: tiny random transformers models built from a config (no download), fp32, eager attention.
Tolerance: max abs logit difference <= 1e-4.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from checkpoints_convert import from_hf, to_hf  # noqa: E402
from conftest import assert_one_line_error, run_entry, run_script  # noqa: E402
from generate import generate  # noqa: E402
from model import KVCache, Transformer  # noqa: E402
from speculate import generate_speculative  # noqa: E402

V = 128
ATOL = 1e-4


def hf_config(name):
    C = transformers
    small = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, bos_token_id=1, eos_token_id=2)
    if name == "llama_gqa":
        return C.LlamaConfig(**small, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
                             max_position_embeddings=128)
    if name == "llama3_rope":
        return C.LlamaConfig(**small, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
                             max_position_embeddings=128, rope_parameters={
                                 "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if name == "phi3":
        return C.Phi3Config(**small, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=128, sliding_window=24, pad_token_id=0)
    if name == "phi3_longrope":
        hd2 = 64 // 4 // 2
        return C.Phi3Config(**small, intermediate_size=96, num_attention_heads=4, max_position_embeddings=128,
                            original_max_position_embeddings=32, pad_token_id=0, rope_parameters={
                                "rope_type": "longrope", "rope_theta": 10000.0,
                                "short_factor": [1.0 + 0.1 * i for i in range(hd2)],
                                "long_factor": [1.5 + 0.5 * i for i in range(hd2)]})
    if name == "opt":
        return C.OPTConfig(**small, ffn_dim=128, num_attention_heads=4, max_position_embeddings=128,
                           word_embed_proj_dim=64, do_layer_norm_before=True, pad_token_id=1)
    if name == "opt_350m":
        return C.OPTConfig(**small, ffn_dim=128, num_attention_heads=4, max_position_embeddings=128,
                           word_embed_proj_dim=32, do_layer_norm_before=False, pad_token_id=1)
    if name in ("bloom_pow2", "bloom_6heads"):
        return C.BloomConfig(vocab_size=V, hidden_size=48, n_layer=3, n_head=4 if name == "bloom_pow2" else 6,
                             bos_token_id=1, eos_token_id=2)
    raise KeyError(name)


FAMILIES = ["llama_gqa", "llama3_rope", "phi3", "phi3_longrope", "opt", "opt_350m", "bloom_pow2", "bloom_6heads"]


def make_hf(name, path, seed=0):
    torch.manual_seed(seed)
    cfg = hf_config(name)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random biases and norm weights, so their mapping is exercised
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def prompt(T=40, B=2, seed=3):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, d / "hf")
    from_hf(str(d / "hf"), str(d / "ours"))
    return request.param, hf, Transformer.from_pretrained(d / "ours"), d


@torch.no_grad()
def test_logits_match_transformers(converted):
    name, hf, ours, _ = converted
    idx = prompt()  # 40 tokens: past phi3_longrope's original 32 (long factors), past phi3's window of 24
    diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= ATOL, f"{name}: max abs diff {diff}"
    if name == "phi3_longrope":  # a short prompt uses the short factors, and still matches
        short = idx[:, :20]
        assert (ours(short) - hf(short).logits).abs().max().item() <= ATOL


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(converted):
    name, _, ours, _ = converted
    idx = prompt(T=40)
    full = ours(idx)
    cache = KVCache(ours.cfg, 2, 40)
    steps = [ours(idx[:, :34], cache=cache, pos=0)]
    steps += [ours(idx[:, p:p + 1], cache=cache, pos=p) for p in range(34, 40)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_greedy_generation_matches_transformers(converted):
    name, hf, ours, _ = converted
    idx = prompt(T=36 if name == "phi3_longrope" else 12, B=1)  # LongRoPE: stay in the long regime throughout
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    mine = generate(ours, idx, 20, temperature=0)
    assert theirs.shape[1] == idx.shape[1] + 20
    assert mine.tolist() == theirs.tolist(), name


@torch.no_grad()
def test_round_trip_to_transformers(converted):
    name, hf, ours, d = converted
    out = d / "back"
    to_hf(str(d / "ours"), str(out))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    idx = prompt()
    assert (back(idx).logits - hf(idx).logits).abs().max().item() <= ATOL


def test_sharded_and_bin_inputs_convert_identically(tmp_path):
    make_hf("llama_gqa", tmp_path / "single")
    state = load_file(tmp_path / "single" / "model.safetensors")
    config = (tmp_path / "single" / "config.json").read_text()
    names = sorted(state)
    sharded, binary = tmp_path / "sharded", tmp_path / "bin"
    for d in (sharded, binary):
        d.mkdir()
        (d / "config.json").write_text(config)
    weight_map = {}
    for k, chunk in enumerate((names[:7], names[7:20], names[20:])):
        save_file({n: state[n] for n in chunk}, sharded / f"model-{k + 1:05d}-of-00003.safetensors")
        weight_map.update({n: f"model-{k + 1:05d}-of-00003.safetensors" for n in chunk})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.save(state, binary / "pytorch_model.bin")
    results = []
    for src in ("single", "sharded", "bin"):
        from_hf(str(tmp_path / src), str(tmp_path / f"out_{src}"))
        results.append(load_file(tmp_path / f"out_{src}" / "model.safetensors"))
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        assert all(torch.equal(other[k], results[0][k]) for k in other)


@pytest.fixture
def hf_dir(tmp_path):
    make_hf("llama_gqa", tmp_path / "hf")
    return tmp_path / "hf"


def rewrite(hf_dir, change):
    state = load_file(hf_dir / "model.safetensors")
    change(state)
    save_file(state, hf_dir / "model.safetensors")


def convert_cli(src, out):
    return run_entry("checkpoints_convert.py", "--from_hf", str(src), "--out", str(out))


def test_error_unknown_model_type(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    assert_one_line_error(convert_cli(hf_dir, tmp_path / "out"), "model_type", "gpt2")
    assert not (tmp_path / "out").exists()


def test_error_missing_tensor(hf_dir, tmp_path):
    rewrite(hf_dir, lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"))
    assert_one_line_error(convert_cli(hf_dir, tmp_path / "out"), "missing", "model.layers.1.self_attn.k_proj.weight")
    assert not (tmp_path / "out").exists()


def test_error_wrong_shape(hf_dir, tmp_path):
    rewrite(hf_dir, lambda s: s.update({"model.norm.weight": torch.ones(63)}))
    assert_one_line_error(convert_cli(hf_dir, tmp_path / "out"), "model.norm.weight", "[63]", "[64]")
    assert not (tmp_path / "out").exists()


def test_error_extra_tensor(hf_dir, tmp_path):
    rewrite(hf_dir, lambda s: s.update({"model.layers.9.mystery": torch.ones(2)}))
    assert_one_line_error(convert_cli(hf_dir, tmp_path / "out"), "unexpected", "model.layers.9.mystery")


def test_error_truncated_safetensors(hf_dir, tmp_path):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(convert_cli(hf_dir, tmp_path / "out"), "corrupt", "model.safetensors")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp*"))


def test_error_index_with_missing_shard(hf_dir, tmp_path):
    state = load_file(hf_dir / "model.safetensors")
    os.remove(hf_dir / "model.safetensors")
    save_file(state, hf_dir / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in state}}
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(convert_cli(hf_dir, tmp_path / "out"), "missing shard", "model-00002-of-00002")


def test_cli_round_trip(hf_dir, tmp_path):
    proc = run_script("checkpoints_convert.py", "--from_hf", str(hf_dir), "--out", str(tmp_path / "ours"))
    assert proc.returncode == 0, proc.stderr
    proc = run_script("checkpoints_convert.py", "--to_hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "back" / "model.safetensors").exists()


def test_sample_reads_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    make_hf("opt", tmp_path / "hf")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    assert (tmp_path / "ours" / "tokenizer.json").exists()
    proc = run_script("sample.py", f"--out_dir={tmp_path / 'ours'}", "--prompt=w5 w7", "--max_new_tokens=5",
                      "--temperature=0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[1].startswith("w5 w7")


@pytest.mark.parametrize("name", ["llama_gqa", "phi3"])
@torch.no_grad()
def test_eos_ends_rows_as_in_transformers(name, tmp_path):
    """The eos id is the third token greedy decoding produces: transformers' greedy generate returns 3 new tokens
    and stops; ours too, then eos padding, batched with a row that does not stop, and inside a speculation round
    (E=1, d=4): layers after the first write nothing to the residual stream, so every draft is accepted."""
    hf = make_hf(name, tmp_path / "hf")
    for n, p in hf.named_parameters():  # zero each later layer's attention and MLP output projections
        if any(f"layers.{i}." in n for i in range(1, 3)) and any(k in n for k in ("o_proj", "down_proj", "out_proj", "fc2")):
            p.zero_()
    hf.save_pretrained(tmp_path / "hf")
    from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    ours = Transformer.from_pretrained(tmp_path / "ours")
    for seed in range(20):  # row 0's first 3 new tokens differ, and row 1 never makes row 0's third
        idx = prompt(T=8, B=2, seed=seed)
        free = hf.generate(idx, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 8:].tolist()
        if len(set(free[0][:3])) == 3 and free[0][2] not in free[1]:
            break
    else:
        raise AssertionError("no prompt whose greedy continuation suits the test")
    eos = free[0][2]
    ours.cfg.eos_id = eos
    theirs = hf.generate(idx, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert theirs.shape == (2, 8 + 12) and theirs[0, 8 + 3:].eq(eos).all()
    alone = hf.generate(idx[:1], max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert alone.shape == (1, 8 + 3)
    assert generate(ours, idx[:1], 12, temperature=0).tolist() == theirs[:1].tolist()
    assert generate(ours, idx, 12, temperature=0).tolist() == theirs.tolist()
    for rows in (idx[:1], idx):
        out, stats = generate_speculative(ours, rows, 12, 1, 4)
        assert out.tolist() == theirs[:len(rows)].tolist()
        assert stats["accepted"] == stats["drafted"]  # the eos came inside an accepted run of drafts


def test_export_of_a_fine_tuned_tokenizer_json_checkpoint_keeps_its_special_tokens(tmp_path, monkeypatch):
    """A tiny OPT with a byte-level tokenizer.json (384 tokens, OPT's <s> <pad> </s> <unk>; bos = eos = </s> = 2),
    converted, fine-tuned by train.py (only tokenizer.json travels), exported: AutoTokenizer has the checkpoint's
    special tokens and ids, puts bos first as the tokenizer's post-processor (OPT's) and sample.py do, and greedy
    generate equals ours."""
    tokenizers = pytest.importorskip("tokenizers")
    import train
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([open(transformers.__file__).read()] * 2, tokenizers.trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() == 384
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    cfg = transformers.OPTConfig(vocab_size=384, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                 max_position_embeddings=512, word_embed_proj_dim=64, bos_token_id=2, eos_token_id=2,
                                 pad_token_id=1)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    record = {"instruction": "Say hi.", "output": "hi"}
    (tmp_path / "data").mkdir()
    for split in ("train", "val"):
        (tmp_path / "data" / f"{split}.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.setattr("sys.argv", ["train.py", f"--init_from={tmp_path / 'ours'}", "--dataset=instruct",
                                     f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'tuned'}",
                                     "--max_steps=2", "--eval_interval=2", "--eval_batches=1", "--micro_batch=1",
                                     "--block_size=256", "--device=cpu"])
    train.main()
    to_hf(str(tmp_path / "tuned"), str(tmp_path / "back"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert (theirs.bos_token, theirs.eos_token, theirs.bos_token_id, theirs.eos_token_id) == ("</s>", "</s>", 2, 2)
    text = "def f(x):\n    return x"
    assert theirs(text).input_ids == [2] + tok.encode(text, add_special_tokens=False).ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.tensor([theirs(text).input_ids])
    out = hf.generate(ids, max_new_tokens=20, do_sample=False)
    ours = generate(Transformer.from_pretrained(tmp_path / "tuned"), ids, 20, temperature=0)
    assert out.tolist() == ours[:, :out.shape[1]].tolist() and (ours[:, out.shape[1]:] == 2).all()


def test_the_converter_saves_one_unit_and_replaces_only_its_own(hf_dir, tmp_path):
    """--from_hf and --to_hf write one unit each through savedir (a manifest that from_pretrained verifies);
    a directory holding something else, or the source itself, is refused in one line and left as it was."""
    import savedir
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert convert_cli(hf_dir, ours).returncode == 0
    assert savedir.kind_of(savedir.read_manifest(str(ours))) == savedir.CONVERTED
    assert convert_cli(hf_dir, ours).returncode == 0  # a converted checkpoint may replace its like
    proc = run_entry("checkpoints_convert.py", "--to_hf", str(ours), "--out", str(back))
    assert proc.returncode == 0, proc.stderr
    assert savedir.kind_of(savedir.read_manifest(str(back))) == savedir.EXPORT
    (ours / "config.json").write_text((ours / "config.json").read_text().replace('"n_layer"', ' "n_layer"'))
    assert_one_line_error(run_entry("sample.py", f"--out_dir={ours}", "--max_new_tokens=1"), "config.json")
    before = sorted(os.listdir(back))
    assert_one_line_error(convert_cli(hf_dir, back), "transformers export")  # another kind of unit
    assert_one_line_error(convert_cli(hf_dir, hf_dir), "source")  # its own input
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert_one_line_error(convert_cli(hf_dir, tmp_path / "notes"), "no saved unit owns")
    assert sorted(os.listdir(back)) == before and (tmp_path / "notes" / "todo.txt").read_text() == "mine"
