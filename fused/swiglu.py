"""
SwiGLU on a packed [gate; up] projection (Shazeer 2020, eq. 5 without the projections):

    y = silu(gate) * up,   silu(g) = g * sigmoid(g)

The fused op saves only the packed input; its backward recomputes sigmoid:
    dgate = dy * up * s * (1 + g * (1 - s)),   dup = dy * g * s,   s = sigmoid(g)
"""
import torch
import torch.nn.functional as F

from fused import needs_grad, on_device, upcast


def swiglu_reference(gate_up):
    """gate_up [..., 2I] (gate first) -> [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@on_device
def _forward(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@on_device
def _backward(dy, gate_up):
    gate, up = upcast(gate_up).chunk(2, dim=-1)
    dy = upcast(dy)
    dgate = torch.ops.aten.silu_backward(dy * up, gate)  # dy * up * s * (1 + gate * (1 - s)), one kernel
    return torch.cat((dgate, dy * F.silu(gate)), dim=-1).to(gate_up.dtype)


class FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return _forward(gate_up)

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        return _backward(dy, gate_up)


def swiglu(gate_up):
    """Fused SwiGLU: gate_up [..., 2I] -> [..., I]."""
    return FusedSwiGLU.apply(gate_up) if needs_grad(gate_up) else swiglu_reference(gate_up)
