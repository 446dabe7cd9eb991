"""The README and docs/ stay true to the tree: every repository path and `python -m` module
they name exists, every relative link (and its #anchor) resolves, and the README stays a
one-screen start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = sorted([README, *(REPO_ROOT / "docs").glob("*.md"), REPO_ROOT / "examples" / "README.md"])
TOP_LEVEL = (
    ".ci",
    "deploy",
    "docs",
    "examples",
    "protos",
    "scripts",
    "serving",
    "tests",
    "training",
)
ROOT_FILE = re.compile(r"^(Makefile|pyproject\.toml|docker-compose[\w.]*\.yml|\.dockerignore)$")
PATH = re.compile(rf"^(?:{'|'.join(re.escape(top) for top in TOP_LEVEL)})(?:/[\w.-]*)+$")
FENCE = re.compile(r"^```.*?^```$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def named_paths(text: str) -> set[str]:
    """Repository paths in `code spans` and in code blocks (words like `serving/idx.py`,
    `training/data/`); placeholders and globs (`<model>/`, `examples/*.png`) are not."""
    inline = re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    blocks = " ".join(FENCE.findall(text)).split()
    words = {word.strip("\"'(),;:") for word in (*inline, *blocks)}
    return {word for word in words if PATH.match(word) or ROOT_FILE.match(word)}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text()), re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_named_path_exists(doc):
    text = doc.read_text()
    missing = sorted(p for p in named_paths(text) if not (REPO_ROOT / p.rstrip("/")).exists())
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"
    modules = set(re.findall(r"python -m ((?:serving|training|protos)(?:\.\w+)*)", text))
    for module in modules:
        base = REPO_ROOT / module.replace(".", "/")
        assert base.with_suffix(".py").exists() or (base / "__main__.py").exists(), module


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(doc):
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue
        path_part, _, anchor = target.partition("#")
        linked = (doc.parent / path_part).resolve() if path_part else doc
        assert linked.exists(), f"{doc.name}: broken link {target}"
        if anchor:
            assert anchor in anchors(linked), f"{doc.name}: no heading for #{anchor} in {target}"


def test_the_checker_sees_paths_and_skips_placeholders():
    text = "`serving/idx.py`, `training/data/` and `<model>/x`\n```\nls deploy/k8s\n```\n"
    found = named_paths(text)
    assert found == {"serving/idx.py", "training/data/", "deploy/k8s"}
    assert named_paths("`examples/*.png` `../shared/x` `model_repository/`") == set()
    assert slug("The model card (`model.json`)") == "the-model-card-modeljson"


def test_the_readme_is_a_short_start_with_the_two_commands_first():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail into docs/"
    assert lines[2] == "```bash"
    first = "\n".join(lines[:40])
    assert "make demo" in first and "make test" in first
    docs = {path.name for path in (REPO_ROOT / "docs").glob("*.md")}
    linked = {Path(target).name for target in LINK.findall(README.read_text())}
    assert docs - {"README.md"} <= linked, "every docs/ page is linked from the README"
