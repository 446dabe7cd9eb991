"""The data: the shipped 3s and 7s, full-MNIST directories, the split, make-default, download."""

from __future__ import annotations

import gzip
import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from serving.idx import images_to_idx, labels_to_idx, write_idx
from training.data import (
    CANONICAL_NAMES,
    DEFAULT_DATA_DIR,
    DataError,
    load_dataset,
    split_train_validation,
)
from training.datasets_cli import main as data_main
from training.datasets_cli import make_default
from training.download import DownloadError, RemoteFile, download_mnist

SHIPPED_FILES = [f"{name}.gz" for name in CANONICAL_NAMES]


# --- the shipped dataset ---------------------------------------------------------------


def test_shipped_dataset_holds_all_3s_and_7s_of_its_sources() -> None:
    data = load_dataset()
    assert data.train_images.shape == (2102, 28, 28)
    assert data.test_images.shape == (2038, 28, 28)
    assert data.train_images.dtype == data.train_labels.dtype == np.uint8
    assert np.bincount(data.train_labels, minlength=10)[[3, 7]].tolist() == [1032, 1070]
    assert np.bincount(data.test_labels, minlength=10)[[3, 7]].tolist() == [1010, 1028]
    assert set(np.unique(data.test_labels)) == {3, 7}
    assert 0 < data.train_images.mean() < 255  # real pixels, not a blank placeholder


def test_checksums_are_sha256_of_the_decompressed_files() -> None:
    data = load_dataset()
    assert sorted(data.checksums) == sorted(CANONICAL_NAMES)
    for name, digest in data.checksums.items():
        decompressed = gzip.decompress((DEFAULT_DATA_DIR / f"{name}.gz").read_bytes())
        assert hashlib.sha256(decompressed).hexdigest() == digest


