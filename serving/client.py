"""A small client for the mnist37 server, and `mnist37-client`.

mnist37-client classify digit.png other.png          # PNGs, any size or mode
mnist37-client classify t10k-images-idx3-ubyte.gz    # every image of an IDX file
mnist37-client classify --check IMAGES_IDX --labels LABELS_IDX   # accuracy + latency
mnist37-client explain digit.png --out explanation.png   # the pixel votes, as a picture
mnist37-client explain digit.png other.png --out pictures/   # one picture per image
mnist37-client --channels 16 classify --check IMAGES_IDX --labels LABELS_IDX \
    --batch-size 1 --concurrency 16        # 16 requests in flight over 16 connections
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from serving.codecs import decode_infer_response
from serving.console import console_script
from serving.contract import DIGIT, IMAGE_SIDE, IMAGES
from serving.explain_render import render_explanation
from serving.generated.inference import grpc_service_pb2 as oip_pb
from serving.generated.inference import grpc_service_pb2_grpc as oip_grpc
from serving.generated.mnist37.v1 import classifier_pb2 as classifier_pb
from serving.generated.mnist37.v1 import classifier_pb2_grpc as classifier_grpc
from serving.idx import IdxError, read_images, read_labels
from serving.imaging import PNG_SIGNATURE
from serving.repository import DEFAULT_MODEL_NAME
from serving.settings import POSITIVE, parse_as

DEFAULT_SERVER = "127.0.0.1:8001"
DEFAULT_BATCH_SIZE = 256
PICTURE_SUFFIX = ".explained.png"
"""What `explain` names a picture in a directory: `digit.png` -> `digit.explained.png`."""


@dataclass(frozen=True)
class Prediction:
    digit: int
    probability_seven: float
    model_name: str
    model_version: str


@dataclass(frozen=True)
class Explanation:
    """One image's prediction as pixel votes: logit = contributions.sum() + bias_term."""

    pixels: np.ndarray  # uint8 [28, 28]: the image as the server saw it (a PNG converted)
    contributions: np.ndarray  # float32 [28, 28]: each pixel's vote, > 0 says 7
    bias_term: float
    logit: float
    probability_seven: float
    digit: int
    model_name: str
    model_version: str


class Mnist37Client:
    """Blocking client for both APIs. Use as a context manager or call `close()`.

    One channel is one connection, which a server with `--workers N` gives to one of its
    workers. With `channels` > 1 the client opens that many connections and takes them in
    turn, call by call, so that its requests spread over the workers."""

    def __init__(self, target: str = DEFAULT_SERVER, timeout: float = 30.0, channels: int = 1):
        options = channel_options(channels)
        self.channels = [grpc.insecure_channel(target, options=options) for _ in range(channels)]
        self.channel = self.channels[0]
        self.timeout = timeout
        self._stubs = [
            (classifier_grpc.ClassifierStub(channel), oip_grpc.GRPCInferenceServiceStub(channel))
            for channel in self.channels
        ]
        self.classifier, self.inference = self._stubs[0]
        self._turns = itertools.cycle(self._stubs)
        self._turn_lock = threading.Lock()  # calls may come from several threads

    def __enter__(self) -> Mnist37Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def _next_stubs(
        self,
    ) -> tuple[classifier_grpc.ClassifierStub, oip_grpc.GRPCInferenceServiceStub]:
        """The next channel's stubs (the only one's, with one channel)."""
        with self._turn_lock:
            return next(self._turns)

    def classify(
        self,
        images: Sequence[bytes | np.ndarray],
        model_name: str = "",
        model_version: str = "",
    ) -> list[Prediction]:
        """Classify images given as PNG bytes, 784 raw bytes or uint8 [28, 28] arrays."""
        request = _classify_request(images, model_name, model_version)
        response = self._next_stubs()[0].Classify(request, timeout=self.timeout)
        return [
            Prediction(p.digit, p.probability_seven, p.model_name, p.model_version)
            for p in response.predictions
        ]

    def explain(
        self,
        images: Sequence[bytes | np.ndarray],
        model_name: str = "",
        model_version: str = "",
    ) -> list[Explanation]:
        """Explain the predictions for images given as `classify` takes them."""
        request = _classify_request(images, model_name, model_version)
        response = self._next_stubs()[0].Explain(request, timeout=self.timeout)
        return [
            Explanation(
                pixels=_grid(e.pixels, np.uint8, "pixels"),
                contributions=_grid(e.contributions, np.dtype("<f4"), "contributions"),
                bias_term=e.bias_term,
                logit=e.logit,
                probability_seven=e.probability_seven,
                digit=e.digit,
                model_name=e.model_name,
                model_version=e.model_version,
            )
            for e in response.explanations
        ]

    def infer(
        self,
        images: np.ndarray,
        model_name: str = DEFAULT_MODEL_NAME,
        model_version: str = "",
        outputs: Sequence[str] = (),
        raw: bool = True,
        request_id: str = "",
    ) -> dict[str, np.ndarray]:
        """ModelInfer on uint8 [N, 28, 28]; returns the outputs by name."""
        request = infer_request(images, model_name, model_version, outputs, raw, request_id)
        response = self._next_stubs()[1].ModelInfer(request, timeout=self.timeout)
        return decode_infer_response(response)


