"""
Decoding with a preallocated KV cache: full depth, an early exit, or a static skip plan.

The prompt runs through every layer the decode uses (up to exit_layer); a skip plan applies to
generated tokens only (unified layer skipping, docs/equations.md section 2), so the prompt's cache is
complete and generated tokens never read a slot the plan skipped.
"""
import time
import types
import weakref

import torch

from model import KVCache, layer_mask, rope_switch


def check_sampling(max_new_tokens, temperature, top_k, top_p):
    """The sampling arguments generate(), generate_speculative() and sample.py accept, as in transformers'
    generation/configuration_utils.py and logits_process.py: temperature >= 0 (0 is greedy), top_k None or 0 (off)
    or >= 1, top_p None or in (0, 1], max_new_tokens >= 0. Raises ValueError naming the argument."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN
    if not (isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (number(temperature) and 0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if not (top_k is None or isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"top_k must be None, 0 (off) or an integer >= 1, got {top_k!r}")
    if not (top_p is None or number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def probs_from_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """logits [B, V] -> sampling distribution [B, V] after temperature, top-k (None or 0: off) and top-p (nucleus;
    the most likely token always stays, so a tiny top_p is greedy), as transformers' TopK/TopPLogitsWarper."""
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
    return torch.multinomial(probs_from_logits(logits, temperature, top_k, top_p), 1, generator=generator)


def row_ends(new, count, eos_id, rows, stop=None):
    """Where rows end among the tokens they just accepted: new [B, k], of which row r's first count[r] ([B], on the
    CPU) are its own; rows [B]: each row's index in the batch generate() was called with. Returns (kept [B], ended
    [B] bool) on the CPU: row r keeps new[r, :kept[r]], and ended says it is finished: through its first eos_id, as
    transformers' generate (None: eos does not end rows), or where stop(row, ids it keeps) returns a count (None:
    go on), e.g. at a stop string (sample.py's Completions). One read of new to the host (a sync), then plain Python
    over at most B x k ids: a handful of tensor ops cost more than that at decoding's batch sizes."""
    kept = count.tolist()
    ended = [False] * len(kept)
    if eos_id is not None or stop is not None:
        for r, ids in enumerate(new.tolist()):
            ids = ids[:kept[r]]
            if eos_id in ids:
                kept[r], ended[r] = ids.index(eos_id) + 1, True
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
    """Prompt lengths [B] on the CPU (default: every row is T long), after checking the context fits."""
    B, T = idx.shape
    lens = torch.full((B,), T) if prompt_lens is None else torch.as_tensor(prompt_lens).cpu().long()
    if tuple(lens.shape) != (B,) or int(lens.min()) < 1 or int(lens.max()) > T:
        raise ValueError(f"prompt_lens must hold {B} lengths in [1, {T}]")
    longest = int(lens.max())
    if longest + max_new_tokens > model.cfg.block_size:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {model.cfg.block_size}")
    return lens


def eos_padded(model, idx, lens, max_new_tokens):
    """Prompts idx [B, T] with lengths lens [B] -> [B, T + max_new_tokens]: each prompt, then eos padding."""
    out = torch.full((idx.shape[0], idx.shape[1] + max_new_tokens), model.cfg.eos_id, dtype=torch.long,
                     device=idx.device)
    in_prompt = torch.arange(idx.shape[1]) < lens[:, None]  # [B, T]
    out[:, :idx.shape[1]] = idx.masked_fill(~in_prompt.to(idx.device), model.cfg.eos_id)
    return out


def row_positions(n, cache, device):
    """Per-row positions n [B] on the CPU -> what the model takes: an int when every row is at the same
    place (plain causal attention, no mask), else the per-row tensor; always a tensor on `device` for a
    cache that CUDA graphs write (attend_all), so that every step is the same graph."""
    if cache.attend_all:
        return n.to(device)
    return int(n[0]) if len(n) == 1 or bool((n == n[0]).all()) else n


def cache_mask(model, x, pos, cache):
    """The attention mask for hidden states x [B, T, C] at positions pos over the keys `cache` holds."""
    T = x.shape[1]
    return model.attention_mask(T, pos, x.device, x.dtype, cache.key_length(pos, T))


def layers(model, x, pos, start, end, cache, skip_mask=None):
    """Hidden states x [B, T, C] at positions pos (int or per-row [B]) through layers [start, end)."""
    return model.run_layers(x, start, end, skip_mask, cache, pos, cache_mask(model, x, pos, cache))


def step(model, tokens, pos, start, end, cache, skip_mask=None):
    """tokens [B, T] at positions pos (int or per-row [B]) through layers [start, end) -> hidden [B, T, C]."""
    return layers(model, model.embed(tokens, pos), pos, start, end, cache, skip_mask)


def next_logits(model, tokens, pos, runs, cache, skip_mask=None):
    """One decode step: tokens [B, 1] through the runs of layers ((start, stop), ...) and the exit -> next-token
    logits [B, V]."""
    x = model.embed(tokens, pos)
    attn_mask = cache_mask(model, x, pos, cache)  # one mask for every run
    for start, stop in runs:
        x = model.run_layers(x, start, stop, skip_mask, cache, pos, attn_mask)
    return model.head(x)[:, -1]