def test_shipped_files_match_their_sha256sums() -> None:
    listed = {}
    for line in (DEFAULT_DATA_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        listed[name] = digest
    assert sorted(listed) == sorted(SHIPPED_FILES)
    for name, digest in listed.items():
        assert hashlib.sha256((DEFAULT_DATA_DIR / name).read_bytes()).hexdigest() == digest


def test_shipped_readme_credits_mnist() -> None:
    readme = (DEFAULT_DATA_DIR / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme
    assert "LeCun" in readme
    assert "make-default" in readme


def test_make_default_reproduces_the_shipped_files_byte_for_byte(tmp_path: Path) -> None:
    # The shipped files are their own source (they keep the canonical names): filtering is
    # a no-op, so regenerating must give the same bytes if the output is deterministic.
    make_default(DEFAULT_DATA_DIR, tmp_path)
    for name in [*SHIPPED_FILES, "SHA256SUMS"]:
        assert (tmp_path / name).read_bytes() == (DEFAULT_DATA_DIR / name).read_bytes(), name


# --- full-MNIST directories --------------------------------------------------------------


def write_mnist_dir(
    directory: Path, train_count: int = 60, test_count: int = 40, compress: bool = True
) -> dict[str, np.ndarray]:
    """A tiny MNIST-format directory with all ten digits; each image's pixels encode its index."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    arrays = {}
    for prefix, count in (("train", train_count), ("t10k", test_count)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(count)
        images[:, 14, 14] = labels * 20
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images_to_idx(images))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels_to_idx(labels))
        arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"] = images, labels
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_full_mnist_directory_keeps_only_3s_and_7s_in_order(tmp_path: Path, compress: bool):
    write_mnist_dir(tmp_path, compress=compress)
    data = load_dataset(tmp_path)
    assert data.train_labels.tolist() == [3, 7] * 6
    assert data.train_images[:, 0, 0].tolist() == [i for i in range(60) if i % 10 in (3, 7)]
    assert data.test_labels.tolist() == [3, 7] * 4
    assert data.source == tmp_path


def test_missing_file_is_named(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\.gz"):
        load_dataset(tmp_path)


def test_images_and_labels_of_different_lengths_are_rejected(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels_to_idx(np.zeros(59, np.uint8)))
    with pytest.raises(DataError, match="60 images but train-labels-idx1-ubyte holds 59"):
        load_dataset(tmp_path)


def test_corrupt_file_in_a_data_dir_is_named(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated"):
        load_dataset(tmp_path)


def test_file_that_disagrees_with_sha256sums_is_rejected(tmp_path: Path) -> None:
    make_default(DEFAULT_DATA_DIR, tmp_path)
    load_dataset(tmp_path)  # intact: loads
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    swapped = gzip.decompress(labels.read_bytes())
    swapped = swapped[:8] + bytes(10 - b for b in swapped[8:])  # 3 <-> 7: a mislabeled file
    write_idx(labels, swapped)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: sha256 .*SHA256SUMS"):
        load_dataset(tmp_path)


def test_directory_without_both_digits_is_rejected(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels_to_idx(np.full(40, 3, np.uint8)))
    with pytest.raises(DataError, match="test set has no images of digit 7"):
        load_dataset(tmp_path)


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no-such-dir: no such data directory"):
        load_dataset(tmp_path / "no-such-dir")


def test_make_default_filters_a_full_source(tmp_path: Path) -> None:
    arrays = write_mnist_dir(tmp_path / "source")
    written = make_default(tmp_path / "source", tmp_path / "out")
    assert sorted(path.name for path in written) == sorted(
        [*SHIPPED_FILES, "SHA256SUMS", "README.md"]
    )
    data = load_dataset(tmp_path / "out")
    keep = np.isin(arrays["train_labels"], (3, 7))
    np.testing.assert_array_equal(data.train_images, arrays["train_images"][keep])
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme
    assert "| 12 | 6 | 6 |" in readme  # 60 training images -> 6 threes and 6 sevens


def test_make_default_command_reports_a_missing_source(tmp_path: Path, capsys) -> None:
    assert data_main(["make-default", "--source", str(tmp_path), "--dest", str(tmp_path)]) == 1
    assert "missing train-images-idx3-ubyte.gz" in capsys.readouterr().err


# --- the split ---------------------------------------------------------------------------


def labelled_ids(threes: int = 500, sevens: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """'Images' that are their own index, so a split can be checked for loss and overlap."""
    labels = np.array([3] * threes + [7] * sevens, dtype=np.uint8)
    order = np.random.default_rng(1).permutation(len(labels))
    return np.arange(len(labels)), labels[order]


def test_split_is_a_stratified_partition() -> None:
    ids, labels = labelled_ids()
    train_ids, train_labels, valid_ids, valid_labels = split_train_validation(ids, labels, 0.2, 0)
    assert sorted([*train_ids, *valid_ids]) == ids.tolist()
    assert np.bincount(valid_labels)[[3, 7]].tolist() == [100, 60]
    assert np.bincount(train_labels)[[3, 7]].tolist() == [400, 240]
    np.testing.assert_array_equal(labels[valid_ids], valid_labels)
    np.testing.assert_array_equal(labels[train_ids], train_labels)
    assert (np.diff(train_ids) > 0).all() and (np.diff(valid_ids) > 0).all()  # order kept


def test_split_depends_on_the_seed_only() -> None:
    ids, labels = labelled_ids()
    first = split_train_validation(ids, labels, 0.2, seed=5)
    again = split_train_validation(ids, labels, 0.2, seed=5)
    other = split_train_validation(ids, labels, 0.2, seed=6)
    np.testing.assert_array_equal(first.validation_images, again.validation_images)
    assert not np.array_equal(first.validation_images, other.validation_images)


def test_split_of_the_shipped_data() -> None:
    data = load_dataset()
    split = split_train_validation(data.train_images, data.train_labels, 0.2, 37)
    assert len(split.train_labels) + len(split.validation_labels) == 2102
    assert np.bincount(split.validation_labels)[[3, 7]].tolist() == [206, 214]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_fractions_outside_zero_one(fraction: float) -> None:
    ids, labels = labelled_ids()
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_train_validation(ids, labels, fraction, 0)


# --- download ----------------------------------------------------------------------------


class MirrorHandler(BaseHTTPRequestHandler):
    """Serves `server.files`, honouring `Range: bytes=N-`; `server.cut` stops a body early."""

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Range")))
        body = self.server.files.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and self.server.ranges:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start : self.server.cut or None])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    server.files, server.requests, server.ranges, server.cut = {}, [], True, 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def remote(name: str, body: bytes) -> RemoteFile:
    return RemoteFile(name, len(body), hashlib.sha256(body).hexdigest())


def url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/mnist/"


def closed_port_url() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    port = server.server_address[1]
    server.server_close()
    return f"http://127.0.0.1:{port}/"


BODY = bytes(range(256)) * 400


def test_download_verifies_and_skips_files_already_there(tmp_path: Path, mirror) -> None:
    mirror.files["a.gz"] = BODY
    files = [remote("a.gz", BODY)]
    [path] = download_mnist(tmp_path, [url(mirror)], files, progress=False)
    assert path.read_bytes() == BODY
    download_mnist(tmp_path, [url(mirror)], files, progress=False)
    assert len(mirror.requests) == 1  # the verified file was not fetched again


def test_download_falls_back_to_the_next_mirror(tmp_path: Path, mirror) -> None:
    mirror.files["a.gz"] = BODY
    download_mnist(tmp_path, [closed_port_url(), url(mirror)], [remote("a.gz", BODY)], 5, False)
    assert (tmp_path / "a.gz").read_bytes() == BODY


def test_interrupted_download_resumes_with_a_range_request(tmp_path: Path, mirror) -> None:
    mirror.files["a.gz"] = BODY
    mirror.cut = 40_000
    with pytest.raises(DownloadError, match=r"40000 bytes kept in .*a\.gz\.part, run again"):
        download_mnist(tmp_path, [url(mirror)], [remote("a.gz", BODY)], progress=False)
    assert not (tmp_path / "a.gz").exists()
    mirror.cut = 0
    download_mnist(tmp_path, [url(mirror)], [remote("a.gz", BODY)], progress=False)
    assert mirror.requests[-1] == ("/mnist/a.gz", "bytes=40000-")
    assert (tmp_path / "a.gz").read_bytes() == BODY
    assert not (tmp_path / "a.gz.part").exists()


def test_resume_restarts_when_the_server_ignores_ranges(tmp_path: Path, mirror) -> None:
    mirror.files["a.gz"], mirror.ranges = BODY, False
    (tmp_path / "a.gz.part").write_bytes(BODY[:1000])
    download_mnist(tmp_path, [url(mirror)], [remote("a.gz", BODY)], progress=False)
    assert (tmp_path / "a.gz").read_bytes() == BODY


def test_download_with_a_wrong_checksum_keeps_nothing(tmp_path: Path, mirror) -> None:
    mirror.files["a.gz"] = BODY[::-1]
    with pytest.raises(DownloadError, match=r"a\.gz: sha256 .*, expected"):
        download_mnist(tmp_path, [url(mirror)], [remote("a.gz", BODY)], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_download_without_network_fails_cleanly(tmp_path: Path, capsys) -> None:
    dest = tmp_path / "mnist"
    code = data_main(["download", "--dest", str(dest), "--mirror", closed_port_url()])
    err = capsys.readouterr().err
    assert code == 1
    assert "could not download train-images-idx3-ubyte.gz" in err
    assert "unreachable" in err
    assert "Traceback" not in err
    assert list(dest.iterdir()) == []


def test_download_fetches_the_four_files_the_loader_reads() -> None:
    from training.download import CANONICAL_FILES

    assert [file.name for file in CANONICAL_FILES] == SHIPPED_FILES
    assert all(len(file.sha256) == len(file.raw_sha256) == 64 for file in CANONICAL_FILES)
