"""``modalkit estimate``, through the real command (``python -m modalkit.cli``): the JSON line on a small input (its
records estimated from the sample's bytes per record, its cost the billed seconds times the price), the table, a
bad option in one line before anything starts, and an empty input's clear message. No Prefect: an estimate runs
no flow."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from batch_support import write_config
from support import running

TESTS_DIR = Path(__file__).resolve().parents[1]
#: How near the estimated record count must be to the true one, on inputs of records of varied length.
RECORDS_TOLERANCE = 0.1
#: pricing.local_usd_per_hour of the tests' settings: one worker costs a cent a second.
LOCAL_USD_PER_HOUR = 36.0


def modalkit(*args: str, cwd: Path, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "COLUMNS": "200",
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    return subprocess.run([sys.executable, *flags, "-m", "modalkit.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240, check=False)  # fmt: skip


def write_reviews(folder: Path, files: int, per_file: int) -> int:
    """JSONL reviews of varied length (12 to 400 characters) in ``files`` files; returns how many."""
    folder.mkdir(parents=True)
    rng = random.Random(19)
    words = ["great", "value", "terrible", "fast", "shipping", "broke", "love", "it", "would", "buy", "again"]
    for f in range(files):
        rows = []
        for i in range(per_file):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 70)))[:400]
            rows.append(json.dumps({"id": f"{f}-{i}", "text": text}))
        (folder / f"part-{f}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return files * per_file


def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, job_config={"local_workers": 1},
                        pricing={"local_usd_per_hour": LOCAL_USD_PER_HOUR})  # fmt: skip


def test_estimate_prints_the_json_line_last_with_records_near_the_true_count_and_cost_seconds_times_rate(
    tmp_path: Path,
) -> None:
    true_records = write_reviews(tmp_path / "in", files=3, per_file=1500)

    proc = modalkit("estimate", "in", "--config", str(config(tmp_path)), "--sample", "600", "--json", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    found: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    assert set(found) == {"records", "seconds", "cost_usd", "cost_per_1000", "bottleneck", "sample_records"}
    assert found["records"] == pytest.approx(true_records, rel=RECORDS_TOLERANCE)
    assert 400 <= found["sample_records"] < true_records  # a sample, not the whole input
    assert found["seconds"] > 0
    rate = LOCAL_USD_PER_HOUR / 3600  # one local worker holds the whole machine's price
    assert found["cost_usd"] == pytest.approx(found["seconds"] * rate, abs=0.05 * rate + 1e-6)  # seconds: 0.1 s
    assert found["cost_per_1000"] == pytest.approx(found["cost_usd"] / found["records"] * 1000, rel=1e-3)
    assert found["bottleneck"] in ("device", "host")
    assert not list(tmp_path.glob("in/_*"))  # nothing written beside the input
    assert proc.stderr == ""


def test_estimate_of_an_input_smaller_than_the_sample_counts_its_records_and_shows_the_table(tmp_path: Path) -> None:
    true_records = write_reviews(tmp_path / "in", files=2, per_file=150)

    proc = modalkit("estimate", "in", "--config", str(config(tmp_path)), "--backend", "modal", "--gpu", "L4",
                    "--max-containers", "3", cwd=tmp_path)  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    assert f"{true_records:,} (counted)" in proc.stdout
    for row in ("seconds", "cost_usd", "cost_per_1000", "bottleneck", "assumptions"):
        assert row in proc.stdout
    assert "Modal container(s) of L4: cold start assumed" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("--sample", "0", "a whole number from 1 to 1,000,000"),
        ("--sample", "many", "a whole number from 1 to 1,000,000"),
        ("--max-containers", "-2", "a whole number from 1 to 10,000"),
        ("--backend", "gpu", "one of local, modal"),
    ],
)
def test_estimate_rejects_a_bad_option_value_in_one_line_before_anything_starts(
    tmp_path: Path, option: str, value: str, allowed: str
) -> None:
    write_reviews(tmp_path / "in", files=1, per_file=10)

    proc = modalkit("estimate", "in", option, value, "--json", cwd=tmp_path, flags=("-X", "importtime"))

    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert line.startswith(f"error: Invalid value for {option} '{value}': ")
    assert line.endswith(allowed)
    imported = {row.split("|")[-1].strip() for row in proc.stderr.splitlines() if row.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("prefect", "flows", "multiprocessing")}


def test_estimate_of_an_empty_input_says_there_is_nothing_to_estimate_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "none").mkdir()

    empty = modalkit("estimate", "in", "--config", str(config(tmp_path)), "--json", cwd=tmp_path)
    no_files = modalkit("estimate", "none", "--config", str(config(tmp_path)), "--json", cwd=tmp_path)

    assert (empty.returncode, empty.stdout) == (2, "")
    nothing = "error: input in holds no records (its files are empty): there is nothing to estimate"
    assert empty.stderr.strip() == nothing
    assert (no_files.returncode, no_files.stdout) == (2, "")
    assert no_files.stderr.strip() == "error: input none holds no files"


def test_estimate_with_a_misspelt_id_field_fails_in_one_line_naming_the_option_and_the_fields(tmp_path: Path) -> None:
    write_reviews(tmp_path / "in", files=1, per_file=10)

    proc = modalkit("estimate", "in", "--config", str(config(tmp_path)), "--id-field", "idd", "--json", cwd=tmp_path)

    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.strip() == (
        "error: --id-field 'idd' is in none of the first records of part-0.jsonl (the first has: id, text); "
        "did you mean 'id'?"
    )


SLOW_LOAD = '''
import os, time
from pipelines import PoisonAwareSentiment


class SlowLoad(PoisonAwareSentiment):
    """Loads for half a minute, saying so first (a calibration process is then known to be running)."""

    def __init__(self, *args, **kwargs):
        with open(os.environ["SLOW_LOAD_LOG"], "a") as log:
            log.write(f"{os.getpid()}\\n")
        time.sleep(30)
        super().__init__(*args, **kwargs)
'''


def test_ctrl_c_while_the_estimate_calibrates_prints_one_line_and_leaves_no_calibration_process(
    tmp_path: Path,
) -> None:
    write_reviews(tmp_path / "in", files=2, per_file=400)
    (tmp_path / "slowload.py").write_text(SLOW_LOAD, encoding="utf-8")
    log = tmp_path / "loading.log"
    path = write_config(tmp_path, pipeline="slowload:SlowLoad", job_config={"local_workers": 2})
    env = {
        **os.environ,
        "SLOW_LOAD_LOG": str(log),
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    proc = subprocess.Popen([sys.executable, "-m", "modalkit.cli", "estimate", "in", "--config", str(path)],
                            cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(log.read_text().split() if log.exists() else []) < 2:  # both calibration processes are loading
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the calibration processes did not start in 60 s"
            time.sleep(0.05)
        children = [int(pid) for pid in log.read_text().split()]

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal: to the whole foreground process group
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 130, stderr
    assert stderr.strip() == "interrupted"  # one line; an estimate has nothing to resume
    assert not [pid for pid in children if running(pid)]
