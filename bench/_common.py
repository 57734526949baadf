"""Small helpers the benchmarks share (run them as `python -m bench.NAME`)."""

from __future__ import annotations

import argparse
import contextlib
import platform
import subprocess
from typing import Any

import numpy as np
import psutil


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


def machine(**library_versions: str) -> dict[str, Any]:
    """What a result was measured on: CPU model, cores, memory, Python, numpy
    and the libraries the caller names (e.g. grpcio=grpc.__version__)."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    return {
        "cpu_model": model,
        "logical_cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        **library_versions,
        "platform": platform.platform(),
    }
