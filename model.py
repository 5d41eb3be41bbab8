"""
nanoskip model: one file, a Llama-family decoder whose layers can be skipped per sample and
whose depth can be exited early through the one shared exit (final norm + LM head).

Three primitives and a forward (see README):
    embed(idx, pos)                                  -> x       [B, T, C]
    run_layers(x, start, end, skip_mask, cache, pos) -> x       blocks [start, end)
    head(x)                                          -> logits  [B, T, V]
Every skipping method only chooses the skip mask and the exits; nothing else differs.
"""
import copy
import json
import math
import os
import typing
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import savedir
from rules import above, at_least, check_type, check_values, one_of
from fused import FUSED
from fused.linear_cross_entropy import linear_cross_entropy
from fused.rmsnorm import rms_norm, rms_norm_reference
from fused.rotary import apply_rotary, apply_rotary_reference
from fused.swiglu import swiglu, swiglu_reference


@dataclass
class Config:
    vocab_size: int = 32000
    n_layer: int = 22
    n_head: int = 32
    n_kv_head: int = 4            # < n_head: grouped-query attention
    n_embd: int = 2048
    intermediate_size: int = 5632  # SwiGLU hidden width
    block_size: int = 2048         # maximum context
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2                # ends a row; pads the rows that have ended
    end_ids: list | None = None    # further ids that end a row (Llama-3's <|eot_id|>, Phi-3's <|end|>)
    # family switches (docs/equations.md section 3); the defaults are Llama
    family: str = "llama"          # weight family for checkpoints_convert.py: llama | phi3 | opt | bloom
    norm: str = "rmsnorm"          # "rmsnorm" | "layernorm" (with bias)
    norm_position: str = "pre"     # "pre" | "post" (OPT-350m: norm after each residual add)
    final_norm: bool = True        # OPT-350m has none
    pos_emb: str = "rope"          # "rope" | "learned" (OPT, offset pos_offset) | "alibi" (Bloom)
    pos_offset: int = 0
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "dynamic" | "llama3" | "longrope", ...}
    # the context the checkpoint was trained for (transformers' max_position_embeddings), which dynamic NTK and
    # LongRoPE's attention factor are keyed on; block_size, the context we allow, may differ. None: block_size
    max_position_embeddings: int | None = None
    mlp: str = "swiglu"            # "swiglu" | "relu" | "gelu_tanh"
    bias: bool = False             # biases on every projection (OPT, Bloom)
    emb_norm: bool = False         # LayerNorm right after the token embedding (Bloom)
    emb_dim: int | None = None     # token embedding width when it differs from n_embd (OPT-350m project_in/out)
    sliding_window: int | None = None  # each query sees its last `sliding_window` keys (Phi-3)
    # a static skip plan: 0-based layers that generated tokens skip when decoding (unified layer skipping)
    skip_layers: list | None = None

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def eos_ids(self):
        """Every id that ends a row: eos_id first, then end_ids (transformers' list-valued eos_token_id)."""
        return [self.eos_id] + [i for i in self.end_ids or () if i != self.eos_id]

    def validate(self):
        """ValueError (one line) for a value of the wrong type (ints become floats where a float is
        declared), outside MODEL_RULES, or shapes that do not divide."""
        for name, annotation in typing.get_type_hints(type(self)).items():
            setattr(self, name, check_type(name, getattr(self, name), annotation))
        check_values(self, MODEL_RULES, where="config")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"config: n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) "
                             f"and n_head by n_kv_head ({self.n_kv_head})")
        for name in ("bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"config: {name}={getattr(self, name)} must be a token id in "
                                 f"[0, {self.vocab_size - 1}]")
        if self.end_ids and not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in self.end_ids):
            raise ValueError(f"config: end_ids {self.end_ids} must be token ids in [0, {self.vocab_size - 1}]")
        if self.skip_layers and not all(isinstance(l, int) and 0 <= l < self.n_layer for l in self.skip_layers):
            raise ValueError(f"config: skip_layers {self.skip_layers} must lie in [0, {self.n_layer - 1}]")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_KEYS:
            raise ValueError(f"config: unsupported rope_scaling type {rope_type!r}")
        missing = [k for k in ROPE_KEYS[rope_type] if not isinstance(self.rope_scaling.get(k), (int, float, list))]
        if missing:
            raise ValueError(f"config: rope_scaling of type {rope_type!r} needs {', '.join(missing)}")
        return self

    @classmethod
    def from_dict(cls, d):
        """A Config from config.json's object: unknown keys, wrong types and bad values are one line."""
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config.json: unknown key(s) {unknown}")
        return cls(**d).validate()


