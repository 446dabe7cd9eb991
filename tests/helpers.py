"""Helpers the unit and integration tests share: paths, the shipped digits, request and
PNG makers, a small HTTP client of the OIP REST API, an event-loop runner, a stand-in for
grpc.aio's servicer context and quickly trained real models (torch is imported only by the
tests that train)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from PIL import Image

from serving.generated.inference import grpc_service_pb2 as oip_pb
from serving.generated.inference import grpc_service_pb2_grpc as oip_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_SEED = 37

T = TypeVar("T")


def shipped_digit_files() -> tuple[Path, Path]:
    """The shipped 3s and 7s of MNIST's test set (images, labels)."""
    data = REPO_ROOT / "training" / "data"
    return data / "t10k-images-idx3-ubyte.gz", data / "t10k-labels-idx1-ubyte.gz"


def train_quickly(arch: str, epochs: int = 5, seed: int = TRAINING_SEED):
    """A real `arch` model ("linear" or "mlp"), trained for a few epochs on the shipped 3s
    and 7s (about a second), in eval mode."""
    from training.data import load_dataset, split_train_validation
    from training.train import TrainConfig, fit, is_seven, new_model, reproducible, to_pixels

    data = load_dataset()
    split = split_train_validation(data.train_images, data.train_labels, 0.2, seed)
    config = TrainConfig(arch=arch, epochs=epochs, seed=seed)
    with reproducible(seed):
        model = new_model(config)
        fit(
            model,
            (to_pixels(split.train_images), is_seven(split.train_labels)),
            (to_pixels(split.validation_images), is_seven(split.validation_labels)),
            config,
            progress=False,
        )
    return model.eval()


def infer_request(
    images: np.ndarray, model: str = "mnist37", version: str = "", raw: bool = True
) -> oip_pb.ModelInferRequest:
    """A ModelInfer request for uint8 [N, 28, 28] images, raw or typed."""
    request = oip_pb.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    if raw:
        request.raw_input_contents.append(images.tobytes())
    else:
        tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    return request


HEADER_LENGTH = "Inference-Header-Content-Length"


def rest_infer_body(
    images: np.ndarray,
    binary: bool = True,
    binary_outputs: bool | None = None,
    nested: bool = False,
    **fields: object,
) -> tuple[bytes, dict[str, str]]:
    """An OIP REST infer request for uint8 [N, 28, 28] images, as tritonclient.http writes
    it: the input binary (JSON header + raw bytes) or in JSON (flat, or `nested` as the
    shape); outputs binary when `binary_outputs` (default: as the input). `fields` are
    added to the request (`id`, `outputs`, `parameters`)."""
    tensor: dict[str, object] = {"name": "images", "datatype": "UINT8", "shape": list(images.shape)}
    if binary:
        tensor["parameters"] = {"binary_data_size": images.nbytes}
    else:
        tensor["data"] = images.tolist() if nested else images.reshape(-1).tolist()
    request: dict[str, object] = {"inputs": [tensor], **fields}
    wanted = binary if binary_outputs is None else binary_outputs
    request.setdefault("parameters", {"binary_data_output": wanted})
    header = json.dumps(request, separators=(",", ":")).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + images.tobytes(), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def rest_infer_outputs(body: bytes, headers: dict[str, str]) -> tuple[dict, dict[str, np.ndarray]]:
    """An OIP REST infer response: its JSON header and its outputs by name, binary or JSON."""
    length = int(headers.get(HEADER_LENGTH.lower(), len(body)))
    header = json.loads(body[:length])
    offset, outputs = length, {}
    for tensor in header["outputs"]:
        dtype = np.dtype("<f4") if tensor["datatype"] == "FP32" else np.dtype("<i8")
        size = tensor.get("parameters", {}).get("binary_data_size")
        if size is None:
            values = np.array(tensor["data"], dtype=dtype)
        else:
            values = np.frombuffer(body[offset : offset + size], dtype=dtype)
            offset += size
        outputs[tensor["name"]] = values.reshape(tensor["shape"])
    assert offset == len(body), "bytes left after the binary outputs"
    return header, outputs


