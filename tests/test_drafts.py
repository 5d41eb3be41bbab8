"""Dynamic drafting and skip-plan drafts for self-speculation: greedy output equals plain greedy decoding
(batch 1 and ragged batches, random and trained weights, every family), and bad values are one line."""
import math
import os
import sys
from dataclasses import replace
from unittest import mock

import pytest
import torch

import sample
from configurator import run_main
from generate import generate, pad_prompts
from model import PRESETS, Transformer
from speculate import generate_speculative
from test_generate import FAMILIES, model_with, ragged_prompts
from tokenizer import load_tokenizer

DRAFTS = [dict(exit_layer=2, draft_threshold=0.3), dict(draft_skip_layers=[1, 3]),
          dict(draft_skip_layers=[0, 4], draft_threshold=0.3), dict(draft_skip_layers="auto"), dict(exit_layer="auto")]


def layers(n):
    torch.manual_seed(0)
    return Transformer(replace(PRESETS["test-tiny"], n_layer=n)).eval()


def assert_drafts_give_greedy(model, idx, lens, n, drafts=DRAFTS, ds=(4,)):
    """Every draft setting in `drafts` decodes idx (ragged, lengths lens) and each row alone as plain greedy."""
    expected = generate(model, idx, n, prompt_lens=lens, temperature=0)
    stats = {}
    for draft in drafts:
        for d in ds:
            out, stats[str(draft), d] = generate_speculative(model, idx, n, num_speculations=d, prompt_lens=lens,
                                                             **draft)
            assert out.tolist() == expected.tolist(), (draft, d)
        b = int(lens.argmin())  # the shortest prompt alone
        alone, _ = generate_speculative(model, idx[b:b + 1, :int(lens[b])], n, num_speculations=d, **draft)
        assert alone[0].tolist() == expected[b, :int(lens[b]) + n].tolist(), draft
    return stats


@pytest.mark.parametrize("kw", FAMILIES[:3])  # Llama, ALiBi (Bloom-style), sliding window (Phi-3-style)
def test_dynamic_and_skip_plan_drafts_give_greedy_decoding(kw):
    model = model_with(**kw)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # confident drafts some of the time, so the threshold stops some rows only
    idx, lens = pad_prompts(ragged_prompts(seed=3))
    stats = assert_drafts_give_greedy(model, idx, lens, 20)
    thresholded = stats[str(DRAFTS[0]), 4]
    _, plain = generate_speculative(model, idx, 20, 2, 4, prompt_lens=lens)  # the same draft, no threshold
    assert 0 < thresholded["drafted"] < 0.75 * plain["drafted"], (thresholded, plain)  # unsure drafts were stopped


def test_drafts_on_a_layerskip_trained_model(layerskip_trained, stdlib_path):
    """Trained weights: drafts mostly accepted, so long accepted runs meet the threshold, the plans and auto."""
    model = Transformer.from_pretrained(layerskip_trained).eval()
    tok = load_tokenizer(layerskip_trained, model.cfg.bos_id, model.cfg.eos_id)
    texts = [open(os.path.join(stdlib_path, f), encoding="utf-8").read()[:300] for f in ("argparse.py", "heapq.py")]
    idx, lens = pad_prompts([[tok.bos_id()] + tok.encode(t)[:n] for t, n in zip(texts, (20, 9))])
    drafts = [dict(exit_layer=3, draft_threshold=0.5), dict(draft_skip_layers=[2]), dict(draft_skip_layers="auto"),
              dict(exit_layer="auto", draft_threshold=0.3)]
    stats = assert_drafts_give_greedy(model, idx, lens, 40, drafts, ds=(3, 6))
    assert stats[str(drafts[0]), 6]["acceptance_rate"] > 0.5, stats  # E=3 d=6 accepts 0.8 without a threshold


@torch.no_grad()
def test_auto_plan_skips_the_layers_that_change_nothing():
    """Layers 2 and 4 made identities (output projections zeroed): skipping them agrees with the full model on
    every prompt token, so the auto plan skips both (and greedy output is still plain greedy)."""
    from drafts import choose_draft_plan
    model = model_with()
    for l in (2, 4):
        model.layers[l].attn.wo.weight.zero_()
        model.layers[l].mlp.w_down.weight.zero_()
    idx, lens = pad_prompts(ragged_prompts(seed=5))
    plan = choose_draft_plan(model, idx, lens, 4)
    assert plan[2] and plan[4] and not plan.all(), plan
    out, stats = generate_speculative(model, idx, 12, num_speculations=4, prompt_lens=lens, draft_skip_layers="auto")
    assert out.tolist() == generate(model, idx, 12, prompt_lens=lens, temperature=0).tolist()
    assert {2, 4} <= set(stats["draft_skip_layers"])