# what each rope_scaling type needs (transformers' modeling_rope_utils.py)
ROPE_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "longrope": ("long_factor", "short_factor", "original_max_position_embeddings")}

# value rules of Config (rules.check_values)
MODEL_RULES = {
    **{k: at_least(1) for k in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size",
                                "block_size", "emb_dim", "sliding_window")},
    "norm_eps": above(0), "rope_theta": above(0), "pos_offset": at_least(0),
    "family": one_of("llama", "phi3", "opt", "bloom"),
    "norm": one_of("rmsnorm", "layernorm"), "norm_position": one_of("pre", "post"),
    "pos_emb": one_of("rope", "learned", "alibi"), "mlp": one_of("swiglu", "relu", "gelu_tanh"),
}


PRESETS = {
    # exact TinyLlama-1.1B shape (docs/equations.md section 2)
    "tinyllama-1.1b": Config(),
    # deep and narrow CPU model for the stdlib corpus: depth to exit early from and to speculate with
    "stdlib-16l": Config(vocab_size=4096, n_layer=16, n_head=4, n_kv_head=2, n_embd=128,
                         intermediate_size=352, block_size=256),
    # tiny model for tests
    "test-tiny": Config(vocab_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                        intermediate_size=160, block_size=64),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        """Normalize in fp32, cast back to the input dtype, then scale (as transformers does).
        With a residual: normalize h = x + residual and return (normalized, h)."""
        norm = rms_norm if FUSED["rmsnorm"] else rms_norm_reference
        return norm(x, self.weight, self.eps, residual)


def layer_mask(layers, n_layer):
    """0-based layer indices -> skip mask [L] (True = skip), as run_layers takes it for a whole batch."""
    mask = torch.zeros(n_layer, dtype=torch.bool)
    mask[list(layers)] = True
    return mask


def make_norm(cfg, dim):
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


def rope_frequencies(cfg, seq_len):
    """inv_freq and the cos/sin scale for a sequence of seq_len tokens: an int -> inv_freq [head_dim/2], or
    each row's own length (a LongTensor [B]) -> [B, head_dim/2] (only dynamic NTK and LongRoPE depend on it).

    Scaling types follow transformers (modeling_rope_utils.py): linear divides by factor; dynamic NTK grows
    theta once seq_len passes the checkpoint's max_position_embeddings (M); llama3 scales low frequencies by
    1/factor and blends the middle band; LongRoPE divides by long_factor once seq_len exceeds
    original_max_position_embeddings (else short_factor) and scales cos/sin by sqrt(1 + ln(s)/ln(orig)),
    s = factor, default M / orig.
    """
    hd, theta = cfg.head_dim, cfg.rope_theta
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", "default")
    trained = cfg.max_position_embeddings or cfg.block_size  # M
    per_row = torch.is_tensor(seq_len)
    device = seq_len.device if per_row else None
    exponent = torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd
    if kind == "dynamic":
        grown = seq_len.double().clamp(min=trained)[:, None] if per_row else max(seq_len, trained)  # [B, 1]
        theta = theta * ((rs["factor"] * grown / trained) - (rs["factor"] - 1)) ** (hd / (hd - 2))
        theta = theta.float() if per_row else theta
    inv_freq = 1.0 / theta ** exponent  # [hd/2], or [B, hd/2] for dynamic NTK per row
    scale = 1.0
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        orig = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < orig / high) * ~(wavelen > orig / low)
        inv_freq = torch.where(medium, blended, scaled)
    elif kind == "longrope":
        orig = rs["original_max_position_embeddings"]
        long, short = (torch.tensor(rs[k], dtype=torch.float32, device=device) for k in ("long_factor", "short_factor"))
        ext = torch.where((seq_len > orig)[:, None], long, short) if per_row else long if seq_len > orig else short
        inv_freq = 1.0 / (ext * theta ** exponent)  # [hd/2] or [B, hd/2]
        factor = rs.get("factor") or trained / orig
        scale = rs.get("attention_factor") or (
            math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0)
    return inv_freq, scale