def model_skip_plan(model):
    """The skip plan stored in the checkpoint's config (layers generated tokens skip), as a mask [L]."""
    return layer_mask(model.cfg.skip_layers, model.n_layer) if model.cfg.skip_layers else None


def layer_runs(skip_mask, end):
    """Layers [0, end) under a skip mask [B, L] (or per token, [B, 1, L]) -> (runs of layers every row runs
    ((start, stop), ...), the mask left for rows to differ on, or None). A per-row plan alike for every row
    becomes Python ints, which torch.compile takes as constants (a mask tensor's per-layer decisions would each
    break its graph); skipping a layer for every row is not running it (no cache slot is written for it)."""
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
    """Run right-padded prompts idx [B, T] of lens [B] tokens (each row's own length, which selects
    length-dependent RoPE frequencies) through layers [0, end) into the cache, skipping what skip_mask
    ([B, T, L], or None) says; return the hidden state of each row's last prompt token [B, 1, C]. Pad
    positions get cache slots too, but a row attends only to positions it has reached, and decoding
    overwrites them."""
    x = model.embed(idx)
    x = model.run_layers(x, 0, end, skip_mask, cache, 0, cache_mask(model, x, 0, cache), lens)
    return x[torch.arange(len(lens), device=x.device), (lens - 1).to(x.device)].unsqueeze(1)


def refill(model, out, n, end, cache, prompt_lens=None, skip_mask=None):
    """Recompute the cache when LongRoPE switches to its long factors (model.rope_switch): run each row's
    whole sequence so far, out[b, :n[b]], through layers [0, end) again, generated tokens (from prompt_lens[b]
    on) skipping the layers of skip_mask [B, L] as they did; return the hidden state of each row's last token
    [B, 1, C]. From here the decode equals a cache-free forward; this is transformers' Phi-3 behaviour (its
    prepare_inputs_for_generation drops the cache at the switch). Rows that did not cross get what they had."""
    T = int(n.max())
    per_token = None
    if skip_mask is not None:
        generated = torch.arange(T) >= prompt_lens[:, None]         # [B, T]
        per_token = generated[..., None] & skip_mask[:, None, :]    # [B, T, L]
    return prefill(model, out[:, :T], n, end, cache, per_token)


CUDA_GRAPH_DEVICES = ("cuda",)  # where compiled decode steps are recorded as CUDA graphs
_graph_caches = weakref.WeakKeyDictionary()  # model -> {(batch size, dtype, device): KVCache}


def decode_cache(model, idx, max_len, compile):
    """The KV cache for decoding prompts idx [B, T]: max_len positions, or the whole context when compiled (one
    shape for every call). Where steps become CUDA graphs it is attended over in full and kept for the next
    call with this batch size: the graphs replay over its addresses (a new cache would have them re-recorded);
    every slot a call reads, it writes first."""
    dtype = next(model.parameters()).dtype
    if not (compile and idx.device.type in CUDA_GRAPH_DEVICES):
        return KVCache(model.cfg, idx.shape[0], model.cfg.block_size if compile else max_len, idx.device, dtype)
    caches, key = _graph_caches.setdefault(model, {}), (idx.shape[0], dtype, idx.device)
    if key not in caches:
        caches[key] = KVCache(model.cfg, idx.shape[0], model.cfg.block_size, idx.device, dtype, attend_all=True)
    return caches[key]


_compiled = {}
GRAPHS_PER_FUNCTION = 64


def compiled(fn, device, variant=None):
    """fn (next_logits, greedy_round, full_step_reading_exits, draft_step or verify_step) as a torch.compile'd graph
    for `device`. With compile=True the cache spans the model's whole context, so shapes are static. On CUDA the
    step attends over the whole cache with positions as a device tensor, so one graph serves every step and is
    recorded once as a CUDA graph (mode="reduce-overhead": one launch per step instead of one per kernel). On the
    CPU positions turn symbolic at the second call (one recompile) and attention reads only the written slots;
    Inductor's C++ wrapper there, since the Python wrapper's per-call overhead is most of a small model's step.
    Speedups in BENCHMARKS.md; the first calls compile (tens of seconds on a CPU). Every exit layer, skip plan and
    number of verified positions is a graph of its own: past dynamo's default of 8 graphs a function, the rest would
    run eagerly, so calls of these graphs run with the limit raised to GRAPHS_PER_FUNCTION (recompile_limit).
    variant: what makes a call another graph (a round's draft layers, number of draft steps and, in a
    probe round, the exits it reads): each variant compiles from its own copy of fn's code, which dynamo keeps its
    graphs on, so that a call meets its own graph's guards first instead of failing the others' first (where two
    graphs alternate, as exit auto's rounds do, that cost about 0.3 ms a call on a 2-core CPU, against 0.04 ms with
    copies: BENCHMARKS.md). The copies keep fn's name, line and file, so what dynamo learns of one (positions
    turning symbolic) holds for all."""
    key = fn, device.type, variant
    if key not in _compiled:
        if variant is not None:  # the same code, another object
            copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                      fn.__closure__)
            copy.__kwdefaults__, fn = fn.__kwdefaults__, copy
        if device.type in CUDA_GRAPH_DEVICES:
            graph = torch.compile(fn, mode="reduce-overhead")
        else:
            graph = torch.compile(fn, options={"cpp_wrapper": True})
        # dynamo's graph limit raised for these calls only (torch's own patch; the process's config is left alone)
        limit = max(torch._dynamo.config.recompile_limit, GRAPHS_PER_FUNCTION)
        _compiled[key] = torch._dynamo.config.patch(recompile_limit=limit)(graph)
    return _compiled[key]


