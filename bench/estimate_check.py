#!/usr/bin/env python3
"""``modalkit estimate`` against the real local run, on W1 and W3 (200,000 records each, a sample of 5,000).

For each workload, one after the other on the same machine: ``modalkit estimate DATA --config CFG --sample 5000
--json`` (its ``seconds``: the predicted job clock), then ``modalkit batch DATA OUT --config CFG --json`` with the
same settings (its summary's ``seconds``: the job clock measured), the machine's load average noted before and
after each (an estimate measures the machine as it is while it runs: other work that starts or stops between the
estimate and the job moves the job's clock, not the prediction), against a Prefect server of the benchmark's own,
warmed by a 10-record job first (its first start creates a database, which no job clock should carry). W1: the
toy model on 2 local workers (``bench/run.py``'s settings); W3: its pipeline on 1 worker, the device simulated
(``bench/w3.py``'s settings).

    python bench/estimate_check.py     # prints a markdown table: predicted, measured, predicted / measured
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import run
import w3

ROWS = int(os.environ.get("BENCH_ESTIMATE_ROWS", "200000"))
SAMPLE = os.environ.get("BENCH_ESTIMATE_SAMPLE", "5000")
OUT = run.OUT / "estimate"


def modalkit(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """``python -m modalkit.cli ARGS``; its last stdout line as JSON."""
    proc = subprocess.run([run.PY, "-m", "modalkit.cli", *args], env=env, capture_output=True, text=True,
                          timeout=run.TIMEOUT, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"modalkit {args[0]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def check(name: str, config_text: str, data: Path, env: dict[str, str]) -> dict[str, Any]:
    config = OUT / f"{name}.yaml"
    config.write_text(config_text, encoding="utf-8")
    loads = [os.getloadavg()[0]]
    predicted = modalkit(["estimate", str(data), "--config", str(config), "--sample", SAMPLE, "--json"], env)
    out = OUT / f"{name}-out"
    shutil.rmtree(out, ignore_errors=True)
    loads.append(os.getloadavg()[0])
    measured = modalkit(["batch", str(data), str(out), "--config", str(config), "--json"], env)
    loads.append(os.getloadavg()[0])
    shutil.rmtree(out, ignore_errors=True)
    ratio = predicted["seconds"] / measured["seconds"]
    run.log(f"{name}: predicted {predicted['seconds']:.1f} s, measured {measured['seconds']:.1f} s ({ratio:.2f}x); "
            f"records {predicted['records']:,} estimated, {measured['records']:,} run")  # fmt: skip
    return {"name": name, "predicted": predicted, "measured": measured, "ratio": ratio, "loads": loads}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    data = run.dataset(ROWS)
    server = run.PrefectServer()
    path = os.pathsep.join([str(run.REPO), str(run.HERE)])  # this checkout's modalkit, and the bench pipelines
    env = {**os.environ, **run.THREADS_ENV, "PREFECT_API_URL": server.api_url, "PYTHONPATH": path,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MODALKIT_SHARED_BENCH": str(run.SHARED)}  # fmt: skip
    try:
        warm, config = OUT / "warm-out", OUT / "warm.yaml"
        config.write_text(run.BENCH_CONFIG, encoding="utf-8")
        shutil.rmtree(warm, ignore_errors=True)
        modalkit(["batch", str(run.startup_dataset()), str(warm), "--config", str(config), "--json"], env)
        shutil.rmtree(warm, ignore_errors=True)
        found = [check("W1", run.BENCH_CONFIG, data, env), check("W3", w3.CONFIG, data, env)]
    finally:
        server.stop()
    print(
        f"| workload ({ROWS:,} records, sample {int(SAMPLE):,}) | predicted job clock | measured job clock | "
        "predicted / measured | records estimated | bottleneck predicted / measured | load average (1 min) "
        "before the estimate, before and after the job |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for f in found:
        p, m = f["predicted"], f["measured"]
        print(f"| {f['name']} | {p['seconds']:.1f} s | {m['seconds']:.1f} s | {f['ratio']:.2f} | "
              f"{p['records']:,} of {m['records']:,} | {p['bottleneck']} / {m.get('bottleneck')} | "
              f"{' / '.join(f'{load:.1f}' for load in f['loads'])} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
