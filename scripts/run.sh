#!/usr/bin/env bash
# Sets up .venv and generates on the embedded default model (a small random-weight checkpoint in
# the released layout, written on first use) unless --checkpoint DIR is given.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >&2
exec .venv/bin/gptoss-serve generate "$@"