def rope_switch(cfg):
    """The length past which LongRoPE takes its long factors (original_max_position_embeddings), or None.

    Every position's frequencies change there, so the cache of a shorter sequence is not what a cache-free
    forward of the longer one computes: not its rotated keys, and not the keys and values of later layers,
    which come from hidden states that attended with the old frequencies (so keeping keys before rotation
    would not do). A decode that crosses it therefore recomputes the cache from the tokens (generate.refill),
    once per sequence, as transformers' Phi-3 does. Dynamic NTK changes frequencies at every length past max_position_embeddings; like
    transformers' generate, its cache keeps what each forward computed."""
    rs = cfg.rope_scaling or {}
    return rs["original_max_position_embeddings"] if rs.get("rope_type") == "longrope" else None


def positions(pos, T, device=None):
    """Positions of T new tokens: [T] from an int start, or [B, T] from per-row starts pos [B] (a LongTensor)."""
    if torch.is_tensor(pos):
        return (pos[:, None] + torch.arange(T, device=pos.device)).to(device, non_blocking=True)
    return torch.arange(pos, pos + T, device=device)


def end_position(pos, T):
    """One past the last position written: the key length S of this forward."""
    return (int(pos.max()) if torch.is_tensor(pos) else pos) + T


def rope_cos_sin(cfg, pos, T, dtype, device, lengths=None):
    """cos, sin for the new tokens' positions, computed in fp32 on `device`, cast to `dtype`: [T, head_dim]
    for an int start, [B, 1, T, head_dim] (broadcast over heads) for per-row starts or per-row lengths.
    Frequencies that depend on the length follow each row's own: `lengths` [B] (right-padded rows), by
    default one past the row's last new position, pos + T."""
    inv_freq, scale = rope_frequencies(cfg, pos + T if lengths is None else lengths)
    inv_freq = inv_freq.to(device)
    at = positions(pos, T, device).float()                     # [(B,) T]
    if torch.is_tensor(pos) or inv_freq.dim() == 2:            # per row: [B or 1, T, 1] x [B or 1, 1, hd/2]
        freqs = at.view(-1, T, 1) * inv_freq.view(-1, 1, inv_freq.shape[-1])
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)   # [B, 1, T, hd]
    else:
        freqs = at[:, None] * inv_freq                         # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def alibi_slopes(n_head, device=None):
    """Bloom's ALiBi slopes: (2^(-8/cp2))^k for k=1..cp2, then (2^(-4/cp2))^(1,3,5,..) for the rest."""
    cp2 = 2 ** math.floor(math.log2(n_head))
    base = 2.0 ** (-(2.0 ** -(math.log2(cp2) - 3)))
    slopes = [base ** k for k in range(1, cp2 + 1)]
    if cp2 != n_head:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * cp2) - 3)))
        slopes += [extra ** k for k in range(1, 2 * (n_head - cp2), 2)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


class KVCache:
    """Keys and values of every layer, preallocated: k[l], v[l] [B, n_kv_head, max_len, head_dim] for layer l.

    Indexed by position: the caller says where new tokens go (`pos`: an int, or per-row starts [B]
    when rows are at different lengths), so cropping after a speculation round is just writing at
    an earlier position next time; slots past a row's position are never attended to. Rows that
    skip a layer do not write that layer's slot for those positions.

    attend_all: every forward attends over all max_len slots, the ones past a row's position masked
    out, so shapes never change from step to step and positions can stay on the device: what a CUDA
    graph needs (one recording replayed every step). The tensors then keep fixed addresses.

    Under LongRoPE (rope_switch) it also keeps the token ids and skip decisions Transformer.forward wrote
    at each position (tokens [B, max_len], skips [B, max_len, L] or None), so that the forward which first
    passes the switch can recompute the cache (forward_from_start).
    """

    def __init__(self, cfg, batch_size, max_len, device=None, dtype=torch.float32, attend_all=False):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.attend_all = attend_all
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.switch = rope_switch(cfg)
        self.tokens = None if self.switch is None else torch.zeros(batch_size, max_len, dtype=torch.long,
                                                                   device=device)
        self.skips, self.past_switch = None, False
        self.mark_static()

    def mark_static(self):
        """Tell torch.compile the cache keeps its addresses, so a CUDA graph may write it in place."""
        if self.attend_all:
            for t in self.k + self.v:
                torch._dynamo.mark_static_address(t)

    def key_length(self, pos, T):
        """The key length S that T new tokens at pos attend over: one past the last position written,
        or every slot with attend_all."""
        return self.k[0].shape[2] if self.attend_all else end_position(pos, T)

    def update(self, layer, rows, pos, k, v):
        """Write k, v [R, n_kv, T, hd] at positions [pos, pos+T) of rows `rows` (None: all);
        return keys/values [R, n_kv, S, hd], S = one past the last position written."""
        keys, values, T = self.k[layer], self.v[layer], k.shape[2]
        if torch.is_tensor(pos):  # per-row positions: scatter each row's T tokens at its own offset
            b = torch.arange(k.shape[0], device=k.device) if rows is None else rows
            at = positions(pos, T, k.device)                 # [R, T]
            keys[b[:, None], :, at] = k.transpose(1, 2)      # indexed view: [R, T, n_kv, hd]
            values[b[:, None], :, at] = v.transpose(1, 2)
        else:
            b = slice(None) if rows is None else rows
            keys[b, :, pos:pos + T] = k
            values[b, :, pos:pos + T] = v
        end = self.key_length(pos, T)
        if rows is None:
            return keys[:, :, :end], values[:, :, :end]
        return keys[rows, :, :end], values[rows, :, :end]

    def keep_rows(self, rows):
        """A cache of the batch rows `rows` [R] only (finished generations leave the batch)."""
        kept = copy.copy(self)
        kept.k, kept.v = [k[rows] for k in self.k], [v[rows] for v in self.v]
        kept.tokens = None if self.tokens is None else self.tokens[rows]
        kept.skips = None if self.skips is None else self.skips[torch.as_tensor(rows).cpu()]
        kept.mark_static()
        return kept

    def forward_from_start(self, idx, skip_mask, pos):
        """LongRoPE: record the tokens idx [B, T] and skip decisions (None, [B, L] or [B, T, L]) written at
        [pos, pos+T); when they are the first to pass the switch after earlier positions were computed before
        it (with the short factors), return what must run instead -- the whole sequence [0, pos+T), its skip
        decisions and position 0 -- as transformers' Phi-3 recomputes its cache there; else (idx, skip_mask, pos)."""
        B, T = idx.shape
        self.tokens[:, pos:pos + T] = idx
        if skip_mask is not None and self.skips is None:
            self.skips = torch.zeros(B, self.tokens.shape[1], skip_mask.shape[-1], dtype=torch.bool)
        if self.skips is not None:
            self.skips[:, pos:pos + T] = False if skip_mask is None else (
                skip_mask if skip_mask.dim() == 3 else skip_mask[:, None])
        crossing = pos > 0 and pos + T > self.switch and not self.past_switch
        self.past_switch = pos + T > self.switch
        if not crossing:
            return idx, skip_mask, pos
        return self.tokens[:, :pos + T], None if self.skips is None else self.skips[:, :pos + T], 0


def rotary(x, cos, sin):
    return (apply_rotary if FUSED["rope"] else apply_rotary_reference)(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.use_rope = cfg.pos_emb == "rope"
        self.wqkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, cos, sin, attn_mask, cache, rows, pos):
        B, T, _ = x.shape
        H, Hkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, hd).transpose(1, 2)  # [B, H + 2 Hkv, T, hd]: q heads, k heads, v heads
        qk, v = qkv[:, :H + Hkv], qkv[:, H + Hkv:]
        if self.use_rope:  # q and k rotated together
            qk = rotary(qk, cos, sin)
        q, k = qk[:, :H], qk[:, H:]                                    # [B, H, T, hd], [B, Hkv, T, hd]
        if cache is not None:
            k, v = cache.update(self.layer, rows, pos, k, v)   # [B, Hkv, pos+T, hd]
        is_causal = attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=Hkv != H)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * hd))

    def write_kv(self, x, cos, sin, cache, rows, pos):
        """Only the keys and values of x [B, T, C] into the cache: the K/V rows of the packed projection."""
        B, T, _ = x.shape
        q_dim = self.n_head * self.head_dim
        bias = None if self.wqkv.bias is None else self.wqkv.bias[q_dim:]
        kv = F.linear(x, self.wqkv.weight[q_dim:], bias).view(B, T, 2 * self.n_kv_head, self.head_dim)
        k, v = kv.transpose(1, 2).chunk(2, dim=1)              # [B, Hkv, T, hd] each
        if self.use_rope:
            k = rotary(k, cos, sin)
        cache.update(self.layer, rows, pos, k, v)


