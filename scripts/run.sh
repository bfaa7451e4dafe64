#!/usr/bin/env bash
# Sets up .venv and serves the model (OpenAI API on http://127.0.0.1:8000/v1, gRPC on 127.0.0.1:9000) on a
# local Ray instance; Ctrl-C stops it. Without a config it serves the embedded default model (a small
# random-weight checkpoint in the released layout, written on first use). Arguments go to
# `gptoss-serve serve`, e.g. `./scripts/run.sh config.yaml` or `./scripts/run.sh --checkpoint DIR`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >&2
exec .venv/bin/gptoss-serve serve "$@"
