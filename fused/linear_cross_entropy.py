"""
Fused linear + cross-entropy, chunked over tokens.

loss = mean over non-ignored tokens of  logsumexp(h W^T) - (h W^T)[target]

The [N, V] logits are never held whole. Two ways to get the gradients, both chunk by chunk:
- recompute=True: the forward keeps nothing of size V; the backward recomputes each chunk's logits
  to form (softmax - onehot). 8 x C x V FLOPs per token. An early-exit loss at every layer then
  holds no [N, V] logits at all, where a naive loss holds L of them.
- recompute=False: the forward forms the gradients right away and keeps grad_h [N, C] and
  grad_W [V, C]; the backward only scales them. 6 x C x V FLOPs per token, as an unfused loss, for
  one more [V, C] buffer per call: the choice for one exit.
All-ignored input gives loss 0 and zero gradients (F.cross_entropy would give nan).
"""
import torch

from fused import on_device


def _chunk_size(vocab_size, cuda):
    """Tokens per chunk so that one chunk of fp32 logits is about 64 MiB on the CPU, 256 MiB on CUDA, where
    fewer, larger chunks keep the head's matmuls efficient and the fp32 weight-gradient accumulation rare."""
    return max(16, (2**26 if cuda else 2**24) // vocab_size)


def _chunks(N, size):
    return ((s, min(s + size, N)) for s in range(0, N, size))


@on_device
def _loss_and_grad(logits, targets, ignore_index, scale, want_grad):
    """One chunk: logits [n, V] -> (summed loss fp32, d loss / d logits x scale in logits' dtype, or None).
    The gradient is softmax - onehot(target), zero on ignored rows, formed in place over the fp32 buffer."""
    valid = targets != ignore_index
    at = targets.clamp(min=0).unsqueeze(1)            # [n, 1]: ignored rows point at 0, masked by valid
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    loss_sum = -(logp.gather(1, at).squeeze(1) * valid).sum()
    if not want_grad:
        return loss_sum, None
    probs = logp.exp_()
    probs.scatter_add_(1, at, -valid.float().unsqueeze(1))
    return loss_sum, probs.mul_(valid.unsqueeze(1) * scale).to(logits.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    # custom_fwd/bwd: under CUDA autocast the backward's matmuls run in bf16 as the forward's do
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, targets, ignore_index, chunk_size, recompute):
        # h [N, C], weight [V, C], targets [N]
        w = weight.to(h.dtype)
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        one = torch.ones((), device=h.device)
        grads_now = not recompute and any(ctx.needs_input_grad[:2])
        if grads_now:
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        for s, e in _chunks(h.shape[0], chunk_size):
            # gradients of the summed loss when grads_now; the backward divides by n_valid
            chunk_loss, grad = _loss_and_grad(h[s:e] @ w.T, targets[s:e], ignore_index, one, grads_now)
            loss_sum += chunk_loss
            if grads_now:
                grad_h[s:e] = grad @ w
                grad_w += (grad.T @ h[s:e]).float()
        ctx.precomputed = grads_now
        if grads_now:
            ctx.save_for_backward(grad_h, grad_w, n_valid)
        else:
            ctx.save_for_backward(h, weight, targets, n_valid)
        ctx.ignore_index, ctx.chunk_size, ctx.weight_dtype = ignore_index, chunk_size, weight.dtype
        return loss_sum / n_valid

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss):
        if ctx.precomputed:
            grad_h, grad_w, n_valid = ctx.saved_tensors
            scale = grad_loss.float() / n_valid
            return (grad_h * scale).to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None, None
        h, weight, targets, n_valid = ctx.saved_tensors
        w = weight.to(h.dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        scale = grad_loss.float() / n_valid
        for s, e in _chunks(h.shape[0], ctx.chunk_size):
            # the forward's chunk of logits, recomputed
            _, grad = _loss_and_grad(h[s:e] @ w.T, targets[s:e], ctx.ignore_index, scale, True)
            if grad_h is not None:
                grad_h[s:e] = grad @ w
            if grad_w is not None:
                grad_w += (grad.T @ h[s:e]).float()  # fp32 accumulation across chunks
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(h, weight, targets, ignore_index=-100, chunk_size=None, recompute=True):
    """h [N, C], weight [V, C], targets [N] -> mean cross-entropy over non-ignored tokens."""
    chunk_size = chunk_size or _chunk_size(weight.shape[0], h.is_cuda)
    return LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_size, recompute)
