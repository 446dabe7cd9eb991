#!/usr/bin/env bash
# The main job end to end on the shipped data: train both models, export and publish them,
# start the server, classify the shipped test set (and a few PNGs) over gRPC, stop the server.
# Run through `make demo`, which puts .venv/bin first on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

repository=${MNIST37_REPOSITORY:-model_repository}
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

step "4/5 serve it: mnist37-serve on 127.0.0.1:$grpc_port (metrics on :$metrics_port)"
mnist37-serve --repository "$repository" --host 127.0.0.1 --grpc-port "$grpc_port" \
    --metrics-port "$metrics_port" --log-format text &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    python -m serving.healthcheck --address "127.0.0.1:$grpc_port" --timeout 1 >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { echo "the server exited before it was ready" >&2; exit 1; }
    sleep 0.2
done
python -m serving.healthcheck --address "127.0.0.1:$grpc_port"

step "5/5 classify real digits over gRPC"
pngs=$(mktemp -d)
python - "$data" "$pngs" <<'PY'
import sys
from pathlib import Path

from PIL import Image

from serving.idx import read_images, read_labels

data, out = Path(sys.argv[1]), Path(sys.argv[2])
images = read_images(data / "t10k-images-idx3-ubyte.gz")
labels = read_labels(data / "t10k-labels-idx1-ubyte.gz")
for index in (0, 1, 2, 3):
    png = out / f"test{index}-really-a-{labels[index]}.png"
    Image.fromarray(255 - images[index]).resize((112, 112)).save(png)  # dark ink on white
PY
mnist37-client --server "127.0.0.1:$grpc_port" classify "$pngs"/*.png
echo "-- the shipped test set (2,038 real 3s and 7s), 256 images a request:"
mnist37-client --server "127.0.0.1:$grpc_port" classify \
    --check "$data/t10k-images-idx3-ubyte.gz" --labels "$data/t10k-labels-idx1-ubyte.gz"
echo "-- the same, one image a request (latency of a single classification):"
mnist37-client --server "127.0.0.1:$grpc_port" classify --batch-size 1 \
    --check "$data/t10k-images-idx3-ubyte.gz" --labels "$data/t10k-labels-idx1-ubyte.gz"
rm -rf "$pngs"

kill -TERM $server
wait $server
trap - EXIT
echo "server stopped cleanly (exit 0)"