def gelu_tanh(x):
    """Bloom's GELU, with its literal constant."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class MLP(nn.Module):
    """SwiGLU on a packed [gate; up] projection, or a plain two-layer ReLU / GELU-tanh MLP."""

    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.w_gate_up = nn.Linear(cfg.n_embd, 2 * cfg.intermediate_size, bias=cfg.bias)
        else:
            self.w_up = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.w_down((swiglu if FUSED["swiglu"] else swiglu_reference)(self.w_gate_up(x)))
        act = F.relu if self.kind == "relu" else gelu_tanh
        return self.w_down(act(self.w_up(x)))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.attn_norm = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)
        self.fold_residual = not self.post_norm and cfg.norm == "rmsnorm"  # the add goes into the MLP's norm

    def forward(self, x, cos, sin, attn_mask=None, cache=None, rows=None, pos=0, run=None):
        """run [B, T] bool on the CPU (per-token skipping): only those tokens take the block's update,
        the others keep x. Attention still runs for every token, because tokens that run this layer
        attend to the keys and values of tokens that skip it; the MLP runs on running tokens only."""
        if run is None and self.fold_residual:
            normed, h = self.mlp_norm(self.attn(self.attn_norm(x), cos, sin, attn_mask, cache, rows, pos), residual=x)
            return h + self.mlp(normed)
        h = self.attention_part(x, cos, sin, attn_mask, cache, rows, pos)
        if run is None:
            return self.mlp_part(h)
        at = run.flatten().nonzero()[:, 0].to(x.device, non_blocking=True)  # flat indices of running tokens
        return x.flatten(0, 1).index_copy(0, at, self.mlp_part(h.flatten(0, 1)[at])).view_as(x)

    def attention_part(self, x, cos, sin, attn_mask, cache, rows, pos):
        if self.post_norm:  # OPT-350m: residual add, then norm
            return self.attn_norm(x + self.attn(x, cos, sin, attn_mask, cache, rows, pos))
        return x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache, rows, pos)

    def mlp_part(self, h):
        if self.post_norm:
            return self.mlp_norm(h + self.mlp(h))
        return h + self.mlp(self.mlp_norm(h))

    def write_kv(self, x, cos, sin, cache, rows, pos):
        """For tokens that skip this layer: keys and values from their unchanged residual stream, nothing else."""
        self.attn.write_kv(x if self.post_norm else self.attn_norm(x), cos, sin, cache, rows, pos)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg.validate()
        self.n_layer = cfg.n_layer
        emb_dim = cfg.emb_dim or cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, emb_dim)
        if emb_dim != cfg.n_embd:  # OPT-350m
            self.proj_in = nn.Linear(emb_dim, cfg.n_embd, bias=False)
            self.proj_out = nn.Linear(cfg.n_embd, emb_dim, bias=False)
        if cfg.pos_emb == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size + cfg.pos_offset, cfg.n_embd)
        if cfg.emb_norm:
            self.emb_norm = make_norm(cfg, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, l) for l in range(cfg.n_layer))
        self.rope_tables = {}  # (device, dtype) -> (cos, sin) [block_size, head_dim]: not weights, never saved
        if cfg.final_norm:
            self.norm = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """GPT-2 style init; also used after sharding a model built on the meta device."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * self.n_layer) if name.endswith(("wo", "w_down")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, T):
        """Training FLOPs per token at sequence length T: 6 x parameters (less the embedding lookup)
        + 12 x L x C x T for attention (PaLM, appendix B). Skipped layers and extra exits not counted."""
        n = self.num_params() - self.tok_emb.weight.numel() * (not self.cfg.tie_embeddings)
        return 6 * n + 12 * self.n_layer * self.cfg.n_embd * T

    # ---- the three primitives ----

    def embed(self, idx, pos=0):
        """Token ids [B, T] at positions [pos, pos+T) (pos: int or per-row [B]) -> residual stream [B, T, C]."""
        x = self.tok_emb(idx)
        if hasattr(self, "proj_in"):
            x = self.proj_in(x)
        if self.cfg.pos_emb == "learned":
            x = x + self.pos_emb(positions(pos, idx.shape[1], idx.device) + self.cfg.pos_offset)
        if self.cfg.emb_norm:
            x = self.emb_norm(x)
        return x

    def attention_mask(self, T, pos, device, dtype, S=None):
        """Mask for T queries at [pos, pos+T) over keys [0, S) (default S: pos + T): None where plain causal
        attention does (SDPA's is_causal); else bool [T, S], or with ALiBi an additive float [H, T, S].
        Per-row positions pos [B] always get a mask with a batch dim: [B, 1, T, S] or [B, H, T, S]."""
        cfg, S = self.cfg, end_position(pos, T) if S is None else S
        window, per_row = cfg.sliding_window, torch.is_tensor(pos)
        if (not per_row and cfg.pos_emb != "alibi" and (window is None or S <= window)
                and S == pos + T and (pos == 0 or T == 1)):
            return None
        q = positions(pos, T, device).unsqueeze(-1)  # [(B,) T, 1]
        k = torch.arange(S, device=device)            # [S]
        allowed = k <= q                               # [(B,) T, S]
        if window is not None:
            allowed = allowed & (k > q - window)
        if per_row:
            allowed = allowed.unsqueeze(1)             # [B, 1, T, S]
        if cfg.pos_emb != "alibi":
            return allowed
        bias = alibi_slopes(cfg.n_head, device)[:, None, None] * k.float()  # [H, 1, S]: slope x key position
        return bias.masked_fill(~allowed, float("-inf")).to(dtype)

    def rope(self, pos, T, dtype, device, lengths=None):
        """cos, sin for positions [pos, pos+T), sliced from a table over the whole context (built once per
        device and dtype) unless the frequencies depend on the length (dynamic NTK, LongRoPE): then those of
        each row's own length (see rope_cos_sin)."""
        if (self.cfg.rope_scaling or {}).get("rope_type") in ("dynamic", "longrope"):
            return rope_cos_sin(self.cfg, pos, T, dtype, device, lengths)
        key = (str(device), dtype)
        if key not in self.rope_tables:  # normal tensors even when built under inference_mode: training reads them
            with torch.inference_mode(False):
                self.rope_tables[key] = rope_cos_sin(self.cfg, 0, self.cfg.block_size, dtype, device)  # [S, hd] each
        cos, sin = self.rope_tables[key]
        if torch.is_tensor(pos):
            at = positions(pos, T, device)                                   # [B, T]
            return cos[at].unsqueeze(1), sin[at].unsqueeze(1)                 # [B, 1, T, hd]
        return cos[pos:pos + T], sin[pos:pos + T]

    def run_layers(self, x, start, end, skip_mask=None, cache=None, pos=0, attn_mask=None, lengths=None):
        """Blocks [start, end) at positions [pos, pos+T) (pos: int, or per-row starts [B] on the CPU).
        lengths [B]: each row's own length when rows are right-padded (a prefill); it selects the frequencies
        of length-dependent RoPE (dynamic NTK, LongRoPE). Default: one past each row's last position.

        skip_mask (bool, on the CPU; True = skip): [B, L] per sample: skipping rows pass through block l
        untouched, the others are gathered, run and scattered back, so skipping saves real compute; a
        skipped slot of the cache is never written (static plans never read it). [B, T, L] per token:
        a skipping token keeps its residual stream, but its keys and values are still computed, since
        later tokens that run the layer attend to it. In one-token decode steps a skipping row computes
        only those keys and values; over several tokens attention runs for all and the MLP is saved.
        """
        B, T = x.shape[:2]
        cos = sin = None
        if self.cfg.pos_emb == "rope":
            cos, sin = self.rope(pos, T, x.dtype, x.device, lengths)
        per_token = skip_mask is not None and skip_mask.dim() == 3
        for l in range(start, end):
            block = self.layers[l]
            run = None if skip_mask is None else ~skip_mask[..., l]  # [B] or [B, T]: host-side, no device sync
            if run is None or bool(run.all()):
                x = block(x, cos, sin, attn_mask, cache, None, pos)
                continue
            if per_token and T > 1 and bool(run.any()):  # per-token update (attention for all tokens)
                x = block(x, cos, sin, attn_mask, cache, None, pos, run=run)
                continue
            if per_token:
                run = run.any(-1)  # one token per row, or none running: a row runs the block or writes K/V only
            for keep, rows in ((True, run), (False, ~run)):
                if not bool(rows.any()) or (not keep and not per_token):
                    continue
                idx = rows.nonzero()[:, 0].to(x.device, non_blocking=True)  # [R]
                args = (cos, sin, attn_mask, pos)
                if torch.is_tensor(pos):  # per-row positions: mask and positions follow the rows
                    args = (cos, sin, attn_mask[idx], pos[rows])
                if cos is not None and cos.dim() == 4:  # per-row rope [B, 1, T, hd] follows them too
                    args = (cos[idx], sin[idx], *args[2:])
                if keep:
                    x = x.index_copy(0, idx, block(x[idx], *args[:3], cache, idx, args[3]))
                elif cache is not None:
                    block.write_kv(x[idx], args[0], args[1], cache, idx, args[3])
        return x

    def final_hidden(self, x):
        """The shared exit up to the LM head: final norm, then OPT-350m's project_out."""
        if self.cfg.final_norm:
            x = self.norm(x)
        if hasattr(self, "proj_out"):
            x = self.proj_out(x)
        return x

    def head(self, x):
        return self.lm_head(self.final_hidden(x))

    # ---- forward ----

    def check_exit_layer(self, exit_layer):
        if not isinstance(exit_layer, int) or not 1 <= exit_layer <= self.n_layer:
            raise ValueError(f"exit_layer must be an integer in [1, {self.n_layer}], got {exit_layer!r}")

    def check_vocabulary(self, n_tokens, source):
        """A tokenizer (named by `source`) must give ids the embedding has rows for."""
        if n_tokens > self.cfg.vocab_size:
            raise ValueError(f"{source} has {n_tokens} tokens, more than the model's vocabulary of "
                             f"{self.cfg.vocab_size}: they do not belong together")

    def normalize_skip_mask(self, skip_mask, B, T):
        """Accept [L] (whole batch), [B, L] (per sample) or [B, T, L] (per token); return a bool tensor
        [B, L] or [B, T, L] on the CPU (decisions are host-side)."""
        if skip_mask is None:
            return None
        skip_mask = torch.as_tensor(skip_mask, dtype=torch.bool).cpu()
        if skip_mask.dim() == 1:
            skip_mask = skip_mask.expand(B, -1)
        if tuple(skip_mask.shape) not in ((B, self.n_layer), (B, T, self.n_layer)):
            raise ValueError(f"skip_mask must have shape [{self.n_layer}], [{B}, {self.n_layer}] or "
                             f"[{B}, {T}, {self.n_layer}], got {list(skip_mask.shape)}")
        return skip_mask

    def forward(self, idx, targets=None, *, exit_layer=None, exits=None, skip_mask=None,
                cache=None, pos=0, last_only=False):
        """idx [B, T] token ids at positions [pos, pos+T) (pos: int, or per-row starts [B] on the CPU).

        No targets: logits [B, T, V] of the exit after `exit_layer` layers (default: all L).
        With targets [B, T]: (loss, {exit_layer: loss}) where `exits` maps exit layers
        (1..L, exit E = output of layer E-1) to loss weights; default {L: 1.0}. The loss at every
        exit is computed chunk by chunk from the hidden state, never holding [B*T, V] logits per exit.
        """
        B, T = idx.shape
        if end_position(pos, T) > self.cfg.block_size:
            raise ValueError(f"sequence of {end_position(pos, T)} tokens exceeds the context of {self.cfg.block_size}")
        skip_mask = self.normalize_skip_mask(skip_mask, B, T)
        if targets is None and cache is not None and cache.tokens is not None and not torch.is_tensor(pos):
            idx, skip_mask, pos = cache.forward_from_start(idx, skip_mask, pos)
        x = self.embed(idx, pos)
        S = None if cache is None else cache.key_length(pos, T)
        attn_mask = self.attention_mask(T, pos, idx.device, x.dtype, S)

        if targets is None:
            exit_layer = self.n_layer if exit_layer is None else exit_layer
            self.check_exit_layer(exit_layer)
            x = self.run_layers(x, 0, exit_layer, skip_mask, cache, pos, attn_mask)
            return self.head(x[:, -1:] if last_only else x[:, -T:])  # T: this call's tokens

        exits = exits or {self.n_layer: 1.0}
        for e in exits:
            self.check_exit_layer(e)
        loss, exit_losses, done = 0.0, {}, 0
        flat_targets = targets.reshape(-1)
        for e in sorted(exits):
            x = self.run_layers(x, done, e, skip_mask, cache, pos, attn_mask)
            done = e
            h = self.final_hidden(x).reshape(B * T, -1)  # [B*T, C]
            # one exit: gradients formed in the forward (6CV FLOPs); several: recomputed in the backward,
            # so that no exit holds a [V, C] gradient buffer until the backward
            if FUSED["loss"]:
                exit_loss = linear_cross_entropy(h, self.lm_head.weight, flat_targets, recompute=len(exits) > 1)
            else:  # reference: the whole [B*T, V] logits; like the kernel, 0 when every target is ignored
                n_valid = (flat_targets != -100).sum().clamp(min=1)
                exit_loss = F.cross_entropy(self.lm_head(h).float(), flat_targets, reduction="sum") / n_valid
            exit_losses[e] = exit_loss.detach()
            loss = loss + exits[e] * exit_loss
        return loss, exit_losses

    # ---- checkpoints ----

    def save_pretrained(self, out_dir, state=None):
        """config.json + model.safetensors (of `state`, default this model's), each written to a temporary name and renamed."""
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in (state or self.state_dict()).items()}
        if self.cfg.tie_embeddings:
            state.pop("lm_head.weight")
        savedir.atomic_write(os.path.join(out_dir, "model.safetensors"), lambda p: save_file(state, p))
        savedir.atomic_write(os.path.join(out_dir, "config.json"),
                             lambda p: open(p, "w").write(json.dumps(asdict(self.cfg), indent=2) + "\n"))

    @classmethod
    def from_pretrained(cls, ckpt_dir, device="cpu", dtype=None):
        """Load a nanoskip checkpoint directory (config.json + model.safetensors), checked against its
        manifest.json when it has one (a directory train.py saved)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        cfg_path = os.path.join(ckpt_dir, "config.json")
        weights_path = os.path.join(ckpt_dir, "model.safetensors")
        for path in (cfg_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint {ckpt_dir!r} has no {os.path.basename(path)}")
        savedir.verify(ckpt_dir, only=lambda rel: not rel.startswith("train_state"), required=False)
        try:
            cfg = Config.from_dict(json.load(open(cfg_path)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}") from None
        try:
            state = load_file(weights_path)
        except SafetensorError as e:
            raise ValueError(f"{weights_path}: corrupt safetensors file ({e})") from None
        with torch.device("meta"):
            model = cls(cfg)
        model.load_weights(state)
        model.to(device=device, dtype=dtype)
        return model.eval()

    def load_weights(self, state):
        """Load a full state dict, naming any missing, unexpected, wrongly shaped, integer or non-finite
        tensor; tensors of mixed float dtypes are cast to float32."""
        expected = {k: v.shape for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings:
            expected.pop("lm_head.weight")
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing:
            raise ValueError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}")
        if extra:
            raise ValueError(f"checkpoint has unexpected tensor(s): {', '.join(extra[:5])}")
        for k, shape in expected.items():
            if tuple(state[k].shape) != tuple(shape):
                raise ValueError(f"tensor {k} has shape {list(state[k].shape)}, expected {list(shape)}")
            if not state[k].is_floating_point():
                raise ValueError(f"tensor {k} has dtype {state[k].dtype}; weights must be floating point")
            if not torch.isfinite(state[k]).all():
                raise ValueError(f"tensor {k} holds NaN or inf values")
        if len({t.dtype for t in state.values()}) > 1:  # mixed precisions (one fp16 tensor among fp32...)
            state = {k: t.float() for k, t in state.items()}
        self.load_state_dict(state, strict=False, assign=True)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