@torch.inference_mode()
def generate(model, idx, max_new_tokens, *, prompt_lens=None, temperature=1.0, top_k=None, top_p=None,
             exit_layer=None, skip_mask=None, generator=None, compile=False, stop_at_eos=True, stop=None,
             n_tokens=None):
    """idx [B, T] prompts (right-padded; prompt_lens [B] their lengths, default T) -> [B, T + max_new_tokens]:
    row b holds its prompt, then up to max_new_tokens generated tokens, then eos padding. A row ends at the first
    eos it generates (stop_at_eos), or where stop(row, new ids) ends it (row_ends); decoding ends when every row
    has (finished rows get eos). n_tokens: the tokenizer's size; ids at or beyond it, a padded vocabulary's
    extra rows, are never generated.
    Sampling arguments as check_sampling.

    Prompts run through every layer up to exit_layer; skip_mask ([L] or [B, L]; default: the plan in
    the model's config) applies to generated tokens only. compile: decode steps as a compiled graph
    (prompts of one length, one skip plan for every row; the first call compiles).
    """
    B, T = idx.shape
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    exit_layer = model.n_layer if exit_layer is None else exit_layer
    model.check_exit_layer(exit_layer)
    lens = check_lengths(model, idx, prompt_lens, max_new_tokens)
    skip_mask = model.normalize_skip_mask(model_skip_plan(model) if skip_mask is None else skip_mask, B, 1)
    cache = decode_cache(model, idx, T + max_new_tokens, compile)
    out = eos_padded(model, idx, lens, max_new_tokens)
    rows = torch.arange(B, device=idx.device)
    plan, switch = skip_mask, rope_switch(model.cfg)
    runs, skip_mask = layer_runs(skip_mask, exit_layer)
    if compile and (skip_mask is not None or bool((lens != T).any())):
        raise ValueError("compile needs prompts of one length and one skip plan for every row")
    decode_step = compiled(next_logits, idx.device) if compile else next_logits
    logits = model.head(prefill(model, idx, lens, exit_layer, cache))[:, -1]
    eos_id, finished = model.cfg.eos_id if stop_at_eos else None, torch.zeros(B, dtype=torch.bool)
    for i in range(max_new_tokens):
        token = sample_token(logits[:, :n_tokens], temperature, top_k, top_p, generator)  # [B, 1]
        token = token.masked_fill(finished.to(idx.device)[:, None], model.cfg.eos_id)  # finished rows: eos padding
        pos = lens + i
        out[rows, pos.to(idx.device)] = token[:, 0]
        if eos_id is not None or stop is not None:
            finished |= row_ends(token, (~finished).long(), eos_id, torch.arange(B), stop)[1]
            if bool(finished.all()):
                break
        if i + 1 < max_new_tokens and switch is not None and bool((pos == switch).any()):  # a row passes it
            logits = model.head(refill(model, out, pos + 1, exit_layer, cache, lens, plan))[:, -1]
        elif i + 1 < max_new_tokens:
            logits = decode_step(model, token, row_positions(pos, cache, idx.device), runs, cache, skip_mask)
    return out


def clock(device):
    """Now, for work queued on `device`: a recorded CUDA event (readable once the host has waited on the device),
    else the host's clock (CPU work is done when its call returns)."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds_between(start, end):
    """Seconds between two clock() readings."""
    return start.elapsed_time(end) / 1e3 if isinstance(start, torch.cuda.Event) else end - start


def accepted_prefix(agrees):
    """agrees [B, d] bool, whether each draft is accepted on its own -> how many lead each row unbroken [B]: the
    drafts a round accepts (none after the first rejection)."""
    return agrees.long().cumprod(1).sum(1)


def accept_drafts(logits, drafts, draft_probs, temperature, top_k, top_p, generator, counts=None):
    """Verifier logits [B, d+1, V] (row i predicts draft i; row d the bonus token), drafts [B, d]
    -> (accepted count [B], next token [B]: the correction after the accepted prefix, or the bonus).
    counts [B] (default d): row b's drafts past counts[b] are not its own (it stopped drafting) and never count.

    Greedy: accept the prefix where drafts equal the verifier's argmax. Sampling (draft_probs q
    [B, d, V]): accept draft x with prob min(1, p(x)/q(x)); the first rejection resamples from
    normalize(max(p - q, 0)), so the output follows p exactly.
    """
    B, d = drafts.shape
    rows = torch.arange(B, device=drafts.device)
    own = torch.ones(B, d, dtype=torch.bool, device=drafts.device) if counts is None else (
        torch.arange(d) < counts[:, None]).to(drafts.device)          # [B, d]: drafts each row counts
    if temperature == 0:
        verified = logits.argmax(-1)                                  # [B, d+1]
        n_acc = accepted_prefix((drafts == verified[:, :d]) & own)  # [B]
        return n_acc, verified[rows, n_acc]
    p = probs_from_logits(logits.flatten(0, 1), temperature, top_k, top_p).view(B, d + 1, -1)
    p_x = p[:, :d].gather(-1, drafts[..., None])[..., 0]              # [B, d]
    q_x = draft_probs.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(B, d, generator=generator, device=drafts.device)
    n_acc = accepted_prefix((u < (p_x / q_x).clamp(max=1.0)) & own)  # [B]
    q_pad = torch.cat([draft_probs * own[..., None], torch.zeros_like(p[:, :1])], dim=1)  # past a row's own
    residual = (p[rows, n_acc] - q_pad[rows, n_acc]).clamp(min=0)   # [B, V]; drafts q = 0, so p (the bonus)
    return n_acc, torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


def layer_outputs(model, x, pos, start, end, cache, attn_mask):
    """Hidden states x [B, T, C] at positions pos through layers [start, end), one at a time -> the output of each
    [end - start, B, T, C]: where the heads of --exit_layer auto's probed exits read."""
    outputs = []
    for l in range(start, end):
        x = model.run_layers(x, l, l + 1, None, cache, pos, attn_mask)
        outputs.append(x)
    return torch.stack(outputs)


