"""Decoding: batched generation (ragged prompts) equals each row alone, skip plans, and self-speculative
decoding: greedy output equals full-depth greedy (batch 1 and batch > 1); sampling keeps the model's distribution."""
import os
from dataclasses import replace

import pytest
import torch

import drafts
import generate as generate_module
import speculate
from generate import generate, pad_prompts, probs_from_logits
from speculate import generate_speculative
from model import PRESETS, Transformer
from tokenizer import load_tokenizer


def model_with(**kw):
    torch.manual_seed(0)
    return Transformer(replace(PRESETS["test-tiny"], n_layer=6, **kw)).eval()


FAMILIES = [dict(), dict(pos_emb="alibi", norm="layernorm", bias=True, mlp="gelu_tanh"),
            dict(sliding_window=5), dict(pos_emb="learned", pos_offset=2, norm="layernorm", mlp="relu")]


def ragged_prompts(lengths=(1, 7, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kw", FAMILIES)
def test_batched_generation_equals_each_row_alone(kw):
    """Ragged prompts decoded together, each row at its own position, give every row what it gets alone,
    at full depth, at an exit and under a skip plan; rows end in eos padding."""
    model = model_with(**kw)
    prompts = ragged_prompts()
    idx, lens = pad_prompts(prompts)
    for extra in (dict(), dict(exit_layer=3), dict(skip_mask=torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.bool))):
        out = generate(model, idx, 12, prompt_lens=lens, temperature=0, **extra)
        assert out.shape == (4, 7 + 12)
        for b, p in enumerate(prompts):
            alone = generate(model, torch.tensor([p]), 12, temperature=0, **extra)
            assert out[b, :len(p) + 12].tolist() == alone[0].tolist(), (kw, extra, b)
            assert (out[b, len(p) + 12:] == model.cfg.eos_id).all()


@pytest.mark.parametrize("kw", FAMILIES)
def test_batched_greedy_speculation_equals_greedy_decoding(kw):
    """Rows accept different numbers of drafts and finish at different rounds; output is still plain greedy."""
    model = model_with(**kw)
    idx, lens = pad_prompts(ragged_prompts(seed=3))
    expected = generate(model, idx, 20, prompt_lens=lens, temperature=0)
    for E in (1, 3, 5):
        for d in (1, 2, 4):
            out, stats = generate_speculative(model, idx, 20, E, d, prompt_lens=lens)
            assert out.tolist() == expected.tolist(), (kw, E, d)
            assert len(stats["row_acceptance_rate"]) == 4


@torch.no_grad()
def greedy_by_full_forward(model, idx, n, plan):
    """Greedy decoding without a cache: every step is one forward over the whole sequence, the prompt's tokens
    through every layer and the generated ones skipping the plan's layers (a per-token mask [B, T, L])."""
    T = idx.shape[1]
    for _ in range(n):
        mask = torch.zeros(*idx.shape, model.n_layer, dtype=torch.bool)
        mask[:, T:] = plan
        idx = torch.cat([idx, model(idx, skip_mask=mask)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_skip_plan_in_the_config_is_honoured():
    model = model_with()
    idx = torch.randint(256, (2, 5), generator=torch.Generator().manual_seed(2))
    plan = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)
    planned = generate(model, idx, 10, temperature=0, skip_mask=plan)
    assert planned.tolist() == greedy_by_full_forward(model, idx, 10, plan).tolist()
    assert planned.tolist() != generate(model, idx, 10, temperature=0).tolist()
    model.cfg.skip_layers = [1, 2, 4]
    assert generate(model, idx, 10, temperature=0).tolist() == planned.tolist()
    # rows with plans of their own decode as each row alone
    plans = torch.stack([plan, torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)])
    out = generate(model, idx, 10, temperature=0, skip_mask=plans)
    for b in range(2):
        assert out[b].tolist() == generate(model, idx[b:b + 1], 10, temperature=0, skip_mask=plans[b])[0].tolist()


@pytest.mark.parametrize("packed", [False, True])
def test_compiled_decode_steps_give_the_eager_tokens(packed):
    """compile=True: decode steps (and speculation's drafts and verification) through torch.compile'd graphs;
    packed: every projection weight through its oneDNN-packed copy (fused.decode_layout.pack), which the graphs
    call."""
    from fused.decode_layout import PackedLinear, pack
    model = model_with()
    idx = torch.randint(256, (2, 5), generator=torch.Generator().manual_seed(4))
    expected = generate(model, idx, 12, temperature=0)
    if packed:
        pack(model, min_numel=0)
    assert isinstance(model.lm_head, PackedLinear) == packed
    assert generate(model, idx, 12, temperature=0, compile=True).tolist() == expected.tolist()
    if packed:  # the graphs of the rest are what packed=False tests
        out, _ = generate_speculative(model, idx[:1], 12, 2, 3, compile=True)
        assert out.tolist() == expected[:1].tolist()
        return
    for E, d in ((2, 3), (4, 1)):
        out, _ = generate_speculative(model, idx[:1], 12, E, d, compile=True)
        assert out.tolist() == expected[:1].tolist()
    plan = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)  # a skip plan: the layer runs are graph constants
    assert (generate(model, idx, 12, temperature=0, skip_mask=plan, compile=True).tolist()
            == generate(model, idx, 12, temperature=0, skip_mask=plan).tolist())
    with pytest.raises(ValueError, match="compile needs"):
        generate(model, idx, 4, prompt_lens=[5, 3], temperature=0, compile=True)
    with pytest.raises(ValueError, match="compile needs"):
        generate(model, idx, 4, temperature=0, skip_mask=torch.stack([plan, ~plan]), compile=True)


