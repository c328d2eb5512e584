"""The committed file formats, read through one validating reader: a ledger line, a record, a
curve, a run's result.json.

Each format is a spec of the fields its readers use: `{"field": kind}` (a name ending in "?"
is optional, and may be null), `{"*": kind}` for a table of any keys, `[kind]` for a list,
a tuple of the values allowed, `KeyOf(sibling)` for a key of a sibling table, and the kinds
NUMBER, FINITE, POSITIVE, str, int, dict, list. A spec may also be a function of the value that
returns its spec (a result is a run's or an ensemble's). `read_checked` and `read_checked_lines`
read a file (as `storage.read_json` and `storage.read_json_lines` do), check it against its spec
and refuse what does not fit in one line that names the file, the line and the field, e.g.

    ledger.jsonl:12: field 'variants.final.val_loss' is a string ('5.2'), not a number

so a truncated, hand-edited or foreign file is never a traceback nor a wrong number.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

from . import SlowrunError
from .storage import parse_json, read_json_lines, read_text

LEDGER_FORMAT = "slowrun-ledger/1"
NUMBER = "a number"  # int or float (not bool); NaN and inf pass: a diverged run's loss is data
FINITE = "a finite number"
POSITIVE = "a positive number"  # finite and > 0


class KeyOf(str):
    """A string that must be a key of the sibling field it names (a result's `best` of its `variants`)."""


LOSSES = {"val_loss": NUMBER, "val_bpb?": NUMBER, "test_loss?": NUMBER, "test_bpb?": NUMBER}
RESULT = {"variants": {"*": LOSSES}, "best": KeyOf("variants"), "config?": dict, "dataset?": dict, "steps?": int,
          "wall_s?": NUMBER}
ENSEMBLE_RESULT = {"kind": ("ensemble",), "methods": {"probs": LOSSES}, "config?": dict, "dataset?": dict, "wall_s?": NUMBER}
LEDGER_LINE = {"format": (LEDGER_FORMAT,), "key": str, "dataset": dict, "variants": {"*": LOSSES}, "best": KeyOf("variants"),
               "config?": dict, "tag?": dict, "params?": int, "steps?": int, "tokens_seen?": int, "wall_s?": NUMBER,
               "train_wall_s?": NUMBER, "threads?": int, "device?": str}
_SEED_LOSSES = {"per_seed": [NUMBER], "mean": NUMBER, "std": NUMBER}
RECORD = {"track": str, "name": str, "date": str, "seeds": list, "members?": int, "val_loss": _SEED_LOSSES,
          "test_loss": _SEED_LOSSES, "efficiency?": dict, "vs_best?": dict}
CURVE = {"name": str, "budget": POSITIVE, "tokens": [POSITIVE], "losses": {"*": [FINITE]}, "dataset?": dict}


class FormatError(SlowrunError):
    pass


class _Misfit(Exception):
    """Where a value departs from its spec: the field's path and what is wrong with it."""

    def __init__(self, path: list, problem: str) -> None:
        super().__init__(problem)
        self.path, self.problem = path, problem


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    name = {bool: "a boolean", str: "a string", int: "an integer", float: "a number", dict: "an object",
            list: "a list"}.get(type(v), type(v).__name__)
    return f"{name} ({json.dumps(v)[:40]})" if isinstance(v, (bool, str, int, float)) else name


_NAMES = {str: "a string", dict: "an object", list: "a list"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(v: Any, spec: Any, path: list) -> None:
    if callable(spec) and not isinstance(spec, type):
        spec = spec(v)
    if isinstance(spec, dict):
        if not isinstance(v, dict):
            raise _Misfit(path, f"is {_kind(v)}, not an object")
        if "*" in spec:
            for k, x in v.items():
                _check(x, spec["*"], path + [k])
            return
        for name, sub in spec.items():
            key = name.rstrip("?")
            if key not in v or (name.endswith("?") and v[key] is None):
                if name.endswith("?"):
                    continue
                raise _Misfit(path + [key], "is missing")
            if isinstance(sub, KeyOf):
                table = v.get(sub)
                if not isinstance(v[key], str) or not isinstance(table, dict) or v[key] not in table:
                    have = ", ".join(table) if isinstance(table, dict) and table else "none"
                    raise _Misfit(path + [key], f"is {_kind(v[key])}, not one of the keys of '{sub}' ({have})")
            else:
                _check(v[key], sub, path + [key])
    elif isinstance(spec, list):
        if not isinstance(v, list):
            raise _Misfit(path, f"is {_kind(v)}, not a list")
        for i, x in enumerate(v):
            _check(x, spec[0], path + [i])
    elif isinstance(spec, tuple):
        if v not in spec:
            raise _Misfit(path, f"is {_kind(v)}, not {' or '.join(json.dumps(x) for x in spec)}")
    elif spec == NUMBER:
        if not _is_number(v):
            raise _Misfit(path, f"is {_kind(v)}, not a number")
    elif spec == FINITE:
        if not (_is_number(v) and math.isfinite(v)):
            raise _Misfit(path, f"is {_kind(v)}, not a finite number")
    elif spec == POSITIVE:
        if not (_is_number(v) and math.isfinite(v) and v > 0):
            raise _Misfit(path, f"is {_kind(v)}, not a positive number")
    elif spec is int:
        if not (isinstance(v, int) and not isinstance(v, bool)):
            raise _Misfit(path, f"is {_kind(v)}, not an integer")
    elif not isinstance(v, spec):
        raise _Misfit(path, f"is {_kind(v)}, not {_NAMES[spec]}")


def _field(path: list) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))


def _line_of(text: str, path: list) -> int | None:
    """The line of a field in an indented JSON document: each key of its path searched after the
    one before (the closest the stdlib parser allows); None when not even the first is found."""
    pos = None
    for key in (p for p in path if not isinstance(p, int)):
        m = re.compile(re.escape(json.dumps(key)) + r"\s*:").search(text, pos or 0)
        if m is None:
            break
        pos = m.start()
    return None if pos is None else text.count("\n", 0, pos) + 1


def check(obj: Any, spec: Any, where: str, text: str | None = None, error: type[SlowrunError] = FormatError) -> Any:
    """`obj` if it fits `spec`, else `error` naming `where` (a file, or FILE:LINE), the line of the
    field when `text` (the document) is given, and the field."""
    try:
        _check(obj, spec, [])
    except _Misfit as m:
        line = _line_of(text, m.path) if text is not None else None
        place = f"{where}:{line}" if line else where
        raise error(f"{place}: field '{_field(m.path)}' {m.problem}" if m.path else f"{place}: {m.problem}") from None
    return obj


def read_checked(path: str | Path, spec: Any, error: type[SlowrunError] = FormatError) -> Any:
    """A JSON document that fits `spec` (see the module docstring)."""
    text = read_text(path, error)
    return check(parse_json(text, str(path), error), spec, str(path), text, error)


def read_checked_lines(path: str | Path, spec: Any, error: type[SlowrunError] = FormatError) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSON Lines file, each fitting `spec`."""
    for n, value in read_json_lines(path, error):
        yield n, check(value, spec, f"{path}:{n}", None, error)


def result_spec(obj: Any) -> Any:
    """A run's result.json or an ensemble's (`kind: ensemble`, its losses under `methods`)."""
    return ENSEMBLE_RESULT if isinstance(obj, dict) and obj.get("kind") == "ensemble" else RESULT
