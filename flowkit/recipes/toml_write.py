"""flowkit's one TOML writer (tomllib only reads): resolved recipes (`dumps`), one value
(`toml_value`: ``--set`` strings, ``flowkit parts`` defaults, ablation overrides) and comments.

Handles what recipes hold: nested tables, strings, booleans, integers, floats and arrays of
scalars. `dumps` writes nested tables as ``[a.b]`` headers; `toml_value` writes a table inline.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def _key(key: str) -> str:
    """A bare key where TOML allows one; otherwise quoted (``"step.coupling.parity"`` is one key)."""
    return key if BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def toml_value(value: Any) -> str:
    """``value`` as TOML text: a bool, int, float (nan and inf too), string, list, or a table
    (inline, ``{ a = 1 }``)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that TOML wants DEL escaped too.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def comment(text: str) -> str:
    """``text`` as one TOML comment line: the control characters a comment cannot hold (a
    newline would end it) are written as escapes."""
    return "# " + "".join(c if c == "\t" or c.isprintable() else c.encode("unicode_escape").decode("ascii")
                          for c in text)


def dumps(table: dict[str, Any], _prefix: str = "") -> str:
    lines: list[str] = []
    nested = []
    for key, value in table.items():
        if isinstance(value, dict):
            nested.append((key, value))
        else:
            lines.append(f"{_key(key)} = {toml_value(value)}")
    out = "\n".join(lines)
    for key, value in nested:
        name = f"{_prefix}.{_key(key)}" if _prefix else _key(key)
        body = dumps(value, name)
        out += ("\n\n" if out else "") + f"[{name}]" + ("\n" + body if body and not body.startswith("[") else ("\n\n" + body if body else ""))
    return out.strip("\n") + ("\n" if not _prefix else "")