def test_exit_layer_auto_follows_the_measured_acceptance():
    """Layers from 2 on nearly identities (output projections x0.05) and layer 1 strong (x4): exit 2 agrees with
    the last layer and exit 1 does not, so the exit measured online settles on 2 (probe rounds measure the other
    candidates)."""
    model = layers(8)
    with torch.no_grad():
        for block, scale in zip(model.layers[1:], [4.0] + [0.05] * 6):
            block.attn.wo.weight.mul_(scale)
            block.mlp.w_down.weight.mul_(scale)
    idx, lens = pad_prompts(ragged_prompts(seed=3))
    out, stats = generate_speculative(model, idx, 40, "auto", 6, prompt_lens=lens)
    assert out.tolist() == generate(model, idx, 40, prompt_lens=lens, temperature=0).tolist()
    assert max(stats["exit_layers"], key=stats["exit_layers"].get) == 2, stats
    assert stats["acceptance_rate"] > 0.7, stats


def test_exit_chooser_caps_each_row_by_its_own_acceptance():
    """Row 0's drafts at every exit agree, row 1's never do: row 0 drafts up to the cap, row 1 not at all (cap 0, a
    full-depth step: a draft that is never accepted cannot pay), whatever exit they share; a row that left the
    batch is not read."""
    from drafts import ExitChooser
    chooser = ExitChooser(layers(8), 6, batch_size=3)
    for _ in range(2):  # a full-depth step: 1 s (the first, cold, not counted)
        chooser.time(0, 0, 1.0)
    rows = torch.tensor([0, 2])
    for _ in range(20):
        for e in chooser.candidates:
            chooser.count(e, rows, torch.tensor([6, 0]), torch.tensor([6, 6]))
    E, caps, _ = chooser.choose(rows)
    assert caps.tolist() == [6, 0] and E in chooser.candidates, (E, caps)
    assert chooser.seen[E - 1][1] == 0.0  # row 1 was never counted
    chooser = ExitChooser(layers(8), 6, batch_size=3, compiled=True)  # compiled: caps 0, 1, 2, 4 (one graph each)
    for _ in range(3):  # 2 compiling, then 1 s
        chooser.time(0, 0, 1.0)
    for _ in range(20):
        for e in chooser.candidates:
            chooser.count(e, rows, torch.tensor([6, 0]), torch.tensor([6, 6]))
    assert chooser.choose(rows)[1].tolist() == [4, 0]


def test_exit_chooser_prices_exits_by_their_timed_rounds():
    """Every exit agrees 9 times in 10. Compiled, the exits drafted with are every other one (2, 4, 6 of 8), and
    the first 3 timings of each round (compiling, recompiling, recording a CUDA graph) are not counted, nor later
    ones over 4 times their estimate (a new shape compiling). Until a full-depth step is timed, rounds are full-depth
    steps; then the shallowest exit drafted with, the cheapest in weights read, drafts; a round timed fewer than 3
    times is priced by its weights read, scaled by the rounds timed 3 times of the nearest number of draft steps.
    Once a round is timed as dear as 3 full-depth steps, drafting does not pay at any exit: cap 0 again."""
    from drafts import ExitChooser
    chooser = ExitChooser(layers(8), 4, batch_size=1, compiled=True, cuda_graphs=True)
    rows = torch.tensor([0])
    for e in chooser.candidates:
        chooser.count(e, rows, torch.tensor([36]), torch.tensor([40]))
    for seconds in (100.0, 100.0, 100.0, 1.0):  # compiling, then a full-depth step: 1 s
        E, caps, _ = chooser.choose(rows)
        assert E == 0 and caps.tolist() == [0], (E, caps)
        chooser.time(0, 0, seconds)
    assert torch.equal(chooser.costs(), chooser.prior[1:])  # weights read, scaled by the full-depth step
    E, caps, _ = chooser.choose(rows)
    assert E == 2 and caps.tolist() == [4], (E, caps)
    for seconds in (100.0, 100.0, 100.0, 1.2, 1.3, 1.2):  # compiling exit 2's graphs, then rounds of 2 draft steps
        chooser.time(2, 2, seconds)
    c = chooser.costs()  # [e - 1, s]
    assert c[1, 2] == pytest.approx(1.2) and c[1, 3] == pytest.approx(1.2 * chooser.prior[2, 3] / chooser.prior[2, 2])
    assert c[4, 2] == pytest.approx(1.2 * chooser.prior[5, 2] / chooser.prior[2, 2])
    E, caps, _ = chooser.choose(rows)
    assert E == 2 and caps.tolist() == [4], (E, caps)
    chooser.time(2, 2, 20.0)  # over 4 times its estimate: a call that compiled, not counted
    assert chooser.costs()[1, 2] == pytest.approx(1.2)
    for seconds in [2.0] * chooser.window + [3.0] * chooser.window:  # dearer, then 3 full-depth steps
        chooser.time(2, 2, seconds)
    E, caps, _ = chooser.choose(rows)
    assert caps.tolist() == [0] and E == 0, (E, caps)


