"""Decoding on the CPU: one copy of the weights, a model that trains after it as if it never
decoded, and the opt-in oneDNN-packed layout (fused/decode_layout.py)."""

import copy
import ctypes

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from fused import decode_layout
from fused.decode_layout import PackedLinear, pack, unpack
from generate import GRAPHS_PER_FUNCTION, generate
from model import Config, Transformer
from speculate import generate_speculative
from test_model import TOL, tiny, tokens



def resident_mib():
    """The resident set in MiB, freed heap memory given back to the system first (malloc_trim)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def adamw_step(model, x, y):
    """One AdamW step -> (loss, {name: weight after the step})."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss, _ = model(x, y)
    loss.backward()
    opt.step()
    return loss.item(), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("decode", ["generate", "generate_speculative", "inference_mode forward"])
def test_a_model_trains_after_decoding_as_if_it_never_decoded(decode):
    """generate, generate_speculative or a bare forward under torch.inference_mode, then one AdamW
    step: the step's loss and weights equal those of a model that never decoded (1e-6), and no
    parameter or cached table became an inference tensor (which autograd cannot save for a
    backward)."""
    model, never = tiny(), tiny()
    idx = tokens(1, 5)
    if decode == "generate":
        generate(model, idx, 6, temperature=0)
    elif decode == "generate_speculative":
        generate_speculative(model, idx, 6, 2, 2)
    else:
        with torch.inference_mode():
            model(idx)
    assert not [n for n, p in model.named_parameters() if p.is_inference()]
    x, y = tokens(2, 12, seed=3), tokens(2, 12, seed=4)
    loss, weights = adamw_step(model, x, y)
    expected_loss, expected = adamw_step(never, x, y)
    assert abs(loss - expected_loss) <= 1e-6
    for name, w in expected.items():
        torch.testing.assert_close(weights[name], w, rtol=0, atol=1e-6, msg=name)


def test_decoding_keeps_one_copy_of_the_weights():
    """After decoding, eager and compiled, every parameter keeps its storage (same data pointer,
    nothing laid out anew) and the resident set has grown by at most 10% of the weights' bytes (a
    second copy of the large ones would be about 100%). A 45M-parameter model (180 MB fp32), so
    that a copy stands out of the noise; the compiler's own memory, which does not grow with the
    weights, is taken first by a test-tiny decode."""
    with torch._dynamo.config.patch(
        recompile_limit=GRAPHS_PER_FUNCTION
    ):  # what generate.compiled sets
        one_copy_after_decoding()


def one_copy_after_decoding():
    # the compiler's code, loaded once a process
    generate(tiny(), tokens(1, 4), 3, temperature=0, compile=True)
    torch.manual_seed(0)
    cfg = Config(
        vocab_size=8192,
        n_layer=2,
        n_head=8,
        n_kv_head=2,
        n_embd=1024,
        intermediate_size=4096,
        block_size=32,
    )
    model = Transformer(cfg).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    idx = tokens(1, 4, V=cfg.vocab_size)
    before = resident_mib()
    for compile in (False, True):
        generate(model, idx, 3, temperature=0, compile=compile)
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
        grown = resident_mib() - before
        assert (
            grown <= 0.1 * weights
        ), f"compile={compile}: +{grown:.0f} MiB beside {weights:.0f} MiB of weights"


@pytest.mark.parametrize("min_numel", [decode_layout.PACKED_MIN_NUMEL, 0])
def test_packed_layout_changes_memory_not_values(tmp_path, min_numel):
    """pack() gives weights of at least min_numel elements (0: all) a oneDNN-packed copy that
    forwards without autograd run through (packed_linear) and stores smaller ones input-major:
    logits within float32 rounding (TOL) of F.linear's; state dict, gradients and checkpoint
    unchanged; a weight changed afterwards, in place or by new data, runs as it is, never a stale
    packed copy; unpack() drops the copies."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN packing needs a build with oneDNN")
    for kw in (dict(), dict(tie_embeddings=True, bias=True)):
        model, laid_out = tiny(**kw), tiny(**kw)
        added = pack(laid_out, min_numel, verbose=False)
        packed = [m for m in laid_out.modules() if isinstance(m, PackedLinear)]
        linears = [m for m in laid_out.modules() if isinstance(m, nn.Linear)]
        assert added == sum(m.weight.numel() * 4 for m in linears)
        assert bool(packed) == (min_numel == 0)  # test-tiny's weights are all below the default
        weight = laid_out.layers[0].mlp.w_down.weight
        # packed: [out, in] as trained; else input-major, [out, in] over [in, out]
        assert weight.stride() == ((weight.shape[1], 1) if packed else (1, weight.shape[0]))
        for (name, a), b in zip(model.state_dict().items(), laid_out.state_dict().values()):
            assert torch.equal(a, b), name
        idx = tokens()
        with torch.no_grad():
            torch.testing.assert_close(laid_out(idx), model(idx), **TOL)
            for m in (
                model,
                laid_out,
            ):  # changed after packing: in place (version counter) and new data
                m.layers[0].mlp.w_down.weight.mul_(-2)
                m.lm_head.weight.data = m.lm_head.weight.data.flip(0).clone()
            torch.testing.assert_close(laid_out(idx), model(idx), **TOL)
        laid_out.train()(idx, idx)[0].backward()
        model.train()(idx, idx)[0].backward()
        torch.testing.assert_close(
            laid_out.layers[1].attn.wqkv.weight.grad, model.layers[1].attn.wqkv.weight.grad, **TOL
        )
        laid_out.save_pretrained(tmp_path / "m")
        torch.testing.assert_close(
            Transformer.from_pretrained(tmp_path / "m").lm_head.weight,
            model.lm_head.weight,
            rtol=0,
            atol=0,
        )
    if min_numel:
        return
    # which copy runs: a packed copy marked x2 runs (a forward without autograd goes through it),
    # then F.linear once the weight changed (in place; new data twice, so an address may come back),
    # and the next pack() packs it again; moving or casting the model drops the copies; the model
    # still pickles
    module = laid_out.layers[1].mlp.w_down
    w, x = module.weight, torch.randn(2, 3, module.weight.shape[1])

    def pack_twice_w():  # pack()'s entry for w, holding the packed copy of 2 w
        decode_layout._packed[w] = (
            StorageWeakRef(w.untyped_storage()),
            w._version,
            torch.ops.mkldnn._reorder_linear_weight(2 * w.detach(), 1),
        )

    pack_twice_w()
    torch.testing.assert_close(module(x), F.linear(x, w), **TOL)  # with autograd: never the copy
    with torch.no_grad():
        torch.testing.assert_close(module(x), 2 * F.linear(x, w), **TOL)
        w.add_(1)
        torch.testing.assert_close(module(x), F.linear(x, w), rtol=0, atol=0)
        pack(laid_out, 0, verbose=False)
        torch.testing.assert_close(module(x), F.linear(x, w), **TOL)
        for _ in range(2):
            pack_twice_w()
            w.data = torch.randn_like(w)
            torch.testing.assert_close(module(x), F.linear(x, w), rtol=0, atol=0)
        pack(laid_out, 0, verbose=False)
        torch.save(laid_out, tmp_path / "whole.pt")
        assert type(unpack(copy.deepcopy(laid_out)).lm_head) is nn.Linear
        laid_out.double()
        assert type(module) is nn.Linear and w not in decode_layout._packed
        torch.testing.assert_close(
            module(x.double()), F.linear(x.double(), module.weight), rtol=0, atol=0
        )