def channel_options(channels: int = 1) -> list[tuple[str, int]]:
    """The client's channel arguments, for one of `channels` channels to one server."""
    options = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]
    if channels > 1:
        # grpc shares one connection between channels with the same target and arguments
        # (its process-wide subchannel pool): a pool of each channel's own makes each one
        # open a connection of its own.
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


def infer_request(
    images: np.ndarray,
    model_name: str = DEFAULT_MODEL_NAME,
    model_version: str = "",
    outputs: Sequence[str] = (),
    raw: bool = True,
    request_id: str = "",
) -> oip_pb.ModelInferRequest:
    """A ModelInfer request for uint8 [N, 28, 28] images, raw or typed."""
    request = oip_pb.ModelInferRequest(
        model_name=model_name, model_version=model_version, id=request_id
    )
    tensor = request.inputs.add(name=IMAGES.name, datatype=IMAGES.datatype, shape=images.shape)
    if raw:
        request.raw_input_contents.append(np.ascontiguousarray(images, np.uint8).tobytes())
    else:
        tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def _classify_request(
    images: Sequence[bytes | np.ndarray], model_name: str, model_version: str
) -> classifier_pb.ClassifyRequest:
    """The request Classify and Explain take: PNG bytes, 784 raw bytes or uint8 arrays."""
    request = classifier_pb.ClassifyRequest(model_name=model_name, model_version=model_version)
    for image in images:
        if isinstance(image, np.ndarray):
            request.images.add(pixels=np.ascontiguousarray(image, dtype=np.uint8).tobytes())
        elif image.startswith(PNG_SIGNATURE):
            request.images.add(png=image)
        else:
            request.images.add(pixels=image)
    return request


def _grid(data: bytes, dtype: np.dtype, field: str) -> np.ndarray:
    """An answer's 28x28 array from its raw bytes, row-major."""
    dtype = np.dtype(dtype)
    expected = IMAGE_SIDE * IMAGE_SIDE * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"the server sent {len(data)} bytes of {field}, not {expected}")
    return np.frombuffer(data, dtype).reshape(IMAGE_SIDE, IMAGE_SIDE)


def _load_images(path: Path) -> list[bytes | np.ndarray]:
    data = path.read_bytes()
    if data.startswith(PNG_SIGNATURE):
        return [data]
    try:
        return list(read_images(path))
    except IdxError as error:
        raise IdxError(f"{path}: neither a PNG nor an IDX images file ({error})") from error


def _label(path: Path, index: int, count: int) -> str:
    """How a line names an image: the file's name, with the index of an IDX file's image."""
    return path.name if count == 1 else f"{path.name}[{index}]"


def _classify_files(client: Mnist37Client, files: Sequence[Path], args) -> int:
    for path in files:
        images = _load_images(path)
        for start in range(0, len(images), args.batch_size):
            chunk = images[start : start + args.batch_size]
            predictions = client.classify(chunk, args.model, args.model_version)
            for offset, prediction in enumerate(predictions):
                label = _label(path, start + offset, len(images))
                print(
                    f"{label}\tdigit={prediction.digit}\tP(7)={prediction.probability_seven:.4f}"
                    f"\tmodel={prediction.model_name}/{prediction.model_version}"
                )
    return 0