def test_exit_chooser_prices_rounds_by_their_draft_steps():
    """On a CPU a verification costs more the more positions it verifies (small-M products), so a round's cost is
    timed for each number of draft steps. Timed at 1.7 s for 2 steps and 4.8 s for 8 (a full-depth step 1 s), an
    untimed count priced from the nearest timed one (ties: the larger), drafts are capped where they pay best (3 at
    exit 2, the exit drafted with of 4 layers), not at the cap of 8, as pricing every round by one ratio to its
    weights read would have them. A single slow timing (a cold call) does not price a round dearer than its weights
    read scaled; a later call with a smaller cap ignores the larger counts timed."""
    from drafts import ExitChooser
    chooser, rows = ExitChooser(layers(4), 8, batch_size=1), torch.tensor([0])
    for e in chooser.candidates:
        chooser.count(e, rows, torch.tensor([90]), torch.tensor([99]))  # acceptance 0.9: 90 of 99 + 1
    for _ in range(2):  # eager too, the first timing of each round (cold) is not counted
        chooser.time(0, 0, 1.0)
    for _ in range(4):
        chooser.time(2, 2, 1.7)
        chooser.time(2, 8, 4.8)
    c = chooser.costs()  # c[e - 1, s]: a round from exit e of s draft steps
    ratio = chooser.prior[:, 4] / chooser.prior[2, 2] * 1.7  # 4 is nearer 2 than 8
    assert c[1, 2] == 1.7 and c[1, 8] == 4.8 and torch.allclose(c[:, 4], ratio[1:]), c
    E, caps, _ = chooser.choose(rows)
    assert E == 2 and caps.tolist() == [3], (E, caps)
    for _ in range(2):  # one slow round of 1 draft step counted (a cold call): priced as 2 steps' ratio says
        chooser.time(2, 1, 3.0)
    assert chooser.costs()[1, 1] == pytest.approx(1.7 * chooser.prior[2, 1] / chooser.prior[2, 2])
    assert chooser.choose(rows)[1].tolist() == [3]
    small = ExitChooser(layers(4), 2, batch_size=1, timings=chooser.timings)  # a later call with a smaller cap
    assert small.costs().shape == (3, 3)


def test_exit_chooser_probes_the_exits_drafted_with_and_repeats_unchanged_choices(monkeypatch):
    """Probe rounds (the first and every 4th) read each of the other exits drafted with (every other one up to half
    the depth: 2, 4 and 6 of 12), far ones too: an estimate left from the prompt would never be corrected otherwise.
    Rounds that count nothing (full-depth rounds) repeat the last choice without pricing again; a count prices
    again."""
    from drafts import ExitChooser
    chooser, rows = ExitChooser(layers(12), 4, batch_size=1), torch.tensor([0])
    for _ in range(2):
        chooser.time(0, 0, 1.0)
    for e in chooser.candidates:
        chooser.count(e, rows, torch.tensor([9 if e == 4 else 1]), torch.tensor([10]))
    choices = [chooser.choose(rows) for _ in range(5)]
    assert [(E, caps.tolist()) for E, caps, _ in choices] == [(4, [3])] * 5, choices
    assert choices[0][2] == choices[4][2] == [2, 6] and choices[1][2] == [], choices
    priced = []
    monkeypatch.setattr(ExitChooser, "best_exit", lambda self, rows: priced.append(1) or (0, torch.tensor([0])))
    chooser.choose(rows)
    chooser.count(1, rows, torch.tensor([1]), torch.tensor([1]))
    chooser.choose(rows)
    assert len(priced) == 1


def test_exit_chooser_probes_less_often_while_nothing_pays():
    """While full-depth steps are chosen, each probe doubles the gap to the next (8, 16, then at most 32 rounds): a
    probe costs about a full-depth step, so probing every 4th round of a hard context cost a quarter of a step a
    token. A probe drafts anyway, at the exit most likely to pay (before, it was a full-depth step reading each exit
    at one position, and a context whose first tokens disagreed stayed at full depth where exit 4 paid 1.4x). Once
    an exit drafts again, within 4 rounds and every 4th (not after the gap grown while nothing paid, which left the
    other exits unread for up to 32 rounds of drafting at one)."""
    from drafts import ExitChooser
    chooser, rows = ExitChooser(layers(8), 4, batch_size=1), torch.tensor([0])
    for _ in range(2):
        chooser.time(0, 0, 1.0)
    for e in chooser.candidates:
        chooser.count(e, rows, torch.tensor([1]), torch.tensor([10]))
    choices = [chooser.choose(rows) for _ in range(1, 80)]
    probed = [r for r, (_, _, probes) in zip(range(1, 80), choices) if probes]
    assert probed == [1, 9, 25, 57], probed
    assert all((E != 0) == (r in probed) and (E == 0 or caps.tolist() == [1])
               for r, (E, caps, _) in zip(range(1, 80), choices)), choices
    chooser.count(2, rows, torch.tensor([100]), torch.tensor([100]))  # exit 2 agrees: it drafts
    choices = [chooser.choose(rows) for _ in range(80, 100)]
    assert {E for E, _, _ in choices} == {2}, choices
    assert [r for r, (_, _, probes) in zip(range(80, 100), choices) if probes] == [84, 88, 92, 96], choices


