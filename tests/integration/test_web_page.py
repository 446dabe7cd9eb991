"""The web page's files over HTTP from the real server: a fixed set, each with its content
type, security headers and cache validation; nothing else reachable through their paths;
served without a token; and shipped in the wheel, so a non-editable install has them.
(The page itself, in a browser: tests/integration/test_browser.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator

import pytest
from helpers import REPO_ROOT, http_call

from serving.launcher import ServerProcess, free_port, start_server
from serving.rest.web import CONTENT_SECURITY_POLICY, WEB_FILES

WEB = REPO_ROOT / "serving" / "web"
TOKEN = "web-token-1"


@pytest.fixture(scope="module")
def server_with_metrics(model_repository, tmp_path_factory) -> Iterator[tuple[ServerProcess, int]]:
    metrics_port = free_port()
    running = start_server(
        model_repository, tmp_path_factory.mktemp("logs"), "--metrics-port", str(metrics_port)
    )
    try:
        yield running, metrics_port
    finally:
        running.terminate()


@pytest.fixture(scope="module")
def server(server_with_metrics) -> ServerProcess:
    return server_with_metrics[0]


def get(server: ServerProcess, path: str, method: str = "GET", **headers: str):
    return http_call(server.http_address, method, path, headers=headers)


@pytest.mark.parametrize("path", sorted(WEB_FILES))
def test_each_file_is_served_with_its_type_and_security_headers(server, path):
    name, content_type = WEB_FILES[path]
    status, headers, body = get(server, path)
    assert status == 200
    assert body == (WEB / name).read_bytes()
    assert headers["content-type"] == content_type
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-cache"
    etag = headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    # Revalidation: the same ETag is a 304 without a body; another is the file again.
    status, again, body = get(server, path, **{"If-None-Match": etag})
    assert (status, body, again["etag"]) == (304, b"", etag)
    status, _, body = get(server, path, **{"If-None-Match": f'"other", W/{etag}'})
    assert status == 304
    status, _, body = get(server, path, **{"If-None-Match": '"other"'})
    assert status == 200 and body == (WEB / name).read_bytes()
    # HEAD: the headers, no body.
    status, head, body = get(server, path, "HEAD")
    assert (status, body, head["content-type"], head["etag"]) == (200, b"", content_type, etag)


def test_the_page_names_only_files_the_server_serves():
    html = (WEB / "index.html").read_text()
    for path in ("/app.js", "/style.css", "/favicon.svg"):
        assert f'"{path}"' in html
    assert set(WEB_FILES) == {"/", *(f"/{f.name}" for f in WEB.iterdir() if f.name != "index.html")}


@pytest.mark.parametrize(
    "path",
    [
        "/index.html",
        "/web/app.js",
        "/serving/web/app.js",
        "/../pyproject.toml",
        "/%2e%2e/pyproject.toml",
        "/app.js/../../serving/server.py",
        "/..%2fserving%2fserver.py",
        "/app.js%00",
        "//etc/passwd",
        "/rest/web.py",
    ],
)
def test_no_other_path_reaches_a_file(server, path):
    status, headers, body = get(server, path)
    assert status == 404, (path, body[:200])
    assert headers["content-type"] == "application/json"
    assert "no endpoint" in json.loads(body)["error"]


def test_the_files_take_only_get_and_head(server):
    status, headers, _ = http_call(server.http_address, "POST", "/", b"{}")
    assert status == 405 and headers["allow"] == "GET, HEAD"


def web_requests(server: ServerProcess, metrics_port: int) -> tuple[float, str]:
    """`mnist37_requests_total` of the page's files (answered OK), and all the metrics."""
    status, _, body = http_call(f"127.0.0.1:{metrics_port}", "GET", "/metrics")
    assert status == 200
    text = body.decode()
    series = 'mnist37_requests_total{code="OK",model="",protocol="http",rpc="WebPage",version=""} '
    values = [float(line[len(series) :]) for line in text.splitlines() if line.startswith(series)]
    return (values[0] if values else 0.0), text


def test_requests_for_the_page_are_counted_under_one_rpc_name(server_with_metrics):
    server, metrics_port = server_with_metrics
    before, _ = web_requests(server, metrics_port)
    for path in WEB_FILES:
        assert get(server, path)[0] == 200
    assert get(server, "/nope.js")[0] == 404
    after, text = web_requests(server, metrics_port)
    assert after - before == len(WEB_FILES)
    assert "nope" not in text  # an unknown path is "_unknown", as for every endpoint


@pytest.mark.parametrize("protect_health", [False, True])
def test_with_tokens_the_page_is_open_and_the_api_is_not(
    model_repository, tmp_path, protect_health
):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    flags = ["--auth-token-file", str(tokens)] + (["--protect-health"] if protect_health else [])
    metadata = [("authorization", f"Bearer {TOKEN}")]
    server = start_server(model_repository, tmp_path, *flags, metadata=metadata)
    try:
        for path in WEB_FILES:
            status, _, _ = get(server, path)
            assert status == 200, path  # no secret in them, and a browser sends no token
        status, headers, _ = get(server, "/v2")
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        status, _, _ = get(server, "/v2", Authorization=f"Bearer {TOKEN}")
        assert status == 200
    finally:
        assert server.terminate() == 0, server.log()


def test_the_wheel_ships_the_page(tmp_path):
    """A non-editable install has the files: they are package data of the wheel."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source)
    for package in ("serving", "training", "protos"):
        shutil.copytree(
            REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    completed = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--no-index", "--wheel-dir", str(tmp_path / "wheels")),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr
    (wheel,) = (tmp_path / "wheels").glob("mnist37-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for name, _ in WEB_FILES.values():
            assert archive.read(f"serving/web/{name}") == (WEB / name).read_bytes(), name
