"""
Decoding with a preallocated KV cache: full depth, an early exit, or a static skip plan.

The prompt runs through every layer the decode uses (up to exit_layer); a skip plan applies to
generated tokens only (unified layer skipping, docs/equations.md section 2). Sampling, the batch's
bookkeeping (prompt lengths, where rows end), prefill and compiled steps live here and serve
speculate.py too. How the loop is made fast: docs/sampling.md.
"""
import types
import weakref

import torch

from model import KVCache, layer_mask, rope_switch


def check_sampling(max_new_tokens, temperature, top_k, top_p):
    """The sampling arguments generate(), generate_speculative() and sample.py accept, as in
    transformers' generation/configuration_utils.py and logits_process.py: temperature >= 0 (0 is
    greedy), top_k None or 0 (off) or >= 1, top_p None or in (0, 1], max_new_tokens >= 0.
    Raises ValueError naming the argument."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN

    def integer(x):
        return isinstance(x, int) and not isinstance(x, bool)
    if not (integer(max_new_tokens) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (number(temperature) and 0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if not (top_k is None or integer(top_k) and top_k >= 0):
        raise ValueError(f"top_k must be None, 0 (off) or an integer >= 1, got {top_k!r}")
    if not (top_p is None or number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def probs_from_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """logits [B, V] -> sampling distribution [B, V] after temperature, top-k (None or 0: off) and
    top-p (nucleus; the most likely token always stays), as transformers' TopK/TopPLogitsWarper."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop[:, 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits [B, V] -> next token ids [B, 1]. temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(probs_from_logits(logits, temperature, top_k, top_p), 1,
                             generator=generator)


def first_end(ids, end_ids):
    """The index of the first id in ids that is one of end_ids (a row's end), or None."""
    return next((i for i, t in enumerate(ids) if t in end_ids), None)


def row_ends(new, count, end_ids, rows, stop=None):
    """Where rows end among the tokens they just accepted. new [B, k], of which row r's first
    count[r] ([B], CPU) are its own; rows [B]: each row's index in the batch the decode was called
    with. A row ends through its first id in end_ids (None: ids end no row; transformers'
    list-valued eos_token_id), or where stop(row, ids it keeps) returns a count (None: go on).
    Returns (kept [B], ended [B] bool) on the CPU: row r keeps new[r, :kept[r]]."""
    kept = count.tolist()
    ended = [False] * len(kept)
    if end_ids is not None or stop is not None:
        ends = set(end_ids or ())
        for r, ids in enumerate(new.tolist()):  # one read to the host, then plain Python
            ids = ids[:kept[r]]
            at = first_end(ids, ends)
            if at is not None:
                kept[r], ended[r] = at + 1, True
            m = stop(int(rows[r]), ids[:kept[r]]) if stop is not None and kept[r] else None
            if m is not None:
                kept[r], ended[r] = m, True
    return torch.tensor(kept, dtype=torch.long), torch.tensor(ended, dtype=torch.bool)


def pad_prompts(prompts, pad_id=0):
    """A list of token-id lists -> (idx [B, T] right-padded with pad_id, lengths [B] on the CPU)."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    lens = torch.tensor([len(p) for p in prompts])
    idx = torch.full((len(prompts), int(lens.max())), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.as_tensor(p)
    return idx, lens


def check_lengths(model, idx, prompt_lens, max_new_tokens):
    """Prompt lengths [B] on the CPU (default: every row is T long), after checking the context
    fits. Raises ValueError."""
    B, T = idx.shape
    lens = torch.full((B,), T) if prompt_lens is None else torch.as_tensor(prompt_lens).cpu().long()
    if tuple(lens.shape) != (B,) or int(lens.min()) < 1 or int(lens.max()) > T:
        raise ValueError(f"prompt_lens must hold {B} lengths in [1, {T}]")
    longest = int(lens.max())
    if longest + max_new_tokens > model.cfg.block_size:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's context of {model.cfg.block_size}")
    return lens


def eos_padded(model, idx, lens, max_new_tokens):
    """Prompts idx [B, T] with lengths lens [B] -> [B, T + max_new_tokens]: each prompt, then eos
    padding (cfg.eos_id)."""
    eos = model.cfg.eos_id
    out = torch.full((idx.shape[0], idx.shape[1] + max_new_tokens), eos, dtype=torch.long,
                     device=idx.device)
    in_prompt = torch.arange(idx.shape[1]) < lens[:, None]  # [B, T]
    out[:, :idx.shape[1]] = idx.masked_fill(~in_prompt.to(idx.device), eos)
    return out


def row_positions(n, cache, device):
    """Per-row positions n [B] on the CPU -> what the model takes: an int when every row is at the
    same place, else the per-row tensor; always a tensor on `device` for a cache that CUDA graphs
    write (attend_all), so that every step is the same graph."""
    if cache.attend_all:
        return n.to(device)
    return int(n[0]) if len(n) == 1 or bool((n == n[0]).all()) else n


def cache_mask(model, x, pos, cache):
    """The attention mask for hidden states x [B, T, C] at positions pos over the keys `cache`
    holds."""
    T = x.shape[1]
    return model.attention_mask(T, pos, x.device, x.dtype, cache.key_length(pos, T))


def layers(model, x, pos, start, end, cache, skip_mask=None):
    """Hidden states x [B, T, C] at positions pos (int or [B]) through layers [start, end)."""
    return model.run_layers(x, start, end, skip_mask, cache, pos, cache_mask(model, x, pos, cache))


def step(model, tokens, pos, start, end, cache, skip_mask=None):
    """tokens [B, T] at positions pos (int or [B]) through layers [start, end) -> [B, T, C]."""
    return layers(model, model.embed(tokens, pos), pos, start, end, cache, skip_mask)


def next_logits(model, tokens, pos, runs, cache, skip_mask=None):
    """One decode step: tokens [B, 1] through the runs of layers ((start, stop), ...) and the exit
    -> next-token logits [B, V]."""
    x = model.embed(tokens, pos)
    attn_mask = cache_mask(model, x, pos, cache)  # one mask for every run
    for start, stop in runs:
        x = model.run_layers(x, start, stop, skip_mask, cache, pos, attn_mask)
    return model.head(x)[:, -1]


def model_skip_plan(model):
    """The checkpoint config's skip plan (layers generated tokens skip) as a mask [L], or None."""
    return layer_mask(model.cfg.skip_layers, model.n_layer) if model.cfg.skip_layers else None


