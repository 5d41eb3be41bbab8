"""
An opt-in CPU decode layout: oneDNN-packed copies of large projection weights beside the model's
own, small ones stored input-major.

    added = pack(model)     # bytes of the copies (also printed); the model decodes through them
    unpack(model)           # the packed copies dropped

Decoding never needs it: the model's [out, in] weights, as trained, are the only copy a decode
reads by default. pack() trades memory (a second copy of every packed weight) for oneDNN's matrix
product (torch.ops.mkldnn._reorder_linear_weight, the layout Inductor's freezing gives constant
weights), which on some CPUs streams a weight faster than MKL and costs less per extra verified
position. Whether it pays on a machine is what `bench.py --mode bandwidth` measures. Smaller
weights, where oneDNN's call costs more than the product, are stored input-major (the transposed
view of an [in, out] tensor) for MKL's matrix-vector product: their storage replaced, which frees
the old one unless something else holds it (a checkpoint's file mapping does until every weight
loaded from it is replaced). Parameter values, names, gradients and checkpoints are unchanged:
only forwards without autograd go through the packed copies.
"""

import typing

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

# below 4 MB (fp32), oneDNN's per-call cost exceeds what its product saves
PACKED_MIN_NUMEL = 1 << 20
# weight -> (weak ref to its storage, version, packed copy)
_packed = torch.utils.weak.WeakIdKeyDictionary()


def packed_copy(weight):
    """weight's packed copy, or None when it has none or weight changed since: new data (its storage
    is another) or an in-place write through weight (torch's version counter moved; writes
    through .data are not counted)."""
    storage, version, packed = _packed.get(weight, (None, None, None))
    if (
        storage is None
        or storage.expired()
        or storage.cdata != weight.untyped_storage()._cdata
        or version != weight._version
    ):
        return None
    return packed


@torch.library.custom_op("nanoskip::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor]
) -> torch.Tensor:
    """F.linear(x [..., in], weight [out, in], bias [out]) -> [..., out] through weight's packed
    copy (oneDNN's kernel; equal to F.linear to float32 rounding), or F.linear itself when weight
    has no current copy. A custom op, so that compiled decode steps call it as it is (Inductor
    cannot take a packed tensor as a graph input)."""
    packed = packed_copy(weight)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class PackedLinear(nn.Linear):
    """An nn.Linear that pack() gave a packed copy: forwards without autograd (and without autocast)
    run through packed_linear; moving or casting it drops the copy and makes it an nn.Linear
    again."""

    def forward(self, x):
        if not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
            return packed_linear(x, self.weight, self.bias)
        return super().forward(x)

    def _apply(self, fn, *args, **kwargs):
        unpack(self)
        return self._apply(fn, *args, **kwargs)


def packable(module, min_numel):
    if type(module) not in (nn.Linear, PackedLinear):
        return False
    w = module.weight
    return (
        w.numel() >= min_numel
        and w.device.type == "cpu"
        and w.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
    )


@torch.no_grad()
def pack(model, min_numel=PACKED_MIN_NUMEL, verbose=True):
    """Give every nn.Linear of `model` with a CPU weight (fp32 or bf16) of at least min_numel
    elements a packed copy (again where its weight changed since), store the smaller ones
    input-major -> bytes of the copies and re-laid weights, printed unless verbose=False."""
    added = 0
    for module in model.modules():
        if not packable(module, min_numel):
            if (
                type(module) is nn.Linear
                and module.weight.device.type == "cpu"
                and module.weight.is_contiguous()
            ):
                with torch.inference_mode(
                    False
                ):  # a normal tensor, which training can save for a backward
                    module.weight.data = (
                        module.weight.data.t().contiguous().t()
                    )  # [out, in] over [in, out]
                added += module.weight.numel() * module.weight.element_size()
            continue
        w = module.weight
        if packed_copy(w) is None:
            with torch.inference_mode(
                False
            ):  # the copy is built from, and keyed by, a normal tensor
                _packed[w] = (
                    StorageWeakRef(w.untyped_storage()),
                    w._version,
                    torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 1),
                )
            added += w.numel() * w.element_size()
        module.__class__ = PackedLinear
    if verbose:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        print(
            f"decode layout: {added / 2**20:.0f} MiB of weights copied (packed beside, or re-laid "
            f"input-major) for the model's {weights / 2**20:.0f} MiB"
        )
    return added


def unpack(model):
    """Drop every packed copy pack() gave `model` (or one PackedLinear); its modules become
    nn.Linear again."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            _packed.pop(module.weight, None)
            module.__class__ = nn.Linear
    return model