def test_compiled_speculation_compiles_a_graph_for_every_exit_and_draft_length(monkeypatch):
    """Every exit layer and draft length is a graph of its own (greedy_round: a greedy round as one call): more
    than dynamo's default limit of 8 a function, past which the rest ran eagerly (d481b79; sample.py --compile
    --exit_layer auto drafts with many). Each variant now compiles from its own copy of the function's code
    (generate.compiled), so no code object nears the limit; all of them compile. Counted per function with a
    graph-counting backend in place of Inductor; the eager tokens throughout."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    monkeypatch.setattr(generate_module, "_compiled", {})
    counters, real_compile = {}, torch.compile
    def count_graphs(fn, **kw):
        counters.setdefault(fn.__name__, []).append(CompileCounter())
        return real_compile(fn, backend=counters[fn.__name__][-1])
    monkeypatch.setattr(torch, "compile", count_graphs)
    model = model_with()
    idx = torch.randint(256, (1, 5), generator=torch.Generator().manual_seed(4))
    expected = generate(model, idx, 8, temperature=0)
    try:
        with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default; torch's own patch restores it
            for E in range(1, 6):
                for d in (1, 2):
                    assert generate_speculative(model, idx, 8, E, d, compile=True)[0].tolist() == expected.tolist()
        assert sum(c.frame_count for c in counters["greedy_round"]) > 8  # past the default limit (d481b79: 8, then
        # eager)
    finally:
        torch._dynamo.reset()  # the counting backend's graphs would count towards later compiles' limit


def scaled_sum(x, pos, k):
    for _ in range(k):
        x = x * pos + 1
    return x


def test_compiled_variants_keep_their_graphs_apart_and_learn_together(monkeypatch):
    """Each variant of a compiled function (a round's draft layers and draft steps) compiles from its own copy of
    the code, which dynamo keeps the graphs on: a call looks among its own variant's graphs only (where two graphs
    of one code object alternate, failing the other's guards first cost about 0.3 ms a call). The copies share
    name, file and line, so the second variant's positions are symbolic from its first call (one graph, not two)."""
    from torch._dynamo.testing import CompileCounter
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as graphs_of
    torch._dynamo.reset()
    monkeypatch.setattr(generate_module, "_compiled", {})
    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter))
    cpu, x = torch.device("cpu"), torch.ones(3)
    one, two = (generate_module.compiled(scaled_sum, cpu, (k,)) for k in (1, 2))
    assert generate_module.compiled(scaled_sum, cpu, (1,)) is one
    try:
        for pos in range(3):
            assert torch.equal(one(x, pos, 1), scaled_sum(x, pos, 1))
        assert counter.frame_count == 2  # a static position, then a symbolic one
        for pos in range(3):
            assert torch.equal(two(x, pos, 2), scaled_sum(x, pos, 2))
        assert counter.frame_count == 3
        codes = [f._torchdynamo_orig_callable.__code__ for f in (one, two)]
        assert [len(graphs_of(code)) for code in codes] == [2, 1] and not graphs_of(scaled_sum.__code__)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("kw", FAMILIES)
