"""
Choosing a draft for self-speculation (REFERENCE.md section 5): a skip plan from the prompt itself, before
decoding (choose_draft_plan), or the exit layer and cap of each round while generating (ExitChooser).

A skip-plan draft runs every layer but the plan's; whether it pays depends on how often its next-token
prediction agrees with the full model's (the acceptance rate a) and on what a draft step and a verification
cost. choose_draft_plan scores plans on the prompt's own tokens, where the full model's predictions are
known from one forward, and keeps the plan with the largest expected speedup:

    tokens per round  = (1 - a^(d+1)) / (1 - a)             (Leviathan et al. 2023, section 3)
    cost of a round   = d * c + v                            (a full-depth decode step = 1)
    c = (layers the draft runs + head) / (L + head),  v = 1

with costs counted in weights read, since batch-1 decoding is bandwidth-bound: a round's last draft token runs
layers [0, f) (f: the plan's first skipped layer) and verification reruns [f, L) + head, every weight once.
"""
import torch


def head_cost(model):
    """The head's weights (final norm + LM head) in units of one layer's."""
    layer = sum(p.numel() for p in model.layers[0].parameters())
    return model.lm_head.weight.numel() / layer


def expected_speedup(a, d, c, v):
    """Tokens per round over the round's cost (REFERENCE.md section 5) for acceptance a, cap d, costs c and v;
    a and d numbers or tensors that broadcast."""
    a = a.clamp(max=1 - 1e-9) if torch.is_tensor(a) else min(a, 1 - 1e-9)  # a -> 1: d + 1 tokens
    return (1 - a ** (d + 1)) / (1 - a) / (d * c + v)


def plan_cost(plan, head):
    """(c, v) of a skip plan [L]: a draft step's cost and a verification's (with the exit step before it), a full
    decode step being 1."""
    L = len(plan)
    return (L - int(plan.sum()) + head) / (L + head), 1.0


@torch.inference_mode()
def choose_draft_plan(model, idx, lens, d):
    """The skip plan [L] (bool) with the largest expected speedup on prompts idx [B, T] (lengths lens [B]), cap d.

    Each layer is scored alone (how often the model with that one layer skipped predicts the full model's next
    token on the prompts' tokens); plans are then the k best-scoring layers for k = 1 .. L-1, each scored on
    the prompts again (2L - 1 forwards over the prompts). Agreement on the prompt stands in for acceptance.
    """
    L, T = model.n_layer, idx.shape[1]
    if L < 2:
        raise ValueError(f"draft_skip_layers auto needs a model of at least 2 layers, this one has {L}")
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


class ExitChooser:
    """--exit_layer auto (after DEL, REFERENCE.md section 5): the exit layer E of each round and each row's cap d,
    from acceptance measured while generating, row by row. Every round's acceptance counts for the exit it
    drafted with; every `probe_every` rounds the head also reads the hidden state at every candidate exit
    (shallower ones during the draft, deeper ones during verification, where they are at hand), and whether each
    would have predicted the tokens the round accepted counts for it. Counts decay by `decay` per update, so the
    choice follows the context. Rows share a round's draft pass, so they share E (the exit whose best caps give
    the largest summed expected speedup) and each drafts up to its own cap. Costs of a draft step and of a
    verification in weights read (expected_speedup, plan_cost)."""

    def __init__(self, model, cap, batch_size, probe_every=8, decay=0.9):
        L = model.n_layer
        if L < 2:
            raise ValueError(f"exit_layer auto needs a model of at least 2 layers to draft with, this one has {L}")
        self.cap, self.probe_every, self.decay = cap, probe_every, decay
        self.candidates = sorted({max(1, round(L * i / 8)) for i in range(1, 8)} - {L})
        head = head_cost(model)
        self.costs = {e: plan_cost(torch.arange(L) >= e, head) for e in self.candidates}
        # per exit, per row: decayed counts of agreements and of predictions; prior: one agreement in two
        self.agreed = {e: torch.ones(batch_size, dtype=torch.float64) for e in self.candidates}
        self.seen = {e: torch.full((batch_size,), 2.0, dtype=torch.float64) for e in self.candidates}
        self.rounds = 0

    def choose(self, rows):
        """rows [B]: the batch rows still decoding -> (exit layer, caps [B] in 1 .. cap, probe: whether this round
        reads every candidate exit)."""
        d = torch.arange(1, self.cap + 1, dtype=torch.float64)  # [D]
        best = None
        for e in self.candidates:
            a = (self.agreed[e] / self.seen[e])[rows, None]  # [B, 1]
            speedup, caps = expected_speedup(a, d, *self.costs[e]).max(1)  # [B]: each row's best cap at e
            total = float(speedup.sum())
            if best is None or total > best[0]:
                best = (total, e, caps + 1)
        self.rounds += 1
        return best[1], best[2], self.rounds % self.probe_every == 1

    def count(self, e, rows, agreed, seen):
        """At exit e, batch row rows[i] agreed agreed[i] times in seen[i] predictions ([B] each)."""
        self.agreed[e][rows] = self.decay * self.agreed[e][rows] + agreed.double().cpu()
        self.seen[e][rows] = self.decay * self.seen[e][rows] + seen.double().cpu()
