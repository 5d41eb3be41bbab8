"""
Decoding with a preallocated KV cache: full depth, an early exit, or a static skip plan.

The prompt runs through every layer the decode uses (up to exit_layer); a skip plan applies to
generated tokens only (unified layer skipping, REFERENCE.md section 2), so the prompt's cache is
complete and generated tokens never read a slot the plan skipped.
"""
import torch

from model import KVCache


def probs_from_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """logits [B, V] -> sampling distribution [B, V] after temperature, top-k and top-p (nucleus)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits [B, V] -> next token ids [B, 1]. temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(probs_from_logits(logits, temperature, top_k, top_p), 1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
             exit_layer=None, skip_mask=None, generator=None):
    """idx [B, T] prompt -> [B, T + max_new_tokens]."""
    B, T = idx.shape
    total = T + max_new_tokens
    if total > model.cfg.block_size:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {model.cfg.block_size}")
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, B, total, device=idx.device, dtype=dtype)
    out = torch.empty(B, total, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    logits = model(idx, exit_layer=exit_layer, cache=cache, pos=0, last_only=True)
    for pos in range(T, total):
        out[:, pos:pos + 1] = sample_token(logits[:, -1], temperature, top_k, top_p, generator)
        if pos + 1 < total:
            logits = model(out[:, pos:pos + 1], exit_layer=exit_layer, skip_mask=skip_mask,
                           cache=cache, pos=pos, last_only=True)
    return out


@torch.no_grad()
def generate_speculative(model, idx, max_new_tokens, exit_layer, num_speculations, *, temperature=0.0,
                         top_k=None, top_p=None, generator=None):
    """Self-speculative decoding (LayerSkip section 4.3), batch 1: idx [1, T] -> ([1, T + max_new_tokens], stats).

    Each round drafts d tokens with layers [0, E) + the shared head, keeping each drafted position's
    exit hidden state (output of layer E-1), then verifies all of them in one pass through layers
    [E, L) only: the draft's KV cache for layers < E is reused. Greedy: drafts are accepted up to the
    first mismatch with the verifier's argmax, plus the verifier's next token, so the output equals
    greedy full-depth decoding. Sampling: draft x is accepted with prob min(1, p(x)/q(x)), else the
    round ends with a sample from normalize(max(p - q, 0)).
    Invariant at the start of a round: every layer's cache holds positions [0, n-1); token n-1 is unprocessed.
    """
    B, T = idx.shape
    if B != 1:
        raise ValueError("self-speculative decoding takes one prompt at a time")
    model.check_exit_layer(exit_layer)
    E, L, d = exit_layer, model.n_layer, num_speculations
    if E >= L:
        raise ValueError(f"speculation needs exit_layer < {L} (the draft must be shallower than the model)")
    if d < 1:
        raise ValueError(f"num_speculations must be at least 1, got {d}")
    total = T + max_new_tokens
    if total > model.cfg.block_size:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {model.cfg.block_size}")
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, 1, total + d + 1, device=idx.device, dtype=dtype)
    out = torch.empty(1, total + d + 1, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    if T > 1:  # prefill all layers with every prompt token but the last
        model.run_layers(model.embed(idx[:, :-1]), 0, L, cache=cache, pos=0,
                         attn_mask=model.attention_mask(T - 1, 0, idx.device, dtype))
    greedy = temperature == 0
    n, drafted, accepted = T, 0, 0

    def draft_layers(p):  # token at position p through layers [0, E) -> exit hidden state [1, 1, C]
        return model.run_layers(model.embed(out[:, p:p + 1], p), 0, E, cache=cache, pos=p,
                                attn_mask=model.attention_mask(1, p, idx.device, dtype))

    while n < total:
        steps = min(d, total - n)  # never draft past the end
        exit_states, draft_probs = [], []
        for i in range(steps):  # draft: tokens n-1 .. n+steps-2 through layers [0, E)
            p = n - 1 + i
            h = draft_layers(p)
            exit_states.append(h)
            logits = model.head(h)[:, -1]
            if greedy:
                out[:, p + 1] = logits.argmax(-1)
            else:
                q = probs_from_logits(logits, temperature, top_k, top_p)
                draft_probs.append(q)
                out[:, p + 1] = torch.multinomial(q, 1, generator=generator)[:, 0]
        # the last draft token has not been through layers [0, E) yet: run it there first
        exit_states.append(draft_layers(n - 1 + steps))
        # verify: positions n-1 .. n+steps-1 in one pass through layers [E, L)
        h = torch.cat(exit_states, dim=1)  # [1, steps+1, C]
        h = model.run_layers(h, E, L, cache=cache, pos=n - 1,
                             attn_mask=model.attention_mask(steps + 1, n - 1, idx.device, dtype))
        logits = model.head(h)[0]  # [steps+1, V]: row i predicts the token at position n+i
        drafts = out[0, n:n + steps]
        if greedy:
            verified = logits.argmax(-1)
            n_acc = int((drafts == verified[:steps]).long().cumprod(0).sum())
            next_token = verified[n_acc]
        else:
            probs = probs_from_logits(logits, temperature, top_k, top_p)
            n_acc, next_token = 0, None
            for i in range(steps):
                x, q = drafts[i], draft_probs[i][0]
                if torch.rand((), generator=generator, device=idx.device) < torch.clamp(probs[i, x] / q[x], max=1.0):
                    n_acc += 1
                    continue
                residual = torch.clamp(probs[i] - q, min=0)
                next_token = torch.multinomial(residual / residual.sum(), 1, generator=generator)[0]
                break
            if next_token is None:  # every draft accepted: a bonus token from the verifier
                next_token = torch.multinomial(probs[steps], 1, generator=generator)[0]
        out[0, n + n_acc] = next_token
        drafted += steps
        accepted += n_acc
        n += n_acc + 1  # later rounds overwrite the rejected positions: cropping is moving n
    stats = {"drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / max(drafted, 1)}
    return out[:, :total], stats
