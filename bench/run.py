#!/usr/bin/env python3
"""`make bench`: modalkit batch vs the bare two-process loop of the reference harness, side by side.

Workload W1 of ../shared/bench: JSONL in, JSONL out, the harness's toy model (as ``bench/toy_pipeline.py``),
batches of 256, 4 input shards, one BLAS thread per process. For each size the two commands run in turn,
A B A B..., each under the harness's ``treemem.py`` (peak RSS/PSS of the whole process tree), and every modalkit
output is checked against the bare loop's predictions with the harness's ``check_outputs.py``.

modalkit runs as a user runs it: ``modalkit batch IN OUT --config ... --json`` (local backend, 2 workers) against
a Prefect server started once for the benchmark (as a deployment would have one). Figures:

* job records/s: records / the job's own clock (modalkit: the flow run, planning to manifest; bare: its timer,
  pool start to finish). This is the figure the target is set on.
* process wall: the whole command, interpreter start and imports included.

    make bench                                   # 1M and 4M records, 3 rounds each
    BENCH_SIZES=200000 BENCH_ROUNDS=1 make bench  # a quick look

Before the throughput runs, the start-up of a 10-record job: command to first chunk running, and whole-process
wall, with a configured Prefect server, with modalkit's local server up, and with it stopped; beside the runs with
the local server up, ``python -c "import prefect"`` in turn (the target: the job's wall at most 2x that).

Then the repeated-id check (``bench/repeated_ids.py``): what hashing the ids costs the workers and what merging them
costs the job's end, at each size, and its share of the W1 job's seconds.

Then W2, online (``bench/w2.py``): ``modalkit serve`` beside LitServe and plain FastAPI at 1 and 32 clients.

Then the scale row (``bench/scale.py``): 20,000 files of 5 records against the same records in one file, task runs
read back from the Prefect server, objects written, manifest bytes, a no-op rerun, and planning 100,000 files.

Then W3, device-bound (``bench/w3.py``): modalkit with one local worker (one simulated device) beside the harness's
``run_w3.py`` runners (``cpu``, ``seq``, ``threads``, ``procs``, Ray Data), each as a fraction of the device's bound.

Environment: MODALKIT_SHARED_BENCH (default ../shared/bench), BENCH_SIZES, BENCH_ROUNDS, BENCH_CHUNK_SIZE,
BENCH_STARTUP_ROUNDS (0 skips the start-up runs), BENCH_REPEATS (0 skips the repeated-id check), BENCH_W2 (0 skips
W2), W2_ROUNDS, W2_REQUESTS, BENCH_SCALE (0 skips the scale row), BENCH_SCALE_FILES, BENCH_SCALE_PLAN_FILES,
BENCH_W3 (0 skips W3), BENCH_W3_ROWS, BENCH_RAY (0 skips W3's Ray Data runner).
``BENCH_SIZES= BENCH_W2=0 make bench`` runs the start-up part (and the scale row) alone and prints it (RESULTS.md is
left as it is); ``BENCH_SIZES= BENCH_STARTUP_ROUNDS=0 BENCH_W2=0 BENCH_SCALE_FILES=500 make bench`` a small scale row.
``BENCH_SIZES= BENCH_STARTUP_ROUNDS=0 BENCH_W2=0 BENCH_REPEATS=0 BENCH_SCALE=0 make bench`` runs W3 alone (about two
minutes), prints its section and puts it into RESULTS.md in place of the one there (the rest is left as it is).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from procs import descendants, free_port, rss_mb, run_under_treemem

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("MODALKIT_SHARED_BENCH", REPO.parent / "shared" / "bench")).resolve()
DATA = HERE / "data"
OUT = HERE / "out"
RESULTS = HERE / "RESULTS.md"
#: Hand-kept figures behind code choices, copied into RESULTS.md as they are.
CODE_MEASUREMENTS = HERE / "code-measurements.md"
PY = sys.executable
BIN = Path(sys.executable).parent
SIZES = [int(s) for s in os.environ.get("BENCH_SIZES", "1000000 4000000").split()]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CHUNK_SIZE = os.environ.get("BENCH_CHUNK_SIZE", "32MiB")  # the default chunk_size
FILES = 4
TIMEOUT = 1800
W2 = os.environ.get("BENCH_W2", "1") != "0"  # W2, online: modalkit serve beside LitServe and plain FastAPI
REPEATS = os.environ.get("BENCH_REPEATS", "1") != "0"  # the repeated-id check's cost (bench/repeated_ids.py)
SCALE = os.environ.get("BENCH_SCALE", "1") != "0"  # many small files against one file (bench/scale.py)
W3 = os.environ.get("BENCH_W3", "1") != "0"  # device-bound: modalkit beside the harness's W3 runners (bench/w3.py)

THREADS_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

BENCH_CONFIG = f"""# written by bench/run.py: W1's toy model, local backend with 2 workers, no queues
app_settings:
  batch_config:
    max_batch_size: 256
  queue_config:
    backend: none
  job_config:
    backend: local
    local_workers: 2
    chunk_size: {CHUNK_SIZE}
    id_field: id
    output_format: jsonl
