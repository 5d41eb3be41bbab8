"""The tokenizer's own rules wherever a prompt is encoded, decoded or exported (tokenizer.py): several end ids,
a sentencepiece space prefix in task completions and in --to_hf exports, special tokens that exist only in a
tokenizer.json beside a tokenizer.model (Phi-3's layout), chat templates. Each test is one of issue 40's small
inputs; the reference is transformers on the same files."""
import io
import json
import os
import sysconfig
from dataclasses import replace

import pytest
import sentencepiece as spm
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import evaluate  # noqa: E402
import tasks  # noqa: E402
from checkpoints_convert import from_hf, to_hf  # noqa: E402
from conftest import assert_one_line_error, checkpoint_tokenizer, run_entry  # noqa: E402
from generate import generate  # noqa: E402
from model import PRESETS, Transformer  # noqa: E402
from test_convert import make_hf, prompt  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

LLAMA_TOKENIZER_CONFIG = {  # what a Llama-2 / TinyLlama repository ships beside tokenizer.model
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "clean_up_tokenization_spaces": False, "legacy": False, "pad_token": None, "padding_side": "right",
    "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}
PHI3_MARKERS = ["<|endoftext|>", "<|user|>", "<|end|>", "<|assistant|>"]


def llama_sentencepiece(vocab_size):
    """A byte-fallback BPE tokenizer.model trained as Llama's is: add_dummy_prefix, <unk> <s> </s> = 0 1 2."""
    stdlib = sysconfig.get_paths()["stdlib"]
    lines = [line for f in ("textwrap.py", "shlex.py", "glob.py") for line in
             open(os.path.join(stdlib, f)).read().encode("ascii", "ignore").decode().split("\n") if line.strip()]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type="bpe", vocab_size=vocab_size,
        character_coverage=0.995, byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return proto.getvalue()


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    """test-tiny (448 ids, random weights) with a Llama-style tokenizer.model and tokenizer_config.json."""
    out = tmp_path_factory.mktemp("llama_tok")
    torch.manual_seed(0)
    Transformer(replace(PRESETS["test-tiny"], vocab_size=448)).save_pretrained(str(out))
    (out / "tokenizer.model").write_bytes(llama_sentencepiece(448))
    (out / "tokenizer_config.json").write_text(json.dumps(LLAMA_TOKENIZER_CONFIG))
    return out


def convert_with_end_ids(tmp_path):
    """A tiny Llama with eos [2, X] (X the 3rd greedy token of idx) in config.json and generation_config.json,
    and another with it in generation_config.json alone, each converted and exported -> (dir, idx, X)."""
    hf = make_hf("llama_gqa", tmp_path / "hf")
    idx = prompt(T=8, B=1, seed=1)
    free = hf.generate(idx, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
    x = free[2]
    assert x not in free[:2] and x != 2
    for where in ("both", "generation_config"):
        d = tmp_path / where
        make_hf("llama_gqa", d / "hf")
        cfg = json.loads((d / "hf" / "config.json").read_text())
        cfg["eos_token_id"] = [2, x] if where == "both" else 2
        (d / "hf" / "config.json").write_text(json.dumps(cfg))
        (d / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, x]}))
        ours = from_hf(str(d / "hf"), str(d / "ours"))
        assert (ours.eos_id, ours.end_ids, ours.eos_ids) == (2, [x], [2, x])
        to_hf(str(d / "ours"), str(d / "back"))
        for name in ("config.json", "generation_config.json"):
            assert json.loads((d / "back" / name).read_text())["eos_token_id"] == [2, x]
    return tmp_path / "both", idx, x


def test_end_ids_from_config_and_generation_config_are_read_and_exported(tmp_path):
    """Small input 2: end_ids [X] either way; --to_hf writes eos_token_id [2, X] (was 2 alone)."""
    convert_with_end_ids(tmp_path)


