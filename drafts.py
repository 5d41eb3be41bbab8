"""
Choosing a draft for self-speculation (docs/equations.md section 5): a skip plan from the prompt itself, before
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
    """Tokens per round over the round's cost (docs/equations.md section 5) for acceptance a, cap d, costs c and v;
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


FULL = ("round", 0, 0)  # ExitChooser's key of a full-depth step: a round without drafts
_timings = weakref.WeakKeyDictionary()  # model -> {(device type, batch size, compiled): ExitChooser.timings}


def measured_timings(model, device, batch_size, compiled):
    """The timings ExitChooser keeps for this model, device, batch size and compile mode, one dict per process:
    what a step costs does not depend on the prompt, so each call starts from what earlier calls timed."""
    return _timings.setdefault(model, {}).setdefault((device.type, batch_size, compiled), {})


_agreement = weakref.WeakKeyDictionary()  # model -> ExitChooser.history


def measured_agreement(model):
    """How often each exit of this model agreed with the full model in earlier calls' greedy rounds without a
    threshold, one per process: [agreements, predictions], each a list [L-1] (exit e at e - 1) summed over calls
    and rows: ExitChooser's prior."""
    return _agreement.setdefault(model, [[0.0] * (model.n_layer - 1), [0.0] * (model.n_layer - 1)])


