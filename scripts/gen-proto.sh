#!/usr/bin/env bash
# Regenerate proto/*_pb2.py(i). The .proto files are compiled as diffrl/proto/*.proto (a temporary
# tree whose diffrl/proto is this folder), so the generated modules import each other as
# `diffrl.proto.*` and register as `diffrl/proto/*.proto`: the installed names, never a top-level `proto`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/diffrl"
ln -s "$PWD/proto" "$tmp/diffrl/proto"
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
(cd "$tmp" && "$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. diffrl/proto/*.proto)