def test_cuda_graph_decode_steps_are_one_graph_with_the_eager_tokens(kw, monkeypatch):
    """The CUDA path (a cache attended over in full, positions as device tensors) run here on the CPU through
    torch.compile with a graph-counting backend: the eager tokens, and one graph for every decode step (no
    graph break, no recompile: what recording one CUDA graph needs; verification, one per number of drafts).
    Speculation (batched, rows leaving) on the Llama family only, to keep the suite short."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    monkeypatch.setattr(generate_module, "CUDA_GRAPH_DEVICES", ("cpu",))
    monkeypatch.setattr(generate_module, "_compiled", {})
    counters, real_compile = {}, torch.compile
    def count_graphs(fn, **kw):  # every variant's graphs (generate.compiled) counted together
        counters[fn.__name__] = counters.get(fn.__name__) or CompileCounter()
        return real_compile(fn, backend=counters[fn.__name__])
    monkeypatch.setattr(torch, "compile", count_graphs)
    model = model_with(**kw)
    idx = torch.randint(256, (2, 5), generator=torch.Generator().manual_seed(4))
    expected = generate(model, idx, 12, temperature=0)
    assert generate(model, idx, 12, temperature=0, compile=True).tolist() == expected.tolist()
    out, _ = generate_speculative(model, idx[:1], 12, 3, 2, compile=True)
    assert out.tolist() == expected[:1].tolist()
    # greedy rounds: one graph per number of drafts a round verifies (1 .. d; the last round may draft fewer), each
    # a variant of its own (generate.compiled), none recompiled
    variants = [key for key in generate_module._compiled if key[0] is speculate.greedy_round]
    assert counters["next_logits"].frame_count == 1 and counters["greedy_round"].frame_count == len(variants) <= 2
    if not kw:
        ragged, lens = pad_prompts(ragged_prompts(seed=3))  # rows at their own positions, leaving as they finish
        out, _ = generate_speculative(model, ragged, 16, 2, 3, prompt_lens=lens, compile=True)
        assert out.tolist() == generate(model, ragged, 16, prompt_lens=lens, temperature=0).tolist()
    # the next call of this batch size decodes in the same cache (the same addresses for the CUDA graph)
    assert generate_module.decode_cache(model, idx, 17, True) is generate_module.decode_cache(model, idx, 17, True)
    assert generate(model, idx, 12, temperature=0, compile=True).tolist() == expected.tolist()
    assert counters["next_logits"].frame_count == 1
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_record_every_compiled_decode_step():
    """On CUDA the compiled steps are CUDA graphs; with cudagraph_or_error a step that cannot be recorded (a CPU
    tensor, a mutated input that is not static, a dynamic shape) raises instead of quietly running without one."""
    torch._dynamo.reset()
    with torch._inductor.config.patch({"triton.cudagraph_or_error": True}):
        model = model_with().cuda()
        idx = torch.randint(256, (2, 5), generator=torch.Generator().manual_seed(4)).cuda()
        expected = generate(model, idx, 12, temperature=0)
        for _ in range(2):  # the second call replays the recordings over the kept cache
            assert generate(model, idx, 12, temperature=0, compile=True).tolist() == expected.tolist()
        out, _ = generate_speculative(model, idx[:1], 12, 3, 2, compile=True)
        assert out.tolist() == expected[:1].tolist()
        ragged, lens = pad_prompts(ragged_prompts(seed=3))
        out, _ = generate_speculative(model, ragged.cuda(), 16, 2, 3, prompt_lens=lens, compile=True)
        assert out.tolist() == generate(model, ragged.cuda(), 16, prompt_lens=lens, temperature=0).tolist()
    torch._dynamo.reset()


@pytest.mark.parametrize("prompt_len", [1, 7])
def test_greedy_speculation_equals_greedy_decoding(prompt_len):
    model = model_with()
    idx = torch.randint(256, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    expected = generate(model, idx, 30, temperature=0)
    for E in (1, 2, 3, 5):
        for d in (1, 2, 3, 6):
            out, stats = generate_speculative(model, idx, 30, E, d, temperature=0)
            assert out.tolist() == expected.tolist(), (E, d)
            assert 0 <= stats["accepted"] <= stats["drafted"]


def test_a_greedy_round_is_one_call(monkeypatch):
    """A greedy round with a static draft (an exit or a skip plan) is one call, greedy_round (compiled, one graph),
    not d draft steps and a verification called one by one (6a47cb0): the host pays one call a round. Ragged batch,
    greedy output; the calls' draft steps are the rounds' (steps: greedy_round's 8th argument)."""
    calls, real = [], speculate.greedy_round
    monkeypatch.setattr(speculate, "greedy_round", lambda *a: calls.append(a[7]) or real(*a))
    model = model_with()
    idx, lens = pad_prompts(ragged_prompts(seed=3))
    expected = generate(model, idx, 12, prompt_lens=lens, temperature=0)
    for draft in (dict(exit_layer=2), dict(draft_skip_layers=[1, 3])):
        calls.clear()
        out, stats = generate_speculative(model, idx, 12, num_speculations=3, prompt_lens=lens, **draft)
        assert out.tolist() == expected.tolist(), draft
        assert len(calls) == stats["rounds"] and sum(calls) == stats["draft_steps"] > 0, (calls, stats)
        assert stats["draft_seconds"] == stats["verify_seconds"] == 0 < stats["round_seconds"], stats  # none apart


def test_greedy_speculation_on_a_layerskip_trained_model(layerskip_trained, stdlib_path):
    """On a trained model drafts are mostly accepted (long accepted runs, bonus tokens), unlike on random weights;
    output is still plain greedy, batched (ragged stdlib prompts) and for a row alone."""
    model = Transformer.from_pretrained(layerskip_trained).eval()
    tok = load_tokenizer(layerskip_trained, model.cfg.bos_id, model.cfg.eos_id)
    texts = [open(os.path.join(stdlib_path, f), encoding="utf-8").read()[:300] for f in ("argparse.py", "heapq.py")]
    idx, lens = pad_prompts([[tok.bos_id()] + tok.encode(t)[:n] for t, n in zip(texts, (20, 9))])
    expected = generate(model, idx, 40, prompt_lens=lens, temperature=0)
    for E in (1, 2, 3):
        for d in (1, 3, 6):
            out, stats = generate_speculative(model, idx, 40, E, d, prompt_lens=lens)
            assert out.tolist() == expected.tolist(), (E, d)
            n = int(lens[1])  # the shorter prompt, alone
            alone, _ = generate_speculative(model, idx[1:, :n], 40, E, d)
            assert alone[0].tolist() == expected[1, :n + 40].tolist(), (E, d)
    assert stats["acceptance_rate"] > 0.5, stats  # measured 0.8 at E=3, d=6: the accepting path is exercised


def test_greedy_speculation_with_alibi_and_sliding_window():
    for kw in (dict(pos_emb="alibi", norm="layernorm", bias=True, mlp="gelu_tanh"), dict(sliding_window=5)):
        model = model_with(**kw)
        idx = torch.randint(256, (1, 4), generator=torch.Generator().manual_seed(1))
        expected = generate(model, idx, 24, temperature=0)
        for E, d in ((2, 3), (4, 5)):
            assert generate_speculative(model, idx, 24, E, d)[0].tolist() == expected.tolist()


@pytest.mark.parametrize("batched, draft", [(False, dict(exit_layer=1)), (True, dict(exit_layer=1)),
                                           (True, dict(exit_layer=1, draft_threshold=0.38)),
                                           (True, dict(draft_skip_layers=[1, 3]))])
def test_speculative_sampling_matches_the_model_distribution(batched, draft):
    """Chi-square test on the joint distribution of the first two sampled tokens (V=4: 16 cells),
    from N calls with one prompt, or one call with N rows; drafts by an early exit, stopped by a confidence
    threshold, or by a skip plan."""
    torch.manual_seed(0)
    model = Transformer(replace(PRESETS["test-tiny"], vocab_size=4, n_layer=4)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5)  # sharpen the distributions so the draft and the verifier differ
    idx = torch.tensor([[1]])
    # exact joint distribution P(t1) P(t2 | t1) of the full model at temperature 1
    p1 = probs_from_logits(model(idx)[:, -1])[0]
    exact = torch.zeros(4, 4, dtype=torch.float64)
    for a in range(4):
        p2 = probs_from_logits(model(torch.tensor([[1, a]]))[:, -1])[0]
        exact[a] = (p1[a] * p2).double()
    plan = drafts.draft_plan(model, draft.get("exit_layer"), draft.get("draft_skip_layers"))
    draft_p1 = probs_from_logits(model(idx, skip_mask=plan)[:, -1])[0]
    assert (draft_p1 - p1).abs().max() > 0.1  # the draft really is a different distribution
    g = torch.Generator().manual_seed(123)
    N = 3000
    counts = torch.zeros(4, 4, dtype=torch.float64)
    runs = [idx.expand(N, 1)] if batched else [idx] * N
    drafted = 0
    for prompts in runs:
        out, stats = generate_speculative(model, prompts, 2, num_speculations=2, temperature=1.0, generator=g,
                                          stop_at_eos=False, **draft)  # eos (id 2) is one of the 4 tokens
        drafted += stats["drafted"]
        for row in out.tolist():
            counts[row[1], row[2]] += 1
    if "draft_threshold" in draft:  # the second draft is unsure after some first tokens only: some rows stop
        assert N < drafted < 2 * N, drafted
    expected = N * exact
    keep = expected > 5
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    # chi-square 0.999 quantiles; degrees of freedom = kept cells - 1
    critical = {15: 37.70, 14: 36.12, 13: 34.53, 12: 32.91, 11: 31.26, 10: 29.59, 9: 27.88, 8: 26.12, 7: 24.32,
                6: 22.46, 5: 20.52, 4: 18.47, 3: 16.27}
    df = int(keep.sum()) - 1
    assert df >= 3 and chi2 < critical[df], (chi2, df, counts, expected)


def test_speculation_errors():
    model = model_with()
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="exit_layer"):
        generate_speculative(model, idx, 5, 6, 2)      # E = L: nothing to verify
    with pytest.raises(ValueError, match="exit_layer"):
        generate_speculative(model, idx, 5, 0, 2)
    with pytest.raises(ValueError, match="num_speculations"):
        generate_speculative(model, idx, 5, 2, 0)
    with pytest.raises(ValueError, match="prompt_lens"):
        generate_speculative(model, torch.zeros(2, 3, dtype=torch.long), 5, 2, 2, prompt_lens=[3, 4])
    with pytest.raises(ValueError, match="context"):
        generate_speculative(model, idx, 100, 2, 2)


