"""The fused linear + cross-entropy against eager float64 cross-entropy on full logits."""
import pytest
import torch
import torch.nn.functional as F

from fused.linear_cross_entropy import linear_cross_entropy


def reference(h, w, t, ignore_index=-100):
    return F.cross_entropy(h.double() @ w.double().T, t, ignore_index=ignore_index)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_matches_eager_forward_and_grads(chunk_size, recompute):
    torch.manual_seed(0)
    N, C, V = 53, 24, 97  # odd sizes: the last chunk is partial
    h = torch.randn(N, C, requires_grad=True)
    w = (0.3 * torch.randn(V, C)).requires_grad_()
    t = torch.randint(V, (N,))
    t[3:17] = -100  # ignored tokens, spanning whole chunks for chunk_size 1 and 7
    loss = linear_cross_entropy(h, w, t, chunk_size=chunk_size, recompute=recompute)
    gh, gw = torch.autograd.grad(loss * 2.5, (h, w))  # a non-unit upstream gradient
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference(h64, w64, t)
    rh, rw = torch.autograd.grad(ref * 2.5, (h64, w64))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-6)
    assert gh[3:17].abs().max() == 0  # ignored tokens get no gradient


def test_non_contiguous_input():
    torch.manual_seed(1)
    h = torch.randn(16, 40)[:, ::2].requires_grad_()  # [16, 20], stride 2
    w = torch.randn(30, 20, requires_grad=True)
    t = torch.randint(30, (16,))
    for recompute in (True, False):
        loss = linear_cross_entropy(h, w, t, chunk_size=5, recompute=recompute)
        gh, = torch.autograd.grad(loss, h)
        h64 = h.detach().double().requires_grad_()
        ref = reference(h64, w.detach().double(), t)
        rh, = torch.autograd.grad(ref, h64)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recompute", [True, False])
def test_all_ignored_gives_zero_loss_and_grads(recompute):
    h = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((8,), -100), recompute=recompute)
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


# ---- RMSNorm, rotary, SwiGLU: fused op vs its eager reference, forward and backward ----

from fused.rmsnorm import rms_norm, rms_norm_reference
from fused.rotary import apply_rotary, apply_rotary_reference
from fused.swiglu import swiglu, swiglu_reference


def odd_non_contiguous(*shape):
    """A random tensor of `shape` that is a strided view (every other element of the last dim)."""
    return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]


def outputs_and_grads(fn, inputs, dtype, seed=0):
    """fn's outputs and the gradients of its inputs that require grad, under a random upstream gradient,
    with the inputs cast to `dtype`; all returned in float64 for comparison."""
    inputs = [x.detach().to(dtype).requires_grad_(x.requires_grad) if torch.is_tensor(x) else x for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator(device=outs[0].device).manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=g, device=o.device).to(dtype).to(o.dtype) for o in outs]
    leaves = [x for x in inputs if torch.is_tensor(x) and x.requires_grad]
    grads = torch.autograd.grad(outs, leaves, upstream)
    for x, gx in zip(leaves, grads):
        assert gx.dtype == x.dtype and gx.shape == x.shape
    return [t.detach().double() for t in (*outs, *grads)]


