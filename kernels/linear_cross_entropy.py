"""
Fused linear + cross-entropy, chunked over tokens.

loss = mean over non-ignored tokens of  logsumexp(h W^T) - (h W^T)[target]

The [N, V] logits are never held whole: the forward keeps only the per-token logsumexp [N]
and the backward recomputes each chunk's logits to form (softmax - onehot). An early-exit loss at
every layer therefore costs L x [N] floats of loss state instead of L x [N, V] logits.
All-ignored input gives loss 0 and zero gradients (F.cross_entropy would give nan).
"""
import torch


def _chunk_size(vocab_size, budget=2**24):
    """Tokens per chunk so that one chunk of fp32 logits is about `budget` elements (64 MiB)."""
    return max(16, budget // vocab_size)


class LinearCrossEntropy(torch.autograd.Function):
    # custom_fwd/bwd: under CUDA autocast the backward's matmuls run in bf16 as the forward's do
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, targets, ignore_index, chunk_size):
        # h [N, C], weight [V, C], targets [N]
        w = weight.to(h.dtype)
        N = h.shape[0]
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        valid = targets != ignore_index
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            logits = (h[s:e] @ w.T).float()                        # [n, V]
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[s:e].clamp(min=0).unsqueeze(1)).squeeze(1)
            loss_sum += ((lse[s:e] - target_logit) * valid[s:e]).sum()
        n_valid = valid.sum().clamp(min=1)
        ctx.save_for_backward(h, weight, targets, lse, n_valid)
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        return loss_sum / n_valid

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss):
        h, weight, targets, lse, n_valid = ctx.saved_tensors
        w = weight.to(h.dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        scale = grad_loss.float() / n_valid
        N = h.shape[0]
        for s in range(0, N, ctx.chunk_size):
            e = min(s + ctx.chunk_size, N)
            tgt = targets[s:e]
            valid = (tgt != ctx.ignore_index).unsqueeze(1)
            logits = (h[s:e] @ w.T).float()
            grad_logits = torch.exp(logits - lse[s:e].unsqueeze(1))  # softmax [n, V]
            grad_logits.scatter_add_(1, tgt.clamp(min=0).unsqueeze(1), -valid.float())
            grad_logits = (grad_logits * (valid * scale)).to(h.dtype)
            if grad_h is not None:
                grad_h[s:e] = grad_logits @ w
            if grad_w is not None:
                grad_w += (grad_logits.T @ h[s:e]).float()  # fp32 accumulation across chunks
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h, weight, targets, ignore_index=-100, chunk_size=None):
    """h [N, C], weight [V, C], targets [N] -> mean cross-entropy over non-ignored tokens."""
    chunk_size = chunk_size or _chunk_size(weight.shape[0])
    return LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_size)
