"""Shared fixtures: the `spin` binary these tests drive (built by `cargo test` or `cargo build`
before pytest runs; `SPIN_BIN` overrides the path)."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def spin_bin() -> Path:
    candidates = [os.environ.get("SPIN_BIN"), REPO / "target/debug/spin", REPO / "target/release/spin"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    pytest.fail("no spin binary: run `cargo build -p zoo` first, or set SPIN_BIN")


@pytest.fixture(scope="session")
def spin(spin_bin):
    def run(*args: str) -> str:
        done = subprocess.run([str(spin_bin), *args], capture_output=True, text=True)
        assert done.returncode == 0, f"spin {' '.join(args)} failed: {done.stderr}"
        return done.stdout

    return run
