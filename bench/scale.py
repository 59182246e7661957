#!/usr/bin/env python3
"""The scale row of ``make bench``: many small files against the same records in one file, side by side.

W1's records (the harness's ``gen_data.py``, 5 a file) in ``BENCH_SCALE_FILES`` local JSONL files (default
20,000: 100,000 records) and, the same records, in one file; both through ``modalkit batch IN OUT --json`` as a
user runs it (the toy model, local backend with 2 workers, no Prefect API configured: modalkit's own local
server, the embedded default). For each job:

* wall: the whole command, and the job's own clock (the summary's ``seconds``);
* Prefect task runs the job made, read back through the Prefect API (the server's count before and after);
* objects written (files under the output) and ``_manifest.json``'s bytes.

Then a no-op rerun of the finished many-file job (every chunk committed), the same again against the benchmark's
Prefect server (a configured API: version check and heartbeats on), and the planning of
``BENCH_SCALE_PLAN_FILES`` listed local files (default 100,000: ``list_dataset`` + ``plan_chunks``, in a process of
its own), first with an empty content-hash cache (every file is read once for its hash), then again.

    python bench/run.py   # with the other rows; BENCH_SCALE=0 skips this one

Targets (issue 17): the many-file job's wall within 1.5x of the one-file job's, task runs at most
``2 x concurrency + 10``, the no-op rerun under 5 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("MODALKIT_SHARED_BENCH", REPO.parent / "shared" / "bench")).resolve()
DATA = HERE / "data"
OUT = HERE / "out" / "scale"
PY = sys.executable
FILES = int(os.environ.get("BENCH_SCALE_FILES", "20000"))
PLAN_FILES = int(os.environ.get("BENCH_SCALE_PLAN_FILES", "100000"))
RECORDS_PER_FILE = 5
#: chunks in flight at once: the benchmark's config runs 2 local workers and sets no concurrency
CONCURRENCY = 2
TIMEOUT = 3600
#: seconds the server's task-run count must stay still before it is read
SETTLE_S = 5.0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def dataset(rows: int, files: int) -> Path:
    """W1's ``rows`` records over ``files`` files, as the harness's ``gen_data.py --files`` cuts them (a record
    depends on its id only): the one-file dataset made by ``gen_data.py``, then its lines dealt out in order (much
    faster than ``gen_data.py`` writing 100,000 files)."""
    path = DATA / f"scale_{rows}_f{files}"
    if (path / ".complete").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    if files == 1:
        log(f"generating {rows:,} rows with the harness's gen_data.py")
        subprocess.run([PY, str(SHARED / "gen_data.py"), "--rows", str(rows), "--files", "1", "--out", str(path)],
                       check=True)  # fmt: skip
    else:
        log(f"cutting {rows:,} rows into {files:,} files")
        lines = (dataset(rows, 1) / "part-00000.jsonl").read_bytes().splitlines(keepends=True)
        bounds = [rows * k // files for k in range(files + 1)]  # numpy.linspace(0, rows, files + 1), as gen_data
        path.mkdir(parents=True)
        for k in range(files):
            (path / f"part-{k:05d}.jsonl").write_bytes(b"".join(lines[bounds[k] : bounds[k + 1]]))
    (path / ".complete").touch()  # a hidden name: not part of the dataset
    return path


def task_runs(api_url: str) -> int:
    """How many task runs the Prefect server holds (``POST /task_runs/count``), once the count has settled: a
    flow run's task runs reach the server's database through its event stream, seconds after the run ends."""
    seen, since = -1, time.monotonic()
    deadline = since + 120
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"{api_url}/task_runs/count", data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            count = int(json.loads(response.read()))
        if count != seen:
            seen, since = count, time.monotonic()
        elif time.monotonic() - since >= SETTLE_S:
            break
        time.sleep(0.5)
    return seen


def run_job(name: str, data: Path, out: Path, config: Path, env: dict[str, str], api_url: str) -> dict[str, Any]:
    """``modalkit batch`` over ``data`` into ``out``: its summary, wall, task runs, objects and manifest bytes."""
    before = task_runs(api_url)
    cmd = [PY, "-m", "modalkit.cli", "batch", str(data), str(out), "--config", str(config), "--json"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"scale job {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    objects = sum(1 for p in out.rglob("*") if p.is_file())
    manifest = out / "_manifest.json"
    measured = {
        "wall_s": wall,
        "job_s": float(summary["seconds"]),
        "records": int(summary["records"]),
        "chunks": int(summary["chunks"]),
        "chunks_skipped": int(summary["chunks_skipped"]),
        "task_runs": task_runs(api_url) - before,
        "objects": objects,
        "manifest_bytes": manifest.stat().st_size if manifest.exists() else 0,
    }
    log(f"scale, {name}: {wall:.1f} s wall ({measured['job_s']:.1f} s job), {measured['records']:,} records, "
        f"{measured['chunks']:,} chunks ({measured['chunks_skipped']:,} skipped), {measured['task_runs']:,} task "
        f"runs, {objects:,} objects, manifest {measured['manifest_bytes']:,} bytes")  # fmt: skip
    return measured


def plan_seconds(data: Path) -> dict[str, Any]:
    """Listing and planning ``data`` in a process of its own, with an empty content-hash cache, then again."""
    home = Path(tempfile.mkdtemp(prefix="modalkit-bench-scale-home-"))
    env = {**os.environ, "MODALKIT_HOME": str(home)}
    try:
        runs = []
        for _ in range(2):
            proc = subprocess.run([PY, __file__, "plan", str(data)], env=env, capture_output=True, text=True,
                                  check=True, timeout=TIMEOUT)  # fmt: skip
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    first, again = runs
    log(f"scale, planning {first['files']:,} local files: list {first['list_s']:.2f} s + plan {first['plan_s']:.2f} s "
        f"first, list {again['list_s']:.2f} s + plan {again['plan_s']:.2f} s again")  # fmt: skip
    return {"first": first, "again": again}


def plan_here(data: str) -> None:
    """Print what listing and planning ``data`` took in this process (the ``plan`` subcommand)."""
    sys.path.insert(0, str(REPO))
    from modalkit.batch.planning import list_dataset, plan_chunks

    started = time.perf_counter()
    files = list_dataset(data)
    listed = time.perf_counter()
    chunks = plan_chunks(files, chunk_size=32 * 1024 * 1024)
    planned = time.perf_counter()
    print(json.dumps({"files": len(files), "chunks": len(chunks), "list_s": listed - started,
                      "plan_s": planned - listed}))  # fmt: skip


def managed_server(env: dict[str, str]) -> str:
    """modalkit's own local Prefect server for ``env``'s MODALKIT_HOME, started as a job would start it (the
    embedded default); its API URL."""
    code = "from modalkit.cli_prefect import ensure_server; print(ensure_server().api_url)"
    proc = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=TIMEOUT)
    return proc.stdout.strip().splitlines()[-1]


def run(config: Path, api_url: str, env: dict[str, str]) -> dict[str, Any]:
    """The scale row: the two jobs and the no-op rerun as a user runs them (no Prefect API configured: modalkit's
    own local server, started once before them), the no-op rerun again against the benchmark's server (a
    configured API), and the planning of ``PLAN_FILES`` files."""
    rows = FILES * RECORDS_PER_FILE
    many, one = dataset(rows, FILES), dataset(rows, 1)
    home = Path(tempfile.mkdtemp(prefix="modalkit-bench-scale-home-"))
    path = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    job_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    job_env.update({"MODALKIT_HOME": str(home), "PYTHONPATH": path})
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    try:
        local = managed_server(job_env)
        jobs = {
            "one file": run_job("one file", one, OUT / "one", config, job_env, local),
            f"{FILES:,} files": run_job(f"{FILES:,} files", many, OUT / "many", config, job_env, local),
        }
        rerun = run_job(f"{FILES:,} files, no-op rerun", many, OUT / "many", config, job_env, local)
        configured = {**job_env, "PREFECT_API_URL": api_url}
        rerun_configured = run_job(
            f"{FILES:,} files, no-op rerun, configured API", many, OUT / "many", config, configured, api_url
        )
    finally:
        subprocess.run([PY, "-m", "modalkit.cli", "prefect", "stop"], env=job_env, capture_output=True,
                       timeout=TIMEOUT)  # fmt: skip
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(OUT, ignore_errors=True)
    planning = plan_seconds(dataset(PLAN_FILES * RECORDS_PER_FILE, PLAN_FILES))
    return {"files": FILES, "jobs": jobs, "rerun": rerun, "rerun_configured": rerun_configured,
            "planning": planning}  # fmt: skip


def markdown(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section of the scale row."""
    files, jobs, rerun, planning = result["files"], result["jobs"], result["rerun"], result["planning"]
    one, many = jobs["one file"], jobs[f"{files:,} files"]
    ratio = many["wall_s"] / one["wall_s"]
    bound = 2 * CONCURRENCY + 10
    lines = [
        "## Scale: many small files against one file",
        "",
        f"W1's records, {RECORDS_PER_FILE} a file in {files:,} local JSONL files, against the same "
        f"{many['records']:,} records in one file; both `modalkit batch IN OUT --json` (local backend, 2 workers, "
        "the toy model) as a user runs it: no Prefect API configured, so against modalkit's own local server "
        "(started once, before them), one after the other. Task runs: that server's count before and after each "
        "job. Objects: files under the output. The last row is the no-op rerun again with `PREFECT_API_URL` set to "
        "the benchmark's server: Prefect's client then checks the server's version first, and the flow run's "
        "heartbeat thread (on by default, every 180 s) is joined as the run ends, which waits for its next "
        "one-second tick.",
        "",
        "| job | wall s | job s | records | chunks | Prefect task runs | objects written | manifest bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    configured = result.get("rerun_configured")
    reruns = [(f"{files:,} files, no-op rerun", rerun)]
    if configured is not None:
        reruns.append((f"{files:,} files, no-op rerun, configured Prefect API", configured))
    for name, m in [*jobs.items(), *reruns]:
        lines.append(f"| {name} | {m['wall_s']:.1f} | {m['job_s']:.1f} | {m['records']:,} | {m['chunks']:,} "
                     f"| {m['task_runs']:,} | {m['objects']:,} | {m['manifest_bytes']:,} |")  # fmt: skip
    first, again = planning["first"], planning["again"]
    lines += [
        "",
        f"- wall of the {files:,}-file job within 1.5x of the one-file job's: **{ratio:.2f}x** "
        f"({'met' if ratio <= 1.5 else 'not met'}).",
        f"- Prefect task runs at most 2 x concurrency + 10 = {bound}: **{many['task_runs']:,}** for the "
        f"{files:,}-file job, {one['task_runs']:,} for the one-file job "
        f"({'met' if max(many['task_runs'], one['task_runs']) <= bound else 'not met'}).",
        f"- no-op rerun of the finished {files:,}-file job under 5 s: **{rerun['wall_s']:.1f} s** "
        f"({'met' if rerun['wall_s'] < 5 else 'not met'})"
        + (f"; {configured['wall_s']:.1f} s against a configured Prefect API." if configured else "."),
        f"- planning {first['files']:,} listed local files ({RECORDS_PER_FILE} records each; `list_dataset` + "
        f"`plan_chunks`, {first['chunks']:,} chunks): **{first['list_s'] + first['plan_s']:.1f} s** with an empty "
        f"content-hash cache (list {first['list_s']:.1f} s, every file read once for its hash; plan "
        f"{first['plan_s']:.1f} s), **{again['list_s'] + again['plan_s']:.1f} s** again (list {again['list_s']:.1f} s, "
        f"a stat per file; plan {again['plan_s']:.1f} s).",
    ]
    return lines


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "plan":
        plan_here(sys.argv[2])
    else:
        sys.exit("usage: python bench/scale.py plan DATASET  (the scale row runs from bench/run.py)")