def draft_step(model, tokens, pos, shared, runs, cache, keep=False):
    """One draft step of a skip-plan draft: tokens [B, 1] through layers [0, shared), which the draft and the
    verification share, then the draft's runs of later layers ((start, stop), ...) and the head
    -> (hidden state before layer `shared` [B, 1, C]: where verification starts, draft logits [B, V], and with
    keep the output of each layer in [0, shared) [shared, B, 1, C], else None)."""
    x = model.embed(tokens, pos)
    attn_mask = cache_mask(model, x, pos, cache)  # one mask for every run
    kept = layer_outputs(model, x, pos, 0, shared, cache, attn_mask) if keep else None
    h = x = kept[-1] if keep else model.run_layers(x, 0, shared, None, cache, pos, attn_mask)
    for start, stop in runs:
        x = model.run_layers(x, start, stop, None, cache, pos, attn_mask)
    return h, model.head(x)[:, -1], kept


def with_last_draft(model, states, tokens, pos, start, cache):
    """Hidden states before layer `start` of the drafted positions (states [B, K, C] at positions pos .. pos+K-1,
    or None for K = 0) and tokens [B, 1] at position pos+K (the last draft, which no draft step has run; None when
    one has), run through layers [0, start) -> [B, K (+1), C]."""
    if tokens is None:
        return states
    last = step(model, tokens, pos + (0 if states is None else states.shape[1]), 0, start, cache)
    return last if states is None else torch.cat([states, last], dim=1)


def verify_step(model, states, pos, start, end, cache, tokens=None, keep=False):
    """A round's verification: with_last_draft's states through layers [start, end) and the head -> (logits
    [B, K (+1), V], with keep the output of each layer in [start, end) [end - start, B, K (+1), C], else None).
    One graph for what would be an exit step, the verification and the head."""
    states = with_last_draft(model, states, tokens, pos, start, cache)
    if not keep:
        return model.head(layers(model, states, pos, start, end, cache)), None
    kept = layer_outputs(model, states, pos, start, end, cache, cache_mask(model, states, pos, cache))
    return model.head(kept[-1]), kept


def greedy_round(model, token, pos, shared, runs, end, cache, steps, n_tokens=None, exits=()):
    """A greedy round in one call (one graph when compiled): `steps` draft steps (draft_step) from tokens [B, 1] at
    positions pos, each drafting the argmax of its logits (ids below n_tokens), then their verification (verify_step)
    -> (the verifier's argmax [B, steps+1], accepted drafts [B], [(exit, predictions [B])] of each exit in `exits`
    at the round's first position: exit auto's probe, probed_predictions, from the layer outputs the first draft
    step and the verification keep when exits are read). The verifier's tokens up to a row's accepted count are what
    it settles: its accepted drafts (equal to them), then the correction or the bonus token."""
    states, drafts, first_kept = [], [], None
    for i in range(steps):
        h, logits, kept = draft_step(model, token, pos + i, shared, runs, cache, keep=bool(exits) and i == 0)
        first_kept = kept if i == 0 else first_kept
        states.append(h)
        token = logits[:, :n_tokens].argmax(-1, keepdim=True)  # [B, 1]
        drafts.append(token)
    logits, kept = verify_step(model, torch.cat(states, 1) if states else None, pos, shared, end, cache, token,
                               keep=bool(exits))
    verified = logits[..., :n_tokens].argmax(-1)  # [B, steps+1]
    drafts = torch.cat(drafts, 1) if drafts else verified[:, :0]  # [B, steps]
    probed = probed_predictions(model, exits, shared, first_kept, kept, n_tokens)
    return verified, accepted_prefix(drafts == verified[:, :-1]), probed


def full_step_reading_exits(model, token, pos, end, cache, exits, n_tokens=None):
    """A full-depth decode step of tokens [B, 1] at positions pos through layers [0, end) that also reads the head
    at each exit in `exits` on the way -> (the full model's argmax [B, 1], each exit's [len(exits), B]): while exit
    layer auto decodes at full depth, how often each exit would have drafted the token settled is counted at the
    price of its head (one graph when compiled)."""
    x = model.embed(token, pos)
    attn_mask = cache_mask(model, x, pos, cache)
    states, start = [], 0
    for stop in list(exits) + [end]:
        x = model.run_layers(x, start, stop, None, cache, pos, attn_mask)
        states.append(x[:, -1])  # [B, C]
        start = stop
    preds = model.head(torch.stack(states))[..., :n_tokens].argmax(-1)  # [len(exits) + 1, B]: one product
    return preds[-1][:, None], preds[:-1]


