"""LayerSkip schedules against the paper's equations and worked examples (docs/equations.md section 1)."""
import json
import math
import os

import pytest
import torch

from layerskip import (depth_scale, dropout_rates, enabled_exits, exit_scales, exit_weights,
                       layer_dropout_mask, time_scale)


def test_dropout_rates_follow_the_paper():
    L = 8
    p = dropout_rates(L, step=0, total_steps=100, p_max=0.2)
    expected = [0.2 * (2 ** (l / 7) - 1) for l in range(L)]
    assert torch.allclose(p, torch.tensor(expected, dtype=torch.float64))
    assert p[0] == 0 and abs(p[-1] - 0.2) < 1e-12  # 0 at layer 0, p_max at the last layer
    assert torch.allclose(depth_scale(5, "linear"), torch.tensor([0, .25, .5, .75, 1], dtype=torch.float64))
    assert time_scale(0, 11, "exp") == 0 and time_scale(10, 11, "exp") == 1
    assert abs(time_scale(5, 11, "exp") - (2 ** 0.5 - 1)) < 1e-12
    assert torch.allclose(dropout_rates(L, 5, 11, 0.2, curriculum="exp"), (2 ** 0.5 - 1) * p)


def test_empirical_drop_rate_matches_p_within_binomial_tolerance():
    L, B, steps = 6, 16, 400
    rates = dropout_rates(L, 0, 1, p_max=0.5, scale="linear")
    drops = sum(layer_dropout_mask(rates, B, seed=1000 + s).double().sum(0) for s in range(steps))
    n = B * steps
    for l in range(L):
        p = rates[l].item()
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(drops[l].item() - n * p) <= 4 * sigma + 1e-9, (l, drops[l].item() / n, p)
    assert drops[0] == 0


def test_decisions_are_a_function_of_the_seed():
    rates = dropout_rates(8, 0, 1, 0.5)
    assert torch.equal(layer_dropout_mask(rates, 4, 7), layer_dropout_mask(rates, 4, 7))
    assert not torch.equal(layer_dropout_mask(rates, 64, 7), layer_dropout_mask(rates, 64, 8))


def test_exit_weights_paper_example():
    e = exit_scales(32, 0.2)
    assert e[0] == 0 and e[31] == 31 + 0.2 * sum(range(31))
    all_on = exit_weights(32, 0, 100, 0.2, curriculum="none")
    assert abs(all_on[32] - 0.111) < 5e-4 and abs(sum(all_on.values()) - 1) < 1e-12
    rotational = exit_weights(32, 0, 100, 0.2, curriculum="rotational", period=8)
    # layers {0, 8, 16, 24, 31} -> exit layers {1, 9, 17, 25, 32}; layer 0 has weight 0 and is left out
    assert sorted(rotational) == [9, 17, 25, 32]
    got = [round(rotational[e], 3) for e in (9, 17, 25, 32)]
    assert got == [0.033, 0.125, 0.275, 0.568]


def test_rotational_curriculum_rotates_by_one_layer_per_step():
    L, R = 10, 4
    assert enabled_exits(L, 0, 100, "rotational", R) == [0, 4, 8, 9]
    assert enabled_exits(L, 1, 100, "rotational", R) == [1, 5, 9]
    assert enabled_exits(L, 6, 100, "rotational", R) == [2, 6, 9]
    for l in range(L - 1):  # every layer is on exactly once in any R consecutive steps
        assert sum(l in enabled_exits(L, s, 100, "rotational", R) for s in range(7, 7 + R)) == 1


def test_gradual_curriculum_adds_one_layer_every_T_over_2L_steps():
    L, T = 5, 100  # one more exit every 10 steps, all on by step 50
    assert enabled_exits(L, 0, T, "gradual") == [4]
    assert enabled_exits(L, 9, T, "gradual") == [4]
    assert enabled_exits(L, 10, T, "gradual") == [3, 4]
    assert enabled_exits(L, 39, T, "gradual") == [1, 2, 3, 4]
    assert enabled_exits(L, 40, T, "gradual") == [0, 1, 2, 3, 4]
    assert enabled_exits(L, 99, T, "gradual") == [0, 1, 2, 3, 4]
    assert enabled_exits(L, 3, T, "off") == [4] and enabled_exits(L, 3, T, "none") == list(range(L))
    with pytest.raises(ValueError, match="early_exit_curriculum"):
        enabled_exits(L, 0, T, "sometimes")


def test_instruction_data_masks_the_prompt(stdlib_data, tmp_path):
    from tokenizer import load_tokenizer
    from data.instruct import IGNORE, encode_records, epoch_indices, format_prompt, load_records, make_batch
    records = [{"instruction": "Add one.", "input": "", "output": "x + 1"},
               {"instruction": "Negate.", "input": "x = 3", "output": "-x"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    assert load_records(str(path)) == records
    assert "### Input:\nx = 3" in format_prompt(records[1])
    tok = load_tokenizer(os.path.join(stdlib_data, "tokenizer.model"), 1, 2)
    examples = encode_records(tok, records, block_size=256)
    assert len(examples) == 2
    x, y = make_batch(examples, [0, 1], 256)
    for row, (ids, n_prompt) in enumerate(examples):
        target = y[row][y[row] != IGNORE].tolist()
        assert target == ids[n_prompt:]                       # response + eos, nothing of the prompt
        assert tok.decode(target[:-1]) == records[row]["output"] and target[-1] == tok.eos_id()
        assert x[row, :len(ids) - 1].tolist() == ids[:-1]
    first_epoch = epoch_indices(5, 0, 5, seed=1)
    assert sorted(first_epoch) == list(range(5)) and epoch_indices(5, 0, 5, seed=1) == first_epoch
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(ValueError, match="record 0"):
        load_records(str(tmp_path / "bad.jsonl"))


def test_stdlib_instruction_records():
    from data.instruct import function_records
    src = 'def f(a, b=2):\n    """Add things."""\n    c = a + b\n    return c\n\ndef g():\n    pass\n'
    (r,) = function_records(src)
    assert r["instruction"].endswith('def f(a, b=2):\n    """Add things."""')
    assert r["output"] == "c = a + b\nreturn c\n" and r["input"] == ""
