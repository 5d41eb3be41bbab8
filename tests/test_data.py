import filecmp
import json
import os

import numpy as np
import sentencepiece as spm

from conftest import run_script
from data.prepare import is_val, list_files, read_texts


def test_tokenizer_round_trips_every_file(stdlib_data, stdlib_path):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(stdlib_data, "tokenizer.model"))
    texts, skipped = read_texts(list_files([stdlib_path], (".py",)))
    assert len(texts) > 1000 and skipped < 10
    ids = sp.encode([t for _, t in texts])
    bad = [rel for (rel, t), i in zip(texts, ids) if sp.decode(i) != t]
    assert bad == []
    assert any("\n" in p for p in (sp.id_to_piece(i) for i in range(sp.vocab_size())))


def test_corpus_files_and_meta(stdlib_data):
    meta = json.load(open(os.path.join(stdlib_data, "meta.json")))
    assert meta["vocab_size"] == 4096 and meta["val_files"] > 10
    train = np.memmap(os.path.join(stdlib_data, "train.bin"), dtype=meta["dtype"], mode="r")
    val = np.memmap(os.path.join(stdlib_data, "val.bin"), dtype=meta["dtype"], mode="r")
    assert len(train) == meta["train_tokens"] > 10 * len(val) > 0
    assert train.max() < meta["vocab_size"]
    assert (train == meta["bos_id"]).sum() == meta["train_files"]  # one bos per document


def test_split_is_by_file_and_deterministic(tmp_path, stdlib_path, stdlib_data):
    files = [rel for _, rel in list_files([stdlib_path], (".py",))]
    val = {f for f in files if is_val(f, 5)}
    assert 0 < len(val) < len(files) * 0.1
    assert val == {f for f in files if is_val(f, 5)}
    proc = run_script("data/prepare.py", "--out", str(tmp_path / "again"))  # the whole corpus, a second time
    assert proc.returncode == 0, proc.stderr
    for name in ("train.bin", "val.bin", "tokenizer.model", "meta.json"):
        assert filecmp.cmp(tmp_path / "again" / name, os.path.join(stdlib_data, name), shallow=False), name


def test_missing_source_is_one_line(tmp_path):
    proc = run_script("data/prepare.py", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert proc.returncode != 0 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