def prefill_reading_exits(model, idx, lens, cache, exits, last=8):
    """prefill() of prompts idx [B, T] (lens [B]) but each row's last token, as generate_speculative's, through
    every layer, reading the head at each exit in `exits` on the way -> (predictions [len(exits), B, last] of those
    exits and [B, last] of the full model at each row's last `last` positions, valid [B, last]: the positions the
    row has). How often an exit agrees with the full model on the prompt stands in for its acceptance until rounds
    measure it."""
    x = model.embed(idx[:, :-1])
    attn_mask = cache_mask(model, x, 0, cache)
    pos = (lens - 1)[:, None] - last + torch.arange(last)  # [B, last]: positions whose next token is in the prompt
    at = (torch.arange(len(lens))[:, None].to(x.device), pos.clamp(min=0).to(x.device))
    states, start = [], 0
    for stop in list(exits) + [model.n_layer]:
        x = model.run_layers(x, start, stop, None, cache, 0, attn_mask, (lens - 1).clamp(min=1))
        states.append(x[at])  # [B, last, C]
        start = stop
    preds = model.head(torch.stack(states)).argmax(-1)  # [len(exits) + 1, B, last]: one product for every exit
    return preds[:-1], preds[-1], (pos >= 0).to(x.device)


def probed_predictions(model, exits, f, first_kept, kept, n_tokens):
    """What the head at each exit in `exits` predicts at a round's first position: shallower than f from the first
    draft step's kept layer outputs ([f, B, 1, C], None if the round drafted nothing), deeper from the
    verification's (kept [L - f, B, K+1, C]), all in one product with the head -> [(exit, predictions [B])]."""
    states = [(e, first_kept[e - 1]) for e in exits if e < f and first_kept is not None]
    states += [(e, kept[e - 1 - f, :, :1]) for e in exits if e > f]
    if not states:
        return []
    preds = model.head(torch.stack([x for _, x in states]))[..., 0, :n_tokens].argmax(-1)  # [X, B]
    return [(e, p) for (e, _), p in zip(states, preds)]


def count_agreement(chooser, rows, E, counts, planned, n_acc, settled, probed=(), read=(), remember=True):
    """Tell the exit chooser how its exits did this round in batch rows rows [B] (on the CPU, as counts, planned
    and n_acc [B]). settled [B, K+1]: the tokens at the round's positions, valid up to each row's n_acc (the
    accepted drafts and the verifier's token). The exit E drafted (0: none did): its accepted drafts agreed, a
    rejected one did not, nor one the threshold stopped (a row's count below what it planned). probed: (exit,
    predictions [B]) of a probe round's other exits at the round's first position, which every round settles (its
    later ones only where E's drafts were accepted, where counting them would count the other exits mostly where E
    found the tokens easy). read: (exit, predictions [B, K+1]) of a stretch of full-depth steps, every position of
    which the full model settled, counted position by position (one product, one copy to the host). remember: as
    ExitChooser.count."""
    if E:
        chooser.count(E, rows, n_acc, torch.minimum(counts + (counts < planned).long(), n_acc + 1), remember)
    for e, preds in probed:
        chooser.count(e, rows, (preds == settled[:, 0]).long(), torch.ones_like(n_acc), remember)
    if read:
        exits = [e for e, _ in read]
        agreed = (torch.stack([preds for _, preds in read]) == settled).long().cpu()  # [exits, B, K+1]
        for position in agreed.permute(2, 0, 1).tolist():  # [K+1][exits][B]
            for e, rows_agreed in zip(exits, position):
                chooser.count(e, rows, rows_agreed, [1] * len(rows_agreed), remember)


def draft_plan(model, exit_layer, draft_skip_layers):
    """The layers a draft skips, as a mask [L]: an early exit at E skips [E, L); a skip plan (layer indices
    or a mask [L]) skips its layers. The draft must run a layer and skip one."""
    L = model.n_layer
    if (exit_layer is None) == (draft_skip_layers is None):
        raise ValueError("speculation drafts with exit_layer E or with draft_skip_layers (one of them)")
    if exit_layer is not None:
        model.check_exit_layer(exit_layer)
        if exit_layer >= L:
            raise ValueError(f"speculation needs exit_layer < {L} (the draft must be shallower than the model)")
        return torch.arange(L) >= exit_layer
    plan = torch.as_tensor(draft_skip_layers)
    if plan.dtype != torch.bool:
        if plan.dim() != 1 or not bool(((plan >= 0) & (plan < L)).all()):
            raise ValueError(f"draft_skip_layers must be layer indices in [0, {L - 1}], got {draft_skip_layers!r}")
        plan = layer_mask(plan.tolist(), L)
    if tuple(plan.shape) != (L,) or not bool(plan.any()) or bool(plan.all()):
        raise ValueError(f"draft_skip_layers must skip at least one of the {L} layers and keep at least one, "
                         f"got {draft_skip_layers!r}")
    return plan


