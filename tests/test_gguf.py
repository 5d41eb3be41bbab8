"""--from_gguf on a tiny Llama written as llama.cpp writes it (query/key rows permuted, every tensor type
the `gguf` package reads: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants), against
transformers' own GGUF loading of the same file (from_pretrained(gguf_file=...)): logits within 1e-4
(fp32), the tokenizer's ids, special tokens and chat template. Bad files are one line each."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers' GGUF loading needs it

from checkpoints_convert import from_gguf  # noqa: E402
from conftest import assert_one_line_error, run_entry  # noqa: E402
from model import Transformer  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
# K-quant blocks: (bytes, byte offsets of their float16 scales), llama.cpp's ggml-common.h layouts
K_BLOCKS = {Q.Q2_K: (84, (80, 82)), Q.Q3_K: (110, (108,)), Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)),
            Q.Q6_K: (210, (208,))}
TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, *K_BLOCKS]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def quantized(w, qtype, rng):
    """w [rows, cols] float32 -> the bytes GGUF stores for it; K-quants are random blocks with small scales
    (the `gguf` package dequantizes them but cannot quantize)."""
    if qtype in K_BLOCKS:
        size, scales = K_BLOCKS[qtype]
        blocks = rng.integers(0, 256, (w.shape[0], w.shape[1] // 256, size), dtype=np.uint8)
        for at in scales:
            blocks[..., at:at + 2] = rng.uniform(0.001, 0.01, blocks.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
        return blocks.reshape(w.shape[0], -1)
    return gguf.quants.quantize(w, qtype)


def permuted(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py permute: rotary halves interleaved, [h, 2, d/2] -> [h, d/2, 2]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, -1).swapaxes(1, 2).reshape(w.shape)


def byte_level_vocab():
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = sorted(ByteLevel.alphabet(), key=lambda c: ord(c))
    pairs = [(a, b) for a in "etaoinsr" for b in "etaoinsr"][:61]
    return alphabet + [a + b for a, b in pairs] + SPECIALS, [f"{a} {b}" for a, b in pairs]


def write_tiny_gguf(path, seed=0):
    """A 2-layer Llama (d 256, 4 heads, 2 KV heads, vocab 320) with a byte-level BPE tokenizer, ChatML; each
    linear weight stored in another type. -> the transformers config it was made from."""
    tokens, merges = byte_level_vocab()
    cfg = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=256, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    state = transformers.LlamaForCausalLM(cfg).state_dict()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(128), w.add_embedding_length(256), w.add_feed_forward_length(256)
    w.add_head_count(4), w.add_head_count_kv(2), w.add_rope_dimension_count(64), w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6), w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2"), w.add_token_list(tokens), w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(tokens.index("<|im_start|>")), w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False), w.add_chat_template(CHATML)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    kinds = iter(TYPES * 3)
    for name, t in state.items():
        base, suffix = name.rsplit(".", 1)
        t = t.float().numpy()
        t = permuted(t, 4) if "q_proj" in name else permuted(t, 2) if "k_proj" in name else t
        qtype = Q.F32 if t.ndim == 1 else next(kinds)
        data = t if qtype == Q.F32 else quantized(t, qtype, rng)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", data, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(d / "tiny.gguf")
    from_gguf(str(d / "tiny.gguf"), str(d / "ours"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    return d, hf, transformers.AutoTokenizer.from_pretrained(d, gguf_file="tiny.gguf")


@torch.no_grad()
def test_every_tensor_type_converts_to_transformers_logits(tiny):
    d, hf, _ = tiny
    types = {t.tensor_type for t in gguf.GGUFReader(str(d / "tiny.gguf")).tensors}
    assert set(TYPES) | {Q.F32} <= types
    ours = Transformer.from_pretrained(str(d / "ours")).eval()
    idx = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    assert not ours.cfg.tie_embeddings and (ours.cfg.bos_id, ours.cfg.eos_id) == (318, 319)


def test_tokenizer_ids_special_tokens_and_chat_template_as_transformers(tiny):
    d, _, theirs = tiny
    tok = load_tokenizer(str(d / "ours"), 318, 319)
    text = "<|im_start|>user\nsee a tree<|im_end|>\n"
    assert tok.encode_prompt(text) == theirs(text).input_ids and tok.encode(text)[0] == 318
    chat = [{"role": "user", "content": "eat a tart"}]
    assert tok.chat_prompt(chat) == theirs.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert tok.chat_end_id() == 319 and tok.vocab_size() == 320


@pytest.mark.parametrize("content, words", [
    (b"GGUF\x03\x00\x00\x00garbage", ["not a valid GGUF file"]),
    (b"not a gguf file at all", ["not a valid GGUF file"]),
])
def test_bad_gguf_files_are_one_line(tmp_path, content, words):
    (tmp_path / "bad.gguf").write_bytes(content)
    proc = run_entry("checkpoints_convert.py", "--from_gguf", tmp_path / "bad.gguf", "--out", tmp_path / "out")
    assert_one_line_error(proc, *words)
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_one_line(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    proc = run_entry("checkpoints_convert.py", "--from_gguf", tmp_path / "gpt2.gguf", "--out", tmp_path / "out")
    assert_one_line_error(proc, "architecture 'gpt2'", "llama")