class ExitChooser:
    """--exit_layer auto (after DEL, docs/equations.md section 5): the exit layer E of each round and each row's cap d,
    from acceptance and costs measured while generating, row by row.

    Acceptance: counts start as `prior_weight` predictions at the rate earlier calls in this process counted on
    generated tokens in greedy rounds without a threshold (history: measured_agreement; a sampled token or a draft
    the threshold stopped says less of agreement), or in a first call from how often each exit agrees with the full
    model on the prompt's last tokens (generate.prefill_reading_exits). Every round counts for the exit it drafted with;
    in probe rounds (the first, then every `probe_every`-th while drafting; while full-depth steps are chosen the
    gap doubles with each probe, up to `max_probe_gap` rounds: a probe costs more than a round without one; back to
    `probe_every` as soon as a round drafts), the head also reads, at the round's first position, the output of the
    layer before every other exit drafted with (shallower ones from the first draft step, deeper ones from the
    verification, which keep every layer's output; greedy, all in the round's one call, generate.greedy_round), in
    one product; whether each would have predicted the token settled there counts for it (later positions are
    settled only where E's drafts were accepted, so they would count the other exits mostly where E found the tokens
    easy). A probe round where full depth is chosen drafts anyway, at the exit whose best cap of 1 or more is
    expected to pay most: it counts that exit's acceptance on every draft, where a full-depth probe reads one
    position. Greedy full-depth steps outside probe rounds without a threshold read the head at every exit drafted
    with (generate.full_step_reading_exits), and each token they settle counts for each of those exits (every
    position there is settled by the full model alone, so none is read selectively; with a threshold, agreement
    overstates what drafts the threshold stops would give). Counts decay by `decay` per update (a row not counted
    keeps its own), so the choice follows the context; an exit's acceptance is agreements / (predictions + 1).

    Costs: seconds of a whole round at exit E with s draft steps (its draft steps, its verification of s + 1
    positions and the host's work until the next round: greedy rounds are one call, greedy_round, whose parts are
    not timed apart) and of a full-depth step (a round without drafts), each the least of its last `window`
    timings of rounds that read no other exit. `timings` (measured_timings) carries them from call to call.
    The first `warm_up` timings of each round compile or run cold and are not counted (kept as None; eager, the
    first: a first call can run slow, and once auto drafts a full-depth step is timed rarely, so one slow timing
    could price it: in one process its only timing was 6.31 ms where plain decoding ran at 3.6 ms a token, so every
    round looked 1.75x cheaper against it than it was), nor later is one over `outlier` times its estimate (a new
    shape compiling). The first rounds are full-depth steps, until one is timed. A round timed `trust` times costs
    its least timing; any other is priced by weights read (s * plan_cost + 1 full-depth steps) scaled by what
    trusted rounds of the nearest number of draft steps measured against theirs (on a CPU a verification of 5
    positions costs about twice one of 1, on a GPU about the same), or by its timing where that is less.

    Rows share a round's draft pass, so they share E: of the exits drafted with (every other one up to half the
    depth, 2, 4, ..., L/2, or 1 of 2 layers and 2 of 3: the largest of fewer noisy estimates is less often an
    overstated one, and a draft step from past half the depth costs over half a full-depth step, so that at 85%
    acceptance 4 drafts pay about 1.15x at best; compiled, each exit being its own graphs, later calls draft only
    with the exits earlier calls timed, so that few graphs compile inside them: on 2 CPU cores a round's graph
    compiles in 40-160 s; a probe round is a graph of its own too), the one whose best caps give the largest summed
    expected speedup (expected_speedup over a full-depth step). A round drafts up to its rows' largest cap and each
    row counts its drafts up to its own, in 0 .. cap (compiled, 0, 1, 2 or 4, each number of draft steps of each
    exit being a graph; a round shortened by a row's end drafts the allowed number below): cap 0, a full-depth step,
    wherever no draft is expected to pay `margin` more (estimates from a few tokens are noisy)."""

    def __init__(self, model, cap, batch_size, compiled=False, cuda_graphs=False, timings=None, history=None,
                 probe_every=4, max_probe_gap=32, decay=0.9, window=5, margin=0.05, prior_weight=4.0):
        L = model.n_layer
        if L < 2:
            raise ValueError(f"exit_layer auto needs a model of at least 2 layers to draft with, this one has {L}")
        self.cap, self.decay, self.window, self.margin = cap, decay, window, margin
        self.probe_every, self.max_probe_gap, self.outlier = probe_every, max_probe_gap, 4.0
        self.next_probe, self.probe_gap = 1, probe_every  # the round of the next probe, and the last gap
        # timings not counted: compile, recompile (symbolic positions), record a CUDA graph; eager, a cold first call
        self.warm_up = 3 if cuda_graphs else 2 if compiled else 1
        self.candidates = list(range(1, L))  # exit e at index e - 1 of the counts below, at row e of the costs
        self.timings = {} if timings is None else timings  # ("round", e, s) -> seconds timed (None: warm-up)
        # the exits drafted with: every other one up to half the depth (exit 1 of 2 layers, 2 of 3); compiled (each is
        # its own graphs), in later calls only those earlier calls ran
        e, timed = torch.tensor(self.candidates), [key[1] for key in self.timings if key[1]]
        self.draftable = (e % 2 == 0) & (e <= max(L // 2, 2)) if L > 2 else e == 1
        if compiled and timed:
            self.draftable = torch.isin(e, torch.tensor(timed))
        self.drafted_with = e[self.draftable].tolist()  # the same, as exit layers
        head = head_cost(model)  # a draft step at exit e in full-depth steps, from weights read (plan_cost)
        draft = torch.tensor([0.0] + [plan_cost(torch.arange(L) >= e, head)[0] for e in self.candidates],
                             dtype=torch.float64)
        steps = torch.arange(cap + 1, dtype=torch.float64)
        # the caps a round may draft up to: compiled, each (exit, cap) being a graph (greedy_round), 0, 1, 2 and 4
        # (one of 8 draft steps at exit 12 of 16 took 10 minutes to compile on a CPU)
        self.allowed = [s in (0, 1, 2, 4) or not compiled for s in range(cap + 1)]
        self.allowed_steps = [max(t for t in range(s + 1) if self.allowed[t]) for s in range(cap + 1)]  # the most <= s
        self.prior = steps * draft[:, None] + 1  # [L, cap+1]: a round from exit e of s draft steps, [0, 0] full depth
        # [L][cap+1] (plain numbers, as the counts below): the least kept timing (nan: none), and whether there are
        # enough timings to price by
        self.seconds = [[float("nan")] * (cap + 1) for _ in range(L)]
        self.trusted, self.trust = [[False] * (cap + 1) for _ in range(L)], 3
        for key, kept in self.timings.items():
            self.keep(key, kept)
        self.estimated = self.priced = self.chosen = None  # estimates(), costs() and choose(), until they change
        # [L-1][B] (plain numbers: a round's choice reads a few of them, and tensor ops on a few numbers cost more
        # than the numbers): decayed counts of agreements and of predictions per exit and row, from `prior_weight`
        # predictions at the rate earlier calls counted (history, summed over calls: measured_agreement), if any
        self.history = [[0.0] * (L - 1), [0.0] * (L - 1)] if history is None else history
        self.seen = [[prior_weight if n > 0 else 0.0] * batch_size for n in self.history[1]]
        self.agreed = [[a / max(n, 1.0) * prior_weight if n > 0 else 0.0] * batch_size for a, n in zip(*self.history)]
        self.rounds = 0

    def keep(self, key, kept):
        """Timings kept for key: the least is its cost, changed when it moves by 5% or more (so that timing noise
        does not price every choice again: in a compiled loop on a CPU, pricing again every round took 0.15 ms of a
        2.5 ms round), trusted from `trust` timings on (a full-depth step's from the first).
        Rounds past this call's cap (timed by an earlier call with a larger one) are not used."""
        _, e, s = key
        kept = [t for t in kept if t is not None]
        if not kept or s > self.cap:
            return
        trusted = len(kept) >= (1 if e == 0 else self.trust)
        if not abs(self.seconds[e][s] - min(kept)) < 0.05 * min(kept) or trusted != self.trusted[e][s]:  # nan: False
            self.seconds[e][s], self.trusted[e][s] = min(kept), trusted
            self.estimated = self.priced = self.chosen = None

    def estimates(self):
        """Seconds of every round [L, cap+1], as in `seconds`: each trusted timing; else its prior scaled by the
        median (of an even count, the lower middle) ratio of trusted timing to prior of the rounds with the nearest
        number of draft steps (ties: the larger), or the timing if less: a round's first timings can run cold, and
        one priced too dear by them would never be chosen, so never timed again. In full-depth steps before anything
        is timed."""
        if self.estimated is not None:
            return self.estimated
        seconds, trusted = torch.tensor(self.seconds, dtype=torch.float64), torch.tensor(self.trusted)  # [L, cap+1]
        scale = torch.ones(self.cap + 1, dtype=torch.float64)  # [cap+1] by number of draft steps
        if trusted.any():
            s = torch.arange(self.cap + 1)
            distance = 2 * (s[None, :] - s[:, None]).abs() - (s[None, :] > s[:, None]).long()  # [s, t]: ties, larger t
            nearest = distance.masked_fill(~trusted.any(0), 2 * self.cap + 3).argmin(1)  # [cap+1]: nearest t
            scale = (seconds / self.prior).masked_fill(~trusted, float("nan")).nanmedian(0).values[nearest]
        priced = self.prior * scale
        self.estimated = torch.where(trusted, seconds, torch.fmin(seconds, priced))  # fmin: not nan
        return self.estimated

    def costs(self):
        """A round from exit e with s draft steps [L-1, cap+1] (at [e - 1, s]) in full-depth steps. A round runs
        every layer for at least one position and fewer draft steps never cost more: a timing that says otherwise
        is noise (which is upward), so a round costs at least 1 and at most what any larger s costs."""
        if self.priced is None:
            rounds = self.estimates()
            self.priced = (rounds[1:] / rounds[0, 0]).flip(1).cummin(1).values.flip(1).clamp(min=1.0)
        return self.priced

    def choose(self, rows):
        """rows [B]: the batch rows still decoding -> (exit layer, caps [B] in 0 .. cap, the exits drafted with this
        round reads besides E: none unless it is a probe round). E is 0 when no row drafts: a full-depth step (in a
        probe round only before a full-depth step is timed: its verification from layer 0 keeps every layer's
        output). Until counts or costs change, the same rows get the same choice outside probe rounds."""
        self.rounds += 1
        if self.chosen is None or not torch.equal(self.chosen[0], rows):
            self.chosen = rows, *self.best_exit(rows)
        E, caps = self.chosen[1:]
        if E != 0 and self.probe_gap > self.probe_every:  # drafting again after full-depth steps: the next probe
            # within probe_every rounds, not after the gap grown while nothing paid (up to 32 rounds of drafting at
            # one exit, the others unread: eagerly on textwrap.py, 8 rounds at exit 6 where E=2 d=2 paid 1.74x)
            self.probe_gap, self.next_probe = self.probe_every, min(self.next_probe, self.rounds + self.probe_every)
        probe = self.rounds >= self.next_probe
        if probe:  # a gap doubles when full depth is chosen (not when forced, before a full-depth step is timed)
            chose_full = E == 0 and self.trusted[0][0]
            self.probe_gap = min(2 * self.probe_gap, self.max_probe_gap) if chose_full else self.probe_every
            self.next_probe = self.rounds + self.probe_gap
            if chose_full:  # the probe drafts anyway, at the exit most likely to pay: it measures that exit's
                # acceptance on every position it drafts, where a full-depth step's probe reads one
                E, caps = self.best_exit(rows, explore=True)
        return E, caps, [e for e in self.drafted_with if e != E] if probe else []

    def best_exit(self, rows, explore=False):
        """choose()'s exit layer and caps [B] for rows [B], from the counts and costs now; with explore, the best
        that drafts (each row's best cap of 1 or more). Each exit drafted with scores the sum over rows of each row's
        best expected speedup over a full-depth step (ties: the shallower exit, the smaller cap)."""
        costs, rows = self.costs().tolist(), rows.tolist()  # costs[e - 1][s] in full-depth steps
        steps = [s for s in range(1, self.cap + 1) if self.allowed[s]]  # (a list: indexing a tensor costs more)
        floor = 0.0 if explore else 1.0 + self.margin  # no drafts: a full-depth step, unless drafts pay enough
        best_total, E, best_caps = -1.0, 0, [0] * len(rows)
        for e in self.drafted_with:
            agreed, seen, total, caps = self.agreed[e - 1], self.seen[e - 1], 0.0, []
            for b in rows:
                a = agreed[b] / (seen[b] + 1)  # one disagreement more than counted (an estimate of 1 from a few
                # predictions would price every cap as free)
                speedup, cap = max((expected_speedup(a, s, 0.0, costs[e - 1][s]), -s) for s in steps)
                speedup, cap = (speedup, -cap) if speedup > floor else (floor, 0)
                total += speedup
                caps.append(cap)
            if total > best_total:
                best_total, E, best_caps = total, e, caps
        if not self.trusted[0][0] or not any(best_caps):  # full-depth steps (the first ones, until one is timed)
            return 0, torch.zeros(len(rows), dtype=torch.long)
        return E, torch.tensor(best_caps)

    def full_depth_rounds(self):
        """After a full-depth choice outside a probe round: the rounds it holds for, this one and those until the
        next probe round, at most `probe_every` (full-depth steps read the exits drafted with, so the choice may
        change after them), which are counted as chosen; 1 while no full-depth step is timed (a timing may make
        drafting pay). They are counted before the caller's clamps (a row's end, LongRoPE's switch) shorten the
        stretch, so the next probe may come a few tokens early."""
        rounds = min(self.next_probe - self.rounds, self.probe_every) if self.trusted[0][0] else 1
        self.rounds += rounds - 1
        return rounds

    def count(self, e, rows, agreed, seen, remember=True):
        """At exit e, batch row rows[i] agreed agreed[i] times in seen[i] predictions ([B] each, tensors or lists);
        a row without predictions (a cap of 0 in a round that drafts) keeps its counts. remember: add them to
        `history`, later calls' prior (greedy rounds without a threshold; not the prompt's agreement)."""
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
        """A round of `steps` draft steps at exit e took `seconds` (a full-depth step when steps is 0)."""
        key = ("round", e, steps) if steps else FULL
        kept = self.timings.setdefault(key, [])
        if len(kept) < self.warm_up and all(t is None for t in kept):  # its first calls (compiling, cold)
            kept.append(None)
            return
        if self.trusted[0][0] and seconds > self.outlier * float(self.estimates()[key[1:]]):  # a call that compiled
            return
        kept.append(seconds)
        del kept[:-self.window]
        self.keep(key, kept)
