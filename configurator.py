"""
nanoGPT-style configuration:  python train.py config/NAME.py --key=value --key value

Config files are Python files executed with the defaults as globals; every name they assign must
be an existing key. Command-line overrides come after and are type-checked against the
annotations of the script's config dataclass. Problems raise ValueError with one line.
"""
import ast
import inspect
import io
import os
import sys
import tokenize
import traceback
import types
import typing
from dataclasses import fields, is_dataclass, replace

from rules import allowed_types, check_type


def _parse_value(key, text, annotation):
    """Parse a command-line string into a value of the annotated type."""
    allowed = allowed_types(annotation)
    if bool in allowed and text.lower() in ("true", "false", "1", "0"):
        return text.lower() in ("true", "1")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word is a string
    try:
        return check_type(key, value, annotation)
    except ValueError:
        if str in allowed:  # "1,2" for a string key stays the text "1,2"
            return text
        raise


def configure(defaults, argv=None):
    """Return a copy of dataclass `defaults` updated from config files and --key=value overrides."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(help_text(defaults))
        sys.exit(0)
    hints = typing.get_type_hints(type(defaults))
    values = {f.name: getattr(defaults, f.name) for f in fields(defaults)}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):  # a config file
            if not os.path.isfile(arg):
                raise ValueError(f"config file {arg!r} not found")
            scope = dict(values)
            run_config_file(arg, scope)
            for key, value in scope.items():
                if key.startswith("_") or isinstance(value, types.ModuleType) or key == "__builtins__":
                    continue
                if key not in values:
                    raise ValueError(f"{arg}: unknown config key {key!r}")
                values[key] = check_type(key, value, hints[key])
            i += 1
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in values:
            raise ValueError(f"unknown config key {key!r}")
        if not eq:  # --key value, or a bare --flag for a bool key
            if bool in allowed_types(hints[key]) and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
                text = "true"
            elif i + 1 >= len(argv):
                raise ValueError(f"--{key} needs a value")
            else:
                text = argv[i + 1]
                i += 1
        if typing.get_origin(hints[key]) is list:  # a repeatable key: each --key adds one value
            values[key] = [*values[key], _parse_value(key, text, typing.get_args(hints[key])[0])]
        else:
            values[key] = _parse_value(key, text, hints[key])
        i += 1
    return replace(defaults, **values)


def help_text(defaults):
    """Usage, then every key of dataclass `defaults` as --key=default with the comment on its line in the
    dataclass source (a key a subclass redefines: the subclass's line), under the source's section comments."""
    notes = {}
    for cls in reversed([c for c in type(defaults).__mro__ if is_dataclass(c)]):
        for name, (section, comment) in field_comments(cls).items():
            base_section, base_comment = notes.get(name, ("", ""))  # a redefined key keeps its place
            notes[name] = (base_section if name in notes else section, comment or base_comment)
    lines = [f"usage: python {os.path.basename(sys.argv[0])} [CONFIG_FILE.py ...] [--key=value ...]"]
    for f in fields(defaults):
        section, comment = notes.get(f.name, ("", ""))
        if section:
            lines.append(f"# {section}")
        lines.append(f"  --{f.name}={getattr(defaults, f.name)!r}" + (f"  # {comment}" if comment else ""))
    return "\n".join(lines)


def field_comments(cls):
    """{field name: (the section comment on the lines just above it, the comment on its line)} from cls's
    source ({} without a source)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments = {t.start[0]: t.string.lstrip("# ").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above = node.lineno - 1  # a comment standing alone on the line above
            section = comments.get(above, "") if lines[above - 1].lstrip().startswith("#") else ""
            found[node.target.id] = (section, comments.get(node.lineno, ""))
    return found


def run_config_file(path, scope):
    """exec a config file in `scope`; a syntax error or an exception inside it is one line with the line number."""
    try:
        exec(compile(open(path).read(), path, "exec"), scope)
    except SyntaxError as e:
        raise ValueError(f"{path}, line {e.lineno}: syntax error ({e.msg})") from None
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise ValueError(f"{path}, line {line}: {type(e).__name__}: {e}") from None


def run_main(main):
    """Run a script's main(); our own errors and those of the file system (a file where a directory is
    expected, a read-only directory, a full disk) print one line and exit 1 instead of a traceback."""
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {os_error_line(e)}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


def os_error_line(e):
    """'<what went wrong>: <path>' for an OSError that names a path (its own message otherwise)."""
    if e.filename is None or not e.strerror:
        return str(e)
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return f"{e.strerror}: {paths}"
