"""Coverage-guided fuzzing (atheris, libFuzzer) of what the server decodes from clients:
ModelInfer requests (bytes -> protobuf -> images), Classifier requests (-> pixels or PNGs,
decoded the MNIST way) and IDX files (the client and training read them).

The only acceptable outcomes are a result or the typed refusal the server maps to a status
code (InvalidInput, protobuf's DecodeError, IdxError); anything else is a crash that
libFuzzer reports with the input that caused it.

    python tests/fuzz/fuzz_decoding.py -runs=20000 CORPUS_DIR          # a bounded run
    python tests/fuzz/fuzz_decoding.py -max_total_time=3600 CORPUS_DIR  # a long one

An empty CORPUS_DIR is first seeded with one valid input of each kind, so the fuzzer starts
from requests that get past the protobuf parser and the headers; libFuzzer adds each new
input that reaches new code to it.

`make test` runs a short bounded run (tests/integration/test_fuzz.py).
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    from google.protobuf.message import DecodeError

    from serving.classifier import decode_images
    from serving.codecs import decode_infer_request
    from serving.errors import InvalidInput
    from serving.generated.inference import grpc_service_pb2 as pb
    from serving.generated.mnist37.v1 import classifier_pb2 as cpb
    from serving.idx import IdxError, decompress_if_gzip, images_to_idx, parse_images
    from serving.imaging import PngLimits

# Small limits keep each input cheap, so the fuzzer tries many.
LIMITS = PngLimits(image_pixels=64 * 64, request_pixels=4 * 64 * 64)
MAX_IMAGES = 16


def check_count(count: int, field: str) -> None:
    if count > MAX_IMAGES:
        raise InvalidInput(f"{field}: {count} images exceed {MAX_IMAGES}")


def fuzz_infer_request(data: bytes) -> None:
    with contextlib.suppress(DecodeError, InvalidInput):
        decode_infer_request(pb.ModelInferRequest.FromString(data), check_count)


def fuzz_classify_request(data: bytes) -> None:
    try:
        request = cpb.ClassifyRequest.FromString(data)
        check_count(len(request.images), "images")
        decode_images(list(request.images), LIMITS)
    except (DecodeError, InvalidInput):
        pass


def fuzz_png(data: bytes) -> None:
    image = cpb.Image(png=b"\x89PNG\r\n\x1a\n" + data)  # past the signature check
    with contextlib.suppress(InvalidInput):
        decode_images([image], LIMITS)


def fuzz_idx(data: bytes) -> None:
    with contextlib.suppress(IdxError):
        parse_images(decompress_if_gzip(data, "<fuzz>"))


TARGETS = (fuzz_infer_request, fuzz_classify_request, fuzz_png, fuzz_idx)


def one_input(data: bytes) -> None:
    """The first byte picks the decoder, the rest is its input."""
    if data:
        TARGETS[data[0] % len(TARGETS)](data[1:])


def seeds() -> list[bytes]:
    """One valid input of each kind, with its selector byte."""
    image = bytes(range(256)) * 3 + bytes(16)
    infer = pb.ModelInferRequest(model_name="mnist37")
    infer.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28])
    infer.raw_input_contents.append(image)
    typed = pb.ModelInferRequest()
    typed.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28])
    typed.inputs[0].contents.uint_contents.extend(image)
    classify = cpb.ClassifyRequest(images=[cpb.Image(pixels=image)])
    png = _small_png()
    idx = images_to_idx(np.frombuffer(image * 2, np.uint8).reshape(2, 28, 28))
    return [
        bytes([0]) + infer.SerializeToString(),
        bytes([0]) + typed.SerializeToString(),
        bytes([1]) + classify.SerializeToString(),
        bytes([1]) + cpb.ClassifyRequest(images=[cpb.Image(png=png)]).SerializeToString(),
        bytes([2]) + png[8:],
        bytes([3]) + idx,
    ]


def _small_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    stroke = np.zeros((20, 20), np.uint8)
    stroke[3:17, 8:12] = 255
    Image.fromarray(stroke).save(buffer, format="PNG")
    return buffer.getvalue()


def seed(directory: Path) -> None:
    if directory.is_dir() and not any(directory.iterdir()):
        for number, data in enumerate(seeds()):
            (directory / f"seed-{number}").write_bytes(data)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        if not argument.startswith("-"):
            seed(Path(argument))
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
