"""
A checkpoint's tokenizer and its rules, in one place: every entry point encodes prompts through it.

    tok = load_tokenizer(ckpt_dir, bos_id, eos_id)
    tok.encode_prompt(text)   # the tokenizer's own prefix (bos, if it adds one) + the text's ids
    tok.chat_prompt(messages) # the chat template rendered as transformers' apply_chat_template, encoded

A directory's tokenizer.json (the optional `tokenizers` package) is read before its tokenizer.model, as
transformers reads it: special tokens that exist only there (Phi-3's <|user|>, <|end|>) are its ids, and
its post-processor says whether bos goes first. A sentencepiece tokenizer.model alone adds bos unless
tokenizer_config.json says add_bos_token: false (data/prepare.py's tokenizers add it). The chat template
comes from chat_template.jinja or tokenizer_config.json.
"""
import json
import os
from datetime import datetime

import sentencepiece as spm

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


class Tokenizer:
    """sentencepiece's API (encode, decode, vocab_size, bos_id, eos_id) over a tokenizer.model or a
    tokenizer.json, plus the rules above: `prefix` (ids put before a prompt), `chat_template`."""

    def __init__(self, path, bos_id, eos_id, config=None):
        config = config or {}
        self.sp = self.tok = None
        if path.endswith(".json"):
            self.tok = open_tokenizer_json(path)
            self._bos, self._eos = bos_id, eos_id
            self.prefix = post_processor_prefix(self.tok)
            self.special_ids = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        else:
            try:
                self.sp = spm.SentencePieceProcessor(model_file=path)
            except (RuntimeError, OSError) as e:  # a truncated or foreign file
                raise ValueError(f"{path}: not a valid sentencepiece model ({first_line(e)})") from None
            self._bos, self._eos = self.sp.bos_id(), self.sp.eos_id()
            self.prefix = [self._bos] if config.get("add_bos_token", True) and self._bos >= 0 else []
            self.special_ids = {i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)}
        self.chat_template = config.get("chat_template")
        self.special_tokens = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                               if isinstance(config.get(k), str)}

    def encode(self, text):
        """text -> ids, nothing added; special tokens written in the text are their ids (tokenizer.json)."""
        return self.sp.encode(text) if self.sp else self.tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text):
        """A prompt as the tokenizer encodes it with its special tokens: prefix (bos, if added) + text ids."""
        return self.prefix + (self.encode(text) if text else [])

    def decode(self, ids):
        return self.sp.decode(ids) if self.sp else self.tok.decode(ids)

    def vocab_size(self):
        """The ids the tokenizer can produce: its pieces and its added tokens (eos may be one of them)."""
        if self.sp:
            return self.sp.get_piece_size()
        return max(self.tok.get_vocab(with_added_tokens=True).values()) + 1

    def bos_id(self):
        return self._bos

    def eos_id(self):
        return self._eos

    def render_chat(self, messages, add_generation_prompt=True):
        """The chat template rendered for `messages` ([{"role", "content"}]), as apply_chat_template does."""
        if not self.chat_template:
            raise ValueError("the checkpoint has no chat template (tokenizer_config.json or chat_template.jinja)")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **self.special_tokens)

    def chat_prompt(self, messages):
        """Prompt ids for a chat: the rendered template encoded with nothing added (the template writes any
        bos itself), as apply_chat_template(tokenize=True) does."""
        return self.encode(self.render_chat(messages))

    def chat_end_id(self):
        """The special token the template writes after an assistant reply (ChatML's <|im_end|>), or None."""
        mark = "\ue000reply\ue000"
        text = self.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                                add_generation_prompt=False)
        tail = text[text.find(mark) + len(mark):] if mark in text else ""
        return next((i for i in self.encode(tail) if i in self.special_ids), None)


def open_tokenizer_json(path):
    try:
        from tokenizers import Tokenizer as JSONTokenizer
    except ImportError:
        raise ValueError(f"{path} needs the optional package tokenizers: pip install tokenizers") from None
    try:
        return JSONTokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a plain Exception for a damaged file
        raise ValueError(f"{path}: not a valid tokenizer.json ({first_line(e)})") from None


def post_processor_prefix(tok):
    """The ids tokenizer.json's post-processor puts before a text (Llama's [bos]; none for SmolLM2, OPT's
    byte-level BPE without a template)."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    starts = [k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain]
    return full[:starts[0]] if starts else []


def read_config(ckpt_dir):
    """tokenizer_config.json (add_bos_token, special tokens, chat template), with chat_template.jinja's
    template over the config's, as transformers reads them."""
    config = {}
    path = os.path.join(ckpt_dir, "tokenizer_config.json")
    if os.path.isfile(path):
        try:
            config = json.load(open(path, encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a JSON object")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = os.path.join(ckpt_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        template = open(jinja, encoding="utf-8").read()
    config["chat_template"] = template if isinstance(template, str) else None
    for key, value in list(config.items()):  # {"content": "<s>", ...} -> "<s>"
        if key.endswith("_token") and isinstance(value, dict):
            config[key] = value.get("content")
    return config


def load_tokenizer(path, bos_id, eos_id):
    """`path` is a tokenizer file or a checkpoint directory (tokenizer.json, else tokenizer.model, with
    tokenizer_config.json beside). bos_id and eos_id are the checkpoint's (its config.json): tokenizer.json
    carries none we could trust, and OPT's differ from Llama's, so there is no default."""
    if os.path.isdir(path):
        names = [n for n in ("tokenizer.json", "tokenizer.model") if os.path.isfile(os.path.join(path, n))]
        if names[:1] == ["tokenizer.json"] and len(names) == 2 and not tokenizers_installed():
            names = names[1:]  # transformers would read tokenizer.json; without `tokenizers`, the model file
        if not names:
            raise FileNotFoundError(f"{path!r} has no tokenizer.model or tokenizer.json")
        return Tokenizer(os.path.join(path, names[0]), bos_id, eos_id, read_config(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path!r} not found")
    return Tokenizer(path, bos_id, eos_id, read_config(os.path.dirname(path) or "."))


def tokenizers_installed():
    try:
        import tokenizers  # noqa: F401
        return True
    except ImportError:
        return False


# ---- chat templates (transformers' utils/chat_template_utils.py: _compile_jinja_template) ----

def render_chat_template(template, messages, add_generation_prompt=True, **special_tokens):
    """Render a chat template in jinja2's immutable sandbox, set up as transformers sets it up (trim_blocks,
    lstrip_blocks, loop controls, its tojson, raise_exception and strftime_now; {% generation %} blocks
    render their body). ValueError (one line) for a template that does not parse or raises."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("chat templates need the package jinja2: pip install jinja2") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[generation_tag(jinja2), jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, tools=None, documents=None,
                                                add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {first_line(e)}") from None


def raise_template_error(message):
    import jinja2
    raise jinja2.exceptions.TemplateError(message)


def generation_tag(jinja2):
    """transformers' {% generation %}...{% endgeneration %} (marks assistant text): here it renders its body."""
    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()
    return Generation


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
