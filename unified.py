"""
Unified layer skipping (Liu et al. 2024, arXiv 2404.06954): a fixed set of layers, chosen from a
target speedup, that every generated (response) token skips; the prompt runs through every layer.

    python train.py config/unified_cpu.py       # fine-tune for a 2x plan; the plan lands in config.json
    python sample.py --out_dir out-unified      # decoding honours the stored plan

The plan is only a skip mask: [B, T, L] in training (response tokens skip the plan's layers), [L]
for generated tokens when decoding. Skipped layers' caches are never read, so batching and the KV
cache work unchanged.
"""
import torch

from data.instruct import IGNORE  # the target of prompt and padding positions
from model import layer_mask


def unified_plan(n_layer, speedup):
    """Kept layers for a target speedup: layers 0 and L-1, then every `interval`-th layer until
    n_keep = int(L / speedup) are kept, interval = int(L / (n_keep - 1)). L=22, 3x: [0, 3, 6, 9, 12, 15, 21]."""
    n_keep = int(n_layer / speedup)
    if n_keep < 2:
        raise ValueError(f"a {speedup}x plan keeps {n_keep} of {n_layer} layers; it needs at least the first "
                         f"and the last (speedup <= {n_layer / 2:g})")
    interval = int(n_layer / (n_keep - 1))
    keep = [0, n_layer - 1]
    for l in range(1, n_layer - 1):
        if len(keep) >= n_keep:
            break
        if l % interval == 0:
            keep.append(l)
    return sorted(keep)


def skipped_layers(n_layer, speedup):
    """The complement of unified_plan: what config.skip_layers stores."""
    keep = set(unified_plan(n_layer, speedup))
    return [l for l in range(n_layer) if l not in keep]


def response_tokens(targets):
    """[B, T] bool: input positions after each row's prompt, from instruction targets where the prompt
    (and padding) is IGNORE. The last prompt token predicts the first response token, so it is prompt."""
    seen = (targets != IGNORE).long().cumsum(1) > 0          # from the last prompt token on
    return torch.cat([torch.zeros_like(seen[:, :1]), seen[:, :-1]], dim=1)


def response_skip_mask(targets, skip_layers, n_layer):
    """[B, T, L] skip mask: response tokens skip `skip_layers`, prompt tokens run every layer."""
    return response_tokens(targets.cpu())[..., None] & layer_mask(skip_layers, n_layer)