@torch.no_grad()
def test_every_end_id_ends_a_row_as_in_transformers(tmp_path):
    """cfg.end_ids = [X] beside eos 2, X the third token greedy decoding emits: transformers' generate with
    eos_token_id=[2, X] stops after 3 tokens, and so do generate and generate_speculative, batch 1 and a ragged
    batch beside a row that does not stop, finished rows padded with eos. Layers after the first write nothing to
    the residual stream, so every draft of exit 1 is accepted: X comes inside a round's accepted drafts, and the
    rest of that round is dropped."""
    pytest.importorskip("transformers")
    from checkpoints_convert import from_hf
    from test_convert import make_hf, prompt
    hf = make_hf("llama_gqa", tmp_path / "hf")
    for n, p in hf.named_parameters():
        if any(f"layers.{i}." in n for i in (1, 2)) and any(k in n for k in ("o_proj", "down_proj")):
            p.zero_()
    hf.save_pretrained(tmp_path / "hf")
    from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    ours = Transformer.from_pretrained(tmp_path / "ours")

    def hf_generate(p, eos):  # one prompt [T], its new tokens padded with eos 2 to 12
        new = hf.generate(p[None], max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=2)
        return new[0, len(p):].tolist() + [2] * (len(p) + 12 - new.shape[1])

    for seed in range(20):  # row 0's first 3 new tokens differ; row 1 (shorter) never makes X or 2
        idx = prompt(T=8, B=2, seed=seed)
        rows = [idx[0], idx[1, :5]]
        free = [hf_generate(p, None) for p in rows]
        X = free[0][2]
        if len(set(free[0][:3]) | {2}) == 4 and X not in free[1] and 2 not in free[1]:
            break
    else:
        raise AssertionError("no prompt whose greedy continuation suits the test")
    theirs = [hf_generate(p, [2, X]) for p in rows]
    assert theirs[0] == free[0][:3] + [2] * 9 and theirs[1] == free[1]  # transformers: 3 tokens, then eos
    assert generate(ours, rows[0][None], 12, temperature=0)[0, 8:].tolist() == free[0]  # no end id: 12 tokens
    ours.cfg.end_ids = [X]
    assert generate(ours, rows[0][None], 12, temperature=0)[0, 8:].tolist() == theirs[0]
    out, stats = generate_speculative(ours, rows[0][None], 12, 1, 4)
    assert out[0, 8:].tolist() == theirs[0] and stats["accepted"] == stats["drafted"] == 4, stats
    ragged, lens = pad_prompts([p.tolist() for p in rows])
    for out in (generate(ours, ragged, 12, prompt_lens=lens, temperature=0),
                generate_speculative(ours, ragged, 12, 1, 4, prompt_lens=lens)[0]):
        assert [out[b, n:n + 12].tolist() for b, n in enumerate(lens.tolist())] == theirs
        assert out[1, 5 + 12:].eq(2).all()  # the shorter row's padding


