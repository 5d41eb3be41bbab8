import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model import PRESETS, KVCache, Transformer

TOL = dict(rtol=0, atol=1e-5)  # fp32


def tiny(**overrides):
    torch.manual_seed(0)
    return Transformer(replace(PRESETS["test-tiny"], **overrides)).eval()


def tokens(B=3, T=12, V=256, seed=1):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_tinyllama_preset_shape():
    cfg = PRESETS["tinyllama-1.1b"]
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (22, 2048, 32, 4, 64)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.block_size) == (5632, 32000, 2048)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (10000.0, 1e-5, False)
    with torch.device("meta"):
        n = Transformer(cfg).num_params()
    assert abs(n - 1_100_048_384) < 1e3  # TinyLlama-1.1B parameter count


@torch.no_grad()
def test_skipped_layer_is_identity_and_other_rows_unchanged():
    model = tiny()
    x = torch.randn(3, 10, 64)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = True  # row 0 skips layer 1
    out = model.run_layers(x, 1, 2, skip_mask=mask)
    full = model.run_layers(x, 1, 2)
    assert torch.equal(out[0], x[0])                   # exactly the identity
    torch.testing.assert_close(out[1:], full[1:], **TOL)
    assert not torch.allclose(full[0], x[0])           # the layer does change row 0 when run


@torch.no_grad()
def test_per_row_mask_equals_running_each_row_alone():
    model = tiny()
    idx = tokens()
    mask = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    batched = model(idx, skip_mask=mask)
    for b in range(3):
        alone = model(idx[b:b + 1], skip_mask=mask[b])  # [L] mask: whole (one-row) batch
        torch.testing.assert_close(batched[b:b + 1], alone, **TOL)


@torch.no_grad()
def test_skipping_rows_do_not_reach_the_block():
    model = tiny()
    seen = []
    for l, block in enumerate(model.layers):
        block.register_forward_hook(lambda m, args, out, l=l: seen.append((l, args[0].shape[0])))
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    model(tokens(), skip_mask=mask)
    assert seen == [(0, 3), (1, 1), (3, 3)]  # layer 2 skipped by everyone never runs


@torch.no_grad()
def test_per_token_skipping_keeps_skipping_tokens_and_their_keys():
    """A token that skips keeps its residual exactly; a running token gets exactly the full block's
    output, because the skipping tokens' keys and values are still computed for it to attend to."""
    model = tiny()
    x = torch.randn(2, 10, 64)
    mask = torch.zeros(2, 10, 4, dtype=torch.bool)
    mask[0, 3:7, 1] = True
    mask[1, 1::2, 1] = True
    out, full = model.run_layers(x, 1, 2, skip_mask=mask), model.run_layers(x, 1, 2)
    skip = mask[..., 1]
    assert torch.equal(out[skip], x[skip])
    torch.testing.assert_close(out[~skip], full[~skip], **TOL)
    # a mask constant over the tokens of each row is per-sample skipping
    rows = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    idx = tokens(B=2)
    torch.testing.assert_close(model(idx, skip_mask=rows[:, None].expand(2, 12, 4)), model(idx, skip_mask=rows), **TOL)


@pytest.mark.parametrize("kw", [dict(), dict(norm_position="post", norm="layernorm", bias=True, mlp="relu",
                                                pos_emb="learned", pos_offset=2)])
@torch.no_grad()
def test_per_token_skipping_decodes_like_the_full_forward(kw):
    """Token-by-token decoding with per-token masks (skipping rows write only K/V) equals one forward
    over the whole sequence with the same [B, T, L] mask."""
    model = tiny(**kw)
    idx = tokens(B=3, T=14)
    mask = torch.rand(3, 14, 4, generator=torch.Generator().manual_seed(5)) < 0.5
    mask[:, :4] = False  # a prompt through every layer, then random per-token skipping
    full = model(idx, skip_mask=mask)
    cache = KVCache(model.cfg, 3, 14)
    pieces = [model(idx[:, :4], skip_mask=mask[:, :4], cache=cache)]
    for t in range(4, 14):
        pieces.append(model(idx[:, t:t + 1], skip_mask=mask[:, t:t + 1], cache=cache, pos=t))
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5


