"""Dynamic batching for one model version.

Requests queue up; whenever no onnxruntime call is running for this model version, the
queued requests (up to `max_batch_size` images) run as one call in a worker thread, so the
event loop never blocks. An idle batcher starts at once, so a lone request pays no delay;
under concurrency, what arrives while a call runs forms the next batch. With a positive
`max_queue_delay` a batch that is not full also waits up to that long for company.

A request larger than `max_batch_size` is split into chunks that queue like requests of
their own; in the Triton statistics it still counts as one request, with its chunks'
durations summed. A request that is cancelled, or whose deadline passes, while queued is
dropped before its batch is built. Each caller gets exactly its own rows, in order.

The queue is bounded in images and in requests (admission control): a request that would
take it past either bound is refused at once with `Overloaded`, whole, before any of it
queues, so a burst costs bounded memory and the requests admitted keep a bounded wait.

After each successful call, `on_batch` gets the batch's image count, the queue wait of every
queued item in it (a request, or one chunk of a split request) and the call's duration.

With `inline_below_s`, a batch whose onnxruntime call is expected to take less than that
runs on the event loop itself: handing a call to a worker thread and its answer back costs
about 100-200 us of CPU here (two thread wake-ups), more than the linear model takes for 64
images. The expectation comes from the calls of the batch's size class (powers of two),
measured on every call (`_EXPECTATION_RISE`); a size class not seen yet runs in a worker
thread first. So a slow graph, a large batch or a GPU keep the loop free, and a fast one stops
paying for the hop. The batch then starts at the end of the current loop iteration, so the
requests that arrived together still join one batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial

import numpy as np

from serving.errors import DeadlineExpired, Overloaded
from serving.stats import InferenceStats, SplitRequestDurations

# What a graph gives for a batch: arrays with one row per image, (probability, digit) for
# the serving graph, five arrays for the explanation graph; each caller gets its rows of each.
Prediction = tuple[np.ndarray, ...]
PredictFunction = Callable[[np.ndarray], Prediction]
# (images in the batch, each queued item's wait in seconds, onnxruntime seconds)
BatchListener = Callable[[int, list[float], float], None]
# A size class's expected call duration is the fastest call seen, allowed to rise by this
# factor at each call so that a graph that became slower is noticed within a few dozen
# calls. The fastest, not the average: a call in a worker thread also counts its wait for
# the GIL while the event loop is busy, which is not the call's own cost.
_EXPECTATION_RISE = 1.05


@dataclass(slots=True)
class _Queued:
    images: np.ndarray
    future: asyncio.Future[Prediction]
    enqueued_ns: int
    deadline: float | None
    split: SplitRequestDurations | None = None  # set on the chunks of a split request


class DynamicBatcher:
    def __init__(
        self,
        predict: PredictFunction,
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        max_queued_images: int | None = None,
        max_queued_requests: int | None = None,
        stats: InferenceStats | None = None,
        on_batch: BatchListener | None = None,
        inline_below_s: float = 0.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        # 0: every call in a worker thread (tests, a graph of unknown cost).
        self.inline_below_ns = inline_below_s * 1e9
        # the expected onnxruntime call's ns, by the batch's size class
        self._call_ns: dict[int, float] = {}
        self._schedule_pending = False
        # None: unbounded (tests, benchmarks of the batcher alone); the server sets both.
        self.max_queued_images = max_queued_images
        self.max_queued_requests = max_queued_requests
        self._predict = predict
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.stats = stats if stats is not None else InferenceStats()
        self._on_batch = on_batch
        self._queue: deque[_Queued] = deque()
        self._queued_images = 0
        self._running = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def queued_images(self) -> int:
        return self._queued_images

    async def infer(self, images: np.ndarray, deadline: float | None = None) -> Prediction:
        """`predict`'s arrays for `images` (uint8 [N, 28, 28]), (probability, digit) for
        the serving graph. `deadline` is in `loop.time()` terms; None for no deadline."""
        count = len(images)
        self._admit(count, -(-count // self.max_batch_size))
        if count <= self.max_batch_size:
            return await self._put(images, deadline)
        durations = SplitRequestDurations()
        futures = [
            self._put(images[start : start + self.max_batch_size], deadline, durations)
            for start in range(0, count, self.max_batch_size)
        ]
        try:
            parts = [await future for future in futures]
        finally:
            for future in futures:
                future.cancel()
        self.stats.record_split_request(durations)
        return tuple(np.concatenate(chunks) for chunks in zip(*parts, strict=True))

    def _admit(self, images: int, items: int) -> None:
        """Refuse a request of `images` images (`items` queue entries once split) that
        would take the queue past its bounds. An empty queue takes any request, so one
        larger than the image bound still runs when it is alone."""
        if not self._queue:
            return
        limit_images, limit_items = self.max_queued_images, self.max_queued_requests
        too_many_images = limit_images is not None and self._queued_images + images > limit_images
        too_many_items = limit_items is not None and len(self._queue) + items > limit_items
        if too_many_images or too_many_items:
            raise Overloaded(
                f"the model's queue is full ({self._queued_images} images in "
                f"{len(self._queue)} entries waiting: requests, or chunks of larger ones; at "
                f"most {limit_images} images and {limit_items} entries, "
                "--max-queued-images/--max-queued-requests): retry later"
            )

    def _put(
        self,
        images: np.ndarray,
        deadline: float | None,
        split: SplitRequestDurations | None = None,
    ) -> asyncio.Future[Prediction]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Prediction] = loop.create_future()
        self._queue.append(_Queued(images, future, time.perf_counter_ns(), deadline, split))
        self._queued_images += len(images)
        if not self._running:
            if self.inline_below_ns:
                self._schedule_soon(loop)
            else:
                self._schedule(loop)
        return future

    def _schedule_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """`_schedule` at the end of this loop iteration: the requests handled in it queue
        first (a batch that may run inline would otherwise take only the first)."""
        if not self._schedule_pending:
            self._schedule_pending = True
            loop.call_soon(self._scheduled, loop)

    def _scheduled(self, loop: asyncio.AbstractEventLoop) -> None:
        self._schedule_pending = False
        if not self._running:
            self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start a batch now, or arm the timer that starts it when the oldest request has
        waited max_queue_delay."""
        if not self._queue:
            return
        if self.max_queue_delay_s <= 0 or self._queued_images >= self.max_batch_size:
            self._launch(loop)
            return
        waited_s = (time.perf_counter_ns() - self._queue[0].enqueued_ns) / 1e9
        if waited_s >= self.max_queue_delay_s:
            self._launch(loop)
        elif self._timer is None:
            self._timer = loop.call_later(self.max_queue_delay_s - waited_s, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if not self._running:
            self._launch(loop)

    def _launch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch: list[_Queued] = []
        batch_images = 0
        now = loop.time()
        while self._queue:
            item = self._queue[0]
            if batch and batch_images + len(item.images) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_images -= len(item.images)
            if item.future.done():
                continue  # cancelled while queued
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(DeadlineExpired("deadline passed while queued"))
                continue
            batch.append(item)
            batch_images += len(item.images)
        if not batch:
            return
        parts = [item.images for item in batch]
        if self._runs_inline(batch_images):
            self._run_inline(loop, batch, parts)
            return
        self._running = True
        start_ns = time.perf_counter_ns()
        pending = loop.run_in_executor(self._executor, _run_batch, self._predict, parts)
        pending.add_done_callback(partial(self._finish, loop, batch, start_ns))

    def _runs_inline(self, images: int) -> bool:
        """Whether a batch of `images` is expected to take less than `inline_below_s`."""
        if not self.inline_below_ns:
            return False
        expected_ns = self._call_ns.get(images.bit_length())
        return expected_ns is not None and expected_ns < self.inline_below_ns

    def _run_inline(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Queued], parts: list[np.ndarray]
    ) -> None:
        start_ns = time.perf_counter_ns()
        self._running = True
        try:
            outcome = _run_batch(self._predict, parts)
        except Exception as error:
            self._running = False
            _fail(batch, error)
        else:
            self._running = False
            self._deliver(batch, start_ns, *outcome)
        # What arrived during the call waits in grpc and aiohttp, not in the queue yet.
        self._schedule_soon(loop)

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Queued],
        start_ns: int,
        pending: asyncio.Future[tuple[Prediction, int, int]],
    ) -> None:
        self._running = False
        try:
            error = pending.exception()
        except asyncio.CancelledError as cancelled:
            error = cancelled
        if error is not None:
            _fail(batch, error)
        else:
            self._deliver(batch, start_ns, *pending.result())
        self._schedule(loop)

    def _deliver(
        self,
        batch: list[_Queued],
        start_ns: int,
        prediction: Prediction,
        input_ns: int,
        infer_ns: int,
    ) -> None:
        output_start = time.perf_counter_ns()
        offset = 0
        for item in batch:
            rows = len(item.images)
            if not item.future.done():
                item.future.set_result(tuple(array[offset : offset + rows] for array in prediction))
            offset += rows
        output_ns = time.perf_counter_ns() - output_start
        size_class = offset.bit_length()
        expected = self._call_ns.get(size_class)
        self._call_ns[size_class] = (
            infer_ns if expected is None else min(infer_ns, expected * _EXPECTATION_RISE)
        )
        waits_ns = [start_ns - item.enqueued_ns for item in batch]
        requests, requests_wait_ns = 0, 0
        for item, wait_ns in zip(batch, waits_ns, strict=True):
            split = item.split
            if split is None:
                requests += 1
                requests_wait_ns += wait_ns
            else:
                split.queue_ns += wait_ns
                split.input_ns += input_ns
                split.infer_ns += infer_ns
                split.output_ns += output_ns
        stats = self.stats
        stats.queue.add(requests_wait_ns, requests)
        stats.record_execution(offset, requests, input_ns, infer_ns, output_ns)
        if self._on_batch is not None:
            self._on_batch(offset, [wait_ns / 1e9 for wait_ns in waits_ns], infer_ns / 1e9)


def _fail(batch: list[_Queued], error: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)


def _run_batch(predict: PredictFunction, parts: list[np.ndarray]) -> tuple[Prediction, int, int]:
    """Runs in a worker thread (or inline): joins the parts, predicts, and times both steps."""
    input_start = time.perf_counter_ns()
    images = parts[0] if len(parts) == 1 else np.concatenate(parts)
    infer_start = time.perf_counter_ns()
    prediction = predict(images)
    return prediction, infer_start - input_start, time.perf_counter_ns() - infer_start