def layer_runs(skip_mask, end):
    """Layers [0, end) under a skip mask [B, L] (or per token, [B, 1, L]) -> (runs of layers every
    row runs ((start, stop), ...), the mask left for rows to differ on, or None). A plan alike for
    every row becomes Python ints (graph constants when compiled); a layer every row skips is not
    run."""
    if skip_mask is None or skip_mask.dim() != 2 or not bool((skip_mask == skip_mask[0]).all()):
        return ((0, end),), skip_mask
    runs = []
    for l, skip in enumerate(skip_mask[0, :end].tolist()):
        if not skip and runs and runs[-1][1] == l:
            runs[-1] = (runs[-1][0], l + 1)  # extends the run before it
        elif not skip:
            runs.append((l, l + 1))
    return tuple(runs), None


def prefill(model, idx, lens, end, cache, skip_mask=None):
    """Right-padded prompts idx [B, T] of lens [B] tokens (each row's own length selects
    length-dependent RoPE frequencies) through layers [0, end) into the cache, skipping what
    skip_mask ([B, T, L] or None) says -> the hidden state of each row's last prompt token
    [B, 1, C]. Pad positions get cache slots, which a row never attends to before decoding
    overwrites them."""
    x = model.embed(idx)
    x = model.run_layers(x, 0, end, skip_mask, cache, 0, cache_mask(model, x, 0, cache), lens)
    return x[torch.arange(len(lens), device=x.device), (lens - 1).to(x.device)].unsqueeze(1)


def refill(model, out, n, end, cache, prompt_lens=None, skip_mask=None):
    """The cache recomputed where LongRoPE switches to its long factors (model.rope_switch): each
    row's sequence so far, out[b, :n[b]], through layers [0, end) again, generated tokens (from
    prompt_lens[b] on) skipping skip_mask's layers [B, L] -> the hidden state of each row's last
    token [B, 1, C]. As transformers' Phi-3 (prepare_inputs_for_generation drops the cache
    there)."""
    T = int(n.max())
    per_token = None
    if skip_mask is not None:
        generated = torch.arange(T) >= prompt_lens[:, None]         # [B, T]
        per_token = generated[..., None] & skip_mask[:, None, :]    # [B, T, L]
    return prefill(model, out[:, :T], n, end, cache, per_token)


CUDA_GRAPH_DEVICES = ("cuda",)  # where compiled decode steps are recorded as CUDA graphs
_graph_caches = weakref.WeakKeyDictionary()  # model -> {(batch size, dtype, device): KVCache}


def records_cuda_graphs(device, compile):
    """Whether compiled steps on `device` are recorded as CUDA graphs."""
    return bool(compile) and device.type in CUDA_GRAPH_DEVICES