@torch.no_grad()
def test_exit_layer_logits():
    model = tiny()
    idx = tokens()
    torch.testing.assert_close(model(idx, exit_layer=4), model(idx), rtol=0, atol=0)
    x = model.run_layers(model.embed(idx), 0, 2)
    torch.testing.assert_close(model(idx, exit_layer=2), model.head(x), rtol=0, atol=0)
    for bad in (0, 5, -1, 2.0):
        with pytest.raises(ValueError, match="exit_layer"):
            model(idx, exit_layer=bad)


def test_exit_losses_match_cross_entropy_of_exit_logits():
    model = tiny()
    idx, targets = tokens(), tokens(seed=2)
    targets[0, :5] = -100
    loss, per_exit = model(idx, targets, exits={1: 0.25, 3: 0.25, 4: 0.5})
    expected = {}
    for e in (1, 3, 4):
        logits = model(idx, exit_layer=e)
        expected[e] = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        torch.testing.assert_close(per_exit[e], expected[e].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, 0.25 * expected[1] + 0.25 * expected[3] + 0.5 * expected[4],
                               rtol=1e-5, atol=1e-6)
    loss.backward()  # every exit trains through the one shared head
    assert model.lm_head.weight.grad.abs().sum() > 0 and model.layers[0].attn.wqkv.weight.grad is not None


@pytest.mark.parametrize("exit_layer, skip", [(None, None), (2, None), (None, [False, True, False, True])])
@torch.no_grad()
def test_kv_cache_matches_full_forward(exit_layer, skip):
    model = tiny()
    idx = tokens(B=2, T=16)
    full = model(idx, exit_layer=exit_layer, skip_mask=skip)
    cache = KVCache(model.cfg, 2, 20)
    pieces, pos = [], 0
    for n in (5, 1, 1, 3, 1, 4, 1):  # prefill, single tokens, and multi-token chunks after a prefix
        pieces.append(model(idx[:, pos:pos + n], exit_layer=exit_layer, skip_mask=skip, cache=cache, pos=pos))
        pos += n
    incremental = torch.cat(pieces, dim=1)
    assert (incremental - full).abs().max() <= 1e-5


@torch.no_grad()
def test_gqa_and_tied_head_round_trip(tmp_path):
    for kw in (dict(n_kv_head=1), dict(n_kv_head=4, tie_embeddings=True)):
        model = tiny(**kw)
        model.save_pretrained(tmp_path / "m")
        loaded = Transformer.from_pretrained(tmp_path / "m")
        idx = tokens()
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
        if kw.get("tie_embeddings"):
            assert loaded.lm_head.weight is loaded.tok_emb.weight
    assert not [f for f in os.listdir(tmp_path / "m") if ".tmp" in f]


def test_from_pretrained_errors(tmp_path):
    model = tiny()
    good = tmp_path / "good"
    model.save_pretrained(good)
    state = load_file(good / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path / "nothing")

    def broken(name, tensors=None, raw=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((good / "config.json").read_text())
        if raw is not None:
            (d / "model.safetensors").write_bytes(raw)
        else:
            save_file(tensors, d / "model.safetensors")
        return d

    missing = {k: v for k, v in state.items() if k != "layers.1.mlp.w_down.weight"}
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.w_down.weight"):
        Transformer.from_pretrained(broken("missing", missing))
    wrong = dict(state, **{"norm.weight": torch.ones(65)})
    with pytest.raises(ValueError, match=r"norm.weight has shape \[65\], expected \[64\]"):
        Transformer.from_pretrained(broken("wrong", wrong))
    extra = dict(state, bogus=torch.ones(1))
    with pytest.raises(ValueError, match="unexpected.*bogus"):
        Transformer.from_pretrained(broken("extra", extra))
    truncated = (good / "model.safetensors").read_bytes()[:1000]
    with pytest.raises(ValueError, match="corrupt"):
        Transformer.from_pretrained(broken("truncated", raw=truncated))
    bad_cfg = tmp_path / "badcfg"
    bad_cfg.mkdir()
    (bad_cfg / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    (bad_cfg / "config.json").write_text('{"n_layers": 4}')
    with pytest.raises(ValueError, match="n_layers"):
        Transformer.from_pretrained(bad_cfg)