def check_against_reference(fused, reference, inputs, dtype=torch.float32, rtol=1e-5, atol=1e-6):
    """Forward outputs and input gradients of the fused op equal the reference's in `dtype`."""
    for a, b in zip(outputs_and_grads(fused, inputs, dtype), outputs_and_grads(reference, inputs, dtype)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_reference(with_residual):
    torch.manual_seed(0)
    x = odd_non_contiguous(3, 5, 37).requires_grad_()
    residual = torch.randn(3, 5, 37, requires_grad=True) if with_residual else None
    weight = (1 + 0.1 * torch.randn(37)).requires_grad_()
    check_against_reference(lambda x, w, r: rms_norm(x, w, 1e-5, r), lambda x, w, r: rms_norm_reference(x, w, 1e-5, r),
                            [x, weight, residual])


def test_rotary_matches_reference():
    torch.manual_seed(0)
    qk = torch.randn(2, 5, 7, 16).transpose(1, 2).requires_grad_()  # [B, heads, T, hd], non-contiguous
    angle = torch.randn(5, 8)
    cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()  # [T, hd]
    check_against_reference(apply_rotary, apply_rotary_reference, [qk, cos, sin])
    per_row = torch.randn(2, 1, 5, 16)  # per-row positions: [B, 1, T, hd]
    check_against_reference(apply_rotary, apply_rotary_reference, [qk, per_row.cos(), per_row.sin()])


def test_swiglu_matches_reference():
    torch.manual_seed(0)
    gate_up = odd_non_contiguous(3, 4, 2 * 23).requires_grad_()
    check_against_reference(swiglu, swiglu_reference, [gate_up])


def test_fused_ops_match_in_float64_and_bf16():
    """float64: the hand-written backwards are exact up to rounding; bf16: within bf16 rounding."""
    torch.manual_seed(0)
    x, w = torch.randn(4, 33, requires_grad=True), (1 + 0.1 * torch.randn(33)).requires_grad_()
    for dtype, tol in ((torch.float64, 1e-12), (torch.bfloat16, 2e-2)):
        check_against_reference(lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: rms_norm_reference(x, w, 1e-6),
                                [x, w], dtype, rtol=tol, atol=tol)
        check_against_reference(swiglu, swiglu_reference, [torch.randn(4, 66, requires_grad=True)], dtype,
                                rtol=tol, atol=tol)


def test_compiled_fast_path_matches_eager(monkeypatch):
    """The torch.compile'd bodies (the CUDA fast path) give the eager numbers: compiled here on the CPU."""
    import fused.swiglu as module
    monkeypatch.setattr(module, "_forward", torch.compile(module._forward.__wrapped__, dynamic=True))
    monkeypatch.setattr(module, "_backward", torch.compile(module._backward.__wrapped__, dynamic=True))
    torch.manual_seed(0)
    check_against_reference(swiglu, swiglu_reference, [torch.randn(5, 2 * 19, requires_grad=True)])


def test_model_fused_equals_reference(monkeypatch):
    """A whole forward and backward with every fused op on equals the one with all off (fp32)."""
    from fused import FUSED
    from model import PRESETS, Transformer
    from dataclasses import replace
    torch.manual_seed(0)
    model = Transformer(replace(PRESETS["test-tiny"]))
    x = torch.randint(256, (2, 17))
    results = []
    for on in (True, False):
        for op in FUSED:
            monkeypatch.setitem(FUSED, op, on)
        model.zero_grad()
        loss, _ = model(x, x, exits={2: 0.5, 4: 1.0})
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_ops_match_reference_in_bf16():
    """On CUDA the fused ops run their torch.compile'd bodies. Within bf16 rounding: against the reference in
    fp32 on the same bf16 inputs, the fused bf16 op errs no more than the eager bf16 reference does (x 1.5, plus
    one bf16 ulp of the largest value)."""
    torch.manual_seed(0)
    cuda = dict(device="cuda")
    x, r, w = torch.randn(6, 7, 129, **cuda), torch.randn(6, 7, 129, **cuda), 1 + 0.1 * torch.randn(129, **cuda)
    qk = torch.randn(2, 9, 5, 64, **cuda).transpose(1, 2)
    angle = torch.randn(9, 32, **cuda)
    cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
    h, head, t = torch.randn(300, 64, **cuda), 0.1 * torch.randn(1000, 64, **cuda), torch.randint(1000, (300,), **cuda)
    cases = [
        (lambda x, r, w: rms_norm(x, w, 1e-5, r), lambda x, r, w: rms_norm_reference(x, w, 1e-5, r),
         [x.requires_grad_(), r.requires_grad_(), w.requires_grad_()]),
        (apply_rotary, apply_rotary_reference, [qk.requires_grad_(), cos, sin]),
        (swiglu, swiglu_reference, [torch.randn(3, 11, 2 * 175, **cuda).requires_grad_()]),
        (lambda h, w: linear_cross_entropy(h, w, t, chunk_size=128, recompute=True),
         lambda h, w: F.cross_entropy((h @ w.T).float(), t), [h.requires_grad_(), head.requires_grad_()]),
        (lambda h, w: linear_cross_entropy(h, w, t, chunk_size=128, recompute=False),
         lambda h, w: F.cross_entropy((h @ w.T).float(), t), [h, head]),
    ]
    for fused, reference, inputs in cases:
        inputs = [x.detach().bfloat16().requires_grad_(x.requires_grad) for x in inputs]  # the same values for all three
        exact = outputs_and_grads(reference, inputs, torch.float32)
        ours = outputs_and_grads(fused, inputs, torch.bfloat16)
        eager = outputs_and_grads(reference, inputs, torch.bfloat16)
        for o, e, x in zip(ours, eager, exact):
            assert (o - x).abs().max() <= 1.5 * (e - x).abs().max() + 2 ** -8 * x.abs().max()
