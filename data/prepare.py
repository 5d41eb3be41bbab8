"""
Build a token corpus:  python data/prepare.py [PATH ...] [--out DIR] [--vocab_size N]

With no PATH: the Python standard library's own source (sysconfig "stdlib", site-packages
excluded), written to data/stdlib/. Steps: list files, split train/val by file (a hash of the
relative path: deterministic), train a sentencepiece BPE tokenizer with byte fallback on the train
files, encode every file (checking decode(encode(text)) == text), and write
    tokenizer.model   train.bin   val.bin   meta.json
Each file is one document: [bos] + tokens. The .bin files are flat uint16/uint32 token ids for np.memmap.
"""
import argparse
import io
import json
import os
import random
import re
import sys
import sysconfig
import zlib

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import savedir  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
USABLE = re.compile(r"[^\s\x00-\x1f\x7f]")  # a character that is text


def list_files(paths, suffixes):
    """(root, relative path) for every text file under `paths`, sorted: the order is deterministic."""
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append((os.path.dirname(path), os.path.basename(path)))
            continue
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no such file or directory: {path}")
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
            for name in filenames:
                if name.endswith(suffixes):
                    found.append((path, os.path.relpath(os.path.join(dirpath, name), path)))
    return sorted(found, key=lambda f: f[1])


def read_texts(files):
    """Read files as UTF-8, skipping (and counting) those that are not."""
    texts, skipped = [], 0
    for root, rel in tqdm(files, desc="reading", leave=False):
        try:
            with open(os.path.join(root, rel), encoding="utf-8", newline="") as f:
                text = f.read()
        except UnicodeDecodeError:
            skipped += 1
            continue
        if text:
            texts.append((rel, text))
    return texts, skipped


def is_val(rel_path, val_percent):
    return zlib.crc32(rel_path.encode()) % 100 < val_percent


def train_tokenizer(texts, vocab_size, max_lines=300_000):
    """Byte-fallback BPE that keeps whitespace exactly (code indentation matters)."""
    lines = [line for _, text in texts for line in text.split("\n") if line.strip()]
    if len(lines) > max_lines:  # our own seeded sample: sentencepiece's sampling is not reproducible
        lines = random.Random(1234).sample(lines, max_lines)
    proto = io.BytesIO()
    try:
        _train_spm(lines, proto, vocab_size)
    except RuntimeError as e:  # sentencepiece: a vocabulary too small or too large for the corpus
        reason = (str(e).split("] ")[-1].splitlines() or [str(e)])[0].split(" Increase vocab_size")[0]
        raise ValueError(f"vocab_size {vocab_size} does not fit this corpus: {reason}") from None
    return proto.getvalue()


def _train_spm(lines, proto, vocab_size):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_by_whitespace=False, allow_whitespace_only_pieces=True,
        split_digits=True, user_defined_symbols=["\n", "\t"], input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=8192, character_coverage=0.9999,
        num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)


def encode_all(sp, texts, dtype, desc):
    """Concatenate [bos] + ids of every text; verify that every text decodes back exactly."""
    chunks = []
    for i in tqdm(range(0, len(texts), 64), desc=desc, leave=False):
        batch = [text for _, text in texts[i:i + 64]]
        for (rel, text), ids in zip(texts[i:i + 64], sp.encode(batch)):
            if sp.decode(ids) != text:
                raise ValueError(f"tokenizer does not round-trip {rel}")
            chunks.append(np.array([sp.bos_id()] + ids, dtype=dtype))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def prepare(paths, out_dir, vocab_size=4096, val_percent=5, suffixes=(".py",)):
    """Write the data set into out_dir/.next/ and move it in as a whole (savedir.py): a run killed part
    way leaves out_dir's previous data set, or the new one."""
    if not 0 <= val_percent < 100:
        raise ValueError(f"--val_percent {val_percent}: must be in [0, 100)")
    if vocab_size < 1:
        raise ValueError(f"--vocab_size {vocab_size}: must be >= 1")
    inputs = [("source", p) for p in paths]
    savedir.check_target(out_dir, savedir.TOKEN_DATA, inputs)
    files = list_files(paths, suffixes)
    texts, skipped = read_texts(files)
    usable = sum(1 for _, text in texts if USABLE.search(text))  # more than whitespace, NULs, control characters
    if usable < 2:
        raise ValueError(f"need at least 2 files of UTF-8 text, found {usable} of {len(files)} under {paths}")
    train = [t for t in texts if not is_val(t[0], val_percent)]
    val = [t for t in texts if is_val(t[0], val_percent)]
    if not val:  # tiny inputs: keep the last file for validation
        train, val = train[:-1], train[-1:]
    if not train:
        raise ValueError(f"--val_percent {val_percent} puts all {len(val)} files in validation: none left to train on")
    proto = train_tokenizer(train, vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    dtype = np.uint16 if sp.vocab_size() <= 2**16 else np.uint32
    meta = {"vocab_size": sp.vocab_size(), "dtype": np.dtype(dtype).name, "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(), "sources": [os.path.abspath(p) for p in paths],
            "skipped_non_utf8": skipped}

    def write(nxt):
        for split, split_texts in (("train", train), ("val", val)):
            tokens = encode_all(sp, split_texts, dtype, f"encoding {split}")
            tokens.tofile(os.path.join(nxt, f"{split}.bin"))
            meta[f"{split}_files"] = len(split_texts)
            meta[f"{split}_tokens"] = int(len(tokens))
        with open(os.path.join(nxt, "tokenizer.model"), "wb") as f:
            f.write(proto)
        with open(os.path.join(nxt, "meta.json"), "w") as f:
            f.write(json.dumps(meta, indent=2))
    with savedir.claim(out_dir, savedir.TOKEN_DATA, inputs):
        savedir.save(out_dir, savedir.TOKEN_DATA, write)
    return meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("paths", nargs="*", help="files or directories (default: the stdlib source)")
    parser.add_argument("--out", default=None, help="output directory (default: data/stdlib or data/custom)")
    parser.add_argument("--vocab_size", type=int, default=4096,
                        help="tokenizer vocabulary size (default: %(default)s)")
    parser.add_argument("--val_percent", type=int, default=5,
                        help="percent of the files held out for validation (default: %(default)s)")
    parser.add_argument("--suffix", action="append", default=None, help="file suffix in directories (default .py)")
    args = parser.parse_args()
    paths = args.paths or [sysconfig.get_paths()["stdlib"]]
    out = args.out or os.path.join(HERE, "stdlib" if not args.paths else "custom")
    meta = prepare(paths, out, args.vocab_size, args.val_percent, tuple(args.suffix or [".py"]))
    print(f"{out}: vocab {meta['vocab_size']}, train {meta['train_tokens']:,} tokens "
          f"({meta['train_files']} files), val {meta['val_tokens']:,} tokens ({meta['val_files']} files)")


if __name__ == "__main__":
    from configurator import run_main
    run_main(main)