def test_a_decode_call_enters_no_file_twice_along_a_chain_of_calls():
    """A decode call flows generate/speculate -> model (and drafts for a round's plan): along every chain of calls
    among the repository's files, no file is entered again below another one (speculate calling back into a
    function that calls speculate, say). Plain, speculative with a fixed exit, an auto skip plan, exit auto, and
    sampled with a threshold; traced with sys.setprofile."""
    import sys
    from conftest import ROOT
    model = model_with()
    idx, lens = pad_prompts(ragged_prompts(seed=3))
    reentered = set()

    def profile(frame, event, arg):
        if event != "call":
            return
        files = []
        while frame is not None:
            path = os.path.relpath(frame.f_code.co_filename, ROOT)  # the repository's files, tests aside
            ours = frame.f_code.co_filename.startswith(ROOT + os.sep) and not path.startswith("tests")
            if ours and (not files or files[-1] != path):
                files.append(path)
            frame = frame.f_back
        if len(set(files)) < len(files):
            reentered.add(" -> ".join(reversed(files)))

    sys.setprofile(profile)
    try:
        generate(model, idx, 6, prompt_lens=lens, temperature=0)
        for draft in (dict(exit_layer=2), dict(draft_skip_layers="auto"), dict(exit_layer="auto"),
                      dict(exit_layer=2, draft_threshold=0.3, temperature=1.0)):
            generate_speculative(model, idx, 6, num_speculations=2, prompt_lens=lens, **draft)
    finally:
        sys.setprofile(None)
    assert not reentered, reentered
