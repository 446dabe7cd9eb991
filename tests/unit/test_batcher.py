from __future__ import annotations

import asyncio
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import run

from serving.batcher import DynamicBatcher
from serving.errors import DeadlineExpired, Overloaded


class RecordingModel:
    """probability = image id / 1000 (the first pixel row encodes the id), digit = id."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.threads: set[str] = set()
        self.gate: threading.Event | None = None

    def __call__(self, images: np.ndarray):
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(5)
        if self.delay:
            time.sleep(self.delay)
        self.batches.append(len(images))
        ids = images[:, 0, :4].astype(np.int64) @ np.array([1, 256, 65536, 0])
        return (ids / 1000).astype(np.float32), ids


def tagged(first_id: int, count: int) -> np.ndarray:
    images = np.zeros((count, 28, 28), np.uint8)
    ids = np.arange(first_id, first_id + count)
    images[:, 0, 0], images[:, 0, 1], images[:, 0, 2] = ids % 256, ids // 256 % 256, ids // 65536
    return images


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="worker") as pool:
        yield pool


def test_concurrent_callers_share_batches_and_each_gets_its_own_rows_in_order(executor):
    model = RecordingModel(delay=0.002)

    async def scenario():
        batcher = DynamicBatcher(model, executor, max_batch_size=64)
        requests = [tagged(1000 * index, 1 + index % 5) for index in range(40)]
        results = await asyncio.gather(*(batcher.infer(images) for images in requests))
        return batcher, requests, results

    batcher, requests, results = run(scenario())
    for index, (images, (probability, digit)) in enumerate(zip(requests, results, strict=True)):
        expected = np.arange(1000 * index, 1000 * index + len(images))
        np.testing.assert_array_equal(digit, expected)
        np.testing.assert_allclose(probability, expected / 1000, rtol=1e-6)
    assert sum(model.batches) == sum(len(images) for images in requests)
    assert len(model.batches) < 40, "concurrent requests should have been batched"
    assert max(model.batches) <= 64
    assert batcher.stats.inference_count == sum(model.batches)
    assert batcher.stats.execution_count == len(model.batches)
    assert batcher.stats.queue.count == 40
    assert model.threads and all(name.startswith("worker") for name in model.threads)


def test_a_lone_request_runs_at_once_without_queue_delay(executor):
    model = RecordingModel()

    async def scenario():
        batcher = DynamicBatcher(model, executor, max_batch_size=64)
        start = time.perf_counter()
        await batcher.infer(tagged(0, 1))
        return time.perf_counter() - start

    assert run(scenario()) < 0.05
    assert model.batches == [1]


def test_queue_delay_gathers_requests_into_one_batch(executor):
    model = RecordingModel()

    async def scenario():
        batcher = DynamicBatcher(model, executor, max_batch_size=64, max_queue_delay_s=0.05)
        first = asyncio.ensure_future(batcher.infer(tagged(0, 2)))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(batcher.infer(tagged(100, 3)))
        return await first, await second

    first, second = run(scenario())
    assert model.batches == [5]
    np.testing.assert_array_equal(first[1], [0, 1])
    np.testing.assert_array_equal(second[1], [100, 101, 102])


def test_a_request_larger_than_the_batch_is_split_not_rejected(executor):
    model = RecordingModel()

    async def scenario():
        batcher = DynamicBatcher(model, executor, max_batch_size=8)
        return await batcher.infer(tagged(0, 30))

    _, digit = run(scenario())
    np.testing.assert_array_equal(digit, np.arange(30))
    assert sorted(model.batches) == [6, 8, 8, 8]


def test_the_event_loop_keeps_running_while_the_model_computes(executor):
    model = RecordingModel(delay=0.2)

    async def scenario():
        batcher = DynamicBatcher(model, executor, max_batch_size=8)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(ticker())
        await batcher.infer(tagged(0, 1))
        task.cancel()
        return ticks

    assert run(scenario()) >= 10


def test_cancelled_and_expired_requests_are_dropped_from_the_batch(executor):
    model = RecordingModel()
    model.gate = threading.Event()

    async def scenario():
        loop = asyncio.get_running_loop()
        batcher = DynamicBatcher(model, executor, max_batch_size=64)
        blocker = asyncio.ensure_future(batcher.infer(tagged(0, 1)))
        await asyncio.sleep(0.01)  # the first batch is now running and held by the gate
        cancelled = asyncio.ensure_future(batcher.infer(tagged(100, 4)))
        expired = asyncio.ensure_future(batcher.infer(tagged(200, 2), deadline=loop.time()))
        kept = asyncio.ensure_future(batcher.infer(tagged(300, 3)))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        model.gate.set()
        await blocker
        with pytest.raises(DeadlineExpired):
            await expired
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        return await kept

    _, digit = run(scenario())
    np.testing.assert_array_equal(digit, [300, 301, 302])
    assert model.batches == [1, 3]


def test_a_model_error_reaches_every_caller_and_the_batcher_recovers(executor):
    calls = []

    def flaky(images):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return np.zeros(len(images), np.float32), np.full(len(images), 3, np.int64)

    async def scenario():
        batcher = DynamicBatcher(flaky, executor, max_batch_size=4)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.infer(tagged(0, 2))
        return await batcher.infer(tagged(0, 2))

    assert run(scenario())[1].tolist() == [3, 3]


def test_every_queued_request_reports_its_own_wait(executor):
    model = RecordingModel()
    model.gate = threading.Event()
    reports: list[tuple[int, list[float], float]] = []

    def on_batch(batch_size: int, queue_seconds: list[float], infer_seconds: float) -> None:
        reports.append((batch_size, queue_seconds, infer_seconds))

    async def scenario():
        batcher = DynamicBatcher(model, executor, max_batch_size=8, on_batch=on_batch)
        blocker = asyncio.ensure_future(batcher.infer(tagged(0, 1)))
        await asyncio.sleep(0.01)  # the first batch runs, held by the gate
        waiting = []
        for index in range(3):
            waiting.append(asyncio.ensure_future(batcher.infer(tagged(100 * index, 2))))
            await asyncio.sleep(0.02)
        split = asyncio.ensure_future(batcher.infer(tagged(1000, 10)))  # chunks of 8 and 2
        await asyncio.sleep(0.01)
        model.gate.set()
        await asyncio.gather(blocker, *waiting, split)
        return batcher

    batcher = run(scenario())
    assert [(size, len(waits)) for size, waits, _ in reports] == [(1, 1), (6, 3), (8, 1), (2, 1)]
    _, waits, infer_seconds = reports[1]
    # queued 20 ms apart, oldest first: each request's own wait, not only the oldest one's;
    # each chunk of the split request reports its own wait too
    assert waits == sorted(waits, reverse=True)
    assert all(earlier - later >= 0.015 for earlier, later in itertools.pairwise(waits))
    assert waits[2] >= 0.02 and infer_seconds >= 0
    every_wait = [wait for _, report_waits, _ in reports for wait in report_waits]
    assert reports[3][1][0] > reports[2][1][0] > 0
    # the Triton statistics count the split request once, with its chunks' waits summed
    assert len(every_wait) == 6 and batcher.stats.queue.count == 5
    assert batcher.stats.queue.ns == pytest.approx(sum(every_wait) * 1e9, abs=10)


def test_a_split_request_counts_once_with_its_chunks_durations_summed(executor):
    async def scenario():
        batcher = DynamicBatcher(RecordingModel(), executor, max_batch_size=64)
        await batcher.infer(tagged(0, 200))  # chunks of 64, 64, 64 and 8
        await batcher.infer(tagged(0, 5))
        return batcher.stats

    stats = run(scenario())
    assert (stats.execution_count, stats.inference_count) == (5, 205)
    assert {size: batch.compute_infer.count for size, batch in stats.batches.items()} == {
        64: 3,
        8: 1,
        5: 1,
    }
    batches = stats.batches.values()
    for kind in ("compute_input", "compute_infer", "compute_output"):
        request_level = getattr(stats, kind)
        assert request_level.count == 2, kind
        # each request took the whole time of every execution it was part of
        assert request_level.ns == sum(getattr(batch, kind).ns for batch in batches), kind
    assert stats.queue.count == 2


def test_a_split_request_that_fails_is_not_counted(executor):
    model = RecordingModel()
    calls = itertools.count()

    def fail_the_second_chunk(images):
        if next(calls) == 1:
            raise RuntimeError("onnxruntime failed")
        return model(images)

    async def scenario():
        batcher = DynamicBatcher(fail_the_second_chunk, executor, max_batch_size=64)
        with pytest.raises(RuntimeError):
            await batcher.infer(tagged(0, 200))
        return batcher.stats

    stats = run(scenario())
    assert stats.queue.count == stats.compute_infer.count == 0
    assert stats.execution_count >= 1, "the first chunk ran and is counted as an execution"


def test_a_full_queue_refuses_at_once_and_admits_again_once_it_drains(executor):
    model = RecordingModel()
    model.gate = threading.Event()

    async def scenario():
        batcher = DynamicBatcher(
            model, executor, max_batch_size=4, max_queued_images=6, max_queued_requests=3
        )
        running = asyncio.ensure_future(batcher.infer(tagged(0, 4)))
        await asyncio.sleep(0.01)  # the first batch runs (held by the gate): not queued
        queued = [asyncio.ensure_future(batcher.infer(tagged(10, 3)))]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="3 images in 1 entries waiting"):
            await batcher.infer(tagged(20, 4))  # 3 + 4 images > 6
        queued.append(asyncio.ensure_future(batcher.infer(tagged(30, 2))))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="at most 6 images and 3 entries"):
            await batcher.infer(tagged(40, 5))  # split into 2 chunks: 2 + 2 > 3 requests
        queued.append(asyncio.ensure_future(batcher.infer(tagged(50, 1))))
        await asyncio.sleep(0)
        assert batcher.queued_images == 6
        with pytest.raises(Overloaded):
            await batcher.infer(tagged(60, 1))  # 3 requests waiting already
        model.gate.set()
        answers = await asyncio.gather(running, *queued)
        alone = await batcher.infer(tagged(70, 9))  # an empty queue takes even 9 > 6 images
        return answers, alone

    answers, alone = run(scenario())
    assert [digit.tolist() for _, digit in answers] == [[0, 1, 2, 3], [10, 11, 12], [30, 31], [50]]
    assert alone[1].tolist() == list(range(70, 79))


def test_any_number_of_outputs_is_batched_split_and_delivered_row_for_row(executor):
    """The explanation graph gives five arrays, one of them [N, 28, 28]: each caller still
    gets exactly its rows of each, a split request its chunks joined."""

    def explain(images: np.ndarray) -> tuple[np.ndarray, ...]:
        probability, ids = RecordingModel()(images)
        votes = images.astype(np.float32)
        return votes, -probability, ids.astype(np.float32), probability, ids

    async def scenario():
        batcher = DynamicBatcher(explain, executor, max_batch_size=8)
        requests = [tagged(100 * index, count) for index, count in enumerate((1, 3, 20))]
        return requests, await asyncio.gather(*(batcher.infer(images) for images in requests))

    requests, results = run(scenario())
    for images, (votes, negated, as_float, probability, ids) in zip(requests, results, strict=True):
        expected_ids = tagged_ids(images)
        np.testing.assert_array_equal(votes, images.astype(np.float32))
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(as_float, expected_ids.astype(np.float32))
        np.testing.assert_array_equal(negated, -probability)


def tagged_ids(images: np.ndarray) -> np.ndarray:
    return images[:, 0, :3].astype(np.int64) @ np.array([1, 256, 65536])


def test_a_fast_graph_runs_on_the_event_loop_once_its_calls_are_known(executor):
    """With inline_below_s, the first call of a size class runs in a worker thread (its
    duration is not known yet), the next ones on the loop's own thread; answers are the
    same, and concurrent callers still share batches."""
    model = RecordingModel()

    async def scenario():
        batcher = DynamicBatcher(model, executor, max_batch_size=64, inline_below_s=1.0)
        first = await batcher.infer(tagged(0, 3))
        threads = set(model.threads)
        second = await batcher.infer(tagged(10, 3))
        requests = [tagged(1000 * index, 3) for index in range(1, 21)]
        results = await asyncio.gather(*(batcher.infer(images) for images in requests))
        return threads, first, second, results

    threads, first, second, results = run(scenario())
    assert len(threads) == 1 and threads.pop().startswith("worker")
    assert threading.main_thread().name in model.threads  # the second call, inline
    np.testing.assert_array_equal(first[1], [0, 1, 2])
    np.testing.assert_array_equal(second[1], [10, 11, 12])
    for index, (_, digit) in enumerate(results, start=1):
        np.testing.assert_array_equal(digit, np.arange(1000 * index, 1000 * index + 3))
    # 20 requests handled in one loop iteration joined one batch of 60 images.
    assert model.batches == [3, 3, 60]


def test_a_slow_graph_keeps_running_in_worker_threads(executor):
    model = RecordingModel(delay=0.02)

    async def scenario():
        batcher = DynamicBatcher(model, executor, max_batch_size=8, inline_below_s=0.001)
        for index in range(4):
            await batcher.infer(tagged(index, 1))

    run(scenario())
    assert model.threads and all(name.startswith("worker") for name in model.threads)


def test_an_inline_call_that_fails_reaches_its_callers_and_the_batcher_recovers(executor):
    calls = []

    def flaky(images):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:  # the first inline call
            raise RuntimeError("boom")
        return np.zeros(len(images), np.float32), np.full(len(images), 7, np.int64)

    async def scenario():
        batcher = DynamicBatcher(flaky, executor, max_batch_size=4, inline_below_s=1.0)
        await batcher.infer(tagged(0, 2))
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.infer(tagged(0, 2))
        return await batcher.infer(tagged(0, 2))

    assert run(scenario())[1].tolist() == [7, 7]
    assert calls[0].startswith("worker") and calls[1] == threading.main_thread().name


def test_a_split_request_runs_its_chunks_inline_one_loop_iteration_apart(executor):
    """Each chunk is its own call: between two, the loop serves others (a ticker here)."""
    model = RecordingModel()
    ticks = []

    async def scenario():
        batcher = DynamicBatcher(model, executor, max_batch_size=8, inline_below_s=1.0)
        await batcher.infer(tagged(0, 8))  # the size class of a chunk, measured

        async def ticker():
            while True:
                ticks.append(len(model.batches))
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        answer = await batcher.infer(tagged(100, 40))
        task.cancel()
        return answer

    _, digit = run(scenario())
    np.testing.assert_array_equal(digit, np.arange(100, 140))
    assert model.batches == [8] * 6
    assert len(set(ticks)) >= 4, "the loop ran between the chunks"
