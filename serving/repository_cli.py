"""`mnist37-models`: inspect a model repository without torch.

    mnist37-models list --repository DIR [--model-name NAME] [--json]

lists every published version with its architecture, test accuracy, training time, the
sha256 of its `model.onnx` and whether it can explain its predictions (EXPLAIN: it has an
`explanation.onnx`), each file checked against the model card. Exit status 1 if any version
is damaged (unreadable card, missing model file, a checksum mismatch, an explanation file
the card does not record or one it records that is missing), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serving.console import console_script
from serving.repository import (
    ExplanationFileRecord,
    ModelFileRecord,
    ModelVersion,
    RepositoryError,
    list_models,
    list_versions,
    validate_model_name,
)

DEFAULT_REPOSITORY = Path("model_repository")
SHA256_PREFIX_LENGTH = 12


@dataclass(frozen=True)
class VersionSummary:
    """One line of the listing."""

    model: str
    version: int
    path: str
    architecture: str | None = None
    test_accuracy: float | None = None
    created_at: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    explainable: bool = False  # it has an explanation graph, which the server loads
    explanation_sha256: str | None = None
    problems: list[str] = field(default_factory=list)


def summarize_repository(repository: Path, model_name: str | None = None) -> list[VersionSummary]:
    """A summary of every version (of one model, or of all), checked against its card."""
    names = [validate_model_name(model_name)] if model_name else list_models(repository)
    return [
        summarize_version(version) for name in names for version in list_versions(repository, name)
    ]


def summarize_version(version: ModelVersion) -> VersionSummary:
    """A version's key facts from its card, and what is wrong with it, if anything."""
    name, number, path = version.name, version.version, version.path
    try:
        card = version.read_card()
    except RepositoryError as error:
        return VersionSummary(name, number, str(path), problems=[str(error)])
    model_file = card.model_file or ModelFileRecord()
    explanation = card.explanation_file
    explainable = version.explanation_path.exists()
    return VersionSummary(
        model=name,
        version=number,
        path=str(path),
        architecture=card.architecture_name,
        test_accuracy=card.test_accuracy,
        created_at=card.created_at,
        sha256=model_file.sha256,
        bytes=model_file.bytes,
        explainable=explainable,
        explanation_sha256=explanation.sha256 if explanation is not None else None,
        problems=[
            *_file_problems(version.model_path, model_file.sha256),
            *_explanation_problems(version.explanation_path, explainable, explanation),
        ],
    )


def _explanation_problems(
    path: Path, present: bool, record: ExplanationFileRecord | None
) -> list[str]:
    """What is wrong with the explanation graph: none at all is fine (a version published
    before explanations were), but the file and the card's record come together."""
    if not present and record is None:
        return []
    return _file_problems(path, record.sha256 if record is not None else None)


def _file_problems(path: Path, recorded_sha256: str | None) -> list[str]:
    """What is wrong with a version's file measured against the sha256 its card records."""
    try:
        actual_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        return [f"cannot read {path}: {error.strerror}"]
    if recorded_sha256 is None:
        return [f"{path} has sha256 {actual_sha256}, the card records none"]
    if actual_sha256 != recorded_sha256:
        return [f"{path} has sha256 {actual_sha256}, the card says {recorded_sha256}"]
    return []


def format_table(summaries: Sequence[VersionSummary]) -> str:
    """The listing as an aligned text table."""
    header = ("MODEL", "VERSION", "ARCH", "TEST ACC", "CREATED AT", "SHA256", "EXPLAIN", "STATUS")
    rows = [header]
    for s in summaries:
        rows.append(
            (
                s.model,
                str(s.version),
                s.architecture or "-",
                f"{s.test_accuracy:.4f}" if s.test_accuracy is not None else "-",
                s.created_at or "-",
                s.sha256[:SHA256_PREFIX_LENGTH] if s.sha256 else "-",
                "yes" if s.explainable else "no",
                "DAMAGED" if s.problems else "ok",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


@console_script
def main(argv: Sequence[str] | None = None) -> int:
    # By hand, not `serving.settings`: a subcommand, and --model-name must not pick up the
    # MNIST37_MODEL_NAME a training container sets (it would silently filter the listing).
    parser = argparse.ArgumentParser(prog="mnist37-models", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list models and versions with key metrics")
    listing.add_argument(
        "--repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help=f"the model repository directory (default: {DEFAULT_REPOSITORY})",
    )
    listing.add_argument("--model-name", help="only this model")
    listing.add_argument("--json", action="store_true", help="print JSON for machines")
    args = parser.parse_args(argv)

    if not args.repository.is_dir():
        print(f"mnist37-models: no model repository at {args.repository}", file=sys.stderr)
        return 2
    try:
        summaries = summarize_repository(args.repository, args.model_name)
    except RepositoryError as error:
        print(f"mnist37-models: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(s) for s in summaries], indent=2))
    elif summaries:
        print(format_table(summaries))
    else:
        print(f"no published models in {args.repository}")
    for summary in summaries:
        for problem in summary.problems:
            print(f"mnist37-models: {summary.model} v{summary.version}: {problem}", file=sys.stderr)
    return 1 if any(s.problems for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
