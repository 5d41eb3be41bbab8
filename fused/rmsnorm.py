"""
RMSNorm, optionally with the residual add before it folded in:

    h = x + residual;  y = weight * (h / sqrt(mean(h^2) + eps))   (normalized in fp32 (or fp64), cast back, then scaled)

The fused op returns (y, h) and saves only h and the per-row 1/rms for its backward:
    n = h * rstd,  dn = dy * weight,  dh = rstd * (dn - n * mean(dn * n)) + dh_out,  dweight = sum(dy * n)
"""
import torch
import torch.nn.functional as F

from fused import needs_grad, on_device, upcast


def rms_norm_reference(x, weight, eps, residual=None):
    """Eager reference (transformers' order of operations): y, or (y, h) when residual is given."""
    h = x if residual is None else x + residual
    y = weight * F.rms_norm(upcast(h), (h.shape[-1],), eps=eps).to(h.dtype)
    return y if residual is None else (y, h)


@on_device
def _forward(h, weight, eps):
    hf = upcast(h)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1] fp32
    return weight * (hf * rstd).to(h.dtype), rstd


@on_device
def _backward(dy, h, weight, rstd):
    n = upcast(h) * rstd
    dn = upcast(dy * weight)
    dh = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
    dweight = (upcast(dy) * upcast(n.to(h.dtype))).flatten(0, -2).sum(0)
    return dh, dweight


class FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        h = x if residual is None else x + residual
        y, rstd = _forward(h, weight, eps)
        ctx.save_for_backward(h, weight, rstd)
        ctx.dtypes = x.dtype, None if residual is None else residual.dtype
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_out):
        h, weight, rstd = ctx.saved_tensors
        dh, dweight = _backward(dy, h, weight, rstd)
        if dh_out is not None:
            dh = dh + dh_out
        x_dtype, residual_dtype = ctx.dtypes
        return dh.to(x_dtype), None if residual_dtype is None else dh.to(residual_dtype), dweight.to(weight.dtype), None


def rms_norm(x, weight, eps, residual=None):
    """Fused RMSNorm: y, or (y, h = x + residual) when residual is given."""
    if not needs_grad(x, residual, weight):  # inference: nothing to save, the reference's fewer ops are faster
        return rms_norm_reference(x, weight, eps, residual)
    y, h = FusedRMSNorm.apply(x, residual, weight, eps)
    return y if residual is None else (y, h)
