"""The Classifier's PNG decoding is bounded: pixels per image and per request (from the
headers, before decoding), decoding threads, and work left once a request is abandoned."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from helpers import png
from PIL import Image

from serving import classifier
from serving.dataplane import DataPlane
from serving.errors import DeadlineExpired, InvalidInput
from serving.generated.mnist37.v1 import classifier_pb2 as pb
from serving.generated.mnist37.v1 import classifier_pb2_grpc as pb_grpc
from serving.imaging import PngLimits
from serving.launcher import ServerProcess, start_server
from serving.registry import ModelRegistry


def blank(width: int, height: int) -> bytes:
    return png(np.zeros((height, width), np.uint8))


def stroke() -> bytes:
    image = np.zeros((40, 40), np.uint8)
    image[5:35, 18:22] = 255
    return png(image)


class SlowDecodes:
    """Stands in for `png_to_image`: counts calls and how many run at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0
        self.running = 0
        self.most_running = 0
        self.lock = threading.Lock()

    def __call__(self, data: bytes, index: int, max_pixels: int) -> np.ndarray:
        with self.lock:
            self.calls += 1
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        return np.zeros((28, 28), np.uint8)


@pytest.fixture
def slow(monkeypatch) -> SlowDecodes:
    decodes = SlowDecodes(0.05)
    monkeypatch.setattr(classifier, "png_to_image", decodes)
    return decodes


def classification(threads: int = 1) -> classifier.Classification:
    return classifier.Classification(
        DataPlane(ModelRegistry(), 4096), PngLimits(), ThreadPoolExecutor(threads)
    )


def pngs(count: int) -> list[pb.Image]:
    return [pb.Image(png=stroke())] * count


def test_the_request_budget_is_checked_before_any_decoding(slow):
    side = 1448  # 2,096,704 pixels: within the per-image limit
    images = [pb.Image(pixels=bytes(784))] + [pb.Image(png=blank(side, side))] * 9
    with pytest.raises(InvalidInput) as raised:
        classifier.decode_images(images)
    message = str(raised.value)
    assert message.startswith("images[9].png: the request's PNGs add up to 18870336 pixels")
    assert "limit of 16777216 per request (--max-request-png-pixels)" in message
    assert slow.calls == 0
    assert classifier.decode_images(images[:9]).shape == (9, 28, 28)
    assert slow.calls == 8


def test_decoding_stops_between_images_when_asked():
    answers = iter([False, False, True])
    with pytest.raises(DeadlineExpired, match=r"images\[2\]: decoding abandoned"):
        classifier.decode_images(pngs(5), PngLimits(), lambda: next(answers))


def test_decoding_stops_at_the_deadline(slow):
    async def scenario() -> None:
        await classification().decode(pngs(100), 0.3)

    started = time.monotonic()
    with pytest.raises(DeadlineExpired):
        asyncio.run(scenario())
    assert time.monotonic() - started < 3  # all 100 would take 5 s
    assert 1 <= slow.calls <= 20, slow.calls


def test_a_cancelled_request_stops_decoding(slow):
    async def scenario() -> tuple[int, int]:
        task = asyncio.create_task(classification().decode(pngs(100), None))
        while slow.calls < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        at_cancel = slow.calls
        await asyncio.sleep(0.5)
        return at_cancel, slow.calls

    at_cancel, later = asyncio.run(scenario())
    assert later <= at_cancel + 1, (at_cancel, later)


def test_concurrent_requests_share_the_decoding_threads(slow):
    async def scenario() -> list[np.ndarray]:
        shared = classification(threads=2)
        return await asyncio.gather(*(shared.decode(pngs(3), None) for _ in range(6)))

    results = asyncio.run(scenario())
    assert [result.shape for result in results] == [(3, 28, 28)] * 6
    assert slow.calls == 18
    assert slow.most_running == 2


@pytest.fixture(scope="module")
def limited_server(model_repository, tmp_path_factory) -> Iterator[ServerProcess]:
    running = start_server(
        model_repository,
        tmp_path_factory.mktemp("logs"),
        "--max-png-pixels",
        "250000",
        "--max-request-png-pixels",
        "600000",
        "--png-threads",
        "1",
    )
    yield running
    running.terminate()


def classify(server: ServerProcess, *images: bytes) -> pb.ClassifyResponse:
    with grpc.insecure_channel(server.target) as channel:
        request = pb.ClassifyRequest(images=[pb.Image(png=image) for image in images])
        return pb_grpc.ClassifierStub(channel).Classify(request, timeout=30)


def refusal(server: ServerProcess, *images: bytes) -> str:
    with pytest.raises(grpc.RpcError) as raised:
        classify(server, *images)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return raised.value.details()


def test_the_server_applies_its_png_flags(limited_server, test_digits):
    digit = test_digits[0][0]
    big = np.asarray(Image.fromarray(digit).resize((112, 112), Image.BILINEAR))
    details = refusal(limited_server, png(255 - big), blank(501, 500))
    assert details.startswith("images[1].png: 501x500 is 250500 pixels, more than the limit")
    assert "--max-png-pixels" in details
    details = refusal(limited_server, *[blank(490, 490)] * 3)
    assert details.startswith("images[2].png: the request's PNGs add up to 720300 pixels")
    assert refusal(limited_server, png(255 - big), blank(20, 20)) == "images[1]: no ink found"

    white_on_transparent = np.zeros((112, 112, 4), np.uint8)
    white_on_transparent[..., :3] = 255
    white_on_transparent[..., 3] = big
    answers = classify(limited_server, png(big), png(255 - big), png(white_on_transparent, "RGBA"))
    assert len({(p.digit, round(p.probability_seven, 5)) for p in answers.predictions}) == 1