@dataclass(frozen=True)
class _ToExplain:
    """One image for `explain`: how its line names it, and where its picture goes."""

    label: str
    image: bytes | np.ndarray
    picture: Path


def _pictures(files: Sequence[Path], out: Path) -> list[_ToExplain]:
    """Every image of `files`, with where its picture goes: `out` itself for a lone image
    (unless `out` is a directory), else `out/<file stem>[-<index>].explained.png`, the
    index for the images of an IDX file. Two images may not share a picture."""
    loaded = [(path, _load_images(path)) for path in files]
    into_directory = out.is_dir() or sum(len(images) for _, images in loaded) > 1
    todo = [
        _ToExplain(
            _label(path, index, len(images)),
            image,
            out / _picture_name(path, index, len(images)) if into_directory else out,
        )
        for path, images in loaded
        for index, image in enumerate(images)
    ]
    named: dict[Path, str] = {}
    for item in todo:
        if item.picture in named:
            raise ValueError(
                f"{named[item.picture]} and {item.label} would both be drawn to {item.picture}"
            )
        named[item.picture] = item.label
    if into_directory:
        out.mkdir(parents=True, exist_ok=True)
    return todo


def _picture_name(path: Path, index: int, count: int) -> str:
    return f"{path.stem}{PICTURE_SUFFIX}" if count == 1 else f"{path.stem}-{index}{PICTURE_SUFFIX}"


def _explain_files(client: Mnist37Client, files: Sequence[Path], args) -> int:
    todo = _pictures(files, args.out)
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start : start + args.batch_size]
        explanations = client.explain(
            [item.image for item in chunk], args.model, args.model_version
        )
        for item, e in zip(chunk, explanations, strict=True):
            render_explanation(
                e.pixels, e.contributions, e.logit, e.probability_seven, e.digit, item.picture
            )
            print(
                f"{item.label}\tdigit={e.digit}\tP(7)={e.probability_seven:.4f}"
                f"\tlogit={e.logit:+.3f}\tbias={e.bias_term:+.3f}"
                f"\tmodel={e.model_name}/{e.model_version}\tpicture={item.picture}"
            )
    return 0


def _check(images_path: Path, labels_path: Path, args) -> int:
    """Accuracy, latency and throughput: every image sent once, in --batch-size requests,
    --concurrency of them in flight over --channels connections."""
    images = read_images(images_path)
    labels = read_labels(labels_path).astype(np.int64)
    if len(images) != len(labels):
        raise IdxError(f"{len(images)} images but {len(labels)} labels")
    chunks = [
        images[start : start + args.batch_size] for start in range(0, len(images), args.batch_size)
    ]
    start_all = time.perf_counter()
    digits, latencies = asyncio.run(_infer_all(chunks, args))
    elapsed = time.perf_counter() - start_all
    correct = int((np.concatenate(digits) == labels).sum())
    latency_ms = np.array(latencies) * 1000
    print(f"accuracy {correct / len(labels):.6f} ({correct}/{len(labels)})")
    print(
        f"requests {len(latencies)} of up to {args.batch_size} images, {args.concurrency} at "
        f"a time over {args.channels} channel(s): p50 {np.percentile(latency_ms, 50):.2f} ms, "
        f"p99 {np.percentile(latency_ms, 99):.2f} ms, {len(images) / elapsed:.0f} images/s"
    )
    return 0


async def _infer_all(chunks: list[np.ndarray], args) -> tuple[list[np.ndarray], list[float]]:
    """Each chunk's digits and seconds, sent by --concurrency tasks that take the channels
    in turn. grpc.aio, not the blocking API: one event loop drives every channel, where
    blocking channels would each need a thread of their own to wait on."""
    model = args.model or DEFAULT_MODEL_NAME
    options = channel_options(args.channels)
    channels = [
        grpc.aio.insecure_channel(args.server, options=options) for _ in range(args.channels)
    ]
    stubs = itertools.cycle([oip_grpc.GRPCInferenceServiceStub(channel) for channel in channels])
    digits: list[np.ndarray] = [np.zeros(0, np.int64)] * len(chunks)
    latencies = [0.0] * len(chunks)
    todo = iter(range(len(chunks)))  # shared: each chunk is sent once

    async def send() -> None:
        for index in todo:
            request = infer_request(chunks[index], model, args.model_version, [DIGIT.name])
            begin = time.perf_counter()
            response = await next(stubs).ModelInfer(request, timeout=args.timeout)
            latencies[index] = time.perf_counter() - begin
            digits[index] = decode_infer_response(response)[DIGIT.name]

    try:
        await asyncio.gather(*(send() for _ in range(min(args.concurrency, len(chunks)))))
    finally:
        for channel in channels:
            await channel.close()
    return digits, latencies


