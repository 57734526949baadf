"""The committed stubs must be exactly what scripts/gen_protos.py makes from
proto/tributary.proto (an edited .proto without regenerating fails here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_proto() -> None:
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_drift_is_detected(tmp_path: Path) -> None:
    """The check itself can fail: on a copy with a changed .proto it reports drift."""
    import shutil

    copy = tmp_path / "repo"
    (copy / "proto").mkdir(parents=True)
    (copy / "scripts").mkdir()
    for path in (ROOT / "proto").glob("tributary*"):
        shutil.copy(path, copy / "proto" / path.name)
    shutil.copy(ROOT / "scripts" / "gen_protos.py", copy / "scripts" / "gen_protos.py")
    proto = copy / "proto" / "tributary.proto"
    proto.write_text(proto.read_text().replace("message Chunk {", "message Chunk {\n  uint32 crc = 2;"))
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=copy, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "stubs drifted" in result.stdout
