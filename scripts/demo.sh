#!/usr/bin/env bash
# The main job end to end on the shipped data: train both models, export and publish them,
# start the server, classify the example PNGs and the shipped test set over gRPC (and one PNG
# over HTTP), stop the server.
# Run through `make demo`, which puts .venv/bin first on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

repository=${MNIST37_REPOSITORY:-model_repository}
http_port=${MNIST37_HTTP_PORT:-8000}
grpc_port=${MNIST37_GRPC_PORT:-8001}
metrics_port=${MNIST37_METRICS_PORT:-8002}
data=training/data
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 train, export and publish the linear model (fast.ai linear1)"
mnist37-train --arch linear --out runs/linear --repository "$repository" --no-progress
step "2/5 train, export and publish the MLP (784 -> 30 -> ReLU -> 1)"
mnist37-train --arch mlp --out runs/mlp --repository "$repository" --no-progress
step "3/5 the model repository"
mnist37-models list --repository "$repository"

step "4/5 serve it: mnist37-serve on 127.0.0.1:$grpc_port (HTTP on :$http_port, metrics on :$metrics_port)"
MNIST37_HTTP_PORT="$http_port" mnist37-serve --repository "$repository" --host 127.0.0.1 \
    --grpc-port "$grpc_port" --metrics-port "$metrics_port" --log-format text &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    python -m serving.healthcheck --address "127.0.0.1:$grpc_port" --timeout 1 >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { echo "the server exited before it was ready" >&2; exit 1; }
    sleep 0.2
done
python -m serving.healthcheck --address "127.0.0.1:$grpc_port"

step "5/5 classify real digits over gRPC and HTTP"
mnist37-client --server "127.0.0.1:$grpc_port" classify examples/*.png   # see examples/README.md
echo "-- the shipped test set (2,038 real 3s and 7s), 256 images a request:"
mnist37-client --server "127.0.0.1:$grpc_port" classify \
    --check "$data/t10k-images-idx3-ubyte.gz" --labels "$data/t10k-labels-idx1-ubyte.gz"
echo "-- the same, one image a request (latency of a single classification):"
mnist37-client --server "127.0.0.1:$grpc_port" classify --batch-size 1 \
    --check "$data/t10k-images-idx3-ubyte.gz" --labels "$data/t10k-labels-idx1-ubyte.gz"
echo "-- over HTTP: one PNG as the body of POST /v1/classify:"
curl -sS -H "Content-Type: image/png" --data-binary @examples/three-1.png \
    "http://127.0.0.1:$http_port/v1/classify"
echo

kill -TERM $server
wait $server
trap - EXIT
echo "server stopped cleanly (exit 0)"
