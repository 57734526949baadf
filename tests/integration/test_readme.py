"""The README's SDK example runs as printed, against a real server."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from server import JobConfig, StrategyConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_ten_line_example_trains(serve) -> None:  # type: ignore[no-untyped-def]
    example = re.search(r"```python\n(import torch\n.*?)```", README.read_text(), re.S)
    assert example is not None, "README lost its SDK example"
    code = example.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    initial = {"1.weight": np.zeros((10, 64), np.float32), "1.bias": np.zeros(10, np.float32)}
    running = serve(JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=2)), models={"default": initial})
    exec(compile(code.replace("127.0.0.1:50051", running.address), str(README), "exec"), {})
    job = running.core.job("default")
    assert job.stats.updates_accepted == 10
    assert job.snapshot().version == 5
    assert not np.array_equal(job.snapshot().tensors["1.weight"], initial["1.weight"])
