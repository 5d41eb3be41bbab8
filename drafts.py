"""
Choosing the draft of self-speculation (docs/equations.md section 5), behind one interface:
make_drafter() gives an object whose plan() says what a round drafts and whose observe() takes what
the round settled. A fixed draft (an exit layer, or a skip plan given or chosen from the prompts by
choose_draft_plan) plans the same every round; exit layer auto (ExitChooser) chooses each round's
exit and each row's cap from the acceptance and costs it measures, and carries what it measured from
call to call in an ExitMemory the caller owns. Why it chooses as it does: docs/sampling.md.
"""
import time
import weakref
from dataclasses import dataclass, field

import torch

from generate import layer_runs
from model import layer_mask


def head_cost(model):
    """The head's weights (final norm + LM head) in units of one layer's."""
    layer = sum(p.numel() for p in model.layers[0].parameters())
    return model.lm_head.weight.numel() / layer


def expected_speedup(a, d, c, v):
    """Tokens per round over the round's cost (docs/equations.md section 5) for acceptance a, cap d,
    costs c and v; a and d numbers or tensors that broadcast."""
    a = a.clamp(max=1 - 1e-9) if torch.is_tensor(a) else min(a, 1 - 1e-9)  # a -> 1: d + 1 tokens
    return (1 - a ** (d + 1)) / (1 - a) / (d * c + v)


def plan_cost(plan, head):
    """(c, v) of a skip plan [L]: a draft step's cost and a verification's (with the exit step
    before it), in full-depth decode steps, from weights read."""
    L = len(plan)
    return (L - int(plan.sum()) + head) / (L + head), 1.0


@torch.inference_mode()
def choose_draft_plan(model, idx, lens, d):
    """The skip plan [L] (bool) with the largest expected speedup on prompts idx [B, T] (lengths
    lens [B]) at cap d: each layer scored alone by how often skipping it still predicts the full
    model's next token on the prompts, then the k best for k = 1 .. L-1 scored together (2L - 1
    forwards). Raises ValueError for a model of fewer than 2 layers."""
    L, T = model.n_layer, idx.shape[1]
    if L < 2:
        raise ValueError(f"draft_skip_layers auto needs a model of at least 2 layers, this one "
                         f"has {L}")
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
        a = single[order[0]] if k == 1 else agreement(plan)
        speedup = expected_speedup(a, d, *plan_cost(plan, head))
        if speedup > best_speedup:
            best, best_speedup = plan, speedup
    return best


ONE_DRAFT = "speculation drafts with exit_layer E or with draft_skip_layers (one of them)"


def draft_plan(model, exit_layer, draft_skip_layers):
    """The layers a draft skips, as a mask [L]: an early exit at E skips [E, L); a skip plan (layer
    indices or a mask [L]) skips its layers. The draft must run a layer and skip one.
    Raises ValueError naming the argument."""
    L = model.n_layer
    if (exit_layer is None) == (draft_skip_layers is None):
        raise ValueError(ONE_DRAFT)
    if exit_layer is not None:
        model.check_exit_layer(exit_layer)
        if exit_layer >= L:
            raise ValueError(f"speculation needs exit_layer < {L} (the draft must be shallower "
                             "than the model)")
        return torch.arange(L) >= exit_layer
    plan = torch.as_tensor(draft_skip_layers)
    if plan.dtype != torch.bool:
        if plan.dim() != 1 or not bool(((plan >= 0) & (plan < L)).all()):
            raise ValueError(f"draft_skip_layers must be layer indices in [0, {L - 1}], "
                             f"got {draft_skip_layers!r}")
        plan = layer_mask(plan.tolist(), L)
    if tuple(plan.shape) != (L,) or not bool(plan.any()) or bool(plan.all()):
        raise ValueError(f"draft_skip_layers must skip at least one of the {L} layers and keep at "
                         f"least one, got {draft_skip_layers!r}")
    return plan


