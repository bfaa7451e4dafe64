#!/usr/bin/env bash
# Creates .venv (once) and installs the project into it. torch==2.13.0 first: it is the CPU build
# that lies on disk; plain `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[${1:-test}]"
