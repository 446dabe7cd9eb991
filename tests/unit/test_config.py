"""The README documents every server flag and metric exactly as the code defines them."""

from __future__ import annotations

import re

from helpers import REPO_ROOT

from serving.config import build_parser, flag_table
from serving.metrics import PrometheusObserver

README = REPO_ROOT / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_the_readme_flag_table_is_the_parsers():
    serving = section("Serving")
    table = flag_table()
    assert table in serving, "README's flag table is stale: paste `python -m serving.config`"
    flags = {option for action in build_parser()._actions for option in action.option_strings}
    documented = set(re.findall(r"^\| `(--[a-z-]+)` \|", table, re.MULTILINE))
    assert documented == flags - {"-h", "--help"}
    assert {"--poll-interval", "--keep-versions", "--log-format"} <= documented


def test_every_metric_the_readme_names_is_exported():
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    exported = {
        family.name + suffix
        for family in PrometheusObserver().registry.collect()
        for suffix in ("", *suffixes.get(family.type, ()))
    }
    named = set(re.findall(r"\bmnist37_[a-z_]+\b", README.read_text()))
    assert named, "the README names no metric"
    assert named <= exported, f"not exported: {sorted(named - exported)}"