def _add_connection_arguments(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--server, --timeout and --channels; without `defaults` a value given here
    overrides, and an absent one leaves the main parser's value alone."""
    server_default = os.environ.get("MNIST37_SERVER", DEFAULT_SERVER)
    parser.add_argument(
        "--server",
        default=server_default if defaults else argparse.SUPPRESS,
        help=f"host:port of the gRPC server [MNIST37_SERVER; default {DEFAULT_SERVER}]",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0 if defaults else argparse.SUPPRESS,
        help="seconds per request (default 30)",
    )
    parser.add_argument(
        "--channels",
        type=parse_as(int, POSITIVE),
        default=1 if defaults else argparse.SUPPRESS,
        help="gRPC connections to open and take in turn: a server with --workers gives each "
        "connection to one worker (default 1)",
    )


def _add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """What `classify` and `explain` share: the connection, the model, the batch size."""
    _add_connection_arguments(parser, defaults=False)  # also accepted after the command
    parser.add_argument("--model", default="", help=f"model name (default {DEFAULT_MODEL_NAME})")
    parser.add_argument("--model-version", default="", help="version (default: newest)")
    parser.add_argument(
        "--batch-size",
        type=parse_as(int, POSITIVE),
        default=DEFAULT_BATCH_SIZE,
        help=f"images per request (default {DEFAULT_BATCH_SIZE})",
    )


def build_parser() -> argparse.ArgumentParser:
    """By hand, not `serving.settings`: a subcommand with positional files, --server and
    --timeout accepted on both sides of it, and --check that needs --labels."""
    parser = argparse.ArgumentParser(prog="mnist37-client", description=__doc__.splitlines()[0])
    _add_connection_arguments(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)
    classify = commands.add_parser("classify", help="classify PNG or IDX files")
    _add_image_arguments(classify)
    classify.add_argument("files", nargs="*", type=Path, help="PNG files or IDX image files")
    classify.add_argument("--check", type=Path, metavar="IMAGES_IDX", help="accuracy mode")
    classify.add_argument("--labels", type=Path, metavar="LABELS_IDX", help="labels for --check")
    classify.add_argument(
        "--concurrency",
        type=parse_as(int, POSITIVE),
        default=1,
        help="with --check: requests in flight at once, over --channels (default 1)",
    )
    explain = commands.add_parser(
        "explain", help="draw why each image is a 3 or a 7: its pixel votes, logit and P(7)"
    )
    _add_image_arguments(explain)
    explain.add_argument("files", nargs="+", type=Path, help="PNG files or IDX image files")
    explain.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        help=(
            "the picture (PNG) of a lone image; a directory for several images (created if "
            f"need be), which gets <file stem>{PICTURE_SUFFIX}, or <file stem>-<index>"
            f"{PICTURE_SUFFIX} for an IDX file's images (default: the current directory)"
        ),
    )
    return parser


@console_script
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "classify":
        if args.check and not args.labels:
            parser.error("--check needs --labels")
        if not args.check and not args.files:
            parser.error("classify needs FILE... or --check IMAGES_IDX --labels LABELS_IDX")
    try:
        if args.command == "classify" and args.check:
            return _check(args.check, args.labels, args)
        with Mnist37Client(args.server, args.timeout, args.channels) as client:
            if args.command == "explain":
                return _explain_files(client, args.files, args)
            return _classify_files(client, args.files, args)
    except grpc.RpcError as error:
        print(f"mnist37-client: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:  # IdxError is a ValueError
        print(f"mnist37-client: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
