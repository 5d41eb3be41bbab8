"""Load a checkpoint's tokenizer: tokenizer.model (sentencepiece), else tokenizer.json (optional `tokenizers`)."""
import os

import sentencepiece as spm


class JSONTokenizer:
    """A tokenizer.json (OPT, Bloom) through the optional `tokenizers` package, with sentencepiece's API."""

    def __init__(self, path, bos_id, eos_id):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(f"{path} needs the optional package tokenizers: pip install tokenizers") from None
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a plain Exception for a damaged file
            raise ValueError(f"{path}: not a valid tokenizer.json ({first_line(e)})") from None
        self._bos, self._eos = bos_id, eos_id

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids)

    def vocab_size(self):
        return self.tok.get_vocab_size()

    def bos_id(self):
        return self._bos

    def eos_id(self):
        return self._eos


def load_tokenizer(path, bos_id, eos_id):
    """`path` is a tokenizer file or a directory holding tokenizer.model or tokenizer.json. bos_id and eos_id
    are the checkpoint's (its config.json): tokenizer.json carries none we could trust, and OPT's differ from
    Llama's, so there is no default."""
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), bos_id, eos_id)
        raise FileNotFoundError(f"{path!r} has no tokenizer.model or tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path!r} not found")
    if path.endswith(".json"):
        return JSONTokenizer(path, bos_id, eos_id)
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a valid sentencepiece model ({first_line(e)})") from None


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
