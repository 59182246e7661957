#!/usr/bin/env python3
"""W3 of ../shared/bench, device-bound batch: modalkit beside the harness's W3 runners, in one run.

W1's data (200,000 rows, 4 shards) and model, with the linear layer on ``sim_device.py``: one simulated accelerator
that holds a device lock and waits with the GIL released, as a host thread waits on a kernel. One device bounds a
runner at ``256 / Device().seconds_for(256)`` records/s; each runner is reported as a fraction of that bound.

Runners, one after the other, each under the harness's ``treemem.py`` (peak RSS of the whole process tree):

* the harness's ``run_w3.py --mode cpu`` (the host stages alone, no device: what one core does), ``seq``,
  ``threads``, ``procs`` and ``ray`` (Ray Data, from a virtual environment of its own, ``bench/.venv-ray``, made
  on first use with ``pip install "ray[data]" numpy``; skipped, saying so, when that fails or ``BENCH_RAY=0``);
* modalkit: ``modalkit batch IN OUT --backend local --json`` with one local worker (one worker = one device) and
  the W3 pipeline (``bench/w3_pipeline.py``: ``preprocess`` featurizes, ``predict`` runs the device in the
  worker). Its device's busy seconds come back through ``$W3_STATS_DIR``, as the harness reads them.

Every output but ``cpu``'s (no softmax there) is checked with the harness's ``check_outputs.py`` against ``seq``'s.
Where modalkit's time goes comes from the job's stage timings (the summary's ``stage_seconds``, else the commit
markers' ``stages``) when the engine reports them.

    python bench/w3.py     # alone, against a Prefect server of its own choosing (PREFECT_API_URL, or modalkit's)

``bench/run.py`` calls it (``BENCH_W3=0`` skips it); ``BENCH_W3_ROWS`` changes the size (default 200000);
``BENCH_W3_HOST_WORKERS`` sets modalkit's ``job_config.host_workers`` (default: empty, the setting's own default:
the CPUs of the one worker less the one its own process keeps: host processes from 3 CPUs a worker).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from procs import run_under_treemem

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("MODALKIT_SHARED_BENCH", REPO.parent / "shared" / "bench")).resolve()
DATA = HERE / "data"
OUT = HERE / "out" / "w3"
PY = sys.executable
ROWS = int(os.environ.get("BENCH_W3_ROWS", "200000"))
FILES = 4
TIMEOUT = 900
RAY = os.environ.get("BENCH_RAY", "1") != "0"
RAY_VENV = HERE / ".venv-ray"
HOST_WORKERS = os.environ.get("BENCH_W3_HOST_WORKERS", "")
RAY_TASK_CPUS = "0.5"  # ANCHORS.md's setting: featurize tasks take half a CPU each
HARNESS_MODES = ["cpu", "seq", "threads", "procs", "ray"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONHASHSEED": "0", "MODALKIT_SHARED_BENCH": str(SHARED)}  # fmt: skip
STAGES = ["read", "parse", "preprocess", "predict", "postprocess", "write", "queue"]

CONFIG = """# written by bench/w3.py: W3's pipeline, local backend with one worker (one device), no queues
app_settings:
  batch_config:
    max_batch_size: 256
  queue_config:
    backend: none
  job_config:
    backend: local
    local_workers: 1
    id_field: id
    output_format: jsonl
model_settings:
  default_model: w3
  model_entries:
    w3:
      pipeline: "w3_pipeline:W3Pipeline"
