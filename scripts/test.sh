#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (CPU only; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
mkdir -p .tmp
# Ray's temp dir is left to tests/conftest.py: a short folder under /tmp, since Ray's unix socket paths
# inside it must stay under 108 bytes wherever the checkout lives.
export CUPY_CACHE_DIR="$PWD/.tmp/cupy" GPTOSS_CACHE_DIR="$PWD/.tmp/cache"
exec .venv/bin/python -m pytest -q "$@"