def decode_cache(model, idx, max_len, compile):
    """The KV cache for decoding prompts idx [B, T]: max_len positions, or the whole context when
    compiled (one shape for every call). Where steps become CUDA graphs it is attended over in full
    and kept for the next call with this batch size (the graphs replay over its addresses)."""
    dtype = next(model.parameters()).dtype
    if not records_cuda_graphs(idx.device, compile):
        length = model.cfg.block_size if compile else max_len
        return KVCache(model.cfg, idx.shape[0], length, idx.device, dtype)
    caches, key = _graph_caches.setdefault(model, {}), (idx.shape[0], dtype, idx.device)
    if key not in caches:
        caches[key] = KVCache(model.cfg, idx.shape[0], model.cfg.block_size, idx.device, dtype,
                              attend_all=True)
    return caches[key]


_compiled = {}
GRAPHS_PER_FUNCTION = 64


def compiled(fn, device, variant=None):
    """fn as a torch.compile'd function for `device`: mode="reduce-overhead" (CUDA graphs) on CUDA,
    Inductor's C++ wrapper elsewhere. variant: what makes a call another graph (a round's draft
    layers and draft steps, the exits it reads); each variant compiles from its own copy of fn's
    code. Calls run with dynamo's graph limit raised to GRAPHS_PER_FUNCTION (torch's config.patch;
    the process's config is left alone). Why: docs/sampling.md."""
    key = fn, device.type, variant
    if key not in _compiled:
        if variant is not None:  # the same code, another object
            copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                      fn.__defaults__, fn.__closure__)
            copy.__kwdefaults__, fn = fn.__kwdefaults__, copy
        if device.type in CUDA_GRAPH_DEVICES:
            graph = torch.compile(fn, mode="reduce-overhead")
        else:
            graph = torch.compile(fn, options={"cpp_wrapper": True})
        limit = max(torch._dynamo.config.recompile_limit, GRAPHS_PER_FUNCTION)
        _compiled[key] = torch._dynamo.config.patch(recompile_limit=limit)(graph)
    return _compiled[key]


@torch.inference_mode()
def generate(model, idx, max_new_tokens, *, prompt_lens=None, temperature=1.0, top_k=None,
             top_p=None, exit_layer=None, skip_mask=None, generator=None, compile=False,
             stop_at_eos=True, stop=None, n_tokens=None):
    """idx [B, T] right-padded prompts (prompt_lens [B] their lengths, default T)
    -> [B, T + max_new_tokens]: row b holds its prompt, up to max_new_tokens generated tokens, then
    cfg.eos_id padding. With stop_at_eos a row ends through its first id in cfg.eos_ids; stop(row,
    new ids) may end it too (row_ends). n_tokens: the tokenizer's size; ids at or past it (a padded
    vocabulary's rows) are never generated. Sampling arguments as check_sampling.
    Prompts run through every layer up to exit_layer; skip_mask ([L] or [B, L]; default: the
    model's config plan) applies to generated tokens only. compile: decode steps as a compiled graph
    (prompts of one length, one skip plan for every row). Raises ValueError on bad arguments."""
    B, T = idx.shape
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    exit_layer = model.n_layer if exit_layer is None else exit_layer
    model.check_exit_layer(exit_layer)
    lens = check_lengths(model, idx, prompt_lens, max_new_tokens)
    skip_mask = model_skip_plan(model) if skip_mask is None else skip_mask
    skip_mask = model.normalize_skip_mask(skip_mask, B, 1)
    cache = decode_cache(model, idx, T + max_new_tokens, compile)
    out = eos_padded(model, idx, lens, max_new_tokens)
    rows = torch.arange(B, device=idx.device)
    plan, switch = skip_mask, rope_switch(model.cfg)
    runs, skip_mask = layer_runs(skip_mask, exit_layer)
    if compile and (skip_mask is not None or bool((lens != T).any())):
        raise ValueError("compile needs prompts of one length and one skip plan for every row")
    decode_step = compiled(next_logits, idx.device) if compile else next_logits
    logits = model.head(prefill(model, idx, lens, exit_layer, cache))[:, -1]
    end_ids = model.cfg.eos_ids if stop_at_eos else None
    finished = torch.zeros(B, dtype=torch.bool)
    for i in range(max_new_tokens):
        token = sample_token(logits[:, :n_tokens], temperature, top_k, top_p, generator)  # [B, 1]
        token = token.masked_fill(finished.to(idx.device)[:, None], model.cfg.eos_id)  # padding
        pos = lens + i
        out[rows, pos.to(idx.device)] = token[:, 0]
        if end_ids is not None or stop is not None:
            finished |= row_ends(token, (~finished).long(), end_ids, torch.arange(B), stop)[1]
            if bool(finished.all()):
                break
        if i + 1 < max_new_tokens and switch is not None and bool((pos == switch).any()):
            logits = model.head(refill(model, out, pos + 1, exit_layer, cache, lens, plan))[:, -1]
        elif i + 1 < max_new_tokens:
            pos = row_positions(pos, cache, idx.device)
            logits = decode_step(model, token, pos, runs, cache, skip_mask)
    return out