"""

DESCRIPTIONS = {
    "cpu": "host stages alone, 1 process, no device (`cpu`)",
    "seq": "one batch after another (`seq`)",
    "threads": "three threads, bounded queues (`threads`)",
    "procs": "featurizing processes + device thread (`procs`)",
    "ray": f"Ray Data, featurize tasks + one device actor (`ray`, task CPUs {RAY_TASK_CPUS})",
    "modalkit": f"modalkit, `--backend local`, 1 worker, host_workers {HOST_WORKERS or 'empty (default: CPUs - 1)'}",
}


def log(msg: str) -> None:
    print(f"[w3] {msg}", file=sys.stderr, flush=True)


def _sim_device() -> Any:
    if str(SHARED) not in sys.path:
        sys.path.insert(0, str(SHARED))
    import sim_device

    return sim_device


def device_bound() -> float:
    """Records/s one device allows at batch 256: the figure every runner is divided by."""
    return 256 / float(_sim_device().Device().seconds_for(256))


def dataset() -> Path:
    path = DATA / f"rows_{ROWS}_f{FILES}"
    if not (path / ".complete").exists():
        shutil.rmtree(path, ignore_errors=True)
        log(f"generating {ROWS:,} rows with the harness's gen_data.py")
        subprocess.run([PY, str(SHARED / "gen_data.py"), "--rows", str(ROWS), "--files", str(FILES),
                        "--out", str(path)], check=True, env=ENV)  # fmt: skip
        (path / ".complete").touch()
    return path


def ray_python() -> Path | None:
    """The Ray environment's interpreter, made on first use; None (and why, logged) when Ray cannot be had."""
    if not RAY:
        log("BENCH_RAY=0: the Ray Data runner is skipped")
        return None
    python = RAY_VENV / "bin" / "python"
    probe = [str(python), "-c", "import ray.data, numpy"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    log(f"making {RAY_VENV} for the Ray Data runner (pip install 'ray[data]' numpy; once)")
    base = getattr(sys, "_base_executable", sys.executable)
    made = subprocess.run([base, "-m", "venv", str(RAY_VENV)], capture_output=True, text=True)
    if made.returncode == 0:
        made = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "ray[data]", "numpy"], capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0 or subprocess.run(probe, capture_output=True).returncode != 0:
        log(f"the Ray Data runner is skipped: Ray could not be installed in {RAY_VENV} "
            f"({(made.stderr or made.stdout).strip().splitlines()[-1:] or 'import failed'})")  # fmt: skip
        return None
    return python


