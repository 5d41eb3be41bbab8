"""
LayerSkip training schedules (Elhoushi et al. 2024, arXiv 2404.16710).

Layer dropout chooses the skip mask; the early-exit loss chooses the exits and their weights.
Layers are 0-based (l = 0..L-1); exit l is the OUTPUT of layer l, i.e. exit_layer E = l + 1 in the
model's API. All randomness comes from a generator seeded by (seed, step, micro step): every rank
makes the same decisions and a resumed run repeats them exactly.
"""
import torch


def depth_scale(n_layer, kind="exp"):
    """D(l) for l = 0..L-1: exp 2^(l/(L-1)) - 1 (paper eq. 3), linear l/(L-1), or uniform 1."""
    l = torch.arange(n_layer, dtype=torch.float64)
    denom = max(n_layer - 1, 1)
    if kind == "exp":
        return 2.0 ** (l / denom) - 1
    if kind == "linear":
        return l / denom
    if kind == "uniform":
        return torch.ones(n_layer, dtype=torch.float64)
    raise ValueError(f"dropout_scale must be exp, linear or uniform, got {kind!r}")


def time_scale(step, total_steps, kind="constant"):
    """S(t): constant 1 (fine-tuning, continual pretraining) or exp 2^(t/(T-1)) - 1 (from scratch)."""
    if kind == "constant":
        return 1.0
    if kind == "exp":
        return 2.0 ** (min(step, total_steps - 1) / max(total_steps - 1, 1)) - 1
    raise ValueError(f"dropout_curriculum must be constant or exp, got {kind!r}")


def dropout_rates(n_layer, step, total_steps, p_max, scale="exp", curriculum="constant"):
    """p_{l,t} = S(t) D(l) p_max (paper eq. 4), a [L] tensor."""
    return time_scale(step, total_steps, curriculum) * depth_scale(n_layer, scale) * p_max


def layer_dropout_mask(rates, batch_size, seed):
    """[B, L] bool skip mask: sample b drops layer l with probability rates[l] (Bernoulli, no rescaling).

    Drawn on the CPU from a generator seeded with `seed`, outside any compiled region.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, len(rates), generator=g, dtype=torch.float64) < rates


def exit_scales(n_layer, e_scale):
    """e(l) (paper eq. 6): e_scale * sum_{i<=l} i for l < L-1; (L-1) + e_scale * sum_{i<=L-2} i at the last layer."""
    L = n_layer
    e = [e_scale * l * (l + 1) / 2 for l in range(L)]
    e[L - 1] = (L - 1) + e_scale * (L - 2) * (L - 1) / 2
    return e


def enabled_exits(n_layer, step, total_steps, curriculum="rotational", period=8):
    """Layers whose exit is in the loss at `step`; the last layer always is.

    none: every layer. rotational: layers l with l = t (mod R), so each layer is on once every R
    steps. gradual: from layer L-1 downwards, one more every T/(2L) steps, all on by T/2.
    off: the last layer only (no early-exit loss).
    """
    L = n_layer
    if curriculum == "off":
        layers = set()
    elif curriculum == "none":
        layers = set(range(L))
    elif curriculum == "rotational":
        layers = {l for l in range(L) if l % period == step % period}
    elif curriculum == "gradual":
        n_on = 1 + int(step // max(total_steps / (2 * L), 1e-9))
        layers = set(range(max(L - n_on, 0), L))
    else:
        raise ValueError(f"early_exit_curriculum must be off, none, rotational or gradual, got {curriculum!r}")
    return sorted(layers | {L - 1})


def exit_weights(n_layer, step, total_steps, e_scale, curriculum="rotational", period=8):
    """{exit_layer E = l + 1: normalized weight} (paper eq. 5): C(t,l) e(l) / sum_i C(t,i) e(i).

    Exits whose weight is 0 (layer 0, where e(0) = 0) are left out: they would cost compute for nothing.
    """
    e = exit_scales(n_layer, e_scale)
    layers = enabled_exits(n_layer, step, total_steps, curriculum, period)
    total = sum(e[l] for l in layers)
    if total == 0:  # a one-layer model
        return {n_layer: 1.0}
    return {l + 1: e[l] / total for l in layers if e[l] > 0}
