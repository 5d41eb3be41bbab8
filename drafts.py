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
import weakref

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


FULL = ("verify", 0, 1)  # ExitChooser's key of a full-depth step: a verification of 1 position from layer 0
_timings = weakref.WeakKeyDictionary()  # model -> {(device type, batch size, compiled): ExitChooser.timings}


def measured_timings(model, device, batch_size, compiled):
    """The timings ExitChooser keeps for this model, device, batch size and compile mode, one dict per process:
    what a step costs does not depend on the prompt, so each call starts from what earlier calls timed."""
    return _timings.setdefault(model, {}).setdefault((device.type, batch_size, compiled), {})


class ExitChooser:
    """--exit_layer auto (after DEL, REFERENCE.md section 5): the exit layer E of each round and each row's cap d,
    from acceptance and costs measured while generating, row by row.

    Acceptance: until rounds measure it, how often each exit agrees with the full model on the prompt's last
    tokens (generate.prefill_reading_exits). Every round counts for the exit it drafted with; the first round and
    every `probe_every`-th after it, the head also reads the output of the layer before other exits (in the first
    round and full-depth ones every exit drafted with, in others those within `probe_reach` layers of E):
    shallower ones from the draft steps, deeper ones from the verification, whose graphs keep every layer's
    output, in one product with the head. Whether each would have predicted the tokens the round settled counts
    for it. Counts decay by `decay` per update, so the choice follows the context.

    Costs: seconds of a draft step at E, of a verification from E of n positions (a round's drafts + 1: on a CPU a
    verification of 5 positions costs about twice one of 1, on a GPU about the same) and of a full-depth step (a
    round without drafts), each the least of its last `window` timings of rounds that read no other exit; the
    host's work between rounds counts with the verification, as every round pays it. `timings` (measured_timings)
    carries them from call to call. Compiled, the first `warm_up` timings compile and are not counted, nor later is
    one over `outlier` times its estimate (a new graph or shape compiling). The first rounds are full-depth steps,
    until one is timed; before an exit is timed, its cost in weights read (plan_cost) scaled by what the timed costs
    measured against theirs (for a verification, those of the nearest number of positions).

    Rows share a round's draft pass, so they share E: of the exits drafted with (compiled, each being its own
    graphs: every other one, 2, 4, ..., in the first call, and in later calls only the exits earlier calls timed, so
    that no graph compiles inside them), the one whose best caps give the largest summed expected speedup
    (expected_speedup over a full-depth step). Each row drafts up to its own cap in 0 .. cap: cap 0, a full-depth
    step, wherever no draft is expected to pay `margin` more (estimates from a few tokens are noisy)."""

    def __init__(self, model, cap, batch_size, compiled=False, cuda_graphs=False, timings=None, probe_every=4,
                 probe_reach=4, decay=0.9, window=5, margin=0.05):
        L = model.n_layer
        if L < 2:
            raise ValueError(f"exit_layer auto needs a model of at least 2 layers to draft with, this one has {L}")
        self.cap, self.decay, self.window, self.margin = cap, decay, window, margin
        self.probe_every, self.probe_reach = probe_every, probe_reach
        self.warm_up = 3 if cuda_graphs else 2 if compiled else 0  # compile, recompile (symbolic positions), record
        self.warmed, self.outlier = 0, 4.0
        self.candidates = list(range(1, L))  # exit e at index e - 1 of the tensors below
        self.timings = {} if timings is None else timings  # ("draft", e) or ("verify", e, n) -> seconds timed
        # the exits drafted with: compiled, each is its own draft and verification graphs: those compiled already
        # (timed by an earlier call), else every other one
        self.draftable = torch.ones(L - 1, dtype=torch.bool)
        timed = [key[1] for key in self.timings if key[0] == "draft"]
        if compiled and timed:
            self.draftable[:] = False
            self.draftable[torch.tensor(timed) - 1] = True
        elif compiled and L > 2:
            self.draftable[0::2] = False
        head = head_cost(model)  # priors in full-depth steps, from weights read; a verification's is 1 (plan_cost)
        self.draft_prior = torch.tensor([plan_cost(torch.arange(L) >= e, head)[0] for e in self.candidates],
                                        dtype=torch.float64)  # [L-1]
        # the least kept timing of each cost, nan until timed: a draft step at exit e [L-1]; a verification from
        # exit e of n positions [L, cap+1] at [e, n - 1], [0, 0] being a full-depth step
        self.draft_seconds = torch.full((L - 1,), float("nan"), dtype=torch.float64)
        self.verify_seconds = torch.full((L, cap + 1), float("nan"), dtype=torch.float64)
        for key, kept in self.timings.items():
            self.keep(key, kept)
        self.estimated = self.priced = None  # estimates() and costs(), until a least timing changes
        # [L-1, B]: decayed counts of agreements and of predictions per exit and row; prior: one disagreement
        self.agreed = torch.zeros(L - 1, batch_size, dtype=torch.float64)
        self.seen = torch.ones(L - 1, batch_size, dtype=torch.float64)
        self.rounds = 0

    def keep(self, key, kept):
        """Timings kept for key: the least is its cost. Counts past this call's cap (timed by an earlier call with a
        larger one) are not used."""
        if key[0] == "draft":
            seconds, at = self.draft_seconds, key[1] - 1
        elif key[2] <= self.cap + 1:
            seconds, at = self.verify_seconds, (key[1], key[2] - 1)
        else:
            return
        if not seconds[at] == min(kept):  # (nan == x is False)
            seconds[at] = min(kept)
            self.estimated = self.priced = None

    def estimates(self):
        """(draft step [L-1], verification [L, cap+1]) seconds, as in verify_seconds: each timed cost, or its prior
        scaled by the median (of an even count, the lower middle) ratio of timed to prior of its kind: draft steps,
        or passes through every layer (verifications and full-depth steps) of the nearest number of positions
        timed (ties: the larger); else of the other kind; in full-depth steps before anything is timed."""
        if self.estimated is not None:
            return self.estimated
        draft, verify = self.draft_seconds, self.verify_seconds
        timed = ~verify.isnan()  # [L, cap+1]
        if not draft.isnan().all():
            draft_scale = (draft / self.draft_prior).nanmedian()
        else:
            draft_scale = verify.nanmedian() if timed.any() else torch.tensor(1.0, dtype=torch.float64)
        pass_scale = draft_scale.expand(self.cap + 1)  # [cap+1] by number of positions
        if timed.any():
            n = torch.arange(self.cap + 1)
            distance = 2 * (n[None, :] - n[:, None]).abs() - (n[None, :] > n[:, None]).long()  # [n, m]: ties, larger m
            nearest = distance.masked_fill(~timed.any(0), 2 * self.cap + 3).argmin(1)  # [cap+1]: nearest timed m
            pass_scale = verify.nanmedian(0).values[nearest]
        self.estimated = (torch.where(draft.isnan(), self.draft_prior * draft_scale, draft),
                          torch.where(timed, verify, pass_scale))  # a verification's prior is 1
        return self.estimated

    def costs(self):
        """(draft step [L-1], verification of d + 1 positions [L-1, cap+1]) per exit in full-depth steps. A
        verification runs every layer for at least one position and fewer positions never cost more: a timing that
        says otherwise is noise (which is upward), so v is at least 1 and at most what any larger d costs."""
        if self.priced is None:
            draft, verify = self.estimates()
            full = verify[0, 0]
            self.priced = draft / full, (verify[1:] / full).flip(1).cummin(1).values.flip(1).clamp(min=1.0)
        return self.priced

    def choose(self, rows):
        """rows [B]: the batch rows still decoding -> (exit layer, caps [B] in 0 .. cap, the exits this round reads
        besides E: none unless it is a probe round). E is 0 when no row drafts: a full-depth step, whose
        verification from layer 0 keeps every layer's output, so a probe reads every exit."""
        c, v = self.costs()
        a = self.agreed[:, rows] / self.seen[:, rows]  # [L-1, B]
        d = torch.arange(self.cap + 1, dtype=torch.float64)
        speedup = expected_speedup(a[..., None], d, c[:, None, None], v[:, None, :])  # [L-1, B, cap+1]
        speedup[..., 0] = 1.0 + self.margin  # no drafts: a full-depth step, unless drafts are expected to pay enough
        best, caps = speedup.max(-1)  # [L-1, B]: each row's best cap at each exit
        totals = best.sum(1).masked_fill(~self.draftable, -1.0)  # [L-1]
        E = int(totals.argmax()) + 1
        caps = caps[E - 1]
        if FULL not in self.timings or not bool(caps.any()):  # full-depth steps (the first ones, until one is timed)
            E, caps = 0, torch.zeros_like(caps)
        self.rounds += 1
        probes = []
        if (self.rounds - 1) % self.probe_every == 0:  # the first round and full-depth ones every exit, later E's
            probes = [e for e in self.candidates if e != E and self.draftable[e - 1]  # neighbours
                      and (self.rounds == 1 or E == 0 or abs(e - E) <= self.probe_reach)]
        return E, caps, probes

    def count(self, e, rows, agreed, seen):
        """At exit e, batch row rows[i] agreed agreed[i] times in seen[i] predictions ([B] each)."""
        self.agreed[e - 1, rows] = self.decay * self.agreed[e - 1, rows] + agreed.double().cpu()
        self.seen[e - 1, rows] = self.decay * self.seen[e - 1, rows] + seen.double().cpu()

    def time(self, e, steps, positions, draft_seconds, verify_seconds):
        """A round's steps draft steps at exit e took draft_seconds, its verification of `positions` positions
        verify_seconds (a full-depth step when steps is 0)."""
        timed = ([(("draft", e), draft_seconds / steps), (("verify", e, positions), verify_seconds)] if steps
                 else [(FULL, verify_seconds)])
        draft, verify = self.estimates() if self.timings else (None, None)
        for key, seconds in timed:
            if draft is None and self.warmed < self.warm_up:  # nothing to compare with: the first calls compile
                self.warmed += 1
                continue
            estimate = None if draft is None else draft[e - 1] if key[0] == "draft" else verify[key[1], key[2] - 1]
            if estimate is not None and seconds > self.outlier * estimate:  # a call that compiled (a new graph or
                continue                                                     # shape), not what it costs
            kept = self.timings.setdefault(key, [])
            kept.append(seconds)
            del kept[:-self.window]
            self.keep(key, kept)
