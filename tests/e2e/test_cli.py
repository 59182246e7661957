"""The ``modalkit`` command, run as a real subprocess (``python -m modalkit.cli``), the way users and scripts run it.

Every run talks to the session's Prefect test server (``PREFECT_API_URL``), so no run starts a temporary server of
its own. Jobs use ``pipelines:PoisonAwareSentiment`` (found through ``PYTHONPATH=tests``): the example sentiment
model, plus texts that make a pipeline stage raise, and malformed lines that fail before the model sees them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from batch_support import assert_record_invariant, duplicates, read_failures, read_manifest, read_parts, write_config

from modalkit.task_queue import LocalQueueBackend

TESTS_DIR = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "job_id", "records", "succeeded", "failed", "chunks", "chunks_skipped", "seconds", "records_per_s", "output_uri",
}  # fmt: skip
CONTRACT_OPTIONS = [
    "--model", "--config", "--backend", "--chunk-size", "--concurrency", "--id-field", "--output-format",
    "--success-queue", "--failure-queue", "--json",
]  # fmt: skip
# words that make each stage of PoisonAwareSentiment raise for a batch holding them
POISON_TEXTS = {"POISON-PRE": "preprocess", "POISON-PREDICT": "predict", "POISON-POST": "postprocess"}
BAD_JSON = '{"id": "broken", "text": "an unterminated string'
# a progress bar redraws its line (\r) and colours it (ANSI escapes); neither belongs in a pipe
TERMINAL_CONTROL = ("\r", "\x1b[")


def write_dataset(folder: Path, n_good: int) -> dict[str, Any]:
    """Two JSONL files of reviews with ids ``r00000``..., poison records spread through them, one bad-JSON line.

    Returns the expected counts and the ids that must come out as successes and as failures.
    """
    folder.mkdir(parents=True)
    texts = ["Absolutely love it, great value", "Terrible, it broke after a day", "It is okay, nothing special"]
    good = [{"id": f"r{i:05d}", "text": f"{texts[i % 3]} (review {i})"} for i in range(n_good)]
    poison = [{"id": f"p-{stage}", "text": f"this one carries {marker}"} for marker, stage in POISON_TEXTS.items()]
    half = n_good // 2
    first = [json.dumps(r) for r in good[:half]]
    first.insert(len(first) // 3, json.dumps(poison[0]))
    first.insert(len(first) // 2, BAD_JSON)
    second = [json.dumps(r) for r in good[half:]]
    second.insert(len(second) // 4, json.dumps(poison[1]))
    second.insert(3 * len(second) // 4, json.dumps(poison[2]))
    (folder / "reviews-a.jsonl").write_text("\n".join(first) + "\n", encoding="utf-8")
    (folder / "reviews-b.jsonl").write_text("\n".join(second) + "\n", encoding="utf-8")
    bad_json_at = (folder / "reviews-a.jsonl").read_bytes().index(BAD_JSON.encode())
    return {
        "ids": [r["id"] for r in good + poison] + [f"reviews-a.jsonl:{bad_json_at}"],
        "records": n_good + len(poison) + 1,
        "good_ids": {r["id"] for r in good},
        "poison_ids": {r["id"]: stage for r, stage in zip(poison, POISON_TEXTS.values(), strict=True)},
        "bytes": sum(f.stat().st_size for f in folder.iterdir()),
    }


@pytest.fixture
def cli(prefect_api: str, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m modalkit.cli ARGS`` in ``tmp_path`` against the session's Prefect server."""
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "COLUMNS": "200",  # rich wraps at 80 columns when not on a terminal; keep help and tables on one line
    }

    def run(*args: str, python_flags: tuple[str, ...] | list[str] = ()) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *python_flags, "-m", "modalkit.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )

    return run


