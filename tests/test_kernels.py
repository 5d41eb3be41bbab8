"""The fused linear + cross-entropy against eager float64 cross-entropy on full logits."""
import pytest
import torch
import torch.nn.functional as F

from kernels.linear_cross_entropy import linear_cross_entropy


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
