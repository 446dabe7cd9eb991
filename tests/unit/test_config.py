"""The docs describe every server flag and metric exactly as the code defines them:
docs/serving.md holds `python -m serving.config`'s flag table, and every `mnist37_*` metric
the README or docs/ name is one the server exports."""

from __future__ import annotations

import re

from helpers import REPO_ROOT

from serving.config import build_parser, flag_table
from serving.metrics import PrometheusObserver, SupervisorMetrics

SERVING_DOC = REPO_ROOT / "docs" / "serving.md"
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def exported_families() -> list:
    """Every metric family the server exports: each worker's (or the only process's) and
    the supervisor's of --workers N."""
    registries = (PrometheusObserver().registry, SupervisorMetrics(None).registry)
    return [family for registry in registries for family in registry.collect()]


def section(path, title: str) -> str:
    text = path.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_the_documented_flag_table_is_the_parsers():
    flags_section = section(SERVING_DOC, "Flags")
    table = flag_table()
    assert table in flags_section, (
        "docs/serving.md's flag table is stale: paste `python -m serving.config`"
    )
    flags = {option for action in build_parser()._actions for option in action.option_strings}
    documented = set(re.findall(r"^\| `(--[a-z-]+)` \|", table, re.MULTILINE))
    assert documented == flags - {"-h", "--help"}
    assert {"--poll-interval", "--keep-versions", "--log-format"} <= documented


def test_every_metric_the_docs_name_is_exported():
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    exported = {
        family.name + suffix
        for family in exported_families()
        for suffix in ("", *suffixes.get(family.type, ()))
    }
    named = {}
    for doc in DOCS:
        for name in re.findall(r"\bmnist37_[a-z_]+\b", doc.read_text()):
            named.setdefault(name, doc.name)
    assert len(named) >= 10, "docs/metrics.md should name every metric"
    stale = {name: doc for name, doc in named.items() if name not in exported}
    assert not stale, f"named but not exported: {stale}"


def test_the_metrics_page_documents_every_exported_family():
    families = {family.name for family in exported_families()}
    table = section(REPO_ROOT / "docs" / "metrics.md", "Metrics")
    documented = set(re.findall(r"^\| `(mnist37_[a-z_]+)` \|", table, re.MULTILINE))
    counters = {name.removesuffix("_total") for name in documented}
    assert families <= documented | counters, sorted(families - documented - counters)
