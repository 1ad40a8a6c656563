#!/usr/bin/env sh
# Regenerates worker/protos/tf_serving_pb2.py and .pyi from tf_serving.proto (run from anywhere).
# The proto is compiled with the repository root as include path so its descriptor-pool name is
# worker/protos/tf_serving.proto, which cannot collide with any other file in the pool.
set -eu
root="$(cd "$(dirname "$0")/../.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
cd "$root"
"$python" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. worker/protos/tf_serving.proto
# protoc's .pyi uses bare Mapping in constructor signatures; mypy --strict would reject the generated stub.
pyi=worker/protos/tf_serving_pb2.pyi
{ echo '# mypy: disable-error-code="type-arg"'; cat "$pyi"; } > "$pyi.tmp" && mv "$pyi.tmp" "$pyi"
echo "regenerated worker/protos/tf_serving_pb2.py and tf_serving_pb2.pyi"
