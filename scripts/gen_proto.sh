#!/usr/bin/env bash
# Regenerates the Python gRPC stubs beside serve/proto/gptoss/v1/gptoss.proto (needs grpcio-tools, in the
# test extra). Run after editing the proto; tests/test_grpc_stubs.py checks they are in step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. serve/proto/gptoss/v1/gptoss.proto
