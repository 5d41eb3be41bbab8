"""RoPE scaling that depends on the length (dynamic NTK, LongRoPE) follows each sequence's own length, with a
KV cache, in a batch, and keyed on the checkpoint's own max_position_embeddings, not the context we allow.

Reference: transformers on tiny random models (fp32, eager attention); logits to 1e-4, greedy tokens exactly.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from checkpoints_convert import from_hf  # noqa: E402
from generate import generate  # noqa: E402
from model import KVCache, Transformer, layer_mask  # noqa: E402
from speculate import generate_speculative  # noqa: E402
from test_convert import ATOL, V, hf_config, prompt  # noqa: E402


def dynamic_llama():
    return transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32,
                                    bos_token_id=1, eos_token_id=2,
                                    rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})


def converted(name, d, block_size=None, scale=1.0):
    """(transformers model, ours) for test_convert's config `name` (or a config), weights x scale."""
    torch.manual_seed(0)
    cfg = hf_config(name) if isinstance(name, str) else name
    cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" not in n:
                p.mul_(scale)
    hf.save_pretrained(d / "hf")
    from_hf(str(d / "hf"), str(d / "ours"), block_size)
    return hf, Transformer.from_pretrained(d / "ours")


def hf_greedy(hf, idx, n):
    return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0)


@torch.no_grad()
@pytest.mark.parametrize("name, T", [(dynamic_llama(), 48), ("phi3_longrope", 20), ("phi3_longrope", 40)])
def test_scaling_keyed_on_the_checkpoints_length_not_block_size(tmp_path, name, T):
    """Converted with --block_size 64: dynamic NTK grows theta past the checkpoint's 32 positions, and
    LongRoPE's attention factor is sqrt(1 + ln(128/32)/ln 32) = 1.183 (64/32 would give 1.095)."""
    hf, ours = converted(name, tmp_path, block_size=64)
    assert ours.cfg.block_size == 64
    idx = prompt(T=T)
    assert (ours(idx) - hf(idx).logits).abs().max().item() <= ATOL


@torch.no_grad()
def test_longrope_decode_across_the_switch_equals_transformers(tmp_path):
    """A 30-token prompt and 6 greedy tokens cross original_max_position_embeddings (32) at the third; weights
    x8 as in the issue, so that keys left from the short factors change the tokens. transformers' Phi-3
    recomputes its cache at the switch; so do we."""
    hf, ours = converted("phi3_longrope", tmp_path, scale=8.0)
    idx = prompt(T=30, B=1)
    theirs = hf_greedy(hf, idx, 6)
    assert generate(ours, idx, 6, temperature=0, stop_at_eos=False).tolist() == theirs.tolist()
    # with a skip plan (generated tokens skip layer 1), the recomputed cache keeps the plan: the tokens equal
    # a cache-free forward whose generated tokens skip layer 1
    plan = layer_mask([1], 3)
    seq = idx
    for _ in range(6):
        skip = (torch.arange(seq.shape[1]) >= 30)[None, :, None] & plan  # [1, T, L]
        seq = torch.cat([seq, ours(seq, skip_mask=skip)[:, -1].argmax(-1, keepdim=True)], 1)
    assert generate(ours, idx, 6, skip_mask=plan, temperature=0, stop_at_eos=False).tolist() == seq.tolist()


@torch.no_grad()
@pytest.mark.parametrize("name, lengths", [("phi3_longrope", (20, 36, 31)), (dynamic_llama(), (20, 40, 31))])
def test_batch_rows_follow_their_own_length(tmp_path, name, lengths):
    """Prompts of different lengths decoded as one batch: each row equals transformers' greedy generate of
    that prompt alone (the 31-token prompt crosses LongRoPE's switch while decoding; the others stay short or long)."""
    hf, ours = converted(name, tmp_path, block_size=64, scale=4.0)
    prompts = [prompt(T=n, B=1, seed=n)[0] for n in lengths]
    idx = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
    out = generate(ours, idx, 8, prompt_lens=torch.tensor(lengths), temperature=0, stop_at_eos=False)
    for row, p in zip(out, prompts):
        assert row[:len(p) + 8].tolist() == hf_greedy(hf, p[None], 8)[0].tolist()


@torch.no_grad()
def test_longrope_self_speculation_across_the_switch(tmp_path):
    """Greedy self-speculation equals transformers' greedy generate across the switch, batch 1 and batched
    (no round straddles the switch: the cache is recomputed between rounds); sampling runs through it too."""
    hf, ours = converted("phi3_longrope", tmp_path, scale=8.0)
    lengths = (29, 36)
    prompts = [prompt(T=n, B=1, seed=n)[0] for n in lengths]
    idx = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
    out, _ = generate_speculative(ours, idx, 10, 1, 3, prompt_lens=torch.tensor(lengths), temperature=0, stop_at_eos=False)
    for row, p in zip(out, prompts):
        expected = hf_greedy(hf, p[None], 10)[0].tolist()
        assert row[:len(p) + 10].tolist() == expected
        assert generate_speculative(ours, p[None], 10, 2, 4, temperature=0, stop_at_eos=False)[0][0].tolist() == expected
    sampled, stats = generate_speculative(ours, idx, 10, 1, 3, prompt_lens=torch.tensor(lengths), temperature=1.0, stop_at_eos=False,
                                          generator=torch.Generator().manual_seed(0))
    assert sampled.shape == out.shape and stats["drafted"] > 0


@torch.no_grad()
def test_longrope_logits_at_every_decode_step_equal_transformers(tmp_path, monkeypatch):
    """A 20-token prompt decoded 16 steps, past original_max_position_embeddings (32) at step 13: the logits of
    every step, the one that crosses the switch included, within 1e-4 of transformers' generate, both through
    forward() with a KVCache (the cache remembers its tokens and is recomputed at the switch) and through
    generate (refill). Without the recompute the crossing step differs by 5.8e-3."""
    hf, ours = converted("phi3_longrope", tmp_path)
    idx, n = prompt(T=20, B=1), 16
    res = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    theirs, seq = torch.cat(res.logits), res.sequences                      # [n, V], [1, 20 + n]
    cache = KVCache(ours.cfg, 1, 64)
    stepped = [ours(idx, cache=cache)[:, -1]]
    stepped += [ours(seq[:, 19 + i:20 + i], cache=cache, pos=19 + i)[:, -1] for i in range(1, n)]
    seen, head = [], ours.head
    monkeypatch.setattr(ours, "head", lambda x: seen.append(head(x)[:, -1]) or head(x))
    assert generate(ours, idx, n, temperature=0, stop_at_eos=False).tolist() == seq.tolist()
    for mine in (torch.cat(stepped), torch.cat(seen)):
        assert (mine - theirs).abs().amax(-1).max().item() <= ATOL, (mine - theirs).abs().amax(-1)
