"""
nanoGPT-style configuration:  python train.py config/NAME.py --key=value --key value

Config files are Python files executed with the defaults as globals; every name they assign must
be an existing key. Command-line overrides come after and are type-checked against the
annotations of the script's config dataclass. Problems raise ValueError with one line.
"""
import ast
import math
import os
import sys
import traceback
import types
import typing
from dataclasses import fields, replace


def _allowed_types(annotation):
    """int | None -> (int, NoneType); int -> (int,)"""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _parse_value(key, text, annotation):
    """Parse a command-line string into a value of the annotated type."""
    allowed = _allowed_types(annotation)
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


def check_type(key, value, annotation):
    allowed = _allowed_types(annotation)
    for t in allowed:
        t = typing.get_origin(t) or t
        if t is type(None) and value is None:
            return value
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if t is tuple and isinstance(value, list):
            return tuple(value)
        if t is str and not isinstance(value, str):
            continue
        if isinstance(t, type) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ValueError(f"config key {key!r} expects {names}, got {value!r}")


def configure(defaults, argv=None):
    """Return a copy of dataclass `defaults` updated from config files and --key=value overrides."""
    argv = sys.argv[1:] if argv is None else list(argv)
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
            if bool in _allowed_types(hints[key]) and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
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


def run_config_file(path, scope):
    """exec a config file in `scope`; a syntax error or an exception inside it is one line with the line number."""
    try:
        exec(compile(open(path).read(), path, "exec"), scope)
    except SyntaxError as e:
        raise ValueError(f"{path}, line {e.lineno}: syntax error ({e.msg})") from None
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise ValueError(f"{path}, line {line}: {type(e).__name__}: {e}") from None


# ---- value rules: {key: (is_allowed(value), "what is allowed")}, checked by check_values ----

def at_least(low):
    return lambda v: math.isfinite(v) and v >= low, f">= {low}"


def above(low):
    return lambda v: math.isfinite(v) and v > low, f"> {low}"


UNIT_INTERVAL = (lambda v: 0 <= v < 1, "in [0, 1)")


def one_of(*choices):
    return lambda v: v in choices, f"one of {', '.join(map(str, choices))}"


def check_values(obj, rules, where="config key"):
    """ValueError naming the first field of dataclass `obj` whose value breaks its rule (None passes:
    an optional field left unset)."""
    for key, (is_allowed, allowed) in rules.items():
        value = getattr(obj, key)
        if value is not None and not is_allowed(value):
            raise ValueError(f"{where} {key}={value!r}: must be {allowed}")
    return obj


def run_main(main):
    """Run a script's main(); our own errors print one line and exit 1 instead of a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