@dataclass
class ExitMemory:
    """What exit layer auto carries from call to call on one model (n_layer layers): how often each
    exit agreed with the full model in greedy rounds without a threshold (agreement: [agreements,
    predictions], each a list [n_layer - 1], exit e at e - 1), and the seconds its rounds took
    (timings: (device type, batch size, compiled) -> ExitChooser.timings)."""
    n_layer: int
    agreement: list = None
    timings: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.agreement is None:
            self.agreement = [[0.0] * (self.n_layer - 1), [0.0] * (self.n_layer - 1)]

    def timings_for(self, device, batch_size, compiled):
        """The timings of rounds on `device` at this batch size and compile mode."""
        return self.timings.setdefault((device.type, batch_size, compiled), {})


_memories = weakref.WeakKeyDictionary()  # model -> ExitMemory: default_memory's


def default_memory(model):
    """The ExitMemory generate_speculative uses for `model` when the caller passes none: one per
    model and process."""
    if model not in _memories:
        _memories[model] = ExitMemory(model.n_layer)
    return _memories[model]


def measured_timings(model, device, batch_size, compiled):
    """default_memory(model)'s timings for this device, batch size and compile mode."""
    return default_memory(model).timings_for(device, batch_size, compiled)


def measured_agreement(model):
    """default_memory(model)'s agreement: [agreements [L-1], predictions [L-1]]."""
    return default_memory(model).agreement


FULL = ("round", 0, 0)  # ExitChooser's key of a full-depth step: a round without drafts