def test_exit_chooser_times_again_a_round_first_timed_cold():
    """A round's first timings after its graphs' warm-up can still run cold (compiled, on the Intel CPU: 3.7 ms for
    a round of 1 draft step that runs in about 2.2 ms warm). Priced by such a timing, and every other round scaled
    by it, exit 2 would never draft again, so never be timed again. Until timed 3 times a round costs at most its
    weights read scaled by trusted timings: exit 2 drafts again."""
    from drafts import ExitChooser
    chooser, rows = ExitChooser(layers(8), 4, batch_size=1), torch.tensor([0])
    chooser.time(0, 0, 1.75)  # a process's first full-depth step, cold (eager too): not counted
    assert chooser.choose(rows)[0] == 0 and math.isnan(chooser.seconds[0][0])
    chooser.time(0, 0, 1.0)
    for e in chooser.candidates:
        chooser.count(e, rows, torch.tensor([9 if e == 2 else 1]), torch.tensor([10]))
    for _ in range(2):
        chooser.time(2, 1, 3.0)  # cold: weights read say 1.28 full-depth steps
    E, caps, _ = chooser.choose(rows)
    assert E == 2 and int(caps[0]) > 0, (E, caps)  # before: no drafting (E 0)


def test_exit_chooser_starts_from_earlier_calls_timings_and_acceptance():
    """What a step costs does not depend on the prompt: a later call's chooser starts from the timings of earlier
    calls with the same model, device, batch size and compile mode, so it drafts from its first round (no
    full-depth rounds until one is timed). Its acceptance starts from the rates earlier calls counted on generated
    tokens, at the weight of 4 predictions (before: from the agreement on the prompt's last 8 tokens alone, which on
    a prompt of prose before code chose an exit that did not pay); what a first call counted on the prompt is left
    out. Compiled, it drafts only with the exits they timed, whose graphs have compiled (a new exit's graphs would
    compile inside the call), and a first call with every other exit up to half the depth."""
    from drafts import ExitChooser, measured_agreement, measured_timings
    model, cpu, rows = layers(8), torch.device("cpu"), torch.tensor([0])
    timings, history = measured_timings(model, cpu, 1, True), measured_agreement(model)
    assert measured_timings(model, cpu, 1, True) is timings and measured_agreement(model) is history
    assert measured_timings(model, cpu, 2, True) is not timings
    assert measured_timings(model, cpu, 1, False) is not timings
    assert measured_agreement(layers(8)) is not history
    first = ExitChooser(model, 4, batch_size=1, compiled=True, timings=timings, history=history)
    assert (first.draftable.nonzero()[:, 0] + 1).tolist() == [2, 4]
    for seconds in (100.0, 100.0, 1.0):  # compiling, then a full-depth step: 1 s
        first.time(0, 0, seconds)
    for seconds in (100.0, 100.0, 1.4):  # compiling exit 4's graphs, then a round of 2 draft steps: 1.4 s
        first.time(4, 2, seconds)
    first.count(2, rows, torch.tensor([40]), torch.tensor([40]), remember=False)  # the prompt: exit 2 agrees
    first.count(2, rows, torch.tensor([4]), torch.tensor([40]))  # generated tokens: exit 2 rarely does, 4 mostly
    first.count(4, rows, torch.tensor([36]), torch.tensor([40]))
    second = ExitChooser(model, 4, batch_size=1, compiled=True, timings=timings, history=history)
    assert (second.draftable.nonzero()[:, 0] + 1).tolist() == [4]
    assert [second.seen[e - 1][0] for e in (2, 4)] == [4.0, 4.0]
    assert [second.agreed[e - 1][0] for e in (2, 4)] == pytest.approx([0.4, 3.6])
    E, caps, _ = second.choose(rows)
    assert E == 4 and caps.tolist() == [2], (E, caps)


def test_exit_layer_auto_reads_the_prompts_exits_in_a_first_call_only(monkeypatch):
    """A first call's chooser starts from how often each exit agrees with the full model on the prompt; later calls
    start from what earlier ones counted on generated tokens, and skip reading the prompt's exits. Greedy output
    stays plain greedy."""
    import speculate as generate_module
    reads, real = [], generate_module.prefill_reading_exits
    monkeypatch.setattr(generate_module, "prefill_reading_exits", lambda *a: reads.append(1) or real(*a))
    model = layers(8)
    idx, lens = pad_prompts(ragged_prompts(seed=3))
    expected = generate(model, idx, 20, prompt_lens=lens, temperature=0)
    for _ in range(2):
        out, _ = generate_speculative(model, idx, 20, "auto", 4, prompt_lens=lens)
        assert out.tolist() == expected.tolist()
    assert reads == [1]