model_settings:
  model_entries:
    toy:
      pipeline: "toy_pipeline:ToyPipeline"
"""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class PrefectServer:
    """`prefect server start` on a free loopback port, SQLite in a temporary PREFECT_HOME; stopped by PID."""

    def __init__(self) -> None:
        self.home = tempfile.mkdtemp(prefix="modalkit-bench-prefect-")
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = {**os.environ, "PREFECT_HOME": self.home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        self.log = open(Path(self.home) / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server did not start; see {self.home}/server.log")

    def rss_mb(self) -> float:
        return rss_mb([self.proc.pid, *descendants(self.proc.pid)])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.home, ignore_errors=True)


def dataset(rows: int) -> Path:
    path = DATA / f"rows_{rows}_f{FILES}"
    if not (path / ".complete").exists():
        shutil.rmtree(path, ignore_errors=True)
        log(f"generating {rows:,} rows with the harness's gen_data.py")
        subprocess.run([PY, str(SHARED / "gen_data.py"), "--rows", str(rows), "--files", str(FILES),
                        "--out", str(path)], check=True, env={**os.environ, **THREADS_ENV})  # fmt: skip
        (path / ".complete").touch()
    return path


def run_measured(name: str, cmd: list[str], env: dict[str, str], out_dir: Path) -> dict[str, Any]:
    """Run ``cmd`` under treemem.py; returns its last JSON stdout line, treemem's figures and the process wall."""
    return run_under_treemem(
        name, cmd, env, SHARED / "treemem.py", out_dir.parent / f"{out_dir.name}.mem.json", TIMEOUT
    )


