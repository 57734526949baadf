"""Imports point one way: proto <- server; proto <- client_sdk <- edge. The
aggregation core never sees gRPC, and `tributary client` never loads server code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {
    "proto": {"proto"},
    "server": {"proto", "server"},
    "client_sdk": {"proto", "client_sdk"},
    "edge": {"proto", "client_sdk", "edge"},
}
PROJECT = {"proto", "server", "client_sdk", "edge", "tributary"}
GRPC_FREE = [
    "server/core.py", "server/strategies.py", "server/secagg.py", "server/cohorts.py", "server/config.py", "server/errors.py",
    "server/auth.py", "server/limits.py", "server/store.py", "server/roster.py", "server/metrics.py", "server/evaluation.py",
]  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package: str) -> None:
    offenders = []
    for path in (ROOT / package).rglob("*.py"):
        for module in imported_modules(path):
            top = module.split(".")[0]
            if top in PROJECT and top not in ALLOWED[package]:
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert offenders == []


@pytest.mark.parametrize("relative", GRPC_FREE)
def test_core_does_not_know_grpc(relative: str) -> None:
    modules = imported_modules(ROOT / relative)
    assert not [m for m in modules if m.startswith("grpc") or m.endswith("_pb2") or "tributary_pb2" in m]


def test_client_command_does_not_load_server_code() -> None:
    probe = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from tributary.cli import main\n"
        "result = CliRunner().invoke(main, ['client', '--server', '127.0.0.1:1', '--updates', '1', '--shard', '3', '--num-shards', '2'])\n"
        "assert result.exit_code != 0, result.output\n"
        "import client_sdk, edge.tasks\n"
        "print(sorted(m for m in sys.modules if m == 'server' or m.startswith('server.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_admin_command_does_not_load_server_code(tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("trb_admin_" + "x" * 40)
    probe = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from tributary.cli import main\n"
        f"result = CliRunner().invoke(main, ['admin', '--server', '127.0.0.1:1', '--admin-token-file', {str(token_file)!r}, 'status'])\n"
        "assert result.exit_code != 0, result.output\n"
        "print(sorted(m for m in sys.modules if m == 'server' or m.startswith('server.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_choices_match_the_server_config() -> None:
    """The CLI keeps its own copies (it must not import server code up front)."""
    from server import config
    from tributary import cli

    assert cli.STRATEGIES == config.STRATEGIES
    assert cli.STALENESS == config.STALENESS_KINDS
