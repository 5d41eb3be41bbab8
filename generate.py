"""
Decoding with a preallocated KV cache: full depth, an early exit, or a static skip plan.

The prompt runs through every layer the decode uses (up to exit_layer); a skip plan applies to
generated tokens only (unified layer skipping, REFERENCE.md section 2), so the prompt's cache is
complete and generated tokens never read a slot the plan skipped.
"""
import torch

from model import KVCache


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits [B, V] -> next token ids [B, 1]. temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
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
    return torch.multinomial(probs, 1, generator=generator)


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
