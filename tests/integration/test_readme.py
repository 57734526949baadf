"""The README's SDK example runs as printed, against a real server over mutual TLS."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from server import JobConfig, StrategyConfig, TLSConfig
from server.certs import Layout, write_layout

README = Path(__file__).resolve().parents[2] / "README.md"


def test_ten_line_example_trains(serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    example = re.search(r"```python\n(import torch\n.*?)```", README.read_text(), re.S)
    assert example is not None, "README lost its SDK example"
    code = example.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    # the files the example names, as `tributary certs certs --client phone-17` writes them
    certs = Layout(tmp_path / "certs")
    write_layout(certs.root, client_ids=["phone-17"])
    monkeypatch.chdir(tmp_path)
    tls = TLSConfig(cert_file=certs.server_cert, key_file=certs.server_key, client_ca_file=certs.ca_cert)
    initial = {"1.weight": np.zeros((10, 64), np.float32), "1.bias": np.zeros(10, np.float32)}
    running = serve(JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=2)), models={"default": initial}, tls=tls)
    exec(compile(code.replace("127.0.0.1:50051", running.address), str(README), "exec"), {})
    job = running.core.job("default")
    assert job.stats.updates_accepted == 10
    assert job.snapshot().version == 5
    assert not np.array_equal(job.snapshot().tensors["1.weight"], initial["1.weight"])