def measured(name: str, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` under treemem.py; its last JSON stdout line, treemem's figures and the process wall."""
    return run_under_treemem(f"W3 {name}", cmd, env, SHARED / "treemem.py", OUT / f"{name}.mem.json", TIMEOUT)


def check(output: Path, reference: Path | None) -> bool:
    """The harness's check_outputs.py: ROWS records, ids 0..ROWS-1 once each, the reference's predictions."""
    view = output.parent / f"{output.name}.rows"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir()
    for part in sorted(p for p in output.glob("*.json*") if not p.name.startswith("_")):
        (view / part.name).symlink_to(part)
    cmd = [PY, str(SHARED / "check_outputs.py"), "--output", str(view), "--rows", str(ROWS)]
    if reference is not None:
        cmd += ["--reference", str(reference)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(view, ignore_errors=True)
    return proc.returncode == 0


def harness_runner(mode: str, data: Path, python: str) -> dict[str, Any]:
    out = OUT / mode
    stats = Path(tempfile.mkdtemp(prefix=f"w3-stats-{mode}-"))
    env = {**ENV, "W3_STATS_DIR": str(stats), "W3_RAY_TASK_CPUS": RAY_TASK_CPUS}
    cmd = [python, str(SHARED / "run_w3.py"), "--mode", mode, "--input", str(data), "--output", str(out)]
    try:
        run = measured(mode, cmd, env)
    finally:
        shutil.rmtree(stats, ignore_errors=True)
    r = run["result"]
    return {"runner": mode, "rows": r["rows"], "rows_per_s": r["rows_per_s"], "wall_s": r["wall_s"],
            "process_wall_s": run["process_wall_s"], "device_busy_s": r["device_busy_s"], "mem": run["mem"],
            "out": out}  # fmt: skip


def modalkit_stages(summary: dict[str, Any], out: Path) -> dict[str, float] | None:
    """Seconds in each stage: the summary's ``stage_seconds`` (or ``stages``), else the markers' ``stages`` summed;
    None when the engine reports none (the sequential engine before issue 18's executor)."""
    for key in ("stage_seconds", "stages"):
        if isinstance(summary.get(key), dict):
            return {k: float(v) for k, v in summary[key].items() if k in STAGES}
    total: dict[str, float] = {}
    for marker in sorted((out / "_chunks").glob("*.json")):
        stages = json.loads(marker.read_text()).get("stages")
        if not isinstance(stages, dict):
            return None
        for k in STAGES:
            total[k] = total.get(k, 0.0) + float(stages.get(k, 0.0))
    return total or None


def modalkit_runner(data: Path, api_url: str | None) -> dict[str, Any]:
    out = OUT / "modalkit"
    config = OUT / "w3.yaml"
    text = CONFIG.replace("    local_workers: 1\n", f"    local_workers: 1\n    host_workers: {HOST_WORKERS}\n")
    config.write_text(text if HOST_WORKERS else CONFIG, encoding="utf-8")
    stats = Path(tempfile.mkdtemp(prefix="w3-stats-modalkit-"))
    env = {**ENV, "W3_STATS_DIR": str(stats), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), str(SHARED)])}  # fmt: skip
    if api_url:
        env["PREFECT_API_URL"] = api_url
    cmd = [PY, "-m", "modalkit.cli", "batch", str(data), str(out), "--config", str(config), "--backend", "local",
           "--json"]  # fmt: skip
    try:
        run = measured("modalkit", cmd, env)
        device = _sim_device().read_stats(str(stats))
    finally:
        shutil.rmtree(stats, ignore_errors=True)
    s = run["result"]
    return {"runner": "modalkit", "rows": s["records"], "rows_per_s": s["records_per_s"], "wall_s": s["seconds"],
            "process_wall_s": run["process_wall_s"], "device_busy_s": device["busy_s"], "mem": run["mem"],
            "out": out, "stages": modalkit_stages(s, out), "chunks": s.get("chunks"),
            "device_busy_fraction": s.get("device_busy_fraction"), "chunk_seconds": s.get("chunk_seconds")}  # fmt: skip


def run(api_url: str | None = None) -> dict[str, Any]:
    """Every W3 runner once, one after the other, on the same data; outputs checked against ``seq``'s."""
    data = dataset()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    ray = ray_python()
    bound = device_bound()
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    for mode in HARNESS_MODES:
        if mode == "ray" and ray is None:
            skipped.append("ray")
            continue
        results.append(harness_runner(mode, data, str(ray) if mode == "ray" else PY))
        log(_line(results[-1], bound))
    results.append(modalkit_runner(data, api_url))
    log(_line(results[-1], bound))
    reference = next(r["out"] for r in results if r["runner"] == "seq")
    for r in results:
        r["of_bound"] = r["rows_per_s"] / bound
        r["device_util"] = r["device_busy_s"] / r["wall_s"] if r["runner"] != "cpu" else 0.0
        r["checked"] = r["rows"] == ROWS and (r["runner"] == "cpu" or check(r["out"], reference))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "modalkit"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()  # fmt: skip
    shutil.rmtree(OUT, ignore_errors=True)
    return {"rows": ROWS, "bound": bound, "runs": results, "skipped": skipped, "date": dt.date.today().isoformat(),
            "commit": (commit.stdout.strip() or "?") + (" with uncommitted changes" if dirty else "")}  # fmt: skip


def _line(r: dict[str, Any], bound: float) -> str:
    return (f"{r['runner']}: {r['rows_per_s']:,.0f} rows/s = {r['rows_per_s'] / bound:.2f} of the bound, "
            f"device busy {r['device_busy_s']:.1f} s of {r['wall_s']:.1f} s, "
            f"peak tree RSS {r['mem']['peak_tree_rss_mb']:.0f} MB")  # fmt: skip


def markdown(w3: dict[str, Any]) -> list[str]:
    """The W3 section of RESULTS.md."""
    runs = {r["runner"]: r for r in w3["runs"]}
    lines = [
        "## W3 device-bound batch",
        "",
        f"Measured on {w3['date']}, commit {w3['commit']}, {os.cpu_count()} CPUs; one run of each runner, one after "
        f"the other (`bench/w3.py`, from `make bench`). {w3['rows']:,} rows of W1's data in 4 shards, W1's model with",
        "its linear layer on the harness's simulated device (`sim_device.py`), batches of 256. The device bounds a",
        f"runner at **{w3['bound']:,.0f} records/s**; each runner's records/s over that bound is the figure to",
        "compare (1.0 is the limit). modalkit's clock is the job's own (`seconds`: planning, the worker's start and",
        "load, every chunk, the manifest); the harness's runners time their own loop. Device utilisation: the",
        "device's busy seconds (read back from `$W3_STATS_DIR`) over that clock. Every output but `cpu`'s was",
        "checked with the harness's `check_outputs.py` against `seq`'s. The machine's other work falls on whichever",
        "runner runs beside it: compare runners within one run only. W3 alone (prints this section and puts it",
        "here): `BENCH_SIZES= BENCH_STARTUP_ROUNDS=0 BENCH_W2=0 BENCH_REPEATS=0 BENCH_SCALE=0 "
        ".venv/bin/python bench/run.py`.",
        "",
        "| runner | records/s | of the device bound | device utilisation | wall s (process s) "
        "| peak tree RSS MB | outputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in w3["runs"]:
        of_bound = f"({r['of_bound']:.2f}: the host alone)" if r["runner"] == "cpu" else f"**{r['of_bound']:.2f}**"
        util = "-" if r["runner"] == "cpu" else f"{r['device_util']:.2f}"
        lines.append(f"| {DESCRIPTIONS[r['runner']]} | {r['rows_per_s']:,.0f} | {of_bound} | {util} "
                     f"| {r['wall_s']:.1f} ({r['process_wall_s']:.1f}) | {r['mem']['peak_tree_rss_mb']:.0f} "
                     f"| {'ok' if r['checked'] else 'FAIL'} |")  # fmt: skip
    for name in w3["skipped"]:
        lines.append(f"| {DESCRIPTIONS[name]} | skipped | - | - | - | - | - |")
    mk = runs["modalkit"]
    others = [r for r in w3["runs"] if r["runner"] not in ("modalkit", "cpu")]
    best = max(others, key=lambda r: r["of_bound"]) if others else None
    met = mk["of_bound"] >= 0.9 and (best is None or mk["of_bound"] > best["of_bound"])
    against = f", against {best['of_bound']:.2f} for the best other runner (`{best['runner']}`)" if best else ""
    lines += ["", f"Target: modalkit at 0.9 of the bound or more, and above every other runner: "
              f"**{mk['of_bound']:.2f}**{against} ({'met' if met else 'not met'}); peak tree RSS "
              f"{mk['mem']['peak_tree_rss_mb']:.0f} MB (target: under 1 GiB).",
              "", "### Where each runner's time goes", ""]  # fmt: skip
    lines.append("Seconds of each runner's clock: the device busy, the device idle (waiting on the host: reading, "
                 "parsing, featurizing, writing, and start-up), and the CPU seconds of the whole process tree "
                 "(sampled by `treemem.py`, every process's start-up included).")  # fmt: skip
    lines += ["", "| runner | wall s | device busy s | device idle s | tree CPU s |", "|---|---|---|---|---|"]
    for r in w3["runs"]:
        busy = r["device_busy_s"] if r["runner"] != "cpu" else 0.0
        lines.append(f"| `{r['runner']}` | {r['wall_s']:.1f} | {busy:.1f} | {max(r['wall_s'] - busy, 0.0):.1f} "
                     f"| {r['mem']['tree_cpu_s_sampled']:.1f} |")  # fmt: skip
    lines.append("")
    stages = mk.get("stages")
    if stages:
        total = sum(stages.values())
        shown = ", ".join(f"{k} {stages.get(k, 0.0):.1f} s" for k in STAGES)
        lines.append(f"modalkit's stage timings (summed over its {mk['chunks']} chunks; stages overlap when the "
                     f"engine pipelines them): {shown}; {total:.1f} s in all against the job's {mk['wall_s']:.1f} s"
                     + (f", device busy fraction {mk['device_busy_fraction']:.2f} as the job reports it (its time in "
                        f"`predict` over its chunks' {mk['chunk_seconds']:.1f} s), against "
                        f"{mk['device_busy_s'] / mk['chunk_seconds']:.2f} as the device measured itself over the "
                        "same seconds (issue 19: within 0.1)"
                        if mk.get("device_busy_fraction") is not None and mk.get("chunk_seconds") else "")
                     + ".")  # fmt: skip
    else:
        seq_host = 1e6 / runs["cpu"]["rows_per_s"] if "cpu" in runs else float("nan")
        idle = mk["wall_s"] - mk["device_busy_s"]
        lines.append(f"modalkit's engine reports no stage timings at this commit (the chunk runs each sub-batch's "
                     f"stages one after another on one thread): its device idles {idle:.1f} s "
                     f"of {mk['wall_s']:.1f} s while the host works (the host stages alone cost {seq_host:.0f} us "
                     f"a record in one process, `cpu` above; the device {1e6 / w3['bound']:.0f} us).")  # fmt: skip
    return [*lines, ""]


def splice(results_md: Path, section: list[str]) -> None:
    """Put ``section`` (a ``## W3`` section) into RESULTS.md in place of the one there, or before the hand-kept
    measurements; the rest of the file is left as it is."""
    text = results_md.read_text(encoding="utf-8").splitlines() if results_md.exists() else ["# Benchmark results"]
    start = next((i for i, line in enumerate(text) if line.startswith("## W3")), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
        text[start:end] = section
    else:
        at = next((i for i, line in enumerate(text) if line.startswith("## Measurements behind")), len(text))
        text[at:at] = section
    results_md.write_text("\n".join(text).rstrip("\n") + "\n", encoding="utf-8")


if __name__ == "__main__":
    print("\n".join(markdown(run(os.environ.get("PREFECT_API_URL")))), flush=True)