def test_several_end_ids_end_rows_as_in_transformers(tmp_path):
    """Small input 2, decoding: transformers' generate on the export stops at X after 3 tokens; ours too (was:
    9 more tokens, only eos_id ended a row)."""
    d, idx, x = convert_with_end_ids(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(d / "back").generate(idx, max_new_tokens=12,
                                                                                     do_sample=False)
    assert theirs.shape[1] == 8 + 3  # transformers stops at X
    ours = generate(Transformer.from_pretrained(str(d / "ours")), idx, 12, temperature=0)
    assert ours[0, :11].tolist() == theirs[0].tolist() and set(ours[0, 11:].tolist()) <= {2, x}


def test_task_completions_keep_the_first_indentation_under_a_space_prefix(llama_ckpt, tmp_path):
    """Small input 3: a model emitting exactly the canonical body under a Llama-style sentencepiece tokenizer gets
    that body as its completion (decoded with its prompt; decoded alone it loses a space: 3 spaces, pass@1 0.0)."""
    tok = checkpoint_tokenizer(str(llama_ckpt))
    task = {"task_id": "t/0", "prompt": 'def add(a, b):\n    """Return a + b."""\n', "entry_point": "add",
            "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    body = "    return a + b\n"
    prompt_ids = tok.encode_prompt(task["prompt"])
    full = tok.encode_prompt(task["prompt"] + body)
    assert full[:len(prompt_ids)] == prompt_ids
    emitted = full[len(prompt_ids):]
    assert tok.decode(emitted) == "   return a + b\n"  # alone: the space prefix is stripped from the body
    completion = evaluate.completion_text(tok, prompt_ids, emitted)
    assert completion == body
    assert tasks.score_code([task], {"t/0": [completion]}, workers=1)[0]["pass@1"] == 1.0


TEXTS = ["def f(x):", "hello world", "\tif a:\n    b", "import os\nprint(os.sep)"]


def test_export_encodes_with_the_space_prefix_as_sample(llama_ckpt, tmp_path):
    """Small input 4: --to_hf of a checkpoint with a Llama tokenizer.model and tokenizer_config.json:
    AutoTokenizer on the export encodes ['<s>', '▁', 'def', ...] as sample.py feeds (was '<s>', 'def': the
    space prefix lost) and decodes alike; AutoTokenizer on the source directory agrees too."""
    to_hf(str(llama_ckpt), str(tmp_path / "hf"))
    tok = checkpoint_tokenizer(str(llama_ckpt))
    export = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    source = transformers.AutoTokenizer.from_pretrained(llama_ckpt)
    for text in TEXTS + ["  x = 1"]:  # a leading space too: sentencepiece still puts its prefix before it
        ids = tok.encode_prompt(text)
        assert ids[0] == 1 and export(text).input_ids == ids, (text, export.tokenize(text))
        assert export.decode(ids[1:]) == tok.decode(ids[1:]) == text
    for text in TEXTS:
        assert source(text).input_ids == tok.encode_prompt(text)


def test_chat_without_a_template_is_one_line(llama_ckpt):
    proc = run_entry("sample.py", f"--out_dir={llama_ckpt}", "--chat=hi", "--max_new_tokens=2")
    assert_one_line_error(proc, "no chat template")
    proc = run_entry("sample.py", f"--out_dir={llama_ckpt}", "--chat=hi", "--prompt=x")
    assert_one_line_error(proc, "--chat replaces")
    proc = run_entry("sample.py", f"--out_dir={llama_ckpt}", "--system=be brief")
    assert_one_line_error(proc, "--system goes with --chat")


@pytest.fixture(scope="module")
def phi3_layout(tmp_path_factory):
    """A Phi-3-layout checkpoint: tokenizer.model of N = 400 pieces, tokenizer.json with <|endoftext|> = N (eos)
    and the chat markers N+1.. as special tokens, an embedding padded to N + 64 rows. The weights are test-tiny's,
    with lm_head row N made to win exactly at the 5th greedy step of PROMPT, so eos comes 5th."""
    out = tmp_path_factory.mktemp("phi3_layout")
    n = 400
    (out / "tokenizer.model").write_bytes(llama_sentencepiece(n))
    backend = transformers.PreTrainedTokenizerFast.from_pretrained(out).backend_tokenizer
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in PHI3_MARKERS])
    backend.save(str(out / "tokenizer.json"))
    torch.manual_seed(0)
    model = Transformer(replace(PRESETS["test-tiny"], vocab_size=n + 64, eos_id=n)).eval()
    tok = load_tokenizer(str(out), model.cfg.bos_id, n)
    idx = torch.tensor([tok.encode_prompt(PHI3_PROMPT)])
    with torch.no_grad():
        free = generate(model, idx, 5, temperature=0, n_tokens=n)[0, idx.shape[1]:].tolist()
        x = model.embed(torch.cat([idx, torch.tensor([free[:4]])], 1))
        h = model.final_hidden(model.run_layers(x, 0, model.n_layer))[0, -1].clone()  # lm_head's input, step 5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    w = state["lm_head.weight"]
    w[n] = w[free[4]] + 1e-3 * h / h.dot(h)  # logit n = logit free[4] + 1e-3 at step 5
    model.save_pretrained(str(out), state)
    return out, n, free


PHI3_PROMPT = "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_phi3_layout_markers_and_eos_beyond_the_sentencepiece_pieces(phi3_layout, tmp_path):
    """Small input 5: the markers encode as their ids (was 32 text ids), the tokenizer counts them (N + 4 ids, so
    eos = N can be sampled), and greedy decoding stops at eos where transformers does on the export, after 5
    tokens (was: all 32 generated, ids >= N never sampled)."""
    out, n, free = phi3_layout
    tok = checkpoint_tokenizer(str(out))
    ids = tok.encode(PHI3_PROMPT)
    assert [i for i in ids if i >= n] == [n + 1, n + 2, n + 3] and len(ids) <= 12 and tok.vocab_size() == n + 4
    to_hf(str(out), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt_ids = hf_tok(PHI3_PROMPT).input_ids
    assert prompt_ids == tok.encode_prompt(PHI3_PROMPT)
    theirs = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False)[0, len(prompt_ids):]
    # the weights make eos win at the 5th step (sooner where the prompt's text ids, which the installed
    # tokenizers' conversion of the sentencepiece model decides, lead greedy decoding to that token earlier)
    assert theirs.tolist()[-1] == n and len(theirs) <= 5 and theirs.tolist()[:-1] == free[:len(theirs) - 1]
    proc = run_entry("sample.py", f"--out_dir={out}", f"--prompt={PHI3_PROMPT}", "--temperature=0",
                     "--max_new_tokens=32")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(theirs)} tokens" in proc.stderr.splitlines()[-1], proc.stderr
