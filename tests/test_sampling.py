"""Generation as users expect it: sampling arguments checked alike in generate() and sample.py (transformers'
rules), stop strings (plain and speculative decoding stop at the same token), streaming one prompt, padded
vocabularies, max_new_tokens=0, and instruction prompts in the template the checkpoint was fine-tuned with.
Eos stopping against transformers' generate is in test_convert.py."""
import json
import os
import sys
import sysconfig
from dataclasses import replace

import pytest
import torch

import sample
from configurator import run_main
from data.instruct import encode_records
from data.prepare import train_tokenizer
from generate import check_sampling, generate, probs_from_logits
from model import PRESETS, Transformer
from speculate import generate_speculative
from conftest import checkpoint_tokenizer

N_TOKENS, VOCAB = 400, 448  # a tokenizer smaller than the model's (padded) vocabulary


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """test-tiny with a 448-row vocabulary (random weights) and a 400-token byte-fallback sentencepiece tokenizer."""
    stdlib = sysconfig.get_paths()["stdlib"]
    texts = [(f, open(os.path.join(stdlib, f)).read().encode("ascii", "ignore").decode())
             for f in ("textwrap.py", "shlex.py", "glob.py")]
    out = tmp_path_factory.mktemp("padded")
    torch.manual_seed(0)
    Transformer(replace(PRESETS["test-tiny"], vocab_size=VOCAB)).save_pretrained(str(out))
    (out / "tokenizer.model").write_bytes(train_tokenizer(texts, N_TOKENS))
    return out


def run_sample(monkeypatch, capsys, *args):
    """sample.py in-process as the command line runs it -> (exit code or error line, stdout)."""
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    try:
        run_main(sample.main)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


def test_tiny_top_p_keeps_the_most_likely_token_and_top_k_0_is_off():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    assert probs_from_logits(logits, 1.0, None, 0.0).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert probs_from_logits(logits, 1.0, None, 1e-9).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert torch.allclose(probs_from_logits(logits, 1.0, 0, None), torch.softmax(logits, -1))