def chunks_of(folder: Path, chunk_size: int) -> int:
    """How many byte-range chunks the files in ``folder`` make (a file of at most ``chunk_size`` makes one)."""
    return sum(-(-f.stat().st_size // chunk_size) for f in folder.iterdir())


def last_json_line(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    summary = json.loads(lines[-1])
    assert isinstance(summary, dict)
    return summary


def table_values(stdout: str) -> dict[str, str]:
    """The rows of the summary table printed without ``--json``: ``{"records": "1,503", ...}``."""
    values = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 2 and cells[0] in SUMMARY_KEYS:
            values[cells[0]] = cells[1]
    return values


def assert_every_record_once(output: Path, data: dict[str, Any]) -> None:
    """The invariant: every input record appears exactly once across part files and failure files."""
    assert_record_invariant(str(output), data["ids"])
    parts, failures = read_parts(str(output)), read_failures(str(output))
    ids = [row["record_id"] for row in parts] + [row["record_id"] for row in failures]
    assert duplicates(ids) == {}
    assert len(ids) == data["records"]
    assert {row["record_id"] for row in parts} == data["good_ids"]
    by_id = {row["record_id"]: row for row in failures}
    for record_id, stage in data["poison_ids"].items():
        assert by_id[record_id]["stage"] == stage
    [unparsed] = [row for row in failures if row["record_id"] not in data["poison_ids"]]
    assert unparsed["stage"] == "parse"
    assert unparsed["input"] == BAD_JSON  # kept verbatim, not as an object


def test_batch_fills_date_in_both_uris_with_the_date_option_and_a_bad_date_fails_in_one_line(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    data = write_dataset(tmp_path / "in" / "2026-11-20", n_good=40)
    write_dataset(tmp_path / "in" / "2026-11-21", n_good=10)  # another night's: not read
    config = write_config(tmp_path)

    proc = cli("batch", str(tmp_path / "in" / "{date}"), str(tmp_path / "out" / "{date:%Y/%m/%d}"), "--config",
               str(config), "--id-field", "id", "--date", "2026-11-20", "--json")  # fmt: skip
    bad = cli("batch", str(tmp_path / "in" / "{date}"), str(tmp_path / "out"), "--date", "2026-11-31")

    assert proc.returncode == 0, proc.stderr
    summary = last_json_line(proc.stdout)
    assert summary["output_uri"] == str(tmp_path / "out" / "2026" / "11" / "20")
    assert summary["records"] == data["records"]  # that night's records only
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: --date: '2026-11-31' is not a date; use YYYY-MM-DD, e.g. 2026-11-30"
    ]


# --- a job that completes ----------------------------------------------------------------------------------------


def test_batch_json_prints_the_summary_as_the_last_line_and_exits_0(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    data = write_dataset(tmp_path / "in", n_good=2000)
    assert all(f.stat().st_size > 64 * 1024 for f in (tmp_path / "in").iterdir())  # each file makes 2+ chunks
    config = write_config(tmp_path)
    out = tmp_path / "out"

    proc = cli("batch", str(tmp_path / "in"), str(out), "--config", str(config), "--id-field", "id",
               "--chunk-size", "64KiB", "--json")  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    summary = last_json_line(proc.stdout)
    assert set(summary) >= SUMMARY_KEYS
    assert summary["records"] == data["records"] == summary["succeeded"] + summary["failed"]
    assert (summary["succeeded"], summary["failed"]) == (2000, 4)
    assert summary["chunks"] == chunks_of(tmp_path / "in", 64 * 1024)  # cut by input bytes, not one per file
    assert summary["chunks_skipped"] == 0
    assert summary["output_uri"] == str(out)
    assert summary["seconds"] > 0
    assert summary["records_per_s"] > 0
    assert_every_record_once(out, data)
    manifest = read_manifest(str(out))
    assert {k: manifest[k] for k in SUMMARY_KEYS - {"seconds", "records_per_s"}} == {
        k: summary[k] for k in SUMMARY_KEYS - {"seconds", "records_per_s"}
    }
    assert len(list(out.glob("_chunks/?????.json"))) == summary["chunks"]


def test_batch_forks_its_local_workers_from_the_command_instead_of_starting_new_interpreters(
    prefect_api: str, tmp_path: Path
) -> None:
    """Both workers start before the command runs a second thread (the first while the job is planned, the second
    once it is, before Prefect's import starts in a thread), so both are forked: each starts with what the command
    imported (a third of a second of imports a spawned one pays first). Every record still comes out once."""
    data = write_dataset(tmp_path / "in", n_good=2000)
    notes = tmp_path / "processes.jsonl"
    path = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "NOTE_PROCESS_TO": str(notes), "PYTHONPATH": path}
    config = write_config(tmp_path, "pipelines:NotesItsProcess")  # two local workers
    command = [sys.executable, "-m", "modalkit.cli", "batch", "in", "out", "--config", str(config), "--id-field", "id",
               "--chunk-size", "64KiB", "--json"]  # fmt: skip

    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)

    assert proc.returncode == 0, proc.stderr
    workers = [json.loads(line) for line in notes.read_text().splitlines()]
    assert len(workers) == 2
    assert [w["argv"][1:] for w in workers] == [command[1:]] * 2, workers  # the command's own command line
    assert last_json_line(proc.stdout)["succeeded"] == 2000
    assert_every_record_once(tmp_path / "out", data)


def test_batch_starts_one_local_worker_for_a_job_of_one_chunk(prefect_api: str, tmp_path: Path) -> None:
    """A job with fewer chunks than local workers starts no more workers than it has chunks: its model is loaded
    once, not once per CPU."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "few.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": "fine"}) + "\n"
                                                       for i in range(10)), encoding="utf-8")  # fmt: skip
    notes = tmp_path / "processes.jsonl"
    path = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "NOTE_PROCESS_TO": str(notes), "PYTHONPATH": path}
    config = write_config(tmp_path, "pipelines:NotesItsProcess")  # two local workers

    command = [sys.executable, "-m", "modalkit.cli", "batch", "in", "out", "--config", str(config), "--json"]

    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)

    assert proc.returncode == 0, proc.stderr
    assert last_json_line(proc.stdout)["succeeded"] == 10
    assert len(notes.read_text().splitlines()) == 1


def test_batch_without_json_off_a_terminal_prints_a_table_and_writes_parquet_with_a_plain_integer_chunk_size(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    data = write_dataset(tmp_path / "in", n_good=2000)
    config = write_config(tmp_path)
    out = tmp_path / "out"

    proc = cli("batch", str(tmp_path / "in"), str(out), "--config", str(config), "--id-field", "id",
               "--chunk-size", "65536", "--output-format", "parquet")  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert not any(c in stream for c in TERMINAL_CONTROL), repr(stream[:500])
    assert "{" not in proc.stdout  # a table, not the JSON line
    table = table_values(proc.stdout)
    manifest = read_manifest(str(out))
    assert f"batch job {manifest['job_id']}: completed" in proc.stdout  # the table's title
    assert set(table) == SUMMARY_KEYS - {"job_id"}
    assert table["records"] == f"{data['records']:,}"
    assert table["succeeded"] == f"{manifest['succeeded']:,}" == "2,000"
    assert table["failed"] == "4"
    assert table["chunks"] == str(manifest["chunks"])
    assert table["output_uri"] == str(out)
    assert manifest["chunks"] == chunks_of(tmp_path / "in", 65536) > 2
    parts = sorted(p.name for p in out.glob("part-*"))
    assert parts
    assert all(name.endswith(".parquet") for name in parts)
    assert_every_record_once(out, data)


def test_batch_names_ids_that_two_files_share_in_its_table_and_its_json_summary(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    for name in ("x", "y"):
        rows = [json.dumps({"order_id": i, "text": "fine"}) for i in range(5)]
        (tmp_path / "in" / f"{name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = write_config(tmp_path)
    args = ["batch", str(tmp_path / "in"), "--config", str(config), "--id-field", "order_id"]

    table = cli(*args[:2], str(tmp_path / "table"), *args[2:])
    assert table.returncode == 0, table.stderr
    text = " ".join(line.strip(" │") for line in table.stdout.splitlines())
    assert "duplicate_ids" in text
    assert "5 ids occur more than once: 0 (x.jsonl at 0, y.jsonl at 0)" in " ".join(text.split())

    summary = last_json_line(cli(*args[:2], str(tmp_path / "json"), *args[2:], "--json").stdout)
    assert (summary["succeeded"], summary["duplicate_ids"]) == (10, 5)
    assert summary["duplicate_examples"][0]["occurrences"] == [
        {"key": "x.jsonl", "position": 0}, {"key": "y.jsonl", "position": 0}]  # fmt: skip


# --- a job that fails, and jobs that cannot start -----------------------------------------------------------------


def test_batch_exits_1_when_the_failure_rate_passes_max_failure_rate_and_still_prints_the_summary(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    data = write_dataset(tmp_path / "in", n_good=300)
    config = write_config(tmp_path)
    out = tmp_path / "out"

    proc = cli("batch", str(tmp_path / "in"), str(out), "--config", str(config), "--id-field", "id",
               "--max-failure-rate", "0.001", "--json")  # fmt: skip

    assert proc.returncode == 1, proc.stderr
    summary = last_json_line(proc.stdout)
    assert set(summary) >= SUMMARY_KEYS
    assert (summary["records"], summary["succeeded"], summary["failed"]) == (data["records"], 300, 4)
    assert "max_failure_rate" in proc.stderr
    assert "_failures" in proc.stderr  # says where to look
    assert read_manifest(str(out))["failed"] == 4  # the results are kept, with the manifest
    assert_every_record_once(out, data)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-input", ["does not exist", "no-such-dir"]),
        ("unknown-model", ["no-such-model"]),
        ("bad-chunk-size", ["Invalid value for --chunk-size 'lots': not a size", "64KiB to 8GiB"]),
        ("tiny-chunk-size", ["Invalid value for --chunk-size '100': too small", "64KiB to 8GiB"]),
    ],
)
def test_batch_that_cannot_start_exits_2_with_an_error_and_no_summary(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path, case: str, expected: list[str]
) -> None:
    write_dataset(tmp_path / "in", n_good=10)
    config = write_config(tmp_path)
    args = {
        "missing-input": [str(tmp_path / "no-such-dir"), str(tmp_path / "out")],
        "unknown-model": [str(tmp_path / "in"), str(tmp_path / "out"), "--model", "no-such-model"],
        "bad-chunk-size": [str(tmp_path / "in"), str(tmp_path / "out"), "--chunk-size", "lots"],
        "tiny-chunk-size": [str(tmp_path / "in"), str(tmp_path / "out"), "--chunk-size", "100"],
    }[case]

    proc = cli("batch", *args, "--config", str(config), "--json")

    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout.strip() == ""  # no summary: the job never started
    assert "error" in proc.stderr
    for text in expected:
        assert text in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was written


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("--backend", "bogus", "one of local, modal"),
        ("--output-format", "csv", "one of jsonl, parquet"),
        ("--concurrency", "many", "a whole number from 1 to 10000"),
        ("--concurrency", "0", "a whole number from 1 to 10000"),
        ("--chunk-size", "abc", "64KiB to 8GiB"),
        ("--chunk-size", "1", "64KiB to 8GiB"),
        ("--max-failure-rate", "2", "a number from 0.0 to 1.0"),
    ],
)
def test_batch_rejects_a_bad_option_value_in_one_line_before_prefect_or_any_worker_starts(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path, option: str, value: str, allowed: str
) -> None:
    (tmp_path / "in").mkdir()
    proc = cli("batch", str(tmp_path / "in"), str(tmp_path / "out"), option, value, "--json", python_flags=["-X",
               "importtime"])  # fmt: skip

    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert line.startswith(f"error: Invalid value for {option} '{value}': ")
    assert line.endswith(allowed)
    assert "; allowed: " in line
    assert "pydantic" not in line
    imported = {row.split("|")[-1].strip() for row in proc.stderr.splitlines() if row.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("prefect", "flows", "multiprocessing")}
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("chunk_sise: 1MiB",
         "app_settings.job_config.chunk_sise: unknown key; did you mean 'chunk_size'? (in bad.yaml)"),
        ("chunk_size: 1", "app_settings.job_config.chunk_size: too small; allowed: a size in bytes or with a unit "
         "(64KiB, 32MiB), 64KiB to 8GiB (got 1, in bad.yaml)"),
    ],
)  # fmt: skip
def test_batch_with_a_bad_job_setting_exits_2_with_one_line_naming_it_before_prefect_starts(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path, setting: str, expected: str
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "bad.yaml").write_text(f"app_settings:\n  job_config:\n    {setting}\n", encoding="utf-8")

    proc = cli("batch", "in", "out", "--config", "bad.yaml", "--json", python_flags=["-X", "importtime"])

    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert line == f"error: invalid modalkit settings: {expected}"
    imported = {row.split("|")[-1].strip() for row in proc.stderr.splitlines() if row.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("prefect", "flows", "multiprocessing")}
    assert not (tmp_path / "out").exists()


def test_batch_help_lists_the_contract_options(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    proc = cli("batch", "--help")

    assert proc.returncode == 0, proc.stderr
    for option in CONTRACT_OPTIONS:
        assert option in proc.stdout
    for argument in ("INPUT_URI", "OUTPUT_URI"):
        assert argument in proc.stdout.upper()


def test_batch_help_shows_the_defaults_the_bounds_and_the_exit_codes(
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    from modalkit.settings import JobConfig

    text = " ".join(cli("batch", "--help").stdout.replace("│", " ").split())
    defaults = JobConfig()
    size = defaults.chunk_size.human_readable(decimal=False).replace(".0", "")  # 32MiB
    assert f"e.g. 64MiB. Default: job_config ({size})" in text
    assert f"Default: job_config ({defaults.max_failure_rate})" in text
    assert f"Default: job_config ({defaults.backend})" in text
    assert f"Default: job_config ({defaults.output_format})" in text
    assert "64KiB to 8GiB" in text
    assert "0 the job completed; 1 it failed; 2 it could not start" in text
    assert "130 Ctrl-C and 143 SIGTERM" in text


# --- the demo -----------------------------------------------------------------------------------------------------


def test_demo_scores_sample_reviews_end_to_end_and_its_numbers_add_up(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    workdir = tmp_path / "demo"

    proc = cli("demo", "--records", "200", "--workdir", str(workdir))  # its 15 bad records are 7%: still completes

    assert proc.returncode == 0, proc.stderr
    table = {k: int(v.replace(",", "")) for k, v in table_values(proc.stdout).items() if k in {"records", "succeeded",
             "failed", "chunks", "chunks_skipped"}}  # fmt: skip
    manifest = read_manifest(str(workdir / "results"))
    assert table["records"] == manifest["records"] == 200 + 15  # 200 reviews and 5 malformed ones in 3 files
    assert table["records"] == table["succeeded"] + table["failed"]
    assert (table["succeeded"], table["failed"]) == (manifest["succeeded"], manifest["failed"]) == (200, 15)
    assert table["chunks_skipped"] == 0
    assert "records in = 215 = 200 succeeded + 15 failed" in proc.stdout
    assert "local queue" in proc.stdout
    assert "200 success records, 15 failure records" in proc.stdout
    assert "and 7 more in " in proc.stdout  # the failures table shows 8 of 15 and says so
    failures = read_failures(str(workdir / "results"))
    unterminated = [r for r in failures if "an unterminated string" in str(r["input"])]
    assert len(unterminated) == 3  # one in each JSONL file
    assert all("invalid JSON: Unterminated string starting at (column " in r["error"] for r in unterminated)
    # and the queue file really holds them (a second handle on the durable local queue)
    queues = LocalQueueBackend(workdir / "queues")
    try:
        assert (queues.count("demo-success"), queues.count("demo-failures")) == (200, 15)
        successes = [json.loads(body) for body in queues.messages("demo-success")]
    finally:
        queues.close()
    parts = read_parts(str(workdir / "results"))
    assert {m["record_id"] for m in successes} == {row["record_id"] for row in parts}
    assert len(parts) == 200
    assert len(read_failures(str(workdir / "results"))) == 15