def check(output: Path, rows: int, reference: Path | None) -> dict[str, Any]:
    """The harness's check_outputs.py over the part files (the harness globs *.json*; our _manifest.json is not
    an output row, so the part files are linked into a folder of their own)."""
    view = output.parent / f"{output.name}.parts"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir()
    for part in sorted(output.glob("part-*.jsonl")) or sorted(output.glob("*.jsonl")):
        (view / part.name).symlink_to(part)
    cmd = [PY, str(SHARED / "check_outputs.py"), "--output", str(view), "--rows", str(rows)]
    if reference is not None:
        cmd += ["--reference", str(reference)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(view, ignore_errors=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def bench_size(rows: int, server: PrefectServer, config: Path) -> dict[str, Any]:
    data = dataset(rows)
    base_env = {**os.environ, **THREADS_ENV}
    mk_env = {**base_env, "PREFECT_API_URL": server.api_url, "PYTHONPATH": str(HERE),
              "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MODALKIT_SHARED_BENCH": str(SHARED)}  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "modalkit": []}
    reference: Path | None = None
    for round_no in range(ROUNDS):
        order = ["bare", "modalkit"] if round_no % 2 == 0 else ["modalkit", "bare"]
        for name in order:
            out = OUT / f"rows_{rows}" / f"{name}-{round_no}"
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            if name == "bare":
                cmd = [PY, str(SHARED / "run_mp.py"), "--input", str(data), "--output", str(out), "--workers", "2"]
                measured = run_measured(name, cmd, base_env, out)
                rps = measured["result"]["rows_per_s"]
            else:
                cmd = [str(BIN / "modalkit"), "batch", str(data), str(out), "--config", str(config), "--json"]
                measured = run_measured(name, cmd, mk_env, out)
                rps = measured["result"]["records_per_s"]
            measured["checked"] = check(out, rows, reference if name == "modalkit" else None)
            measured["job_rows_per_s"] = rps
            runs[name].append(measured)
            log(f"{rows:,} rows, round {round_no + 1}/{ROUNDS}, {name}: {rps:,.0f} rows/s (job), "
                f"{measured['process_wall_s']:.1f} s process, peak tree RSS "
                f"{measured['mem']['peak_tree_rss_mb']:.0f} MB, check ok={measured['checked'].get('ok')}")  # fmt: skip
            if name == "bare" and reference is None:
                reference = out
            elif out != reference:
                shutil.rmtree(out, ignore_errors=True)
    if reference is not None:
        shutil.rmtree(reference, ignore_errors=True)
    return {"rows": rows, "runs": runs, "server_rss_mb": server.rss_mb()}


# --- start-up: command to first chunk running, and whole-process wall, for a 10-record job -----------------------

STARTUP_ROUNDS = int(os.environ.get("BENCH_STARTUP_ROUNDS", "5"))
#: the CLI's start-up marks (MODALKIT_STARTUP_TRACE), in order, with what each one ends
PHASES = [
    ("process", "interpreter start to modalkit.cli imported"),
    ("options", "settings loaded and options checked"),
    ("planned", "input listed, chunks planned, output claimed, committed chunks found"),
    ("runner", "local workers spawned (as many as chunks, at most one per CPU), first chunks started"),
    ("prefect_api", "Prefect imported and its API found, in a thread since the options (the first chunks run)"),
    ("done", "the flow run (all chunks, manifest, artifacts)"),
]
#: the yardstick of the start-up target: a 10-record job's whole-process wall at most 2x this one's
IMPORT_PREFECT = [PY, "-c", "import prefect"]


def startup_dataset() -> Path:
    path = DATA / "startup_10"
    if not (path / ".complete").exists():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run([PY, str(SHARED / "gen_data.py"), "--rows", "10", "--files", "1", "--out", str(path)],
                       check=True, env={**os.environ, **THREADS_ENV})  # fmt: skip
        (path / ".complete").touch()
    return path


def startup_run(config: Path, env: dict[str, str], name: str) -> dict[str, Any]:
    """One 10-record job: seconds from launching the command to its first chunk running, and to its exit."""
    out = OUT / "startup" / name
    shutil.rmtree(out, ignore_errors=True)
    trace = OUT / "startup" / f"{name}.trace.json"
    trace.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "modalkit"), "batch", str(startup_dataset()), str(out), "--config", str(config), "--json"]
    launched = time.time()
    proc = subprocess.run(cmd, env={**env, "MODALKIT_STARTUP_TRACE": str(trace)}, capture_output=True, text=True)
    wall = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"start-up run {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "_manifest.json").read_text())
    first = manifest["first_chunk_started_at"] - launched
    marks = json.loads(trace.read_text()) if trace.exists() else {}
    shutil.rmtree(out, ignore_errors=True)
    return {"first_chunk_s": first, "wall_s": wall, "marks": {k: v - launched for k, v in marks.items()}}


def import_prefect_wall(env: dict[str, str]) -> float:
    """Whole-process seconds of ``python -c "import prefect"``, the yardstick of the start-up target."""
    launched = time.perf_counter()
    subprocess.run(IMPORT_PREFECT, env=env, capture_output=True, check=True)
    return time.perf_counter() - launched


