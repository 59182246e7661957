"""``modalkit demo``: sample reviews scored end to end on the embedded default.

Writes a small dataset (JSONL and CSV, with a few malformed records mixed in), a settings file that uses the
example sentiment pipeline, the local worker pool and the durable local queue, then the CLI runs flow
``batch-inference`` on it and :func:`show_demo_results` prints what came out where.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modalkit.batch.layout import OutputLayout
from modalkit.examples.sentiment import training_corpus
from modalkit.queues import LocalQueueBackend

__all__ = ["DemoSetup", "prepare_demo", "show_demo_results"]

SUCCESS_QUEUE = "demo-success"
DEMO_MAX_FAILURE_RATE = 0.05
FAILURES_SHOWN = 8
FAILURE_QUEUE = "demo-failures"
# malformed records a real dataset has: what each one exercises
_POISON = [
    '{"id": "bad-json", "text": "an unterminated string}',
    '{"id": "no-text", "body": "the text is under the wrong key"}',
    '{"id": "empty-text", "text": ""}',
    '["a", "json", "array", "not", "an", "object"]',
    '{"text": "a record without its id"}',
]


@dataclass(frozen=True)
class DemoSetup:
    """What the demo prepared: the flow parameters and where things are."""

    params: dict[str, Any]
    input_dir: Path
    output_dir: Path
    queue_dir: Path
    records: int
    poison: int


def prepare_demo(workdir: Path, records: int) -> DemoSetup:
    """Write the sample dataset and the demo settings under ``workdir`` (results of earlier runs are cleared)."""
    input_dir, output_dir, queue_dir = workdir / "input", workdir / "results", workdir / "queues"
    for path in (input_dir, output_dir, queue_dir):
        shutil.rmtree(path, ignore_errors=True)
    input_dir.mkdir(parents=True)
    texts, _ = training_corpus(n_per_label=max(1, records // 3 + 1), seed=2024)
    rng = random.Random(2024)
    rng.shuffle(texts)
    texts = texts[:records]
    poison = _write_inputs(input_dir, texts, rng)
    config = workdir / "modalkit-demo.yaml"
    # the demo's own bad records must not fail it, however few records it scores: allow twice their share
    max_failure_rate = min(1.0, max(DEMO_MAX_FAILURE_RATE, round(2 * poison / (len(texts) + poison), 2)))
    config.write_text(_settings_yaml(workdir, queue_dir, max_failure_rate), encoding="utf-8")
    params = {
        "input_uri": str(input_dir),
        "output_uri": str(output_dir),
        "config": str(config),
        "success_queue": SUCCESS_QUEUE,
        "failure_queue": FAILURE_QUEUE,
    }
    return DemoSetup(params, input_dir, output_dir, queue_dir, len(texts) + poison, poison)


def _write_inputs(input_dir: Path, texts: list[str], rng: random.Random) -> int:
    """Three JSONL files and one CSV file, with the poison records spread through the JSONL files."""
    quarter = max(1, len(texts) // 4)
    parts = [texts[i * quarter : (i + 1) * quarter] for i in range(3)] + [texts[3 * quarter :]]
    poison = 0
    next_id = 0
    for n, part in enumerate(parts[:3]):
        lines = []
        for text in part:
            lines.append(json.dumps({"id": f"r{next_id:06d}", "text": text}))
            next_id += 1
        for bad in _POISON:
            lines.insert(rng.randrange(len(lines) + 1), bad.replace('"id": "', f'"id": "{n}-'))
            poison += 1
        (input_dir / f"reviews-{n}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (input_dir / "reviews-3.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        for text in parts[3]:
            writer.writerow([f"r{next_id:06d}", text])
            next_id += 1
    return poison


def _settings_yaml(workdir: Path, queue_dir: Path, max_failure_rate: float) -> str:
    return f"""# written by `modalkit demo`: the example model on the embedded default
app_settings:
  batch_config:
    max_batch_size: 256
  queue_config:
    backend: local
    local_path: {json.dumps(str(queue_dir))}
  job_config:
    backend: local
    chunk_size: 256KiB
    id_field: id
    max_failure_rate: {max_failure_rate}
model_settings:
  local_model_repository_folder: {json.dumps(str(workdir / "models"))}
  default_model: sentiment
  model_entries:
    sentiment:
      pipeline: "modalkit.examples.sentiment:SentimentPipeline"
"""


def show_demo_results(setup: DemoSetup, summary: dict[str, Any]) -> None:
    """Print where the results went: a few scored rows, the failures with their reasons, the queue counts."""
    console = Console()
    layout = OutputLayout(str(setup.output_dir))
    chunks = range(int(summary.get("chunks", 0)))
    scored = [path for path in (Path(layout.part(i)) for i in chunks) if path.is_file() and path.stat().st_size]
    if scored:
        table = Table(title="a few scored records (part files)")
        for column in ("record_id", "label", "score"):
            table.add_column(column)
        with scored[0].open(encoding="utf-8") as fh:
            for _, line in zip(range(5), fh, strict=False):
                row = json.loads(line)
                table.add_row(escape(str(row["record_id"])), row["label"], f"{row['score']:.3f}")
        console.print(table)
    failures = [
        json.loads(line)
        for f in (Path(layout.failures(i)) for i in chunks)
        if f.is_file()
        for line in f.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    if failures:
        where = Path(layout.failures_dir).name
        table = Table(title=f"failed records ({len(failures)}), each with its reason ({where}/)")
        for column in ("record_id", "stage", "error"):
            table.add_column(column, overflow="fold")
        for row in failures[:FAILURES_SHOWN]:
            # error texts hold brackets ("[type=...]", JSON arrays): print them as text, not as rich markup
            table.add_row(escape(str(row["record_id"])), row["stage"], escape(row["error"][:110]))
        if len(failures) > FAILURES_SHOWN:
            table.caption = f"and {len(failures) - FAILURES_SHOWN} more in {layout.failures_dir}/"
        console.print(table)
    queues = LocalQueueBackend(setup.queue_dir)
    try:
        console.print(
            f"local queue {setup.queue_dir}: {queues.count(SUCCESS_QUEUE):,} success records, "
            f"{queues.count(FAILURE_QUEUE):,} failure records",
            highlight=False,
        )
    finally:
        queues.close()
    console.print(f"records in = {summary['records']:,} = {summary['succeeded']:,} succeeded + "
                  f"{summary['failed']:,} failed", highlight=False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m modalkit.demo WORKDIR [RECORDS]``: write the sample data and settings, print the flow
    parameters as JSON (``make deploy`` starts its first run with them)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print("usage: python -m modalkit.demo WORKDIR [RECORDS]", file=sys.stderr)
        return 2
    setup = prepare_demo(Path(args[0]).resolve(), int(args[1]) if len(args) > 1 else 20_000)
    print(json.dumps(setup.params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
