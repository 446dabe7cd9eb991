"""`mnist37-serve --workers N`: N server processes behind one gRPC port, one HTTP port
and one metrics port, which behave as one server.

One Python process is bound by its interpreter lock (about 2,000 single-image requests a
second on 2 cores, most of it grpc's and aiohttp's Python): more cores need more
processes. The supervisor (this module, in the process `mnist37-serve` started) runs no
server itself; each worker (`python -m serving.workers`, one `serving.server.serve`) is a
whole server, and:

- **Ports.** The supervisor binds the gRPC and HTTP ports with SO_REUSEPORT and never
  listens on them (`reserve_port`): port 0 becomes a real port to give the workers, no
  other program can take a port while a worker restarts, and a port another program
  listens on is refused in one line (`refuse_busy_ports` binds it without SO_REUSEPORT
  first, which fails while anyone holds it, a reservation included). The workers listen on
  those ports with SO_REUSEPORT, and the kernel spreads *connections* over them: every
  request of one connection (a gRPC channel, an HTTP keep-alive connection) goes to the
  worker that accepted it. A client opens several connections to use several workers
  (docs/benchmarks.md, "Workers").
- **Models.** Each worker follows the repository itself: its own reloader, the same
  --poll-interval, SIGHUP forwarded to all. Publication is atomic (a version directory
  appears whole, renamed into place) and verified (each file's sha256 is in the card),
  versions are immutable and the rule (serve the newest --keep-versions that load) is
  the same everywhere, so every worker reaches the same set of versions within a poll
  interval, without a channel between them to fail or keep in order. Each worker needs its
  own onnxruntime session anyway, and one that restarts loads what is published like a
  fresh server. The cost: for up to a poll interval after a publish or a retirement,
  connections to different workers may be answered by different versions.
- **Metrics.** The workers' metrics go to prometheus_client's per-process files in a
  private directory that the supervisor makes (PROMETHEUS_MULTIPROC_DIR, removed at
  exit); the supervisor's /metrics serves their sum (`serving.metrics.SupervisorMetrics`)
  with its own `mnist37_workers` and `mnist37_worker_restarts_total`.
- **Triton's ModelStatistics** are per worker: each counts the requests of the
  connections it accepted. A client that reads them over the connection it sends on (as
  perf_analyzer does) sees its requests counted.
- **Signals.** SIGTERM or SIGINT is forwarded to every worker, which drains as a single
  server does (health NOT_SERVING, every accepted request answered, then stop); the
  supervisor exits 0 once all are done. A second signal is forwarded too: the workers stop
  at once. The workers have their own process group, so a terminal's Ctrl-C reaches the
  supervisor alone, which forwards it once (twice would cut the drain short).
- **Crashes.** A worker that dies while the server runs is logged, counted and restarted
  after `FIRST_RESTART_DELAY`, doubled for each death within `STABLE_SECONDS` of its
  start. When `MAX_QUICK_DEATHS` restarts in a row died that quickly, restarting does not
  help: the supervisor stops the other workers and exits 1. A worker whose supervisor is
  gone (its control socket reads end-of-file) drains and exits, so no orphan keeps the
  port.
- **Startup.** Worker 0 starts first: an error that stops every worker (a bad TLS file,
  no repository) is reported once, by it, and the supervisor exits 1. Then the others
  start together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from serving.config import ServerConfig
from serving.logs import configure_logging
from serving.metrics import SupervisorMetrics
from serving.runtime import DeviceUnavailable
from serving.server import StartupError, serve

log = logging.getLogger("serving.workers")

# A worker that dies within this many seconds of its start died "quickly": the delay before
# its restart doubles (0.25, 0.5, 1, 2 s), and after MAX_QUICK_DEATHS quick deaths in a
# row the server stops: a worker that crashes as it starts must not spin.
STABLE_SECONDS = 30.0
FIRST_RESTART_DELAY = 0.25
MAX_QUICK_DEATHS = 4
# What a worker sends on its control socket once it serves.
READY = b"ready\n"
# After the drain a worker may take (--shutdown-timeout), this much longer before it is
# killed: a worker that hangs must not keep the supervisor and its ports.
STOP_MARGIN_SECONDS = 15.0
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


# -- the worker's side ------------------------------------------------------------------


@dataclass
class SupervisorLink:
    """A worker's end of its control socket: it says when the worker serves, and reads
    end-of-file when the supervisor is gone."""

    index: int
    control: socket.socket

    def started(self, loop: asyncio.AbstractEventLoop, on_gone: Callable[[], None]) -> None:
        """The worker serves: tell the supervisor, then call `on_gone` (once) if it goes."""
        self.control.sendall(READY)
        self.control.setblocking(False)

        def readable() -> None:
            try:
                data = self.control.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self.control.fileno())
                log.warning("the supervisor is gone: draining")
                on_gone()

        loop.add_reader(self.control.fileno(), readable)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """`python -m serving.workers`: one worker, as the supervisor starts it."""
    parser = argparse.ArgumentParser(prog="python -m serving.workers", description=__doc__)
    parser.add_argument("--index", type=int, required=True, help="this worker's index")
    parser.add_argument("--control-fd", type=int, required=True, help="the control socket")
    parser.add_argument("--config", required=True, help="the ServerConfig, as JSON")
    args = parser.parse_args(argv)
    config = decode_config(args.config)
    configure_logging(config.log_level, config.log_format, worker=args.index)
    link = SupervisorLink(args.index, socket.socket(fileno=args.control_fd))
    try:
        return asyncio.run(serve(config, link))
    except (StartupError, DeviceUnavailable) as error:
        log.error("refusing to start: %s", error)
        return 1


def encode_config(config: ServerConfig) -> str:
    return json.dumps(
        {item.name: _plain(getattr(config, item.name)) for item in fields(config)},
        separators=(",", ":"),
    )


def decode_config(text: str) -> ServerConfig:
    """`encode_config`'s inverse: paths come back as Paths."""
    values = json.loads(text)
    hints = typing.get_type_hints(ServerConfig)
    for name, value in values.items():
        if value is not None and Path in (hints[name], *typing.get_args(hints[name])):
            values[name] = Path(value)
    return ServerConfig(**values)


