"""The output layout contract, and that it is spelled in one place only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from modalkit.batch.layout import OutputLayout

REPO = Path(__file__).resolve().parents[2]
# the names of the output layout contract; no code outside batch/layout.py may spell them
CONTRACT_NAMES = re.compile(
    r"(?<![\w])_(chunks|failures|replay)\b|_manifest\.json|_job\.json|_source\.json|\.progress\.json|\bpart-[\d{N*]"
)


def test_every_contract_path_of_a_chunk_and_a_job() -> None:
    layout = OutputLayout("s3://bucket/scored/", "parquet")

    assert layout.root == "s3://bucket/scored"
    assert layout.part(3) == "s3://bucket/scored/part-00003.parquet"
    assert layout.failures(3) == "s3://bucket/scored/_failures/part-00003.jsonl"
    assert layout.marker(3) == "s3://bucket/scored/_chunks/00003.json"
    assert layout.journal(3) == "s3://bucket/scored/_chunks/00003.progress.json"
    assert layout.job_claim == "s3://bucket/scored/_job.json"
    assert layout.manifest == "s3://bucket/scored/_manifest.json"
    assert layout.replay_input == "s3://bucket/scored/_replay/failures.jsonl"
    assert layout.replay_source == "s3://bucket/scored/_replay/_source.json"
    assert OutputLayout("out").part(123456) == "out/part-123456.jsonl"  # more chunks than five digits hold


@pytest.mark.parametrize(
    ("name", "index"),
    [("00007.json", 7), ("123456.json", 123456), ("00007.progress.json", None), ("7.json", None), ("x.json", None)],
)
def test_marker_index_recognises_only_commit_markers(name: str, index: int | None) -> None:
    assert OutputLayout.marker_index(name) == index


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_module_but_the_layout_spells_an_output_path() -> None:
    spelled = [
        f"{path.relative_to(REPO)}:{line}: {text!r}"
        for folder in ("modalkit", "flows", "tasks")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path != REPO / "modalkit" / "batch" / "layout.py"
        for line, text in _code_strings(path)
        if CONTRACT_NAMES.search(text)
    ]

    assert spelled == []