def bench_startup(server: PrefectServer, config: Path) -> dict[str, Any]:
    """The three ways a run finds Prefect: a configured server, modalkit's local server already up, and that
    server stopped (the first run after it went idle: the run starts it). Plus one run on a fresh machine.

    Beside each run with modalkit's local server up (no Prefect server configured: the case the target is set
    on), ``import prefect`` runs too, in turn, so that their ratio is taken pair by pair."""
    home = Path(tempfile.mkdtemp(prefix="modalkit-bench-home-"))
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base.update(
        THREADS_ENV,
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        MODALKIT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    scenarios = {
        "a running Prefect server (PREFECT_API_URL)": {**base, "PREFECT_API_URL": server.api_url},
        "no server configured, modalkit's local server up": base,
        "no server configured, modalkit's local server stopped": base,
    }
    stop = [str(BIN / "modalkit"), "prefect", "stop"]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in scenarios}
    try:
        first_ever = startup_run(config, base, "first-ever")  # a new MODALKIT_HOME: the server's database is new
        log(f"start-up, first run on a fresh machine: first chunk at {first_ever['first_chunk_s']:.2f} s, "
            f"exit at {first_ever['wall_s']:.2f} s")  # fmt: skip
        for round_no in range(STARTUP_ROUNDS):
            for i, (name, env) in enumerate(scenarios.items()):
                if "stopped" in name:
                    subprocess.run(stop, env=env, capture_output=True, check=True)
                run = startup_run(config, env, f"{round_no}-{i}")
                if "up" in name:
                    run["import_prefect_s"] = import_prefect_wall(env)
                results[name].append(run)
                log(f"start-up, {name}: first chunk at {run['first_chunk_s']:.2f} s, exit at {run['wall_s']:.2f} s")
    finally:
        subprocess.run(stop, env=base, capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)
    return {"first_ever": first_ever, "scenarios": results}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(size: dict[str, Any]) -> dict[str, Any]:
    bare, mk = size["runs"]["bare"], size["runs"]["modalkit"]
    pairs = list(zip(bare, mk, strict=False))
    return {
        "rows": size["rows"],
        "bare_rps": _median([r["job_rows_per_s"] for r in bare]),
        "mk_rps": _median([r["job_rows_per_s"] for r in mk]),
        "ratio_job": _median([m["job_rows_per_s"] / b["job_rows_per_s"] for b, m in pairs]),
        "bare_wall": _median([r["process_wall_s"] for r in bare]),
        "mk_wall": _median([r["process_wall_s"] for r in mk]),
        "ratio_wall": _median([b["process_wall_s"] / m["process_wall_s"] for b, m in pairs]),
        "bare_rss": max(r["mem"]["peak_tree_rss_mb"] for r in bare),
        "mk_rss": max(r["mem"]["peak_tree_rss_mb"] for r in mk),
        "bare_pss": max(r["mem"]["peak_tree_pss_mb"] for r in bare),
        "mk_pss": max(r["mem"]["peak_tree_pss_mb"] for r in mk),
        "mk_cpu": _median([r["mem"]["tree_cpu_s_sampled"] for r in mk]),
        "bare_cpu": _median([r["mem"]["tree_cpu_s_sampled"] for r in bare]),
        "checks_ok": all(r["checked"].get("ok") for r in bare + mk),
        "server_rss_mb": size["server_rss_mb"],
        "mk_job_s": _median([r["result"]["seconds"] for r in mk]),
    }


def startup_lines(startup: dict[str, Any]) -> list[str]:
    lines = [
        "## Start-up",
        "",
        "A 10-record job (`modalkit batch IN OUT --json`, local backend, the toy model; one chunk, so one of the",
        "2 workers starts): seconds from",
        "launching the command to its first chunk running (the chunk's own `started_at`), and to the command's",
        f"exit; medians of {STARTUP_ROUNDS} runs each, min to max in brackets.",
        "",
        "| how the run finds Prefect | command to first chunk running, s | whole process, s |",
        "|---|---|---|",
    ]
    for name, runs in startup["scenarios"].items():
        first = [r["first_chunk_s"] for r in runs]
        wall = [r["wall_s"] for r in runs]
        lines.append(f"| {name} | **{_median(first):.2f}** ({min(first):.2f}-{max(first):.2f}) "
                     f"| {_median(wall):.2f} ({min(wall):.2f}-{max(wall):.2f}) |")  # fmt: skip
    ever = startup["first_ever"]
    lines.append(f"| first run on a fresh machine (the local server creates its database) "
                 f"| {ever['first_chunk_s']:.2f} | {ever['wall_s']:.2f} |")  # fmt: skip
    paired = [r for runs in startup["scenarios"].values() for r in runs if "import_prefect_s" in r]
    if paired:
        job, imp = [r["wall_s"] for r in paired], [r["import_prefect_s"] for r in paired]
        ratio = _median([r["wall_s"] / r["import_prefect_s"] for r in paired])
        lines += ["", "The start-up target (no Prefect server configured, modalkit's local server up; the job and "
                  "`python -c \"import prefect\"` run in turn, the ratio taken pair by pair):", "",
                  "| 10-record job whole-process wall, s | import prefect wall, s | job / import prefect |",
                  "|---|---|---|",
                  f"| {_median(job):.2f} ({min(job):.2f}-{max(job):.2f}) | {_median(imp):.2f} "
                  f"({min(imp):.2f}-{max(imp):.2f}) | **{ratio:.2f}x** (target: at most 2x) |"]  # fmt: skip
    runs = next(iter(startup["scenarios"].values()))
    lines += ["", "Where the seconds go (a running Prefect server; seconds since the command was launched, medians):",
              ""]  # fmt: skip
    for key, what in PHASES:
        marks = [r["marks"][key] for r in runs if key in r["marks"]]
        if marks:
            lines.append(f"- {_median(marks):.2f} s: {what}")
    firsts = [r["first_chunk_s"] for r in runs]
    lines.append(f"- the first chunk started at {_median(firsts):.2f} s, while Prefect was still being imported")
    return [*lines, ""]


