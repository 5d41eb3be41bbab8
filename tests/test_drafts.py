"""Dynamic drafting and skip-plan drafts for self-speculation: greedy output equals plain greedy decoding
(batch 1 and ragged batches, random and trained weights, every family), and bad values are one line."""
import os
import sys
from dataclasses import replace
from unittest import mock

import pytest
import torch

import sample
from configurator import run_main
from generate import generate, generate_speculative, pad_prompts
from model import PRESETS, Transformer
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
    chooser.time(1, 0, 1, 0.0, 1.0)  # a full-depth step: 1 s
    rows = torch.tensor([0, 2])
    for _ in range(20):
        for e in chooser.candidates:
            chooser.count(e, rows, torch.tensor([6, 0]), torch.tensor([6, 6]))
    E, caps, _ = chooser.choose(rows)
    assert caps.tolist() == [6, 0] and E in chooser.candidates, (E, caps)
    assert chooser.seen[E - 1, 1] == 1.0  # row 1 was never counted


def test_exit_chooser_prices_exits_by_their_timed_costs():
    """Every exit agrees 9 times in 10. Compiled, the exits drafted with are every other one (2, 4, 6 of 8), and a
    graph's first 3 timings (compiling, recompiling, recording a CUDA graph) are not counted, nor later ones over 4
    times their estimate (a new graph compiling). Until a full-depth step is timed, rounds are full-depth
    steps; then the shallowest exit drafted with, the cheapest in weights read, drafts; an untimed exit's draft step
    is priced by its weights read, scaled by the timed draft steps. Once a draft step is timed as dear as a
    full-depth step, drafting does not pay at any exit: cap 0 again."""
    from drafts import ExitChooser
    chooser = ExitChooser(layers(8), 4, batch_size=1, compiled=True, cuda_graphs=True)
    rows = torch.tensor([0])
    for e in chooser.candidates:
        chooser.count(e, rows, torch.tensor([36]), torch.tensor([40]))
    for seconds in (100.0, 100.0, 100.0, 1.0):  # compiling, then a full-depth step: 1 s
        E, caps, _ = chooser.choose(rows)
        assert E == 0 and caps.tolist() == [0], (E, caps)
        chooser.time(0, 0, 1, 0.0, seconds)
    c, v = chooser.costs()
    assert c[1] == chooser.draft_prior[1] and bool((v == 1.0).all())  # priors, scaled by the full-depth step
    E, caps, _ = chooser.choose(rows)
    assert E == 2 and caps.tolist() == [4], (E, caps)
    chooser.time(2, 2, 3, 200.0, 100.0)  # compiling the graphs of exit 2
    chooser.time(2, 2, 3, 0.2, 1.0)  # a draft step at exit 2 took 0.1 s, its verification 1 s
    c, v = chooser.costs()
    assert c[1] == pytest.approx(0.1)
    assert c[4] == pytest.approx(0.1 * chooser.draft_prior[4] / chooser.draft_prior[1])
    E, caps, _ = chooser.choose(rows)
    assert E == 2 and caps.tolist() == [4], (E, caps)
    chooser.time(2, 2, 3, 20.0, 1.0)  # 10 s: over 4 times its estimate, a call that compiled, not counted
    assert chooser.costs()[0][1] == pytest.approx(0.1)
    for seconds in [0.35] * chooser.window + [1.0] * chooser.window:  # dearer, then as long as a verification
        chooser.time(2, 2, 3, 2 * seconds, 1.0)
    E, caps, _ = chooser.choose(rows)
    assert caps.tolist() == [0] and E == 0, (E, caps)


