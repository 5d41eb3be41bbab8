"""
Rotary position embedding (RoFormer eq. 34, in the rotate-half layout of Llama checkpoints):

    y = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

Applied to the query and key heads together (one call on the packed [q; k] heads). The fused op saves
nothing but cos and sin (rotate_half is linear and antisymmetric: its transpose is minus itself):
    dx = dy * cos + rotate_half^T(dy * sin) = dy * cos - rotate_half(dy * sin)
"""
import torch

from fused import needs_grad, on_device


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(x, cos, sin):
    """x [..., T, hd]; cos, sin broadcastable to it ([T, hd] or [B, 1, T, hd])."""
    return x * cos + rotate_half(x) * sin


@on_device
def _rotate(x, cos, sin):
    return x * cos + rotate_half(x) * sin


@on_device
def _rotate_backward(dy, cos, sin):
    return dy * cos - rotate_half(dy * sin)


class FusedRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate_backward(dy, cos, sin), None, None


def apply_rotary(x, cos, sin):
    """Fused rotary embedding; cos and sin take no gradient."""
    return FusedRotary.apply(x, cos, sin) if needs_grad(x) else apply_rotary_reference(x, cos, sin)