def write_results(
    rows: list[dict[str, Any]],
    startup: dict[str, Any] | None = None,
    w2: list[str] | None = None,
    repeats: list[str] | None = None,
    scale: list[str] | None = None,
    w3: list[str] | None = None,
) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "modalkit", "flows", "tasks"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()  # fmt: skip
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (bench/run.py) on {dt.date.today().isoformat()}, commit "
        f"{commit.stdout.strip() or '?'}{' with uncommitted changes' if dirty else ''}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "",
        "W1 of `../shared/bench`: JSONL in and out, the harness's toy model, batches of 256, 4 shards, one BLAS",
        "thread per process. `bare` is the harness's `run_mp.py --workers 2`; `modalkit` is",
        f"`modalkit batch IN OUT --json` with the local backend (2 workers, chunk_size {CHUNK_SIZE}, no queues)",
        "against a Prefect server started once. The two ran in turn in one session",
        f"({ROUNDS} pairs per size); medians, ratios taken pair by pair. Every output was checked with the",
        "harness's `check_outputs.py` against the bare loop's predictions.",
        "",
        "| rows | bare rows/s (job) | modalkit rows/s (job) | ratio (job) | bare process s | modalkit process s "
        "| ratio (process) | peak tree RSS MB bare / modalkit | peak tree PSS MB modalkit | outputs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        lines.append(
            f"| {s['rows']:,} | {s['bare_rps']:,.0f} | {s['mk_rps']:,.0f} | **{s['ratio_job']:.3f}x** "
            f"| {s['bare_wall']:.1f} | {s['mk_wall']:.1f} | {s['ratio_wall']:.3f}x "
            f"| {s['bare_rss']:.0f} / {s['mk_rss']:.0f} | {s['mk_pss']:.0f} | {'ok' if s['checks_ok'] else 'FAIL'} |"
        )
    if startup is not None:
        lines += ["", *startup_lines(startup)]
    lines += ["", "## Targets", ""]
    first = rows[0]
    ratios = "; ".join(f"**{s['ratio_job']:.3f}x** at {s['rows']:,} rows ({s['ratio_wall']:.3f}x by whole-process wall)"
                       for s in rows)  # fmt: skip
    lines.append(f"- records/s at least 0.9x the bare 2-process loop, job clock: {ratios}.")
    lines.append(f"- peak memory of the whole process tree under 1 GiB: **{max(s['mk_rss'] for s in rows):.0f} MB** "
                 f"RSS ({max(s['mk_pss'] for s in rows):.0f} MB PSS); the Prefect server, a separate long-lived "
                 f"process, held {first['server_rss_mb']:.0f} MB besides.")  # fmt: skip
    if len(rows) > 1:
        growth = rows[-1]["mk_rss"] / rows[0]["mk_rss"] - 1
        lines.append(f"- memory growth from {rows[0]['rows']:,} to {rows[-1]['rows']:,} rows under 20%: "
                     f"**{growth:+.1%}** (peak tree RSS).")  # fmt: skip
    lines += [
        "",
        "## Notes",
        "",
        "- Job clock: modalkit's `seconds` covers the whole flow run (planning, spawning and loading the two",
        "  workers, every chunk, the manifest and the Prefect artifacts); the bare loop's covers pool start to end.",
        "- Process wall adds interpreter start and imports (Prefect's import is about two seconds here) and the",
        "  flow run's exit (with a configured server, Prefect joins its heartbeat thread, which sleeps in one-second",
        "  steps; runs on modalkit's local server send no heartbeats).",
        f"- CPU seconds over the tree (median, sampled): bare {first['bare_cpu']:.1f}, modalkit {first['mk_cpu']:.1f}.",
        "- The anchors in ../shared/bench/ANCHORS.md put the bare 2-process loop at about 2.7x Ray Data on this",
        "  machine; compare ratios only, never absolute figures across sessions.",
    ]
    if repeats:
        lines += ["", *repeats]
    if w2:
        lines += ["", *w2]
    if scale:
        lines += ["", *scale]
    if w3:
        lines += ["", *w3]
    if CODE_MEASUREMENTS.exists():
        lines += ["", *CODE_MEASUREMENTS.read_text(encoding="utf-8").splitlines()]
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log(f"wrote {RESULTS}")


