"""The web page at `GET /`: draw a digit, see the 28x28 image the model gets, its answer
and each pixel's vote (docs/serving.md#the-web-page).

The page is a fixed set of files shipped inside the package (`serving/web/`, package data
in pyproject.toml), read once when the server starts and answered from memory. Each URL
path is mapped to one named file: no part of a request's path ever reaches the file
system, so there is nothing to traverse, and any other path is the usual 404.

The files carry no secret, so they are served without a token even with
`--auth-token-file` (a browser cannot send one when it opens a page); the page asks for
the token and sends it with its API calls (docs/security.md). Every answer has its
content type, `nosniff`, and a Content-Security-Policy that lets the page load and call
nothing but this origin, with no inline script or style. `Cache-Control: no-cache` with an
ETag: a browser asks again each time and gets a 304 while the file is unchanged, so a
newer server's page is never stale and an unchanged one costs no body.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from serving.rest.edge import HttpCall, Route

RPC = "WebPage"  # the `rpc` label of every file's requests: one fixed value
WEB_PACKAGE = "serving"
WEB_DIRECTORY = "web"

# URL path -> (file in serving/web/, content type). The whole set: nothing else is served.
WEB_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

# Only this origin, for everything (scripts, styles, images, fetch); no plugins, no
# <base>, no form posts, and no framing by other sites (clickjacking).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class WebFile:
    body: bytes
    content_type: str
    etag: str  # a strong ETag: the quoted start of the body's sha256

    @classmethod
    def load(cls, name: str, content_type: str) -> WebFile:
        body = resources.files(WEB_PACKAGE).joinpath(WEB_DIRECTORY, name).read_bytes()
        return cls(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')

    def headers(self) -> dict[str, str]:
        return {**_SECURITY_HEADERS, "ETag": self.etag}


class WebPage:
    """The page's files, read from the package now (a missing one fails the start)."""

    def __init__(self) -> None:
        self.files = {
            path: WebFile.load(name, content_type)
            for path, (name, content_type) in WEB_FILES.items()
        }

    def routes(self) -> list[Route]:
        return [Route("GET", path, RPC, self._handler(path), public=True) for path in self.files]

    def _handler(self, path: str):
        served = self.files[path]

        async def serve(request: web.Request, call: HttpCall) -> web.Response:
            if _matches(request.headers.get("If-None-Match"), served.etag):
                return web.Response(status=304, headers=served.headers())
            # In the headers: aiohttp's content_type= argument takes no charset parameter.
            headers = {**served.headers(), "Content-Type": served.content_type}
            return web.Response(body=served.body, headers=headers)

        return serve


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (or is `*`); weak forms count too,
    as RFC 9110 compares them for GET."""
    if not if_none_match:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags
