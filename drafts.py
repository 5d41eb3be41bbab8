"""
Choosing a draft for self-speculation from the prompt itself, before decoding (REFERENCE.md section 5).

A skip-plan draft runs every layer but the plan's; whether it pays depends on how often its next-token
prediction agrees with the full model's (the acceptance rate a) and on what a draft step and a verification
cost. choose_draft_plan scores plans on the prompt's own tokens, where the full model's predictions are
known from one forward, and keeps the plan with the largest expected speedup:

    tokens per round  = (1 - a^(d+1)) / (1 - a)             (Leviathan et al. 2023, section 3)
    cost of a round   = d * c + v                            (a full-depth decode step = 1)
    c = (layers the draft runs + head) / (L + head),  v = (L - f + head) / (L + head)

with f the plan's first skipped layer (verification reruns [f, L)) and costs counted in weights read, since
batch-1 decoding is bandwidth-bound.
"""
import torch


def head_cost(model):
    """The head's weights (final norm + LM head) in units of one layer's."""
    layer = sum(p.numel() for p in model.layers[0].parameters())
    return model.lm_head.weight.numel() / layer


def expected_speedup(a, d, c, v):
    """Tokens per round over the round's cost (REFERENCE.md section 5) for acceptance a, cap d, costs c and v."""
    tokens = d + 1 if a >= 1 else (1 - a ** (d + 1)) / (1 - a)
    return tokens / (d * c + v)


def plan_cost(plan, head):
    """(c, v) of a skip plan [L]: a draft step's cost and a verification's, a full decode step being 1."""
    L = len(plan)
    f = int(plan.nonzero()[0])
    return (L - int(plan.sum()) + head) / (L + head), (L - f + head) / (L + head)


@torch.inference_mode()
def choose_draft_plan(model, idx, lens, d):
    """The skip plan [L] (bool) with the largest expected speedup on prompts idx [B, T] (lengths lens [B]), cap d.

    Each layer is scored alone (how often the model with that one layer skipped predicts the full model's next
    token on the prompts' tokens); plans are then the k best-scoring layers for k = 1 .. L-1, each scored on
    the prompts again (2L - 1 forwards over the prompts). Agreement on the prompt stands in for acceptance.
    """
    L, B, T = model.n_layer, *idx.shape
    valid = (torch.arange(T) < torch.as_tensor(lens)[:, None]).to(idx.device)  # [B, T]

    def agreement(plan):
        return float((model(idx, skip_mask=plan).argmax(-1) == full)[valid].float().mean())

    full = model(idx).argmax(-1)  # [B, T]
    single = [agreement(torch.arange(L) == l) for l in range(L)]
    order = sorted(range(L), key=lambda l: -single[l])
    head = head_cost(model)
    best, best_speedup = None, 0.0
    for k in range(1, L):
        plan = torch.zeros(L, dtype=torch.bool)
        plan[order[:k]] = True
        speedup = expected_speedup(single[order[0]] if k == 1 else agreement(plan), d, *plan_cost(plan, head))
        if speedup > best_speedup:
            best, best_speedup = plan, speedup
    return best
