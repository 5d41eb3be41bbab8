"""
Value rules for config dataclasses, shared by the command line (configurator.py) and the model's Config.

A rule is (is_allowed(value), "what is allowed"); check_values applies a {key: rule} table to a dataclass,
check_type checks a value against a field's annotation. Both raise ValueError with one line.
"""
import math
import types
import typing


def allowed_types(annotation):
    """int | None -> (int, NoneType); int -> (int,)"""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def check_type(key, value, annotation):
    """`value` as the annotated type (an int where a float is declared becomes a float, a list where a tuple
    is declared a tuple); ValueError naming the key otherwise."""
    allowed = allowed_types(annotation)
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