def check_draft_threshold(draft_threshold):
    """draft_threshold is None (off) or a probability in [0, 1); ValueError otherwise."""
    if draft_threshold is not None and not (isinstance(draft_threshold, (int, float))
                                            and not isinstance(draft_threshold, bool) and 0 <= draft_threshold < 1):
        raise ValueError(f"draft_threshold must be a probability in [0, 1), got {draft_threshold!r}")


@torch.inference_mode()
def generate_speculative(model, idx, max_new_tokens, exit_layer=None, num_speculations=3, *, draft_skip_layers=None,
                         draft_threshold=None, prompt_lens=None, temperature=0.0, top_k=None, top_p=None,
                         generator=None, compile=False, stop_at_eos=True, stop=None, n_tokens=None):
    """Self-speculative decoding (LayerSkip section 4.3; skip-plan drafts as in Draft & Verify, docs/equations.md
    section 5): idx [B, T] right-padded prompts (prompt_lens [B]) -> ([B, T + max_new_tokens] laid out as
    generate()'s, stats).

    Each round drafts up to d = num_speculations tokens one at a time with the draft: layers [0, exit_layer) +
    the shared head (exit_layer "auto": E chosen every round and d per row in 0 .. num_speculations from acceptance
    and costs timed in the loop, drafts.ExitChooser, d = 0 being a full-depth step),
    or every layer but those in draft_skip_layers (indices, a mask [L], or "auto": the plan chosen
    from the prompts, drafts.choose_draft_plan). The draft keeps each drafted position's hidden state
    before f, its first skipped layer (the exit state: output of layer f-1), then verifies all of them in one
    pass through layers [f, L) only: the KV cache of layers < f is shared. The last draft, which no draft step
    has run, goes through [0, f) in the same graph (verify_step). draft_threshold p: a row stops
    drafting for the round when its draft's top probability falls below p (the round ends when every row has
    stopped; a stopped row's further drafts are not counted). Rows accept different numbers of
    drafts, so each row has its own position n[b]; a row that has all its tokens leaves the batch.
    Invariant at the start of a round: every layer's cache holds a row's positions [0, n-1); token
    n-1 is unprocessed. Later rounds overwrite rejected positions (and the draft's own K/V of layers past f):
    cropping the cache is moving n. With LongRoPE no round straddles the switch to the long factors
    (model.rope_switch), and a row's first round past it recomputes the cache (refill), so greedy output still
    equals greedy full-depth decoding. compile: draft steps and verification as compiled graphs. Rows end, and
    ids are limited, as in generate(): an eos (or stop) inside the accepted drafts ends the row there.
    Greedy rounds are one call each, greedy_round (one graph when compiled, drafts chosen and accepted inside it, so
    the host pays one call a round, not d + 1; under exit auto a row settles every verified draft, counting those
    up to its own cap; an exit auto probe round reads the other exits in the same call), except rounds with a
    threshold (the host stops rows). Greedy exit auto runs a choice of full depth as a stretch of full-depth steps
    (ExitChooser.full_depth_rounds), settled together, each reading the head at the exits drafted with
    (full_step_reading_exits).
    stats: drafted and accepted tokens, acceptance_rate (also per row), rounds, draft_steps, draft_seconds and
    verify_seconds (a round's time from its first draft step to its last, and from there to the accepted counts,
    summed: CUDA events on a GPU), round_seconds (the same for rounds run as one call, not timed apart), and
    draft_skip_layers, or for exit_layer auto exit_layers: exit -> rounds drafted with it, 0 -> rounds without
    drafts.
    """
    B, T = idx.shape
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    L, d = model.n_layer, num_speculations
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"num_speculations must be at least 1, got {d}")
    lens = check_lengths(model, idx, prompt_lens, max_new_tokens)
    check_draft_threshold(draft_threshold)
    if draft_skip_layers == "auto":  # checked before its 2L - 1 forwards over the prompts
        if exit_layer is not None:
            raise ValueError("speculation drafts with exit_layer E or with draft_skip_layers (one of them)")
        from drafts import choose_draft_plan
        draft_skip_layers = choose_draft_plan(model, idx, lens, d)
    chooser = None
    if exit_layer == "auto":  # E every round, d per row, from acceptance measured online
        from drafts import ExitChooser, measured_agreement, measured_timings
        chooser = ExitChooser(model, d, B, compile, cuda_graphs=compile and idx.device.type in CUDA_GRAPH_DEVICES,
                              timings=measured_timings(model, idx.device, B, compile),
                              history=measured_agreement(model))
        exit_layer = chooser.candidates[0]
    plan = draft_plan(model, exit_layer, draft_skip_layers)
    f = int(plan.nonzero()[0])                      # the first layer the draft skips
    runs, _ = layer_runs(plan[None], L)
    runs = tuple(r for r in runs if r[0] > f)       # the draft's layers after f
    cache = decode_cache(model, idx, T + max_new_tokens, compile)  # positions written stay below T + max_new_tokens
    result = eos_padded(model, idx, lens, max_new_tokens)
    out = torch.cat([idx, result[:, T:], idx.new_zeros(B, d + 1)], dim=1)  # working buffer, rows leave as they finish
    if T > 1 and chooser and not any(chooser.history[1]):  # a first call's prior: the prefill also tells how
        # often each exit agrees with the full model on the prompts (later calls start from what earlier ones counted)
        exit_preds, full_preds, valid = prefill_reading_exits(model, idx, lens, cache, chooser.drafted_with)
        for e, preds in zip(chooser.drafted_with, exit_preds):
            chooser.count(e, torch.arange(B), ((preds == full_preds) & valid).sum(1), valid.sum(1), remember=False)
    elif T > 1:  # prefill all layers with every prompt token but each row's last
        prefill(model, idx[:, :-1], (lens - 1).clamp(min=1), L, cache)
    n, end = lens.clone(), lens + max_new_tokens   # [B] on the CPU
    row_ids = torch.arange(B)                      # original row of each row still in the batch
    drafted, accepted = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    calls = {"rounds": 0, "draft_steps": 0, "draft_seconds": 0.0, "verify_seconds": 0.0,  # where a round's time goes
             "round_seconds": 0.0}
    exits_used = {}                                # exit layer -> rounds drafted with it (0: rounds without drafts)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    def graph(fn, *variant):  # compiled, a graph of its own for each variant of what fn runs (compiled())
        return compiled(fn, idx.device, variant) if compile else fn

    switch = rope_switch(model.cfg)
    pending = None  # exit_layer auto: the last round's timings, until the host's work after it is counted too
    rows = torch.arange(B, device=idx.device)      # [B] index of each row still in the batch

    while len(row_ids) and max_new_tokens:
        d_round, probe, stretch = d, False, False
        if pending:  # the last round's cost, with the host's work after it (accepting, ending rows) in it (a
            # stretch's: per full-depth step)
            e, timed_steps, seconds, synced_at, tokens = pending
            chooser.time(e, timed_steps, (seconds + time.perf_counter() - synced_at) / tokens)
        if chooser:
            f, caps, probes = chooser.choose(row_ids)
            d_round, probe = int(caps.max()), bool(probes)
            # greedy full depth, outside probe rounds: a stretch of full-depth steps settled together (the host's
            # work once, not once a token; ExitChooser.full_depth_rounds), each reading the exits drafted with
            stretch = f == 0 and not probe and temperature == 0
            if stretch:
                d_round = min(chooser.full_depth_rounds(), int((end[row_ids] - n).min())) - 1  # tokens past the first
        steps = int((end[row_ids] - n).min().clamp(max=d_round))  # no row drafts past its end
        if switch is not None:  # LongRoPE: a round stays on one side of the switch (lengths n .. n+steps)
            if bool((n <= switch).any()):
                steps = min(steps, int((switch - n[n <= switch]).min()))
            if bool((n == switch + 1).any()):  # a row's first round past it: its cache was computed before
                refill(model, out, n, L, cache)
        if chooser and not stretch:  # compiled, a draft count with a graph compiled (ExitChooser.allowed)
            steps = chooser.allowed_steps[steps]
        if chooser:
            exits_used[f if steps else 0] = exits_used.get(f if steps else 0, 0) + (steps + 1 if stretch else 1)
        counts = torch.full((len(row_ids),), steps)          # [B] drafts each row counts this round
        if chooser:  # each row up to its own cap
            counts = torch.minimum(counts, caps)
        planned = counts  # before the threshold stops rows (which makes a new counts)
        first = row_positions(n - 1, cache, idx.device)      # position of the round's first token (int or [B])
        token = out[rows, (n - 1).to(idx.device)][:, None]   # [B, 1]: the last settled token, not yet run
        started = clock(idx.device)
        # greedy, unless a threshold stops drafts: one call (which, in a probe round, reads the other exits too)
        one_call = temperature == 0 and (draft_threshold is None or steps == 0)
        probed, read = (), ()  # exit auto: (exit, predictions) of a probe's other exits, of a stretch's exits
        if stretch:  # new [B, K+1]: steps + 1 full-depth steps, one call each, every token settled
            exits = tuple(chooser.drafted_with)
            new, exit_preds, full_step = [token], [], graph(full_step_reading_exits, exits)
            for i in range(steps + 1):
                settled_token, preds = full_step(model, new[-1], first + i, L, cache, exits, n_tokens)
                new.append(settled_token.clone())  # (a CUDA graph's next replay overwrites its outputs)
                exit_preds.append(preds.clone())
            new, n_acc, K, drafted_at = torch.cat(new[1:], 1), torch.full((len(rows),), steps), steps, None
            # each exit's predictions [B, K+1]; with a threshold, agreement overstates what its drafts would give
            read = list(zip(exits, torch.stack(exit_preds, -1))) if draft_threshold is None else ()
        elif one_call:  # new [B, K+1]: the tokens the round settles, valid up to each row's n_acc
            shared, draft_runs = (f, runs) if steps else (0, ())  # no drafts: a full-depth step, whatever the exit
            exits = tuple(probes) if probe else ()
            new, n_acc, probed = graph(greedy_round, shared, draft_runs, steps, exits)(
                model, token, first, shared, draft_runs, L, cache, steps, n_tokens, exits)
            K, drafted_at = steps, None
            calls["draft_steps"] += steps
        else:
            # every layer's output for the probe's heads: compiled, in every round that drafts (one graph a
            # length); eager, where read (the verification and the first draft step)
            keep = probe or (compile and chooser is not None)
            exit_states, drafts, draft_probs, first_kept = [], [], [], None
            for i in range(steps):  # tokens n-1 .. n+i-1 through the draft, each giving the next draft
                keep_i = keep and (compile or i == 0)
                h, logits, kept = graph(draft_step, f, runs, keep_i)(model, token, first + i, f, runs, cache, keep_i)
                logits = logits[:, :n_tokens]
                calls["draft_steps"] += 1
                exit_states.append(h.clone())  # a CUDA graph's next replay overwrites its output
                if probe and i == 0:
                    first_kept = kept.clone()
                if temperature == 0:
                    token = logits.argmax(-1)
                    probs = torch.softmax(logits.float(), -1) if draft_threshold is not None else None
                else:
                    probs = probs_from_logits(logits, temperature, top_k, top_p)
                    draft_probs.append(probs)
                    token = torch.multinomial(probs, 1, generator=generator)[:, 0]
                drafts.append(token)
                token = token[:, None]
                if draft_threshold is not None:  # a row still drafting (count past i) whose draft is unsure stops
                    counts = torch.where((counts > i) & (probs.max(-1).values.cpu() < draft_threshold), i, counts)
                    if bool((counts <= i + 1).all()):  # every row stopped or at its own cap
                        break
            drafted_at = clock(idx.device)
            K = int(counts.max())  # verify positions n-1 .. n+K-1 in one pass through layers [f, L)
            drafts = torch.stack(drafts, 1) if drafts else out.new_zeros(len(rows), 0)  # [B, S]
            # the state at f of position n+K-1: a draft step's when the round stopped early, else verification's
            last = None if len(exit_states) > K else token
            states = torch.cat(exit_states[:K + 1], dim=1) if exit_states else None  # [B, K or K+1, C]
            logits, kept = graph(verify_step, f, K, last is None, keep)(model, states, first, f, L, cache, last,
                                                                        keep)  # [B, K+1, V]
            no_drafts = logits.new_zeros(len(rows), 0, logits[..., :n_tokens].shape[-1], dtype=torch.float32)
            n_acc, next_token = accept_drafts(logits[..., :n_tokens], drafts[:, :K],
                                              torch.stack(draft_probs, 1)[:, :K] if draft_probs else no_drafts,
                                              **sampling, counts=counts)
            new = torch.cat([drafts[:, :K], next_token[:, None]], 1)  # [B, K+1]: settled up to n_acc
            new[rows, n_acc] = next_token
            probed = probed_predictions(model, probes, f, first_kept, kept, n_tokens) if probe else ()
        verified_at = clock(idx.device)
        n_acc = n_acc.cpu()  # the host waits for the round here
        synced_at = time.perf_counter()
        settles = n_acc + 1  # [B] tokens each row settles: verified drafts, then the verifier's token (a stretch: all)
        n_acc = torch.minimum(n_acc, counts)  # drafts it counts as accepted: up to its own cap (a stretch: none)
        calls["rounds"] += K + 1 if stretch else 1
        if drafted_at is None:  # one call: its draft steps and verification are not timed apart
            draft_seconds, verify_seconds = 0.0, seconds_between(started, verified_at)
            calls["round_seconds"] += verify_seconds
        else:
            draft_seconds = seconds_between(started, drafted_at)
            verify_seconds = seconds_between(drafted_at, verified_at)
            calls["draft_seconds"] += draft_seconds
            calls["verify_seconds"] += verify_seconds
        if chooser:  # a probe round is not timed: reading other exits is not what E costs (the heads run inside the
            # round, in its graph when greedy; eager, the layers ran one call each to keep their outputs)
            pending = None if probe else (f, 0 if stretch else steps if one_call else len(exit_states),
                                          draft_seconds + verify_seconds, synced_at, K + 1 if stretch else 1)
            count_agreement(chooser, row_ids, f, counts, planned, n_acc, new, probed, read,
                            remember=temperature == 0 and draft_threshold is None)  # (ExitChooser.count)
        out[rows[:, None], (n[:, None] + torch.arange(K + 1)).to(idx.device)] = new
        drafted[row_ids] += counts
        accepted[row_ids] += n_acc
        settled = torch.minimum(settles, end[row_ids] - n)  # a round may settle one token past a row's end
        kept, ended = row_ends(new, settled, model.cfg.eos_id if stop_at_eos else None, row_ids, stop)
        n = n + kept
        done = (ended | (n >= end[row_ids])).nonzero()[:, 0].tolist()
        for r in done:
            b, length = int(row_ids[r]), int(n[r])
            result[b, :length] = out[r, :length]  # the rest stays eos padding
        if done:  # finished rows leave the batch and the cache
            stay = torch.tensor([r for r in range(len(row_ids)) if r not in done], dtype=torch.long)
            out, n, row_ids = out[stay.to(idx.device)], n[stay], row_ids[stay]
            cache = cache.keep_rows(stay.to(idx.device))
            rows = torch.arange(len(row_ids), device=idx.device)
    stats = {"drafted": int(drafted.sum()), "accepted": int(accepted.sum()),
             "acceptance_rate": int(accepted.sum()) / max(int(drafted.sum()), 1),
             "row_acceptance_rate": (accepted / drafted.clamp(min=1)).tolist(),
             "draft_skip_layers": plan.nonzero()[:, 0].tolist(), **calls}
    if chooser:  # the exit layers drafted with, not one plan
        stats["exit_layers"] = exits_used
        del stats["draft_skip_layers"]
    return result, stats
