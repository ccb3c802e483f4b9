#!/usr/bin/env bash
# Every test: the Rust workspace (`cargo test`), then spin-torch's (pytest, in a virtual environment
# under .venv with torch, timm, safetensors and numpy from PyPI; they drive the `spin` binary that
# `cargo test` has just built).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "./spin-torch[test]"
SPIN_BIN="$PWD/target/debug/spin" .venv/bin/python -m pytest -q spin-torch/tests
