"""Small helpers the benchmarks share (run them as `python -m bench.NAME`)."""

from __future__ import annotations

import argparse


def count_label(n: int) -> str:
    """100000 -> '100k', 1000000 -> '1M'."""
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def parse_count(text: str) -> int:
    """argparse type for counts written 100000, 100k or 1M."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 100000, 100k or 1M, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value
