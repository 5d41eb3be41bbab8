"""
Fused ops, one small file each, each with the eager reference model.py falls back to.

Switches, read once at import (like the seed's): NANOSKIP_FUSED_<OP>=0 turns an op off, for OP in
RMSNORM, ROPE, SWIGLU, LOSS. All are on by default. A fused op is a torch.autograd.Function whose
backward is written by hand and saves only what it needs; on CUDA its forward and backward bodies
go through torch.compile, which turns each into one generated kernel (inside a compiled block they
are simply inlined into the block's kernels). On the CPU they run eagerly: same numbers, less memory.
Without gradients (decoding, evaluation) each op runs its reference: there is nothing to save.
"""
import functools
import os

import torch

FUSED = {op: os.environ.get(f"NANOSKIP_FUSED_{op.upper()}", "1") != "0" for op in ("rmsnorm", "rope", "swiglu", "loss")}


def on_device(fn):
    """fn as written on the CPU, torch.compile'd on CUDA: picked per call by the first argument."""
    compiled = None  # made at the first CUDA call: torch.compile imports the compiler (seconds of startup)

    @functools.wraps(fn)
    def call(x, *args):
        nonlocal compiled
        if not x.is_cuda or torch.compiler.is_compiling():  # inside a compiled block: inlined as written
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn)  # a second shape makes it dynamic
        return compiled(x, *args)

    return call


def upcast(x):
    """x in at least fp32 (bf16/fp16 -> fp32; fp32 and fp64 unchanged): the precision norms and gates compute in."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def needs_grad(*tensors):
    """Whether autograd must record this call. When not (decoding, evaluation) an op runs its eager reference:
    with nothing to save for a backward, that is the same computation in fewer eager ops."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