def test_exit_memory_is_an_object_the_caller_owns(monkeypatch):
    """What exit auto measures in a call (agreement per exit, round timings) goes to the ExitMemory the caller
    passes, not to the model's default one; a call with the same memory starts from it (no reading of the
    prompt's exits), a call with a fresh one starts afresh. A memory of another depth is one line."""
    import speculate
    from drafts import ExitMemory, default_memory
    reads, real = [], speculate.prefill_reading_exits
    monkeypatch.setattr(speculate, "prefill_reading_exits", lambda *a: reads.append(1) or real(*a))
    model = layers(8)
    idx, lens = pad_prompts(ragged_prompts(seed=3))
    expected = generate(model, idx, 20, prompt_lens=lens, temperature=0)
    memory = ExitMemory(model.n_layer)
    for own in (memory, memory, ExitMemory(model.n_layer)):
        out, _ = generate_speculative(model, idx, 20, "auto", 4, prompt_lens=lens, exit_memory=own)
        assert out.tolist() == expected.tolist()
    assert reads == [1, 1] and any(memory.agreement[1]) and memory.timings_for(torch.device("cpu"), 4, False)
    assert not any(default_memory(model).agreement[1]) and not default_memory(model).timings
    with pytest.raises(ValueError, match="exit_memory"):
        generate_speculative(model, idx, 20, "auto", 4, prompt_lens=lens, exit_memory=ExitMemory(4))


def test_probes_count_other_exits_at_the_rounds_first_position():
    """A round settles its later positions only where E's drafts were accepted, so probed exits count at its first
    position only: counting every settled position counted them mostly where E found the tokens easy."""
    from drafts import count_agreement
    calls = []

    class Chooser:
        def count(self, e, rows, agreed, seen, remember):
            calls.append((e, agreed.tolist(), seen.tolist()))
    settled = torch.tensor([[5, 6, 7, 8], [5, 9, 9, 9]])  # row 0: 3 drafts accepted, then the verifier's token
    n_acc, counts = torch.tensor([3, 0]), torch.tensor([3, 3])
    count_agreement(Chooser(), torch.tensor([0, 1]), 2, counts, counts, n_acc, settled, [(4, torch.tensor([5, 7]))])
    assert calls == [(2, [3, 0], [3, 1]), (4, [1, 0], [1, 1])], calls


@torch.no_grad()
def test_probed_predictions_read_each_exit_at_the_rounds_first_position():
    """Exits shallower than the draft's f are read from the first draft step's layer outputs, deeper ones from the
    verification's at its first position: the output of layer e - 1 through the head. A round that drafted nothing
    has no shallower exits to read."""
    from speculate import probed_predictions
    model, g = layers(8), torch.Generator().manual_seed(0)
    first_kept = torch.randn(4, 2, 1, model.cfg.n_embd, generator=g)  # f = 4: layers 0-3 of the first draft step
    kept = torch.randn(4, 2, 3, model.cfg.n_embd, generator=g)  # layers 4-7 of a verification of 3 positions
    read = dict(probed_predictions(model, [2, 6], 4, first_kept, kept, None))
    assert torch.equal(read[2], model.head(first_kept[1])[:, 0].argmax(-1))
    assert torch.equal(read[6], model.head(kept[1, :, :1])[:, 0].argmax(-1))
    assert probed_predictions(model, [2], 4, None, kept, None) == []


@torch.no_grad()
def test_a_greedy_probe_round_is_one_call_reading_the_other_exits():
    """A greedy probe round of exit auto is one greedy_round call (compiled, one graph; before, a call per draft step
    and one for the verification): it settles what the round settles without reading, and reads the head of each
    other exit at the round's first position, shallower than the draft's exit from the first draft step, deeper from
    the verification, or all from it in a full-depth step: the exit's own prediction there (model(exit_layer=e)),
    exact up to float32 ties."""
    from generate import decode_cache, prefill
    from speculate import greedy_round
    model = layers(8)
    idx = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    T, lens = idx.shape[1], torch.tensor([6, 6])
    expected = {e: model(idx, exit_layer=e)[:, -1].argmax(-1).tolist() for e in (2, 4, 6)}

    def round_at(shared, steps, exits):
        cache = decode_cache(model, idx, T + steps + 1, compile=False)
        prefill(model, idx[:, :-1], lens - 1, 8, cache)
        return greedy_round(model, idx[:, -1:], T - 1, shared, (), 8, cache, steps, None, exits)

    for shared, steps, exits in ((4, 2, (2, 6)), (0, 0, (2, 4, 6))):
        verified, n_acc, probed = round_at(shared, steps, exits)
        alone = round_at(shared, steps, ())
        assert torch.equal(verified, alone[0]) and torch.equal(n_acc, alone[1]) and alone[2] == []
        assert {e: p.tolist() for e, p in probed} == {e: expected[e] for e in exits}


