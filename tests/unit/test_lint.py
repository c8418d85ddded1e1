"""The quality bar of ENGINEERING.md, enforced: ruff everywhere, mypy --strict on
policy/ and backends/."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = BIN / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/test installs the [test] extra)")
    return path


def test_ruff_clean() -> None:
    r = subprocess.run([tool("ruff"), "check", "policy", "backends", "proxy"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_on_policy_and_backends() -> None:
    r = subprocess.run([tool("mypy"), "policy", "backends"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
