"""The serving benchmark (`make bench`, `python -m serving.bench`): a bounded sweep of
batch sizes, concurrencies, protocols and server settings against servers started on
loopback, with in-process onnxruntime, a bare grpc.aio + onnxruntime server and a bare
echo server as references measured in the same run. See docs/benchmarks.md.

- `plan`: which servers and loads a sweep runs (default, `--quick`, `--full`, subsets);
- `bare`: the reference servers; `reference`: in-process onnxruntime;
- `loadgen`: perf_analyzer and a Python grpc.aio closed loop, as measured child processes;
- `servers`, `procfs`: starting servers, reading their process tree's CPU and memory;
- `sweep`: running a plan; `report`: ratios, targets, JSON and Markdown; `plots`: PNGs;
- `cli`: the command.
"""

from serving.bench.loadgen import PROTOCOLS, perf_analyzer_command

__all__ = ["PROTOCOLS", "perf_analyzer_command"]