def test_exit_chooser_keeps_the_counts_of_a_row_without_predictions():
    """A row with a cap of 0 in a round that drafts (a batch) has no prediction at E: its counts stay as they were
    (decayed with nothing added, its estimate of agreements / (predictions + 1) sank towards 0, so that it could not
    draft at E again). Only greedy rounds without a threshold enter later calls' prior."""
    from drafts import ExitChooser
    chooser, rows = ExitChooser(layers(8), 4, batch_size=2), torch.tensor([0, 1])
    chooser.count(2, rows, torch.tensor([9, 9]), torch.tensor([10, 10]))
    for _ in range(20):
        chooser.count(2, rows, torch.tensor([5, 0]), torch.tensor([5, 0]))
    assert chooser.agreed[1][1] == 9 and chooser.seen[1][1] == 10, chooser.seen
    assert [chooser.history[0][1], chooser.history[1][1]] == [118, 120]
    chooser.count(2, rows, torch.tensor([0, 0]), torch.tensor([3, 3]), remember=False)  # sampled, or thresholded
    assert [chooser.history[0][1], chooser.history[1][1]] == [118, 120] and chooser.seen[1][1] == 12  # 0.9 x 10 + 3


def test_exit_layer_auto_learns_from_full_depth_rounds_and_stopped_drafts():
    """Layer 1 of 2 made an identity, so exit 1 predicts the full model's tokens, but drafts are unsure. A one-token
    prompt says nothing of exit 1 and the first rounds are full-depth steps; their probes read it, so auto starts
    drafting. With a threshold that stops every draft, each stopped draft counts against exit 1, so auto goes
    back to full-depth steps (until a probe finds exit 1 agreeing again) instead of paying a draft step every
    round. Greedy output stays plain greedy."""
    model = layers(2)
    with torch.no_grad():
        model.layers[1].attn.wo.weight.zero_()
        model.layers[1].mlp.w_down.weight.zero_()
    idx = torch.randint(1, 256, (1, 1), generator=torch.Generator().manual_seed(0))
    expected = generate(model, idx, 40, temperature=0, stop_at_eos=False)
    out, stats = generate_speculative(model, idx, 40, "auto", 4, stop_at_eos=False)
    assert out.tolist() == expected.tolist() and stats["accepted"] > 0, stats  # was 0: never drafted
    out, stats = generate_speculative(model, idx, 40, "auto", 4, draft_threshold=0.99, stop_at_eos=False)
    assert out.tolist() == expected.tolist() and stats["draft_steps"] < 0.75 * stats["rounds"], stats  # was 39 of 40


def test_threshold_stops_rows_below_the_rounds_longest_cap():
    """Under exit auto rows have their own caps (here 1 and 3): a threshold no draft reaches (0.99 on a random
    model) stops every row at its first draft, the row with the smaller cap too, so nothing is drafted (before,
    only rows drafting the round's longest count were stopped: row 0 drafted, and was verified, every round)."""
    from drafts import ExitChooser
    model = layers(4)
    idx = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    with mock.patch.object(ExitChooser, "choose", lambda self, rows: (2, torch.tensor([1, 3])[:len(rows)], [])):
        out, stats = generate_speculative(model, idx, 12, "auto", 3, draft_threshold=0.99, stop_at_eos=False)
    assert out.tolist() == generate(model, idx, 12, temperature=0, stop_at_eos=False).tolist()
    assert stats["drafted"] == 0 and stats["draft_steps"] == stats["rounds"], stats


def test_exit_layer_auto_drafting_rounds_are_one_call_with_each_rows_cap(monkeypatch):
    """Greedy exit auto rounds are one call (greedy_round), the round drafting the longest cap (here 3) and each row
    counting drafts up to its own (here 1 and 3) but settling every draft verified (free: the round drafted them):
    output plain greedy, the rows ragged (before, such rounds were a call per draft step and one for the
    verification; probe rounds, here every third, reading exits 1 and 3, were until f816bff), and what a probe round
    reads of each exit, a prediction a row, is counted."""
    import speculate as generate_module
    from drafts import ExitChooser
    calls, real, probes, counted = [], generate_module.greedy_round, [], []
    monkeypatch.setattr(generate_module, "greedy_round", lambda *a: calls.append(a[7]) or probes.append(a[9]) or
                        real(*a))
    import drafts
    count_agreement = drafts.count_agreement
    monkeypatch.setattr(drafts, "count_agreement", lambda *a, **k: counted.append(
        [(e, tuple(p.shape)) for e, p in a[7]]) or count_agreement(*a, **k))
    model = layers(4)
    with torch.no_grad():  # layers 2 and 3 nearly identities: exit 2 agrees, so drafts run past a cap of 1
        for block in model.layers[2:]:
            block.attn.wo.weight.mul_(0.05)
            block.mlp.w_down.weight.mul_(0.05)
    idx, lens = pad_prompts(ragged_prompts((5, 3), seed=1))
    caps, rounds = torch.tensor([1, 3]), iter(range(100))
    with mock.patch.object(ExitChooser, "choose",
                           lambda self, rows: (2, caps[rows], [1, 3] if next(rounds) % 3 == 0 else [])):
        out, stats = generate_speculative(model, idx, 24, "auto", 3, prompt_lens=lens, stop_at_eos=False)
    assert out.tolist() == generate(model, idx, 24, prompt_lens=lens, temperature=0, stop_at_eos=False).tolist()
    assert len(calls) == stats["rounds"] and set(calls) <= {1, 2, 3}, (calls, stats)
    assert probes[::3] == [(1, 3)] * len(probes[::3]) and set(probes) - {(1, 3)} == {()}, probes
    assert [c for c, p in zip(counted, probes) if p] == [[(1, (2,)), (3, (2,))]] * len(probes[::3]), counted
    assert 0.5 < stats["acceptance_rate"] <= 1 and max(stats["row_acceptance_rate"]) <= 1, stats
    assert stats["rounds"] < 12, stats  # row 0 settles more than its cap's 2 tokens a round