class ExitChooser:
    """--exit_layer auto (after DEL, docs/equations.md section 5): the exit layer E of each round
    and each row's cap d in 0 .. cap (0: a full-depth step), from acceptance and costs measured
    while generating, row by row (docs/sampling.md, "Exit layer auto").

    Acceptance: per exit and row, decayed counts of agreements and predictions (agreed, seen
    [L-1][B]), from `prior_weight` predictions at history's rate ([agreements, predictions] of
    earlier calls, which count() adds to). Costs: seconds of a round at exit e with s draft steps,
    `timings` {("round", e, s): [seconds, None while warming up]}, FULL for a full-depth step.
    Raises ValueError for a model of fewer than 2 layers."""

    def __init__(self, model, cap, batch_size, compiled=False, cuda_graphs=False, timings=None,
                 history=None, probe_every=4, max_probe_gap=32, decay=0.9, window=5, margin=0.05,
                 prior_weight=4.0):
        L = model.n_layer
        if L < 2:
            raise ValueError(f"exit_layer auto needs a model of at least 2 layers to draft with, "
                             f"this one has {L}")
        self.cap, self.decay, self.window, self.margin = cap, decay, window, margin
        self.probe_every, self.max_probe_gap, self.outlier = probe_every, max_probe_gap, 4.0
        self.next_probe, self.probe_gap = 1, probe_every  # the next probe's round, the last gap
        # timings not counted: compile, recompile (symbolic positions), record a CUDA graph; eager,
        # a cold first call
        self.warm_up = 3 if cuda_graphs else 2 if compiled else 1
        self.candidates = list(range(1, L))  # exit e: index e - 1 of the counts, row e of costs
        self.timings = {} if timings is None else timings
        # the exits drafted with: every other one up to half the depth (exit 1 of 2 layers, 2 of 3);
        # compiled, in later calls only those earlier calls timed (their graphs have compiled)
        e, timed = torch.tensor(self.candidates), [key[1] for key in self.timings if key[1]]
        self.draftable = (e % 2 == 0) & (e <= max(L // 2, 2)) if L > 2 else e == 1
        if compiled and timed:
            self.draftable = torch.isin(e, torch.tensor(timed))
        self.drafted_with = e[self.draftable].tolist()  # the same, as exit layers
        head = head_cost(model)  # a draft step at exit e in full-depth steps (plan_cost)
        draft = torch.tensor([0.0] + [plan_cost(torch.arange(L) >= e, head)[0]
                                      for e in self.candidates], dtype=torch.float64)
        steps = torch.arange(cap + 1, dtype=torch.float64)
        # the caps a round may draft up to: compiled, each (exit, cap) being a graph, 0, 1, 2 and 4
        self.allowed = [s in (0, 1, 2, 4) or not compiled for s in range(cap + 1)]
        self.allowed_steps = [max(t for t in range(s + 1) if self.allowed[t])
                              for s in range(cap + 1)]  # the most allowed <= s
        self.prior = steps * draft[:, None] + 1  # [L, cap+1]: exit e, s draft steps; [0, 0]: full
        # [L][cap+1]: the least kept timing (nan: none), and whether there are enough to price by
        self.seconds = [[float("nan")] * (cap + 1) for _ in range(L)]
        self.trusted, self.trust = [[False] * (cap + 1) for _ in range(L)], 3
        for key, kept in self.timings.items():
            self.keep(key, kept)
        self.estimated = self.priced = self.chosen = None  # estimates(), costs(), choose(): kept
        # [L-1][B] plain numbers: decayed counts of agreements and predictions per exit and row
        self.history = [[0.0] * (L - 1), [0.0] * (L - 1)] if history is None else history
        self.seen = [[prior_weight if n > 0 else 0.0] * batch_size for n in self.history[1]]
        self.agreed = [[a / max(n, 1.0) * prior_weight if n > 0 else 0.0] * batch_size
                       for a, n in zip(*self.history)]
        self.rounds = 0

    def keep(self, key, kept):
        """Timings kept for key: the least is its cost, changed when it moves by 5% or more, trusted
        from `trust` timings on (a full-depth step's from the first). Rounds past this call's cap
        (timed by an earlier call with a larger one) are not used."""
        _, e, s = key
        kept = [t for t in kept if t is not None]
        if not kept or s > self.cap:
            return
        trusted = len(kept) >= (1 if e == 0 else self.trust)
        moved = not abs(self.seconds[e][s] - min(kept)) < 0.05 * min(kept)  # nan: moved
        if moved or trusted != self.trusted[e][s]:
            self.seconds[e][s], self.trusted[e][s] = min(kept), trusted
            self.estimated = self.priced = self.chosen = None

    def estimates(self):
        """Seconds of every round [L, cap+1], as in `seconds`: each trusted timing; else its prior
        scaled by the median (of an even count, the lower middle) ratio of trusted timing to prior
        of the rounds with the nearest number of draft steps (ties: the larger), or the timing if
        less. In full-depth steps before anything is timed."""
        if self.estimated is not None:
            return self.estimated
        seconds = torch.tensor(self.seconds, dtype=torch.float64)  # [L, cap+1]
        trusted = torch.tensor(self.trusted)
        scale = torch.ones(self.cap + 1, dtype=torch.float64)  # [cap+1] by number of draft steps
        if trusted.any():
            s = torch.arange(self.cap + 1)
            # [s, t]: distance from s to t, ties to the larger t
            distance = 2 * (s[None, :] - s[:, None]).abs() - (s[None, :] > s[:, None]).long()
            nearest = distance.masked_fill(~trusted.any(0), 2 * self.cap + 3).argmin(1)  # [cap+1]
            ratio = (seconds / self.prior).masked_fill(~trusted, float("nan"))
            scale = ratio.nanmedian(0).values[nearest]
        priced = self.prior * scale
        self.estimated = torch.where(trusted, seconds, torch.fmin(seconds, priced))  # fmin: not nan
        return self.estimated

    def costs(self):
        """A round from exit e with s draft steps [L-1, cap+1] (at [e - 1, s]) in full-depth steps:
        at least 1, and never more than any larger s costs."""
        if self.priced is None:
            rounds = self.estimates()
            ratio = (rounds[1:] / rounds[0, 0]).flip(1)
            self.priced = ratio.cummin(1).values.flip(1).clamp(min=1.0)
        return self.priced

    def choose(self, rows):
        """rows [B]: the batch rows still decoding -> (exit layer, caps [B] in 0 .. cap, the exits
        drafted with this round reads besides E: none outside probe rounds). E is 0 when no row
        drafts: a full-depth step. Until counts or costs change, the same rows get the same choice
        outside probe rounds."""
        self.rounds += 1
        if self.chosen is None or not torch.equal(self.chosen[0], rows):
            self.chosen = rows, *self.best_exit(rows)
        E, caps = self.chosen[1:]
        if E != 0 and self.probe_gap > self.probe_every:  # drafting again after full-depth steps
            self.probe_gap = self.probe_every
            self.next_probe = min(self.next_probe, self.rounds + self.probe_every)
        probe = self.rounds >= self.next_probe
        if probe:  # a gap doubles when full depth is chosen (not when forced, before one is timed)
            chose_full = E == 0 and self.trusted[0][0]
            gap = min(2 * self.probe_gap, self.max_probe_gap)
            self.probe_gap = gap if chose_full else self.probe_every
            self.next_probe = self.rounds + self.probe_gap
            if chose_full:  # the probe drafts anyway, at the exit most likely to pay
                E, caps = self.best_exit(rows, explore=True)
        return E, caps, [e for e in self.drafted_with if e != E] if probe else []

    def best_exit(self, rows, explore=False):
        """choose()'s exit layer and caps [B] for rows [B], from the counts and costs now; with
        explore, the best that drafts (each row's best cap of 1 or more). Each exit drafted with
        scores the sum over rows of each row's best expected speedup over a full-depth step (ties:
        the shallower exit, the smaller cap)."""
        costs, rows = self.costs().tolist(), rows.tolist()  # costs[e - 1][s] in full-depth steps
        steps = [s for s in range(1, self.cap + 1) if self.allowed[s]]
        floor = 0.0 if explore else 1.0 + self.margin  # no drafts unless drafts pay enough
        best_total, E, best_caps = -1.0, 0, [0] * len(rows)
        for e in self.drafted_with:
            agreed, seen, total, caps = self.agreed[e - 1], self.seen[e - 1], 0.0, []
            for b in rows:
                a = agreed[b] / (seen[b] + 1)  # one disagreement more than counted
                speedup, cap = max((expected_speedup(a, s, 0.0, costs[e - 1][s]), -s)
                                   for s in steps)
                speedup, cap = (speedup, -cap) if speedup > floor else (floor, 0)
                total += speedup
                caps.append(cap)
            if total > best_total:
                best_total, E, best_caps = total, e, caps
        if not self.trusted[0][0] or not any(best_caps):  # full depth (until a full step is timed)
            return 0, torch.zeros(len(rows), dtype=torch.long)
        return E, torch.tensor(best_caps)

    def full_depth_rounds(self):
        """After a full-depth choice outside a probe round: the rounds it holds for, this one and
        those until the next probe round, at most `probe_every`, which are counted as chosen; 1
        while no full-depth step is timed."""
        rounds = min(self.next_probe - self.rounds, self.probe_every) if self.trusted[0][0] else 1
        self.rounds += rounds - 1
        return rounds

    def count(self, e, rows, agreed, seen, remember=True):
        """At exit e, batch row rows[i] agreed agreed[i] times in seen[i] predictions ([B] each,
        tensors or lists); a row without predictions keeps its counts. remember: add them to
        `history` too, later calls' prior."""
        rows, agreed, seen = (x.tolist() if torch.is_tensor(x) else x for x in (rows, agreed, seen))
        for b, n_agreed, n_seen in zip(rows, agreed, seen):
            if n_seen:
                self.agreed[e - 1][b] = self.decay * self.agreed[e - 1][b] + n_agreed
                self.seen[e - 1][b] = self.decay * self.seen[e - 1][b] + n_seen
                if remember:
                    self.history[0][e - 1] += n_agreed
                    self.history[1][e - 1] += n_seen
        self.chosen = None

    def time(self, e, steps, seconds):
        """A round of `steps` draft steps at exit e took `seconds` (a full-depth step when steps is
        0). The first `warm_up` timings of a round, and later ones over `outlier` times its
        estimate, are not counted."""
        key = ("round", e, steps) if steps else FULL
        kept = self.timings.setdefault(key, [])
        if len(kept) < self.warm_up and all(t is None for t in kept):  # its first calls (compiling)
            kept.append(None)
            return
        if self.trusted[0][0] and seconds > self.outlier * float(self.estimates()[key[1:]]):
            return  # a call that compiled
        kept.append(seconds)
        del kept[:-self.window]
        self.keep(key, kept)


def count_agreement(chooser, rows, E, counts, planned, n_acc, settled, probed=(), read=(),
                    remember=True):
    """Tell the chooser how its exits did in a round, for batch rows rows [B] (CPU, as counts,
    planned and n_acc [B]). settled [B, K+1]: the round's tokens, valid up to each row's n_acc. Exit
    E (0: none drafted): accepted drafts agreed, a rejected one did not, nor one the threshold
    stopped (count below planned). probed: (exit, predictions [B]) at the round's first position.
    read: (exit, predictions [B, K+1]) of a stretch of full-depth steps, every position counted.
    remember: as ExitChooser.count."""
    if E:
        stopped = (counts < planned).long()
        chooser.count(E, rows, n_acc, torch.minimum(counts + stopped, n_acc + 1), remember)
    for e, preds in probed:
        chooser.count(e, rows, (preds == settled[:, 0]).long(), torch.ones_like(n_acc), remember)
    if read:
        exits = [e for e, _ in read]
        agreed = (torch.stack([preds for _, preds in read]) == settled).long().cpu()  # [X, B, K+1]
        for position in agreed.permute(2, 0, 1).tolist():  # [K+1][X][B]
            for e, rows_agreed in zip(exits, position):
                chooser.count(e, rows, rows_agreed, [1] * len(rows_agreed), remember)


@dataclass
class RoundPlan:
    """What a round runs, for rows [B] (their indices in the batch the call started with). exit: the
    first layer the draft skips (0: no drafts, full-depth steps); runs: the draft's layers after it
    ((start, stop), ...); steps: draft steps (a stretch: full-depth steps after the first); counts
    [B] (CPU): the drafts each row counts; probes: other exits read at the round's first position;
    stretch: steps + 1 full-depth steps reading the head at each exit in `reads`; auto: exit auto's
    round (compiled, its draft steps keep every layer's output, as a probe round's do)."""
    rows: torch.Tensor
    exit: int
    runs: tuple
    steps: int
    counts: torch.Tensor
    probes: tuple = ()
    stretch: bool = False
    reads: tuple = ()
    auto: bool = False


@dataclass
class RoundResult:
    """What a round settled. new [B, K+1]: tokens at its positions; settles [B] (CPU): how many of
    them each row settles (its verified drafts, then the verifier's token); accepted [B] (CPU): the
    drafts each row counts as accepted, up to its count; counts [B] (CPU): drafts each row counted
    (fewer than planned where the threshold stopped it); draft_steps: draft steps run; draft_seconds
    (None: not timed apart, one call) and verify_seconds: from the first draft step to the last, and
    from there to the accepted counts on the host, at time.perf_counter() synced_at; probed:
    [(exit, predictions [B])] at the first position; read: [(exit, predictions [B, K+1])]."""
    new: torch.Tensor
    settles: torch.Tensor
    accepted: torch.Tensor
    counts: torch.Tensor
    draft_steps: int
    draft_seconds: float | None
    verify_seconds: float
    synced_at: float
    probed: list = ()
    read: list = ()

    @property
    def seconds(self):
        return (self.draft_seconds or 0.0) + self.verify_seconds


class FixedDraft:
    """A draft that skips the same layers every round: plan [L] (draft_plan's mask), cap d."""

    def __init__(self, model, plan, cap):
        self.mask, self.cap = plan, cap
        self.exit = int(plan.nonzero()[0])  # the first layer the draft skips
        self.runs = tuple(r for r in layer_runs(plan[None], model.n_layer)[0] if r[0] > self.exit)

    def prompt_exits(self):
        return ()

    def plan(self, rows, room, limit):
        """rows [B]; room: tokens until the nearest row's end; limit: the most draft steps the round
        may take -> RoundPlan."""
        steps = min(self.cap, limit)
        return RoundPlan(rows, self.exit, self.runs, steps, torch.full((len(rows),), steps))

    def observe(self, plan, result):
        pass

    def stats(self):
        return {"draft_skip_layers": self.mask.nonzero()[:, 0].tolist()}


class ExitAuto:
    """Exit layer auto as a drafter: an ExitChooser's choice each round, in the interface FixedDraft
    has. greedy: rounds settle greedy tokens; remember: what they count enters `memory` (greedy
    rounds without a threshold)."""

    def __init__(self, model, cap, batch_size, device, compiled, cuda_graphs, memory, greedy,
                 remember):
        if memory.n_layer != model.n_layer:
            raise ValueError(f"exit_memory is for a model of {memory.n_layer} layers, this one has "
                             f"{model.n_layer}")
        self.chooser = ExitChooser(model, cap, batch_size, compiled, cuda_graphs,
                                   timings=memory.timings_for(device, batch_size, compiled),
                                   history=memory.agreement)
        self.greedy, self.remember = greedy, remember
        self.pending = None  # the last round's timing, until the host's work after it is in it
        self.exits_used = {}  # exit layer -> rounds drafted with it (0: rounds without drafts)

    def prompt_exits(self):
        """The exits whose agreement on the prompt a first call reads (none once calls counted)."""
        return () if any(self.chooser.history[1]) else tuple(self.chooser.drafted_with)

    def observe_prompt(self, exits, exit_preds, full_preds, valid):
        """Exit agreement on the prompts: exit_preds [X, B, P], full_preds [B, P], valid [B, P]."""
        rows = torch.arange(full_preds.shape[0])
        for e, preds in zip(exits, exit_preds):
            agreed = ((preds == full_preds) & valid).sum(1)
            self.chooser.count(e, rows, agreed, valid.sum(1), remember=False)

    def plan(self, rows, room, limit):
        """As FixedDraft.plan: the chooser's exit and caps; a greedy full-depth choice outside a
        probe round is a stretch of full-depth steps (ExitChooser.full_depth_rounds)."""
        chooser = self.chooser
        if self.pending:  # the last round's cost, with the host's work after it (per token)
            e, steps, seconds, synced_at, tokens = self.pending
            chooser.time(e, steps, (seconds + time.perf_counter() - synced_at) / tokens)
        E, caps, probes = chooser.choose(rows)
        stretch = E == 0 and not probes and self.greedy
        if stretch:
            steps = min(chooser.full_depth_rounds() - 1, room - 1, limit)
        else:
            steps = chooser.allowed_steps[min(int(caps.max()), limit)]
        used = E if steps else 0
        self.exits_used[used] = self.exits_used.get(used, 0) + (steps + 1 if stretch else 1)
        counts = torch.minimum(torch.full((len(rows),), steps), caps)
        reads = tuple(chooser.drafted_with) if stretch else ()
        return RoundPlan(rows, E, (), steps, counts, tuple(probes), stretch, reads, auto=True)

    def observe(self, plan, result):
        """Count what the round's exits agreed on; keep its timing for the next plan() (a probe
        round is not timed)."""
        tokens = plan.steps + 1 if plan.stretch else 1
        self.pending = None if plan.probes else (plan.exit, result.draft_steps, result.seconds,
                                                 result.synced_at, tokens)
        read = result.read if self.remember else ()  # with a threshold, agreement overstates
        count_agreement(self.chooser, plan.rows, plan.exit, result.counts, plan.counts,
                        result.accepted, result.new, result.probed, read, remember=self.remember)

    def stats(self):
        return {"exit_layers": self.exits_used}


def make_drafter(model, idx, lens, exit_layer, draft_skip_layers, cap, compiled=False,
                 cuda_graphs=False, memory=None, greedy=True, remember=True):
    """The drafter for generate_speculative's draft arguments on prompts idx [B, T] (lens [B]):
    ExitAuto for exit_layer "auto" (memory: an ExitMemory, default default_memory(model)), else a
    FixedDraft (draft_skip_layers "auto": choose_draft_plan). Raises ValueError naming the
    argument."""
    if draft_skip_layers == "auto":  # checked before its 2L - 1 forwards over the prompts
        if exit_layer is not None:
            raise ValueError(ONE_DRAFT)
        draft_skip_layers = choose_draft_plan(model, idx, lens, cap)
    if exit_layer != "auto":
        return FixedDraft(model, draft_plan(model, exit_layer, draft_skip_layers), cap)
    memory = default_memory(model) if memory is None else memory
    drafter = ExitAuto(model, cap, idx.shape[0], idx.device, compiled, cuda_graphs, memory, greedy,
                       remember)
    draft_plan(model, drafter.chooser.candidates[0], draft_skip_layers)  # one of the two
    return drafter