def scale_row(server: PrefectServer, config: Path) -> list[str]:
    """The scale row (bench/scale.py), against the benchmark's Prefect server, after W1 (never beside it)."""
    sys.path.insert(0, str(HERE))
    import scale

    return scale.markdown(scale.run(config, server.api_url, {**os.environ, **THREADS_ENV,
                                                             "MODALKIT_SHARED_BENCH": str(SHARED)}))  # fmt: skip


def w3_section(server: PrefectServer) -> list[str]:
    """W3 (bench/w3.py), against the benchmark's Prefect server, after the others (never beside them)."""
    sys.path.insert(0, str(HERE))
    import w3

    return w3.markdown(w3.run(server.api_url))


def main() -> int:
    if not (SHARED / "run_mp.py").exists():
        log(f"the reference harness is not at {SHARED}; set MODALKIT_SHARED_BENCH")
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    config = OUT / "modalkit-bench.yaml"
    config.write_text(BENCH_CONFIG, encoding="utf-8")
    log("starting a Prefect server for the benchmark")
    server = PrefectServer()
    try:
        startup = bench_startup(server, config) if STARTUP_ROUNDS else None
        results = [summarize(bench_size(rows, server, config)) for rows in SIZES]
        scale_lines = scale_row(server, config) if SCALE else None
        w3_lines = w3_section(server) if W3 else None
    finally:
        server.stop()
    if not SIZES:  # BENCH_SIZES="": the start-up runs (and the scale row, W3) only, printed; W3's section replaces
        # its own in RESULTS.md, the rest of which is left as it is
        printed = [*(startup_lines(startup) if startup else []), *(scale_lines or []), *(w3_lines or [])]
        print("\n".join(printed) if printed else "nothing measured", flush=True)
        if w3_lines:
            import w3

            w3.splice(RESULTS, w3_lines)
            log(f"wrote W3's section into {RESULTS}")
        return 0
    repeats_lines = None
    if REPEATS:  # measured directly, alone on the machine, at W1's sizes
        sys.path.insert(0, str(HERE))
        import repeated_ids

        measured = [repeated_ids.measure(rows, str_ids) for rows in SIZES for str_ids in (False, True)]
        repeats_lines = repeated_ids.markdown(measured, {s["rows"]: s["rows"] / s["mk_rps"] for s in results})
    w2_lines = None
    if W2:  # the online workload, after the batch one (never beside it: they would share the cores)
        sys.path.insert(0, str(HERE))
        import w2

        w2_lines = w2.markdown(w2.run())
    write_results(results, startup, w2_lines, repeats_lines, scale_lines, w3_lines)
    for s in results:
        log(f"{s['rows']:,} rows: modalkit/bare = {s['ratio_job']:.3f}x (job), {s['ratio_wall']:.3f}x (process); "
            f"peak tree RSS {s['mk_rss']:.0f} MB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
