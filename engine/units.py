"""Byte sizes and context lengths as users write them, parsed and printed.

Sizes: `24GiB`, `128GB`, `2TiB`, `512MiB`, `1.5GiB`, or a plain number of bytes.
Binary suffixes (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (kB, MB, GB, TB)
powers of 1000, as on the box the memory came in. Contexts: `4096`, `128k`, `1M`,
`10M`, `1.5M` (k = 1,000 tokens, M = 1,000,000, G = 1,000,000,000).
"""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "pib": 1024**5,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4, "pb": 1000**5,
}
_CONTEXT_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3}
_NUMBER = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | int, *, arg: str = "size") -> int:
    """Parse a memory size such as `24GiB` into bytes.

    Raises ValueError naming `arg` and the allowed forms for anything else, and for
    sizes that are zero or negative.
    """
    allowed = ("a positive size such as 24GiB, 128GB, 2TiB, 512MiB "
               "(units B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)")
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"{arg}={text!r} is invalid: {allowed}")
        return text
    m = _NUMBER.match(str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{arg}={text!r} is invalid: {allowed}")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if not value >= 1 or not math.isfinite(value):
        raise ValueError(f"{arg}={text!r} is invalid: {allowed}")
    return int(value)


def parse_context(text: str | int, *, arg: str = "context") -> int:
    """Parse a context length such as `128k`, `1M` or `10M` into tokens.

    Raises ValueError naming `arg` and the allowed forms.
    """
    allowed = "a positive token count such as 4096, 128k, 1M, 10M (suffixes k, M, G)"
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"{arg}={text!r} is invalid: {allowed}")
        return text
    m = _NUMBER.match(str(text))
    if not m or m.group(2).lower() not in _CONTEXT_UNITS:
        raise ValueError(f"{arg}={text!r} is invalid: {allowed}")
    value = float(m.group(1)) * _CONTEXT_UNITS[m.group(2).lower()]
    if not value >= 1 or not math.isfinite(value):
        raise ValueError(f"{arg}={text!r} is invalid: {allowed}")
    return int(round(value))


def format_bytes(n: float) -> str:
    """Bytes as a short binary-unit string: `0 B`, `512.0 MiB`, `23.4 GiB`."""
    n = float(n)
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def format_context(tokens: int) -> str:
    """Tokens as `512`, `128k`, `1M`, `1.5M`, `10M` (decimal, as users write them)."""
    for unit, scale in (("G", 1000**3), ("M", 1000**2), ("k", 1000)):
        if tokens >= scale:
            v = tokens / scale
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.4g}{unit}"
    return str(tokens)