def http_call(
    address: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on a new connection (HTTPS with the client context `tls`): status,
    headers (lower-case names), body."""
    host, port = address.rsplit(":", 1)
    connection = (
        http.client.HTTPConnection(host, int(port), timeout=timeout)
        if tls is None
        else http.client.HTTPSConnection(host, int(port), timeout=timeout, context=tls)
    )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def png(array: np.ndarray, mode: str = "L") -> bytes:
    """`array` (uint8, one channel) encoded as a PNG of `mode`."""
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True, timeout=60)


def _signed(directory: Path, name: str, ca: Path, ca_key: Path, extensions: str) -> None:
    """`name.pem` and `name.key` in `directory`: an EC key and a certificate `ca` signs."""
    key, request = directory / f"{name}.key", directory / f"{name}.csr"
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        request,
        "-subj",
        f"/CN={name}",
    )
    (directory / f"{name}.ext").write_text(extensions + "\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        request,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        directory / f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        directory / f"{name}.ext",
    )


def make_certificates(directory: Path) -> Path:
    """Test certificates made now with openssl: two CAs (`ca`, `other-ca`), a server
    certificate for 127.0.0.1/localhost and a client certificate signed by `ca`, and a
    client certificate signed by `other-ca`. Returns `directory`."""
    for ca in ("ca", "other-ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            directory / f"{ca}.key",
            "-out",
            directory / f"{ca}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN={ca}",
        )
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    _signed(
        directory,
        "server",
        ca,
        ca_key,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
    )
    _signed(directory, "client", ca, ca_key, "extendedKeyUsage=clientAuth")
    _signed(
        directory,
        "stranger",
        directory / "other-ca.pem",
        directory / "other-ca.key",
        "extendedKeyUsage=clientAuth",
    )
    return directory


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine to completion in a fresh event loop."""
    return asyncio.run(coroutine)


class FakeContext:
    """The little of `grpc.aio.ServicerContext` that the servicers and the edge use."""

    def __init__(self, time_remaining: float | None = None) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.remaining = time_remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()

    def code(self) -> grpc.StatusCode | None:
        return self.aborted[0] if self.aborted else None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


class MemoryCgroup:
    """A memory cgroup (v2, or v1's memory controller) that limits what runs in it to
    `limit` bytes, like a container's memory limit: past it the kernel reclaims, then kills
    (OOM). `prefix` is the command prefix that starts a process inside it. None of this
    exists without root or a writable cgroup tree: `MemoryCgroup.create` returns None then.
    """

    def __init__(self, directory: Path, version: int) -> None:
        self.directory, self.version = directory, version

    @classmethod
    def create(cls, name: str, limit: int) -> MemoryCgroup | None:
        unified = Path("/sys/fs/cgroup")
        candidates = []
        controllers = unified / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            candidates.append((unified / name, 2, "memory.max"))
        candidates.append((unified / "memory" / name, 1, "memory.limit_in_bytes"))
        for directory, version, limit_file in candidates:
            try:
                directory.mkdir(exist_ok=True)
                (directory / limit_file).write_text(str(limit))
            except OSError:
                continue
            if version == 1:
                with contextlib.suppress(OSError):  # no swap accounting: fine
                    (directory / "memory.memsw.limit_in_bytes").write_text(str(limit))
            return cls(directory, version)
        return None

    @property
    def prefix(self) -> list[str]:
        script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        return ["/bin/sh", "-c", script, str(self.directory)]

    def oom_kills(self) -> int:
        if self.version == 2:
            events = (self.directory / "memory.events").read_text().split()
        else:
            events = (self.directory / "memory.oom_control").read_text().split()
        pairs = dict(zip(events[::2], events[1::2], strict=False))
        return int(pairs.get("oom_kill", 0))

    def remove(self) -> None:
        for _ in range(50):  # its processes may take a moment to leave
            try:
                self.directory.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def peak_rss_bytes(pid: int) -> int:
    """The most resident memory process `pid` has used so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmHWM for pid {pid}")


def send_until_refused(
    channel: grpc.Channel, outcomes: Counter, lock: threading.Lock, stop: threading.Event
) -> None:
    """What a client behind a load balancer does: send 8-image ModelInfers over `channel`
    until told anything but OK (on UNAVAILABLE it would retry on another replica), or until
    `stop`. Every answer is counted in `outcomes` by its code."""
    images = np.zeros((8, 28, 28), np.uint8)
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    while not stop.is_set():
        try:
            stub.ModelInfer(infer_request(images), timeout=30)
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
        with lock:
            outcomes[code] += 1
        if code != "OK":
            return