def test_exit_layer_auto_takes_full_depth_steps_where_no_exit_agrees(monkeypatch):
    """The last layer made dominant (output projections x8): no earlier exit predicts the full model's token, so
    exit auto stops drafting and most rounds are full-depth steps; the output is still plain greedy. A full-depth
    step outside a probe round is one call, as a plain decode step (6a47cb0: a verification keeping every layer's
    output), that reads the head at the exits drafted with on the way, and each of its tokens counts for them: in
    full-depth steps, every exit's agreement is measured at the price of its head (before, stretches of full-depth
    steps counted nothing and the chooser learnt only from probe rounds, whose gap doubled up to 32 rounds)."""
    import speculate as generate_module
    from drafts import measured_agreement
    calls, real = [], generate_module.full_step_reading_exits  # (exits read, batch rows) of each call
    monkeypatch.setattr(generate_module, "full_step_reading_exits",
                        lambda *a: calls.append((a[5], len(a[1]))) or real(*a))
    model = layers(8)
    with torch.no_grad():
        model.layers[-1].attn.wo.weight.mul_(8)
        model.layers[-1].mlp.w_down.weight.mul_(8)
    idx, lens = pad_prompts(ragged_prompts(seed=3))
    out, stats = generate_speculative(model, idx, 40, "auto", 4, prompt_lens=lens)
    assert out.tolist() == generate(model, idx, 40, prompt_lens=lens, temperature=0).tolist()
    assert stats["exit_layers"].get(0, 0) > stats["rounds"] / 2, stats
    assert stats["exit_layers"][0] / 2 < len(calls) <= stats["exit_layers"][0], (calls, stats)  # not probes
    assert {exits for exits, _ in calls} == {(2, 4)}  # the exits drafted with: every other one up to half the depth
    agreements, predictions = measured_agreement(model)
    row_tokens = sum(rows for _, rows in calls)  # each counts for exits 2 and 4 (besides the rounds that drafted)
    assert predictions[1] >= row_tokens and predictions[3] >= row_tokens and row_tokens > len(calls), predictions
    assert agreements[1] < 0.2 * predictions[1], agreements


def test_exit_layer_auto_with_a_threshold_counts_nothing_of_full_depth_steps_for_later_calls():
    """With a threshold, full-depth steps do not count the exits they could read (agreement there overstates what
    the drafts a threshold stops would give), and nothing of the call enters later calls' prior (9828b11 counted
    its full-depth tokens into it). The output is still plain greedy."""
    from drafts import measured_agreement
    model = layers(8)
    with torch.no_grad():
        model.layers[-1].attn.wo.weight.mul_(8)
        model.layers[-1].mlp.w_down.weight.mul_(8)
    idx, lens = pad_prompts(ragged_prompts(seed=3))
    out, stats = generate_speculative(model, idx, 40, "auto", 4, prompt_lens=lens, draft_threshold=0.5)
    assert out.tolist() == generate(model, idx, 40, prompt_lens=lens, temperature=0).tolist()
    assert stats["exit_layers"].get(0, 0) > stats["rounds"] / 2, stats
    assert not any(measured_agreement(model)[1]), measured_agreement(model)


@torch.no_grad()
def test_full_step_reading_exits_reads_each_exits_head():
    """A full-depth decode step that reads exits 2 and 5 on the way: the full model's argmax and each exit's, as the
    model's own forward at those exit layers predicts the next token; the cache written as a plain step's."""
    from generate import decode_cache, prefill
    from speculate import full_step_reading_exits
    model = layers(8)
    idx = torch.randint(256, (2, 6), generator=torch.Generator().manual_seed(1))
    cache = decode_cache(model, idx, 8, compile=False)
    prefill(model, idx[:, :-1], torch.tensor([5, 5]), 8, cache)
    token, read = full_step_reading_exits(model, idx[:, -1:], 5, 8, cache, (2, 5))
    assert torch.equal(token[:, 0], model(idx)[:, -1].argmax(-1))
    for e, preds in zip((2, 5), read):
        assert torch.equal(preds, model(idx, exit_layer=e)[:, -1].argmax(-1)), e
    token, _ = full_step_reading_exits(model, token, 6, 8, cache, (2, 5))  # the next step reads the cache written
    assert torch.equal(token[:, 0], model(torch.cat([idx, model(idx)[:, -1:].argmax(-1)], 1))[:, -1].argmax(-1))