def test_exit_chooser_prices_verifications_by_their_positions():
    """On a CPU a verification costs more the more positions it verifies (small-M products). Timed at 1.5 s for 3
    positions and 4 s for 9 (a full-depth step 1 s), an untimed count priced as the nearest timed one (ties: the
    larger), drafts are capped where they pay best (4), not at the cap of 8, as one verification cost for every
    count of positions would have them. A single slow timing of fewer positions is noise (it cannot cost more than
    more positions) and does not stop drafting; a later call with a smaller cap ignores the larger counts timed."""
    from drafts import ExitChooser
    chooser, rows = ExitChooser(layers(4), 8, batch_size=1), torch.tensor([0])
    for e in chooser.candidates:
        chooser.count(e, rows, torch.tensor([90]), torch.tensor([100]))
    chooser.time(0, 0, 1, 0.0, 1.0)
    chooser.time(2, 2, 3, 0.2, 1.5)
    chooser.time(2, 8, 9, 0.8, 4.0)
    c, v = chooser.costs()  # v[e - 1, d]: a verification of d + 1 positions from exit e
    assert v[1, 2] == 1.5 and v[1, 8] == 4.0 and v[1, 4] == 1.5 and v[1, 5] == 4.0 and v[0, 3] == 1.5, v
    E, caps, _ = chooser.choose(rows)
    assert caps.tolist() == [4], (E, caps)
    chooser.time(2, 1, 2, 0.1, 5.0)  # one slow verification of 2 positions: noise, since 3 cost 1.5
    assert chooser.costs()[1][1, 1] == 1.5 and chooser.choose(rows)[1].tolist() == [4]
    small = ExitChooser(layers(4), 2, batch_size=1, timings=chooser.timings)  # a later call with a smaller cap
    assert small.costs()[1].shape == (3, 3)


def test_exit_chooser_starts_from_earlier_calls_timings():
    """What a step costs does not depend on the prompt: a later call's chooser starts from the timings of earlier
    calls with the same model, device, batch size and compile mode, so it drafts from its first round (no
    full-depth rounds until one is timed), and compiled it drafts only with the exits they timed, whose graphs have
    compiled, rather than every other exit (a new exit's graphs would compile inside the call)."""
    from drafts import ExitChooser, measured_timings
    model, cpu, rows = layers(8), torch.device("cpu"), torch.tensor([0])
    timings = measured_timings(model, cpu, 1, True)
    assert measured_timings(model, cpu, 1, True) is timings
    assert measured_timings(model, cpu, 2, True) is not timings
    assert measured_timings(model, cpu, 1, False) is not timings
    first = ExitChooser(model, 4, batch_size=1, compiled=True, timings=timings)
    assert (first.draftable.nonzero()[:, 0] + 1).tolist() == [2, 4, 6]
    for seconds in (100.0, 100.0, 1.0):  # compiling, then a full-depth step: 1 s
        first.time(0, 0, 1, 0.0, seconds)
    first.time(6, 2, 3, 0.4, 1.0)  # exit 6's draft step 0.2 s
    second = ExitChooser(model, 4, batch_size=1, compiled=True, timings=timings)
    assert (second.draftable.nonzero()[:, 0] + 1).tolist() == [6]
    for e in second.candidates:
        second.count(e, rows, torch.tensor([36]), torch.tensor([40]))
    E, caps, _ = second.choose(rows)
    assert E == 6 and caps.tolist() == [4], (E, caps)


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


def test_exit_layer_auto_takes_full_depth_steps_where_no_exit_agrees(monkeypatch):
    """The last layer made dominant (output projections x8): no earlier exit predicts the full model's token, so
    exit auto stops drafting and most rounds are full-depth steps; the output is still plain greedy. A full-depth
    round that reads no other exit is one call, as a plain decode step (greedy_round with no drafts; 6a47cb0: a
    verification keeping every layer's output)."""
    import generate as generate_module
    calls, real = [], generate_module.greedy_round
    monkeypatch.setattr(generate_module, "greedy_round", lambda *a: calls.append(a[7]) or real(*a))
    model = layers(8)
    with torch.no_grad():
        model.layers[-1].attn.wo.weight.mul_(8)
        model.layers[-1].mlp.w_down.weight.mul_(8)
    idx, lens = pad_prompts(ragged_prompts(seed=3))
    out, stats = generate_speculative(model, idx, 40, "auto", 4, prompt_lens=lens)
    assert out.tolist() == generate(model, idx, 40, prompt_lens=lens, temperature=0).tolist()
    assert stats["exit_layers"].get(0, 0) > stats["rounds"] / 2, stats
    assert stats["exit_layers"][0] / 2 < len(calls) == calls.count(0) < stats["exit_layers"][0], (calls, stats)


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
