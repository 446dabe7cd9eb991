"""The web page's files (serving/web/) keep their promises: nothing from another origin,
no inline script or style (the Content-Security-Policy forbids them), every control
labelled, every file in the package data, and the facts app.js repeats from Python (the
colour scale, the image sizes, the MNIST recipe's constants) the same as there."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from html.parser import HTMLParser

import pytest
from helpers import REPO_ROOT

from serving import explain_render, imaging
from serving.contract import IMAGE_SIDE
from serving.rest.web import WEB_FILES

WEB = REPO_ROOT / "serving" / "web"
FILES = sorted(path.name for path in WEB.iterdir())
SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # a name, never fetched


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self.elements and self.elements[-1][0] == "script":
            self.script_text += data.strip()


def elements() -> _Elements:
    parser = _Elements()
    parser.feed((WEB / "index.html").read_text())
    return parser


def test_the_served_set_is_the_directory():
    assert sorted(name for name, _ in WEB_FILES.values()) == FILES


@pytest.mark.parametrize("name", FILES)
def test_nothing_comes_from_another_origin(name):
    text = (WEB / name).read_text().replace(SVG_NAMESPACE, "")
    assert not re.search(r"\b(https?|wss?|ftp):", text, re.I), name  # no absolute URL
    assert not re.search(r"//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name  # nor //host/...
    assert "@import" not in text and "@font-face" not in text and "url(" not in text, name


def test_no_inline_script_or_style_and_every_control_labelled():
    parsed = elements()
    tags = [tag for tag, _ in parsed.elements]
    assert "style" not in tags
    assert parsed.script_text == ""  # scripts come from files only
    for tag, attributes in parsed.elements:
        assert "style" not in attributes, tag
        assert not [name for name in attributes if name.startswith("on")], tag
        if tag == "script":
            assert attributes["src"] == "/app.js"
    labels = {attributes["for"] for tag, attributes in parsed.elements if tag == "label"}
    controls = [a["id"] for tag, a in parsed.elements if tag in ("input", "select", "textarea")]
    assert controls and set(controls) <= labels
    assert ("html", {"lang": "en"}) in parsed.elements
    live = [a for _, a in parsed.elements if a.get("id") == "result"]
    assert live and live[0]["aria-live"] == "polite"


def test_the_pad_takes_every_pointer_itself():
    css = (WEB / "style.css").read_text()
    assert re.search(r"\.pad\s*\{[^}]*touch-action:\s*none", css)
    script = (WEB / "app.js").read_text()
    for event in ("pointerdown", "pointermove", "pointerup", "pointercancel"):
        assert f'"{event}"' in script


def _js_constant(name: str) -> str:
    match = re.search(rf"^const {name} = (.+?);", (WEB / "app.js").read_text(), re.M | re.S)
    assert match, name
    return match.group(1)


def test_app_js_repeats_pythons_facts():
    colours = re.findall(r'"(#[0-9a-f]{6})"', _js_constant("RDBU"))
    assert tuple(colours) == explain_render._RDBU
    assert int(_js_constant("SIDE")) == IMAGE_SIDE
    assert int(_js_constant("DIGIT_BOX")) == imaging.DIGIT_BOX
    assert int(_js_constant("INK_THRESHOLD")) == imaging.INK_THRESHOLD
    assert int(_js_constant("SCALE")) == explain_render.SCALE
    panel = str(IMAGE_SIDE * explain_render.SCALE)
    canvases = {a["id"]: a for tag, a in elements().elements if tag == "canvas"}
    for name in ("seen", "votes", "weights"):
        assert canvases[name]["width"] == canvases[name]["height"] == panel, name


def test_every_file_is_package_data():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["serving"]
    for name in FILES:
        assert any(fnmatch.fnmatch(f"web/{name}", pattern) for pattern in patterns), name