@pytest.mark.parametrize("args, name", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_sampling_arguments_name_the_argument(args, name):
    full = dict(max_new_tokens=5, temperature=1.0, top_k=None, top_p=None) | args
    with pytest.raises(ValueError, match=name):
        check_sampling(**full)
    model = Transformer(PRESETS["test-tiny"]).eval()
    for fn in (lambda: generate(model, torch.ones(1, 2, dtype=torch.long), **full),
               lambda: generate_speculative(model, torch.ones(1, 2, dtype=torch.long), exit_layer=2,
                                            num_speculations=2, **full)):
        with pytest.raises(ValueError, match=name):
            fn()


@pytest.mark.parametrize("args, name", [
    (["--temperature=-1"], "temperature"), (["--top_p=0"], "top_p"),
    (["--top_p=0", "--speculative", "--exit_layer=2"], "top_p"), (["--top_k=-3"], "top_k"),
    (["--max_new_tokens=-1"], "max_new_tokens"), (["--stop="], "stop"),
])
def test_sample_bad_sampling_arguments_are_one_line(ckpt, monkeypatch, capsys, args, name):
    code, _ = run_sample(monkeypatch, capsys, f"--out_dir={ckpt}", "--prompt=def ", *args)
    assert isinstance(code, str) and code.startswith("error: ") and name in code and "\n" not in code, code


@pytest.mark.parametrize("extra", [[], ["--speculative", "--exit_layer=2"]])
def test_sample_max_new_tokens_0_prints_the_prompt(ckpt, monkeypatch, capsys, extra):
    code, out = run_sample(monkeypatch, capsys, f"--out_dir={ckpt}", "--prompt=def f", "--max_new_tokens=0", *extra)
    assert code == 0 and out.splitlines()[1] == "def f", out


def test_padded_vocabulary_never_generates_an_id_the_tokenizer_lacks(ckpt, monkeypatch, capsys):
    model = Transformer.from_pretrained(str(ckpt)).eval()
    idx = torch.ones(2, 1, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    free = generate(model, idx, 40, temperature=1.0, generator=g, stop_at_eos=False)
    assert (free >= N_TOKENS).any()  # without the limit, random weights do sample ids past the tokenizer
    out = generate(model, idx, 40, temperature=1.0, generator=g, stop_at_eos=False, n_tokens=N_TOKENS)
    spec, _ = generate_speculative(model, idx, 40, 2, 3, temperature=1.0, generator=g, stop_at_eos=False,
                                   n_tokens=N_TOKENS)
    greedy, _ = generate_speculative(model, idx, 40, 1, 3, stop_at_eos=False, n_tokens=N_TOKENS)
    assert all((t < N_TOKENS).all() for t in (out, spec, greedy))
    code, out = run_sample(monkeypatch, capsys, f"--out_dir={ckpt}", "--temperature=1", "--top_k=None",
                           "--max_new_tokens=40", "--num_samples=2")
    assert code == 0 and out.count("----------") == 2, (code, out)


def test_stop_strings_end_plain_and_speculative_rows_at_the_same_token(ckpt, monkeypatch, capsys):
    model = Transformer.from_pretrained(str(ckpt)).eval()
    tok = checkpoint_tokenizer(str(ckpt))
    prompt = [tok.bos_id()] + tok.encode("def ")
    free = generate(model, torch.tensor([prompt]), 40, temperature=0, n_tokens=N_TOKENS)[0, len(prompt):].tolist()
    completions = sample.Completions(tok, [prompt[1:]], model.cfg.eos_id, [])
    text, _ = completions.text(0, free)
    k = next(k for k in range(12, len(text)) if text[k:k + 2].isascii() and text[k:k + 2].strip())
    stop = text[k:k + 2]
    expected = text[:text.find(stop)]
    ends = next(m for m in range(1, 41) if stop in completions.text(0, free[:m])[0])  # the token completing it
    for spec in (None, (1, 4), (2, 3), (3, 1)):
        completions = sample.Completions(tok, [prompt[1:]], model.cfg.eos_id, [stop])
        idx = torch.tensor([prompt])
        out = (generate(model, idx, 40, temperature=0, stop=completions, n_tokens=N_TOKENS) if spec is None
               else generate_speculative(model, idx, 40, *spec, stop=completions, n_tokens=N_TOKENS)[0])
        gen = out[0, len(prompt):].tolist()
        assert gen[:ends] == free[:ends] and set(gen[ends:]) <= {model.cfg.eos_id}, spec
        assert completions.text(0, gen) == (expected, True)
    code, out = run_sample(monkeypatch, capsys, f"--out_dir={ckpt}", "--prompt=def ", "--temperature=0",
                           "--max_new_tokens=40", f"--stop={stop}", "--stop=\\nnever")
    assert code == 0 and out.splitlines()[1:] == ("def " + expected).splitlines(), (out, expected)


def test_sample_ends_rows_at_every_end_id(ckpt, tmp_path, monkeypatch, capsys):
    """A checkpoint whose config lists a further end id X, the third token greedy decoding emits: sample.py, plain
    and speculative, prints the text of the first two tokens and counts 3 tokens; Completions cuts a row's text
    at any end id."""
    model = Transformer.from_pretrained(str(ckpt)).eval()
    tok = checkpoint_tokenizer(str(ckpt))
    for text in ("def ", "x = ", "import ", "class "):
        ids = tok.encode_prompt(text)
        free = generate(model, torch.tensor([ids]), 12, temperature=0, n_tokens=N_TOKENS,
                        stop_at_eos=False)[0, len(ids):].tolist()
        X = free[2]
        if len(set(free[:3]) | {model.cfg.eos_id}) == 4:
            break
    else:
        raise AssertionError("no prompt whose greedy continuation suits the test")
    expected = tok.decode(ids + free[:2])[len(tok.decode(ids)):]
    completions = sample.Completions(tok, [ids], [model.cfg.eos_id, X], [])
    assert completions.text(0, free) == (expected, False)
    model.cfg.end_ids = [X]
    model.save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes((ckpt / "tokenizer.model").read_bytes())
    for extra in ([], ["--speculative", "--exit_layer=2"]):
        monkeypatch.setattr(sys, "argv", ["sample.py", f"--out_dir={tmp_path}", f"--prompt={text}",
                                          "--temperature=0", "--max_new_tokens=12", *extra])
        run_main(sample.main)
        printed = capsys.readouterr()
        assert printed.out.splitlines()[1:] == (text + expected).splitlines(), printed.out
        assert printed.err.splitlines()[-1].startswith("---------- 3 tokens in "), printed.err


def test_streaming_holds_back_incomplete_characters_and_stop_string_starts(ckpt, capsys):
    tok = checkpoint_tokenizer(str(ckpt))
    e_acute = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in "é".encode()]  # two byte-fallback pieces
    completions = sample.Completions(tok, [tok.encode("x = ")], 2, ["\ndef"], stream=True)
    printed = []
    for ids in ([e_acute[0]], [e_acute[1]], tok.encode("1\nd"), tok.encode("ef g")):
        kept = completions(0, ids)
        printed.append(capsys.readouterr().out)
    assert printed == ["", "é", "1", ""] and kept is not None
    assert completions.text(0, completions.ids[0]) == ("é1", True)


def test_instruction_prompt_is_the_training_prompt(ckpt, tmp_path, monkeypatch, capsys):
    """Fine-tune briefly on instruction data, then sample.py --instruction --input feeds exactly the prompt ids
    training put before the response."""
    import train
    record = {"instruction": "Reverse the list.", "input": "[1, 2, 3]", "output": "[3, 2, 1]"}
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text(json.dumps(record) + "\n")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["train.py", "--model=test-tiny", "--dataset=instruct", f"--data_dir={data}",
                                      f"--tokenizer={ckpt / 'tokenizer.model'}", f"--out_dir={out}", "--max_steps=2",
                                      "--eval_interval=2", "--eval_batches=1", "--micro_batch=1", "--block_size=256",
                                      "--device=cpu"])
    train.main()
    assert (out / "prompt_template.json").exists()
    fed = []
    monkeypatch.setattr(sample, "generate", lambda model, idx, *a, **kw: fed.append(idx[0].tolist()) or idx)
    code, _ = run_sample(monkeypatch, capsys, f"--out_dir={out}", f"--instruction={record['instruction']}",
                         f"--input={record['input']}", "--max_new_tokens=0")
    ids, n_prompt = encode_records(checkpoint_tokenizer(str(out)), [record], 256)[0]
    assert code == 0 and fed == [ids[:n_prompt]]
    (tmp_path / "prompts.json").write_text(json.dumps([{"instruction": record["instruction"], "input": record["input"]}]))
    code, _ = run_sample(monkeypatch, capsys, f"--out_dir={out}", f"--prompts={tmp_path / 'prompts.json'}",
                         "--max_new_tokens=0")  # a prompts file holding records
    assert code == 0 and fed[1:] == [ids[:n_prompt]]
    code, _ = run_sample(monkeypatch, capsys, f"--out_dir={ckpt}", "--instruction=x")  # not fine-tuned
    assert "prompt_template.json" in code


@torch.no_grad()
def test_export_encodes_and_decodes_greedily_as_sample(ckpt, tmp_path):
    """--to_hf of a sentencepiece checkpoint with a padded vocabulary: AutoTokenizer puts bos first as sample.py
    does, and transformers' greedy generate on the export gives sample.py's greedy tokens (eos and suppressed
    padding rows from generation_config.json)."""
    transformers = pytest.importorskip("transformers")
    from checkpoints_convert import to_hf
    to_hf(str(ckpt), str(tmp_path / "hf"))
    tok, theirs = checkpoint_tokenizer(str(ckpt)), transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("def ", "  x = 1\n\tif é:\n"):
        assert theirs(text).input_ids == [tok.bos_id()] + tok.encode(text)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (tok.bos_id(), tok.eos_id())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([theirs("def ").input_ids])
    model = Transformer.from_pretrained(str(ckpt)).eval()
    ours = generate(model, ids, 30, temperature=0, n_tokens=N_TOKENS)
    out = hf.generate(ids, max_new_tokens=30, do_sample=False)
    assert out.tolist() == ours[:, :out.shape[1]].tolist() and (ours[:, out.shape[1]:] == tok.eos_id()).all()
