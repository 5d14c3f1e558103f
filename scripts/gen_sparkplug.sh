#!/usr/bin/env bash
# Regenerate drivers/sparkplug_b_pb2.py from drivers/sparkplug_b.proto with grpcio-tools' protoc, in a throwaway
# venv (the project does not depend on grpcio-tools). The generated module requires a protobuf runtime of the same
# major version and at least protoc's minor: keep the `sparkplug` extra's protobuf bound in pyproject.toml in step.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "grpcio-tools==1.85.1"
"$venv/bin/python" -m grpc_tools.protoc --proto_path=drivers --python_out=drivers --pyi_out=drivers \
    drivers/sparkplug_b.proto
echo "regenerated drivers/sparkplug_b_pb2.py and .pyi with $("$venv/bin/python" -m grpc_tools.protoc --version)"