def test_exit_layer_auto_full_depth_stretches(monkeypatch):
    """Where no exit agrees, a full-depth choice outside a probe round holds for up to 4 rounds (until the next
    probe), so those rounds run as one stretch of full-depth steps with the host's work once (before, the chooser
    and the bookkeeping ran once a token): fewer choices than rounds, and an eos inside a stretch ends its row there,
    as plain greedy."""
    from drafts import ExitChooser
    choices, real = [], ExitChooser.choose
    monkeypatch.setattr(ExitChooser, "choose", lambda self, rows: choices.append(1) or real(self, rows))
    model = layers(8)
    with torch.no_grad():
        model.layers[-1].attn.wo.weight.mul_(8)
        model.layers[-1].mlp.w_down.weight.mul_(8)
    idx, lens = pad_prompts(ragged_prompts(seed=3))
    free = generate(model, idx, 30, prompt_lens=lens, temperature=0, stop_at_eos=False)
    model.cfg.eos_id = int(free[1, int(lens[1]) + 10])  # row 1 generates it, mid-stretch or not
    expected = generate(model, idx, 30, prompt_lens=lens, temperature=0)
    assert expected.tolist() != free.tolist()
    out, stats = generate_speculative(model, idx, 30, "auto", 4, prompt_lens=lens)
    assert out.tolist() == expected.tolist()
    assert stats["exit_layers"].get(0, 0) > stats["rounds"] / 2 and len(choices) < 0.6 * stats["rounds"], stats


@pytest.mark.parametrize("draft, words", [
    (dict(exit_layer=2, draft_threshold=1.0), ["draft_threshold", "[0, 1)"]),
    (dict(exit_layer=2, draft_threshold=-0.1), ["draft_threshold", "[0, 1)"]),
    (dict(draft_skip_layers=[]), ["draft_skip_layers", "at least one"]),
    (dict(draft_skip_layers=list(range(6))), ["draft_skip_layers", "keep at least one"]),
    (dict(draft_skip_layers=[6]), ["draft_skip_layers", "[0, 5]"]),
    (dict(exit_layer=2, draft_skip_layers=[3]), ["exit_layer", "draft_skip_layers"]),
    (dict(), ["exit_layer", "draft_skip_layers"]),
    (dict(exit_layer="auto", draft_skip_layers=[3]), ["exit_layer", "draft_skip_layers"]),
])
def test_bad_draft_values(draft, words):
    with pytest.raises(ValueError) as e:
        generate_speculative(model_with(), torch.zeros(1, 3, dtype=torch.long), 5, num_speculations=2, **draft)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_exit_layer_auto_needs_two_layers():
    with pytest.raises(ValueError, match="exit_layer auto needs a model of at least 2 layers"):
        generate_speculative(layers(1), torch.zeros(1, 3, dtype=torch.long), 5, "auto", 2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 6-layer random model with a word-level tokenizer.json (w0 .. w255): a checkpoint sample.py reads."""
    tokenizers = pytest.importorskip("tokenizers")
    out = tmp_path_factory.mktemp("tiny")
    model_with().save_pretrained(str(out))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    return str(out)


@pytest.mark.parametrize("args, words", [
    (["--exit_layer=2", "--draft_threshold=1.5"], ["draft_threshold", "[0, 1)"]),
    (["--draft_skip_layers=0,1,2,3,4,5"], ["draft_skip_layers", "keep at least one"]),
    (["--draft_skip_layers=x"], ["draft_skip_layers", "integers"]),
    (["--draft_skip_layers=1,2", "--exit_layer=2"], ["exit_layer", "draft_skip_layers"]),
    ([], ["exit_layer", "draft_skip_layers"]),
    (["--exit_layer=auto", "--speculative=False"], ["exit_layer", "auto", "--speculative"]),
    (["--exit_layer=deep"], ["exit_layer", "integer"]),
])
def test_sample_bad_draft_flags(args, words, tiny_dir):
    argv = ["sample.py", f"--out_dir={tiny_dir}", "--speculative", "--max_new_tokens=4", "--device=cpu", *args]
    with mock.patch.object(sys, "argv", argv), pytest.raises(SystemExit) as e:
        run_main(sample.main)
    line = str(e.value.code)
    assert "\n" not in line and all(w in line for w in words), line


def test_sample_draft_flags(tiny_dir, capsys):
    for args in (["--exit_layer=2", "--draft_threshold=0.5"], ["--draft_skip_layers=1,3"], ["--draft_skip_layers=auto"],
                 ["--exit_layer=auto"]):
        argv = ["sample.py", f"--out_dir={tiny_dir}", "--speculative", "--max_new_tokens=4", "--device=cpu",
                "--prompt=w5 w7", *args]
        with mock.patch.object(sys, "argv", argv):
            run_main(sample.main)
        printed = capsys.readouterr().out
        assert "self-speculative: draft" in printed and "w5 w7" in printed, printed
