"""
Self-speculative decoding (LayerSkip section 4.3; skip-plan drafts as in Draft & Verify,
docs/equations.md section 5): draft and verify steps, the greedy round, and generate_speculative,
a loop of plan (drafts.py) -> run -> settle over the rows still decoding. How the loop is made
fast, and what exit layer auto measures: docs/sampling.md.
"""
import time
from dataclasses import dataclass

import torch

import drafts
from generate import (cache_mask, check_lengths, check_sampling, compiled, decode_cache, eos_padded,
                      layers, prefill, probs_from_logits, records_cuda_graphs, refill, row_ends,
                      row_positions, step)
from model import rope_switch


def clock(device):
    """Now, for work queued on `device`: a recorded CUDA event (readable once the host has waited on
    the device), else the host's clock."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds_between(start, end):
    """Seconds between two clock() readings."""
    return start.elapsed_time(end) / 1e3 if isinstance(start, torch.cuda.Event) else end - start


def accepted_prefix(agrees):
    """agrees [B, d] bool, whether each draft is accepted on its own -> how many lead each row
    unbroken [B]: the drafts a round accepts."""
    return agrees.long().cumprod(1).sum(1)


def accept_drafts(logits, drafts, draft_probs, temperature, top_k, top_p, generator, counts=None):
    """Verifier logits [B, d+1, V] (row i predicts draft i; row d the bonus token), drafts [B, d]
    -> (accepted count [B], next token [B]: the correction after the accepted prefix, or the bonus).
    counts [B] (default d): row b's drafts past counts[b] are not its own and never count.
    Greedy: the prefix where drafts equal the verifier's argmax. Sampling (draft_probs q [B, d, V]):
    draft x accepted with probability min(1, p(x)/q(x)), the first rejection resampled from
    normalize(max(p - q, 0)) (Leviathan et al. 2023, algorithm 1), so the output follows p."""
    B, d = drafts.shape
    rows = torch.arange(B, device=drafts.device)
    counts = torch.full((B,), d) if counts is None else counts
    own = (torch.arange(d) < counts[:, None]).to(drafts.device)       # [B, d]: a row's own drafts
    if temperature == 0:
        verified = logits.argmax(-1)                                  # [B, d+1]
        n_acc = accepted_prefix((drafts == verified[:, :d]) & own)    # [B]
        return n_acc, verified[rows, n_acc]
    p = probs_from_logits(logits.flatten(0, 1), temperature, top_k, top_p).view(B, d + 1, -1)
    p_x = p[:, :d].gather(-1, drafts[..., None])[..., 0]              # [B, d]
    q_x = draft_probs.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(B, d, generator=generator, device=drafts.device)
    n_acc = accepted_prefix((u < (p_x / q_x).clamp(max=1.0)) & own)  # [B]
    q_pad = torch.cat([draft_probs * own[..., None], torch.zeros_like(p[:, :1])], dim=1)
    residual = (p[rows, n_acc] - q_pad[rows, n_acc]).clamp(min=0)   # [B, V]; past drafts: p (bonus)
    residual = residual / residual.sum(-1, keepdim=True)
    return n_acc, torch.multinomial(residual, 1, generator=generator)[:, 0]


def layer_outputs(model, x, pos, start, end, cache, attn_mask):
    """Hidden states x [B, T, C] at positions pos through layers [start, end), one at a time -> the
    output of each [end - start, B, T, C]."""
    outputs = []
    for l in range(start, end):
        x = model.run_layers(x, l, l + 1, None, cache, pos, attn_mask)
        outputs.append(x)
    return torch.stack(outputs)


def draft_step(model, tokens, pos, shared, runs, cache, keep=False):
    """One draft step: tokens [B, 1] through layers [0, shared), which the draft and the
    verification share, then the draft's runs of later layers ((start, stop), ...) and the head ->
    (hidden state before layer `shared` [B, 1, C], draft logits [B, V], with keep the output of each
    layer in [0, shared) [shared, B, 1, C], else None)."""
    x = model.embed(tokens, pos)
    attn_mask = cache_mask(model, x, pos, cache)  # one mask for every run
    kept = layer_outputs(model, x, pos, 0, shared, cache, attn_mask) if keep else None
    h = x = kept[-1] if keep else model.run_layers(x, 0, shared, None, cache, pos, attn_mask)
    for start, stop in runs:
        x = model.run_layers(x, start, stop, None, cache, pos, attn_mask)
    return h, model.head(x)[:, -1], kept


def with_last_draft(model, states, tokens, pos, start, cache):
    """Hidden states before layer `start` of the drafted positions (states [B, K, C] at positions
    pos .. pos+K-1, or None for K = 0) and tokens [B, 1] at position pos+K (the last draft, which no
    draft step has run; None when one has), run through layers [0, start) -> [B, K (+1), C]."""
    if tokens is None:
        return states
    last = step(model, tokens, pos + (0 if states is None else states.shape[1]), 0, start, cache)
    return last if states is None else torch.cat([states, last], dim=1)


def verify_step(model, states, pos, start, end, cache, tokens=None, keep=False):
    """A round's verification: with_last_draft's states through layers [start, end) and the head
    -> (logits [B, K (+1), V], with keep the output of each layer in [start, end)
    [end - start, B, K (+1), C], else None)."""
    states = with_last_draft(model, states, tokens, pos, start, cache)
    if not keep:
        return model.head(layers(model, states, pos, start, end, cache)), None
    attn_mask = cache_mask(model, states, pos, cache)
    kept = layer_outputs(model, states, pos, start, end, cache, attn_mask)
    return model.head(kept[-1]), kept


def greedy_round(model, token, pos, shared, runs, end, cache, steps, n_tokens=None, exits=()):
    """A greedy round in one call: `steps` draft steps (draft_step) from tokens [B, 1] at positions
    pos, each drafting its argmax (ids below n_tokens), then their verification (verify_step)
    -> (the verifier's argmax [B, steps+1], accepted drafts [B], [(exit, predictions [B])] of each
    exit in `exits` at the round's first position: probed_predictions). A row settles the verifier's
    tokens up to its accepted count."""
    states, drafts, first_kept = [], [], None
    for i in range(steps):
        keep = bool(exits) and i == 0
        h, logits, kept = draft_step(model, token, pos + i, shared, runs, cache, keep=keep)
        first_kept = kept if i == 0 else first_kept
        states.append(h)
        token = logits[:, :n_tokens].argmax(-1, keepdim=True)  # [B, 1]
        drafts.append(token)
    logits, kept = verify_step(model, torch.cat(states, 1) if states else None, pos, shared, end,
                               cache, token, keep=bool(exits))
    verified = logits[..., :n_tokens].argmax(-1)  # [B, steps+1]
    drafts = torch.cat(drafts, 1) if drafts else verified[:, :0]  # [B, steps]
    probed = probed_predictions(model, exits, shared, first_kept, kept, n_tokens)
    return verified, accepted_prefix(drafts == verified[:, :-1]), probed


def full_step_reading_exits(model, token, pos, end, cache, exits, n_tokens=None):
    """A full-depth decode step of tokens [B, 1] at positions pos through layers [0, end), reading
    the head at each exit in `exits` on the way -> (the full model's argmax [B, 1], each exit's
    [len(exits), B])."""
    x = model.embed(token, pos)
    attn_mask = cache_mask(model, x, pos, cache)
    states, start = [], 0
    for stop in list(exits) + [end]:
        x = model.run_layers(x, start, stop, None, cache, pos, attn_mask)
        states.append(x[:, -1])  # [B, C]
        start = stop
    preds = model.head(torch.stack(states))[..., :n_tokens].argmax(-1)  # [len(exits) + 1, B]
    return preds[-1][:, None], preds[:-1]


def prefill_reading_exits(model, idx, lens, cache, exits, last=8):
    """prefill() of prompts idx [B, T] (lens [B]) but each row's last token through every layer,
    reading the head at each exit in `exits` -> (predictions [len(exits), B, last] of those exits
    and [B, last] of the full model at each row's last `last` positions, valid [B, last])."""
    x = model.embed(idx[:, :-1])
    attn_mask = cache_mask(model, x, 0, cache)
    pos = (lens - 1)[:, None] - last + torch.arange(last)  # [B, last]: next token in the prompt
    at = (torch.arange(len(lens))[:, None].to(x.device), pos.clamp(min=0).to(x.device))
    states, start = [], 0
    for stop in list(exits) + [model.n_layer]:
        x = model.run_layers(x, start, stop, None, cache, 0, attn_mask, (lens - 1).clamp(min=1))
        states.append(x[at])  # [B, last, C]
        start = stop
    preds = model.head(torch.stack(states)).argmax(-1)  # [len(exits) + 1, B, last]
    return preds[:-1], preds[-1], (pos >= 0).to(x.device)


def probed_predictions(model, exits, f, first_kept, kept, n_tokens):
    """What the head at each exit in `exits` predicts at a round's first position: shallower than f
    from the first draft step's layer outputs (first_kept [f, B, 1, C], None if the round drafted
    nothing), deeper from the verification's (kept [L - f, B, K+1, C])
    -> [(exit, predictions [B])]."""
    states = [(e, first_kept[e - 1]) for e in exits if e < f and first_kept is not None]
    states += [(e, kept[e - 1 - f, :, :1]) for e in exits if e > f]
    if not states:
        return []
    preds = model.head(torch.stack([x for _, x in states]))[..., 0, :n_tokens].argmax(-1)  # [X, B]
    return [(e, p) for (e, _), p in zip(states, preds)]


def check_draft_threshold(draft_threshold):
    """draft_threshold is None (off) or a probability in [0, 1); ValueError otherwise."""
    if draft_threshold is not None and not (
            isinstance(draft_threshold, (int, float)) and not isinstance(draft_threshold, bool)
            and 0 <= draft_threshold < 1):
        raise ValueError(f"draft_threshold must be a probability in [0, 1), "
                         f"got {draft_threshold!r}")


@dataclass
class Batch:
    """The rows still decoding. out [B, T + max_new_tokens + d + 1]: each row's tokens so far; n [B]
    (CPU): how many it has (the cache holds positions [0, n-1); token n-1 is not yet run); end [B]
    (CPU): its length when done; row_ids [B] (CPU): its row in the call's batch. result [B0,
    T + max_new_tokens]: finished rows, eos-padded; drafted, accepted [B0]; calls: round counts and
    seconds for the stats."""
    out: torch.Tensor
    n: torch.Tensor
    end: torch.Tensor
    row_ids: torch.Tensor
    cache: object
    result: torch.Tensor
    drafted: torch.Tensor
    accepted: torch.Tensor
    calls: dict


def start_batch(model, idx, lens, max_new_tokens, d, compile, drafter):
    """The batch of prompts idx [B, T] (lens [B]) with every prompt but its last token in the cache;
    in a first exit auto call the prefill also reads each exit's agreement on the prompts."""
    B, T = idx.shape
    cache = decode_cache(model, idx, T + max_new_tokens, compile)  # positions < T + max_new_tokens
    result = eos_padded(model, idx, lens, max_new_tokens)
    out = torch.cat([idx, result[:, T:], idx.new_zeros(B, d + 1)], dim=1)  # room for a round
    exits = drafter.prompt_exits() if T > 1 else ()
    if exits:
        exit_preds, full_preds, valid = prefill_reading_exits(model, idx, lens, cache, exits)
        drafter.observe_prompt(exits, exit_preds, full_preds, valid)
    elif T > 1:
        prefill(model, idx[:, :-1], (lens - 1).clamp(min=1), model.n_layer, cache)
    zeros = torch.zeros(B, dtype=torch.long)
    calls = {"rounds": 0, "draft_steps": 0, "draft_seconds": 0.0, "verify_seconds": 0.0,
             "round_seconds": 0.0}
    return Batch(out, lens.clone(), lens + max_new_tokens, torch.arange(B), cache, result, zeros,
                 zeros.clone(), calls)


def room(batch, switch):
    """(tokens until the nearest row's end, the most draft steps a round may take: with LongRoPE no
    round straddles the switch, model.rope_switch)."""
    room = limit = int((batch.end - batch.n).min())
    if switch is not None and bool((batch.n <= switch).any()):
        limit = min(limit, int((switch - batch.n[batch.n <= switch]).min()))
    return room, limit


def graph(fn, compile, device, *variant):
    """fn, or when compile its compiled graph for `device` and `variant` (generate.compiled)."""
    return compiled(fn, device, variant) if compile else fn


def full_depth_stretch(model, token, first, cache, plan, n_tokens, compile):
    """plan.steps + 1 full-depth steps from tokens [B, 1] at positions first, each reading the head
    at the exits plan.reads -> (tokens [B, steps+1], [(exit, predictions [B, steps+1])])."""
    exits, new, exit_preds = plan.reads, [token], []
    full_step = graph(full_step_reading_exits, compile, token.device, exits)
    for i in range(plan.steps + 1):
        settled, preds = full_step(model, new[-1], first + i, model.n_layer, cache, exits, n_tokens)
        new.append(settled.clone())  # (a CUDA graph's next replay overwrites its outputs)
        exit_preds.append(preds.clone())
    return torch.cat(new[1:], 1), list(zip(exits, torch.stack(exit_preds, -1)))


def stepwise_round(model, token, first, cache, plan, sampling, n_tokens, threshold, compile):
    """A round with a draft step a call: sampled drafts, or a threshold stopping unsure ones (a row
    still drafting whose draft's top probability is below it stops) -> (tokens [B, K+1], accepted
    [B], counts [B], [(exit, predictions [B])] of plan.probes, draft steps run, when drafting
    ended)."""
    f, counts, greedy = plan.exit, plan.counts, sampling["temperature"] == 0
    keep = bool(plan.probes) or (compile and plan.auto)  # every layer's output, for probes' heads
    exit_states, drafted, draft_probs, first_kept = [], [], [], None
    for i in range(plan.steps):  # tokens n-1 .. n+i-1 through the draft, each giving the next draft
        keep_i = keep and (compile or i == 0)  # eager, only where read
        draft = graph(draft_step, compile, token.device, f, plan.runs, keep_i)
        h, logits, kept = draft(model, token, first + i, f, plan.runs, cache, keep_i)
        logits = logits[:, :n_tokens]
        exit_states.append(h.clone())  # a CUDA graph's next replay overwrites its output
        first_kept = kept.clone() if plan.probes and i == 0 else first_kept
        if greedy:
            token = logits.argmax(-1)
            probs = torch.softmax(logits.float(), -1) if threshold is not None else None
        else:
            probs = probs_from_logits(logits, sampling["temperature"], sampling["top_k"],
                                      sampling["top_p"])
            draft_probs.append(probs)
            token = torch.multinomial(probs, 1, generator=sampling["generator"])[:, 0]
        drafted.append(token)
        token = token[:, None]
        if threshold is not None:
            unsure = (counts > i) & (probs.max(-1).values.cpu() < threshold)
            counts = torch.where(unsure, i, counts)
            if bool((counts <= i + 1).all()):  # every row stopped or at its own cap
                break
    drafted_at = clock(token.device)
    K = int(counts.max())  # verify positions n-1 .. n+K-1 in one pass through layers [f, L)
    drafted = torch.stack(drafted, 1) if drafted else token.new_zeros(len(counts), 0)  # [B, S]
    # the state at f of position n+K-1: a draft step's when the round stopped early, else
    # verification runs it
    last = None if len(exit_states) > K else token
    states = torch.cat(exit_states[:K + 1], dim=1) if exit_states else None  # [B, K or K+1, C]
    verify = graph(verify_step, compile, token.device, f, K, last is None, keep)
    logits, kept = verify(model, states, first, f, model.n_layer, cache, last, keep)  # [B, K+1, V]
    logits = logits[..., :n_tokens]
    q = (torch.stack(draft_probs, 1)[:, :K] if draft_probs else
         logits.new_zeros(len(counts), 0, logits.shape[-1], dtype=torch.float32))
    n_acc, next_token = accept_drafts(logits, drafted[:, :K], q, **sampling, counts=counts)
    new = torch.cat([drafted[:, :K], next_token[:, None]], 1)  # [B, K+1]: settled up to n_acc
    new[torch.arange(len(counts), device=new.device), n_acc] = next_token
    probed = probed_predictions(model, plan.probes, f, first_kept, kept, n_tokens)
    return new, n_acc, counts, probed, len(exit_states), drafted_at


def run_round(model, batch, plan, sampling, n_tokens, threshold, compile):
    """One round of `plan` from each row's last settled token -> drafts.RoundResult. Greedy rounds
    are one call (greedy_round) unless a threshold stops drafts; a stretch is full-depth steps."""
    device, n = batch.out.device, batch.n
    first = row_positions(n - 1, batch.cache, device)  # the round's first position (int or [B])
    token = batch.out[torch.arange(len(n), device=device), (n - 1).to(device)][:, None]  # [B, 1]
    counts, probed, read, steps = plan.counts, (), (), plan.steps
    started = clock(device)
    if plan.stretch:
        new, read = full_depth_stretch(model, token, first, batch.cache, plan, n_tokens, compile)
        n_acc, drafted_at, steps = torch.full((len(n),), plan.steps), None, 0
    elif sampling["temperature"] == 0 and (threshold is None or steps == 0):
        shared, runs = (plan.exit, plan.runs) if steps else (0, ())  # no drafts: a full-depth step
        one_call = graph(greedy_round, compile, device, shared, runs, steps, plan.probes)
        new, n_acc, probed = one_call(model, token, first, shared, runs, model.n_layer, batch.cache,
                                      steps, n_tokens, plan.probes)
        drafted_at = None
    else:
        new, n_acc, counts, probed, steps, drafted_at = stepwise_round(
            model, token, first, batch.cache, plan, sampling, n_tokens, threshold, compile)
    verified_at = clock(device)
    n_acc = n_acc.cpu()  # the host waits for the round here
    synced_at = time.perf_counter()
    draft_seconds = None if drafted_at is None else seconds_between(started, drafted_at)
    verify_seconds = seconds_between(started if drafted_at is None else drafted_at, verified_at)
    return drafts.RoundResult(new, n_acc + 1, torch.minimum(n_acc, counts), counts, steps,
                              draft_seconds, verify_seconds, synced_at, probed, read)


def settle(batch, plan, result, end_ids, stop):
    """Write what each row settled, end rows (at an end id, a stop, or their length) and move the
    finished ones to batch.result; they leave the batch and the cache."""
    calls = batch.calls
    calls["rounds"] += plan.steps + 1 if plan.stretch else 1
    calls["draft_steps"] += result.draft_steps
    if result.draft_seconds is None:  # one call: draft steps and verification not timed apart
        calls["round_seconds"] += result.verify_seconds
    else:
        calls["draft_seconds"] += result.draft_seconds
        calls["verify_seconds"] += result.verify_seconds
    device, n, K = batch.out.device, batch.n, result.new.shape[1] - 1
    rows = torch.arange(len(n), device=device)
    batch.out[rows[:, None], (n[:, None] + torch.arange(K + 1)).to(device)] = result.new
    batch.drafted[batch.row_ids] += result.counts
    batch.accepted[batch.row_ids] += result.accepted
    settled = torch.minimum(result.settles, batch.end - n)  # a round may settle past a row's end
    kept, ended = row_ends(result.new, settled, end_ids, batch.row_ids, stop)
    batch.n = n = n + kept
    done = (ended | (n >= batch.end)).nonzero()[:, 0].tolist()
    for r in done:
        batch.result[int(batch.row_ids[r]), :int(n[r])] = batch.out[r, :int(n[r])]  # then eos
    if done:
        stay = torch.tensor([r for r in range(len(n)) if r not in done], dtype=torch.long)
        batch.out, batch.cache = batch.out[stay.to(device)], batch.cache.keep_rows(stay.to(device))
        batch.n, batch.end, batch.row_ids = n[stay], batch.end[stay], batch.row_ids[stay]


@torch.inference_mode()
def generate_speculative(model, idx, max_new_tokens, exit_layer=None, num_speculations=3, *,
                         draft_skip_layers=None, draft_threshold=None, prompt_lens=None,
                         temperature=0.0, top_k=None, top_p=None, generator=None, compile=False,
                         stop_at_eos=True, stop=None, n_tokens=None, exit_memory=None):
    """Self-speculative decoding: idx [B, T] right-padded prompts (prompt_lens [B])
    -> ([B, T + max_new_tokens] laid out as generate()'s, stats).

    Each round drafts up to d = num_speculations tokens with the draft, layers [0, exit_layer) and
    the shared head, or every layer but draft_skip_layers (indices, a mask [L], or "auto":
    drafts.choose_draft_plan), then verifies them in one pass through the layers from the draft's
    first skipped one (their cache below it is shared). exit_layer "auto": the exit and each row's
    cap in 0 .. d chosen every round (drafts.ExitChooser), from what it measures and what earlier
    calls measured (exit_memory: a drafts.ExitMemory; default drafts.default_memory(model)).
    draft_threshold p: a row stops drafting for the round when its draft's top probability is
    below p. Greedy output equals generate()'s; sampled output follows the model's distribution.
    Rows end as in generate() (any of cfg.eos_ids, stop), also inside a round's accepted drafts,
    the rest of the round dropped. compile: rounds as compiled graphs. Sampling arguments as
    check_sampling. Raises ValueError naming a bad argument.
    stats: drafted and accepted tokens, acceptance_rate (row_acceptance_rate per row), rounds,
    draft_steps, draft_seconds and verify_seconds (summed over rounds whose draft steps and
    verification are calls of their own), round_seconds (rounds of one call), and
    draft_skip_layers, or with exit_layer auto exit_layers: exit -> rounds (0: without drafts)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not isinstance(num_speculations, int) or num_speculations < 1:
        raise ValueError(f"num_speculations must be at least 1, got {num_speculations}")
    lens = check_lengths(model, idx, prompt_lens, max_new_tokens)
    check_draft_threshold(draft_threshold)
    greedy = temperature == 0
    drafter = drafts.make_drafter(model, idx, lens, exit_layer, draft_skip_layers, num_speculations,
                                  compile, records_cuda_graphs(idx.device, compile), exit_memory,
                                  greedy, remember=greedy and draft_threshold is None)
    batch = start_batch(model, idx, lens, max_new_tokens, num_speculations, compile, drafter)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    end_ids, switch = model.cfg.eos_ids if stop_at_eos else None, rope_switch(model.cfg)
    while len(batch.row_ids) and max_new_tokens:
        plan = drafter.plan(batch.row_ids, *room(batch, switch))
        if switch is not None and bool((batch.n == switch + 1).any()):  # first round past it
            refill(model, batch.out, batch.n, model.n_layer, batch.cache)
        result = run_round(model, batch, plan, sampling, n_tokens, draft_threshold, compile)
        drafter.observe(plan, result)
        settle(batch, plan, result, end_ids, stop)
    drafted, accepted = int(batch.drafted.sum()), int(batch.accepted.sum())
    row_rates = (batch.accepted / batch.drafted.clamp(min=1)).tolist()
    return batch.result, {"drafted": drafted, "accepted": accepted,
                          "acceptance_rate": accepted / max(drafted, 1),
                          "row_acceptance_rate": row_rates, **batch.calls, **drafter.stats()}
