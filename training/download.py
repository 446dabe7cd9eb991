"""Download the four canonical MNIST files from the public mirrors the field uses.

Each file is fetched into `NAME.part`, resumed with an HTTP Range request when a previous
attempt left one, checked against its published size and SHA-256, and only then renamed
to `NAME`. Without network every mirror fails and `DownloadError` says so; nothing
half-downloaded ever carries the final name.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

# PyTorch's mirror first (torchvision), then TensorFlow's; yann.lecun.com now mostly refuses.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_CHUNK = 1 << 16


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str  # of the file as served (gzip)
    raw_sha256: str = ""  # of its decompressed bytes: what `load_dataset` records


CANONICAL_FILES = (
    RemoteFile(
        "train-images-idx3-ubyte.gz",
        9_912_422,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    RemoteFile(
        "train-labels-idx1-ubyte.gz",
        28_881,
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        1_648_877,
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        4_542,
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
)


class DownloadError(Exception):
    """No mirror delivered a file with the expected checksum."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_into(url: str, partial: Path, size: int, timeout: float, progress: bool) -> None:
    """Append the rest of `url` to `partial`, starting where it ends (HTTP Range)."""
    offset = partial.stat().st_size if partial.exists() else 0
    if offset >= size:
        return
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range header: start over
        with (
            open(partial, "ab" if offset else "wb") as out,
            tqdm(
                total=size,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=partial.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    received = partial.stat().st_size
    if received < size:
        raise ConnectionError(f"the connection closed after {received} of {size} bytes")


def download_file(
    remote: RemoteFile,
    dest: Path,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """One verified file in `dest`, from the first mirror that delivers it intact."""
    target = dest / remote.name
    if target.is_file() and file_sha256(target) == remote.sha256:
        return target
    partial = dest / f"{remote.name}.part"
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + remote.name
        try:
            fetch_into(url, partial, remote.size, timeout, progress)
        except (OSError, http.client.HTTPException) as error:
            failures.append(f"{url}: {_describe(error)}")
            continue
        digest = file_sha256(partial)
        if digest != remote.sha256:
            partial.unlink()
            failures.append(f"{url}: sha256 {digest}, expected {remote.sha256}")
            continue
        os.replace(partial, target)
        return target
    kept = (
        f"; {partial.stat().st_size} bytes kept in {partial}, run again to resume"
        if partial.exists()
        else ""
    )
    raise DownloadError(
        f"could not download {remote.name}{kept}:\n  " + "\n  ".join(failures or ["no mirrors"])
    )


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        return f"unreachable ({error.reason})"
    return str(error) or type(error).__name__


def download_mnist(
    dest: Path,
    mirrors: Sequence[str] = MIRRORS,
    files: Sequence[RemoteFile] = CANONICAL_FILES,
    timeout: float = 30.0,
    progress: bool = True,
) -> list[Path]:
    """The canonical MNIST files in `dest`, downloaded and verified where missing."""
    dest.mkdir(parents=True, exist_ok=True)
    return [download_file(remote, dest, mirrors, timeout, progress) for remote in files]