def _plain(value: object) -> object:
    return os.fspath(value) if isinstance(value, Path) else value


# -- ports ------------------------------------------------------------------------------


@dataclass
class Reservation:
    """A port held, bound with SO_REUSEPORT on every address of a host, never listening:
    connections go to the workers' listening sockets only."""

    port: int
    sockets: list[socket.socket]

    def close(self) -> None:
        for held in self.sockets:
            held.close()


def reserve_port(host: str, port: int, what: str) -> Reservation:
    """Hold `port` (0: one the kernel picks, the same on every address) on each address
    `host` resolves to, as the workers' listeners will bind it; like grpc, one address
    that binds is enough. StartupError (`what`: the error's start) if none does: a port
    someone listens on without SO_REUSEPORT cannot be bound with it."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise StartupError(f"{what}: {error.strerror}") from error
    held: list[socket.socket] = []
    problem = "no address"
    for family, kind, protocol, _, address in addresses:
        reserved = socket.socket(family, kind, protocol)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            reserved.bind((address[0], port, *address[2:]))
        except OSError as error:
            reserved.close()
            problem = error.strerror or str(error)
            continue
        port = reserved.getsockname()[1]
        held.append(reserved)
    if not held:
        raise StartupError(f"{what}: {problem}")
    return Reservation(port, held)


# -- the supervisor ---------------------------------------------------------------------


@dataclass(eq=False)
class WorkerProcess:
    index: int
    process: asyncio.subprocess.Process
    control: socket.socket  # the supervisor's end
    started_at: float  # time.monotonic()
    readiness: asyncio.Task[bool] | None = None  # True once it serves; False: it exited first
    gone: bool = False  # its exit was accounted for

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    @property
    def ready(self) -> bool:
        return self.readiness is not None and self.readiness.done() and self.readiness.result()


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    """Starts `count` workers on the ports it reserved, restarts those that die, forwards
    signals to them and serves their summed metrics; see the module docstring."""

    def __init__(self, config: ServerConfig, count: int) -> None:
        self.config = config
        self.count = count
        self.workers: list[WorkerProcess | None] = [None] * count
        self.grpc_port = config.grpc_port
        self.stopping = False
        self.failed: str | None = None  # why the supervisor exits 1
        self.metrics: SupervisorMetrics | None = None
        self._signals = 0
        self._forwarded: set[int] = set()  # the stop signals sent to the workers
        self._stopped = asyncio.Event()
        self._reservations: list[Reservation] = []
        self._multiprocess_dir: Path | None = None
        self._worker_config = ""

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, self._on_stop_signal, number)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            self._prepare()
            await self._start_workers()
            keepers = (
                []
                if self.stopping
                else [asyncio.create_task(self._keep(index)) for index in range(self.count)]
            )
            await self._stopped.wait()
            await self._wait_for_workers()
            await asyncio.gather(*keepers)
        finally:
            self._clean_up()
        if self.failed:
            log.error("stopped: %s", self.failed)
            return 1
        log.info("stopped: every worker has finished")
        return 0

    def _prepare(self) -> None:
        """Reserve the ports, make the metrics directory, serve /metrics."""
        config = self.config
        grpc = reserve_port(
            config.host, config.grpc_port, f"cannot listen on {config.grpc_address}"
        )
        self._reservations.append(grpc)
        self.grpc_port = grpc.port
        if config.http_port:  # 0: HTTP off
            where = f"cannot listen on {config.host}:{config.http_port} (HTTP)"
            self._reservations.append(reserve_port(config.host, config.http_port, where))
        if config.metrics_port:
            self._multiprocess_dir = Path(tempfile.mkdtemp(prefix="mnist37-metrics-"))
            log.info("the workers' metrics in %s (removed at exit)", self._multiprocess_dir)
        self.metrics = SupervisorMetrics(self._multiprocess_dir)
        if config.metrics_port:
            try:
                self.metrics.serve(config.metrics_host, config.metrics_port)
            except OSError as error:
                raise StartupError(
                    f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: "
                    f"{error.strerror}"
                ) from error
        # The workers' own config: the gRPC port resolved, one process each.
        self._worker_config = encode_config(replace(config, grpc_port=grpc.port, workers="1"))

    async def _start_workers(self) -> None:
        first = await self._spawn(0)
        if not await first.readiness:
            code = await first.process.wait()
            await self._exited(first)
            if not self.stopping:
                self._fail(f"worker 0 {describe_exit(code)} before it served")
            return
        others = []
        for index in range(1, self.count):
            if self.stopping:
                return
            others.append(await self._spawn(index))
        for worker in others:
            if not await worker.readiness and not self.stopping:
                self._fail(
                    f"worker {worker.index} {describe_exit(await worker.process.wait())} "
                    "before it served"
                )
        if self.stopping:
            return
        config = self.config
        log.info(
            "%d workers serving on %s:%d (gRPC), %s (HTTP), metrics on %s",
            self.count,
            config.host,
            self.grpc_port,
            f"{config.host}:{config.http_port}" if config.http_port else "off",
            f"{config.metrics_host}:{config.metrics_port}" if config.metrics_port else "off",
        )

    async def _spawn(self, index: int) -> WorkerProcess:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env.pop(MULTIPROCESS_ENV, None)
        if self._multiprocess_dir is not None:
            env[MULTIPROCESS_ENV] = str(self._multiprocess_dir)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "serving.workers",
                "--index",
                str(index),
                "--control-fd",
                str(theirs.fileno()),
                "--config",
                self._worker_config,
                pass_fds=(theirs.fileno(),),
                env=env,
                # Its own process group: a terminal's Ctrl-C reaches the supervisor only.
                process_group=0,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        worker = WorkerProcess(index, process, ours, time.monotonic())
        worker.readiness = asyncio.create_task(self._serves(worker))
        self.workers[index] = worker
        self._count_workers()
        log.info("started worker %d (pid %d)", index, process.pid)
        if self.stopping:  # a stop came while it started: it missed the signal
            self._forwarded.add(signal.SIGTERM)
            self._signal(worker, signal.SIGTERM)
        return worker

    async def _serves(self, worker: WorkerProcess) -> bool:
        """Whether `worker` came to serve: its READY, or end-of-file when it exits first
        (its end of the socket closes with it)."""
        loop = asyncio.get_running_loop()
        received = b""
        while not received.endswith(READY):
            data = await loop.sock_recv(worker.control, len(READY))
            if not data:
                return False
            received += data
        log.info("worker %d (pid %d) serves", worker.index, worker.pid)
        return True

    async def _keep(self, index: int) -> None:
        """Restart worker `index` whenever it dies, until a stop."""
        quick_deaths = 0
        while True:
            worker = self.workers[index]
            code = await worker.process.wait()
            await self._exited(worker)
            if self.stopping:
                return
            lived = time.monotonic() - worker.started_at
            quick_deaths = quick_deaths + 1 if lived < STABLE_SECONDS else 1
            if quick_deaths > MAX_QUICK_DEATHS:
                self._fail(
                    f"worker {index} died {quick_deaths} times in a row, each within "
                    f"{STABLE_SECONDS:g} s of its start (last: it {describe_exit(code)})"
                )
                return
            delay = FIRST_RESTART_DELAY * 2 ** (quick_deaths - 1)
            log.error(
                "worker %d (pid %d) %s after %.1f s: restarting it in %.2f s",
                index,
                worker.pid,
                describe_exit(code),
                lived,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopped.wait()
            if self.stopping:
                return
            self.metrics.restarts.inc()
            await self._spawn(index)

    async def _exited(self, worker: WorkerProcess) -> None:
        """Account once for a worker that has exited."""
        if worker.gone:
            return
        worker.gone = True
        await worker.readiness  # done: the worker's end of the socket closed with it
        worker.control.close()
        self.metrics.worker_exited(worker.pid)
        self._count_workers()
        code = worker.process.returncode
        if self.stopping:
            # Killed by a stop signal it was sent: it had no handler for it, so it was not
            # serving (not started yet, or its drain done and its event loop closed).
            stopped = code == 0 or -code in self._forwarded
            level = logging.INFO if stopped else logging.ERROR
            log.log(level, "worker %d (pid %d) %s", worker.index, worker.pid, describe_exit(code))
            if not stopped and worker.ready and not self.failed:
                self.failed = f"worker {worker.index} {describe_exit(code)} while stopping"

    def _count_workers(self) -> None:
        running = [worker for worker in self.workers if worker is not None and worker.running]
        self.metrics.workers.set(len(running))

    def _fail(self, reason: str) -> None:
        """Stop everything: the supervisor will exit 1 for `reason`."""
        log.error("%s: stopping the server", reason)
        self.failed = reason
        self._stop(signal.SIGTERM)

    def _on_stop_signal(self, number: int) -> None:
        name = signal.Signals(number).name
        self._signals += 1
        if self._signals == 1:
            log.info("%s received: the workers drain", name)
        else:
            log.warning("second %s: the workers stop without waiting", name)
        self._stop(number)

    def _stop(self, number: int) -> None:
        self.stopping = True
        self._forwarded.add(number)
        for worker in self.workers:
            self._signal(worker, number)
        self._stopped.set()

    def _on_sighup(self) -> None:
        log.info("SIGHUP received: every worker scans the model repository")
        for worker in self.workers:
            self._signal(worker, signal.SIGHUP)

    @staticmethod
    def _signal(worker: WorkerProcess | None, number: int) -> None:
        if worker is not None and worker.running:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(number)

    async def _wait_for_workers(self) -> None:
        """Until every worker has exited; past the longest drain, kill those left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_timeout + STOP_MARGIN_SECONDS
        while running := [w for w in self.workers if w is not None and w.running]:
            left = deadline - loop.time()
            if left <= 0:
                for worker in running:
                    log.error(
                        "worker %d (pid %d) did not stop: killing it", worker.index, worker.pid
                    )
                    self.failed = self.failed or f"worker {worker.index} did not stop in time"
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
                await asyncio.gather(*(worker.process.wait() for worker in running))
                break
            waits = [asyncio.ensure_future(worker.process.wait()) for worker in running]
            await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        for worker in self.workers:
            if worker is not None:
                await self._exited(worker)

    def _clean_up(self) -> None:
        for reservation in self._reservations:
            reservation.close()
        if self.metrics is not None:
            self.metrics.close()
        if self._multiprocess_dir is not None:
            shutil.rmtree(self._multiprocess_dir, ignore_errors=True)


def supervise(config: ServerConfig, count: int) -> int:
    """Run `count` workers for `config` until stopped; the exit status."""
    return asyncio.run(Supervisor(config, count).run())


if __name__ == "__main__":
    sys.exit(worker_main())
