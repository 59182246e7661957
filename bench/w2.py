#!/usr/bin/env python3
"""W2 of ../shared/bench, online: ``modalkit serve`` beside LitServe (max batch 32) and plain FastAPI, in one run.

One ``{"id", "text"}`` record per POST, the harness's toy model, the harness's own load generator (``load.py``) at
concurrency 1 and 32. Each server runs under the harness's ``treemem.py`` (peak memory of its process tree); the
servers take turns, round by round (A B C A B C ...), so that the noise of this machine falls on all of them.
``modalkit serve`` runs as a user runs it, with the toy model as its pipeline (``bench/toy_pipeline.py``),
``max_batch_size`` 32 and ``wait_ms`` 10 (LitServe's ``batch_timeout`` 0.01).

Then the memory check: 30,000 requests at concurrency 32 against one ``modalkit serve``, the server tree's RSS
sampled after the warm-up and at the end.

    python bench/w2.py            # called by `make bench`; W2_ROUNDS, W2_REQUESTS change the sizes
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import descendants, free_port, rss_mb

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("MODALKIT_SHARED_BENCH", REPO.parent / "shared" / "bench")).resolve()
OUT = HERE / "out" / "w2"
PY = sys.executable
BIN = Path(sys.executable).parent
ROUNDS = int(os.environ.get("W2_ROUNDS", "3"))
REQUESTS = int(os.environ.get("W2_REQUESTS", "3000"))
MEMORY_REQUESTS = int(os.environ.get("W2_MEMORY_REQUESTS", "30000"))
CONCURRENCY = (1, 32)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

CONFIG = """# written by bench/w2.py: W2's toy model behind modalkit serve
app_settings:
  batch_config:
    max_batch_size: 32
    wait_ms: 10
  queue_config:
    backend: memory
model_settings:
  local_model_repository_folder: "{models}"
  default_model: toy
  model_entries:
    toy:
      pipeline: "toy_pipeline:ToyPipeline"
"""


def log(msg: str) -> None:
    print(f"[w2] {msg}", file=sys.stderr, flush=True)


def servers(config: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command, the predict path)."""
    return {
        "modalkit": ([str(BIN / "modalkit"), "serve", "--config", str(config), "--port", "{port}"], "/predict_sync"),
        "litserve": ([PY, str(SHARED / "serve_litserve.py"), "--port", "{port}"], "/predict"),
        "fastapi_plain": ([PY, str(SHARED / "serve_fastapi_plain.py"), "--port", "{port}"], "/predict"),
    }


class Server:
    def __init__(self, name: str, cmd: list[str], path: str, tag: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.path = path
        self.mem = OUT / f"{name}.{tag}.mem"
        env = {**ENV, "PYTHONPATH": os.pathsep.join([str(HERE), str(SHARED)])}
        argv = [a.replace("{port}", str(self.port)) for a in cmd]
        self.log = (OUT / f"{name}.{tag}.log").open("wb")
        self.proc = subprocess.Popen(
            [PY, str(SHARED / "treemem.py"), "--out", str(self.mem), "--interval", "0.5", "--grace", "10",
             "--timeout", "3600", "--", *argv],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=OUT,
        )  # fmt: skip
        ready = subprocess.run([PY, str(SHARED / "load.py"), "--url", f"{self.url}/health", "--wait-ready", "180"],
                               capture_output=True, env=ENV, check=False)  # fmt: skip
        if ready.returncode != 0:
            self.stop()
            raise RuntimeError(f"{name} did not become ready; see {OUT / f'{name}.{tag}.log'}")

    def load(self, concurrency: int, requests: int, warmup: int = 100) -> dict[str, Any]:
        cmd = [PY, str(SHARED / "load.py"), "--url", f"{self.url}{self.path}", "--concurrency", str(concurrency),
               "--requests", str(requests), "--warmup", str(warmup)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=True)
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def rss_mb(self) -> float:
        """RSS of the server's process tree now (treemem's children and theirs)."""
        return rss_mb(descendants(self.proc.pid))

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # treemem forwards it; each server stops cleanly on SIGINT
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        try:
            return dict(json.loads(self.mem.read_text()))
        except (OSError, ValueError):
            return {}


def run() -> dict[str, Any]:
    OUT.mkdir(parents=True, exist_ok=True)
    config = OUT / "modalkit-w2.yaml"
    config.write_text(CONFIG.format(models=OUT / "models"), encoding="utf-8")
    table = servers(config)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {c: [] for c in CONCURRENCY} for name in table}
    memory: dict[str, list[dict[str, Any]]] = {name: [] for name in table}
    for round_no in range(ROUNDS):
        for name, (cmd, path) in table.items():
            server = Server(name, cmd, path, f"r{round_no}")
            try:
                for c in CONCURRENCY:
                    result = server.load(c, REQUESTS)
                    runs[name][c].append(result)
                    log(f"round {round_no + 1}/{ROUNDS}, {name}, c={c}: {result['rps']} rps, p50 {result['p50_ms']} "
                        f"ms, p99 {result['p99_ms']} ms, errors {result['errors']}")  # fmt: skip
            finally:
                memory[name].append(server.stop())
    flat = memory_check(table["modalkit"])
    return {"runs": runs, "memory": memory, "flat": flat}


def memory_check(entry: tuple[list[str], str]) -> dict[str, Any]:
    cmd, path = entry
    server = Server("modalkit", cmd, path, "memory")
    try:
        server.load(32, 2000)
        before = server.rss_mb()
        result = server.load(32, MEMORY_REQUESTS, warmup=0)
        after = server.rss_mb()
    finally:
        server.stop()
    log(f"memory: {MEMORY_REQUESTS:,} requests at c=32, server tree RSS {before:.0f} MB -> {after:.0f} MB")
    return {"before_mb": round(before, 1), "after_mb": round(after, 1), "requests": MEMORY_REQUESTS,
            "errors": result["errors"], "rps": result["rps"]}  # fmt: skip


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Medians per server and concurrency, and the pair-by-pair ratios the targets are set on."""
    med: dict[str, dict[int, dict[str, float]]] = {}
    for name, by_c in data["runs"].items():
        med[name] = {}
        for c, results in by_c.items():
            med[name][c] = {k: statistics.median(r[k] for r in results) for k in ("rps", "p50_ms", "p99_ms")}
            med[name][c]["errors"] = sum(r["errors"] for r in results)
    mk, ls, fp = data["runs"]["modalkit"], data["runs"]["litserve"], data["runs"]["fastapi_plain"]
    rps_ratio = statistics.median(a["rps"] / b["rps"] for a, b in zip(mk[32], ls[32], strict=True))
    p99_ratio = statistics.median(a["p99_ms"] / b["p99_ms"] for a, b in zip(mk[32], ls[32], strict=True))
    p50_gap = statistics.median(a["p50_ms"] - b["p50_ms"] for a, b in zip(mk[1], fp[1], strict=True))
    return {"medians": med, "rps_vs_litserve_c32": rps_ratio, "p99_vs_litserve_c32": p99_ratio,
            "p50_gap_vs_fastapi_c1_ms": p50_gap}  # fmt: skip


def markdown(data: dict[str, Any]) -> list[str]:
    s = summarize(data)
    lines = [
        "## W2 online",
        "",
        f'One `{{"id", "text"}}` per POST, the toy model, the harness\'s `load.py` ({REQUESTS:,} measured requests '
        f"after 100 warm-up ones, client on the same 2 cores); the three servers took turns, {ROUNDS} rounds; "
        "medians, ratios taken round by round. `modalkit serve`: max_batch_size 32, wait_ms 10; LitServe: "
        "max_batch_size 32, batch_timeout 0.01; plain FastAPI: one model call per request, no batching.",
        "",
        "| server | c | rps | p50 ms | p99 ms | errors | peak tree RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_c in s["medians"].items():
        peaks = [m.get("peak_tree_rss_mb", 0) for m in data["memory"][name]]
        rss = statistics.median(peaks) if peaks else 0
        for c, m in by_c.items():
            lines.append(f"| {name} | {c} | {m['rps']:,.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                         f"{int(m['errors'])} | {rss:.0f} |")  # fmt: skip
    flat = data["flat"]
    lines += [
        "",
        "Targets:",
        "",
        f"- at 32 clients, requests/s at least 1.2x LitServe's: **{s['rps_vs_litserve_c32']:.2f}x**, with a p99 no "
        f"worse: **{s['p99_vs_litserve_c32']:.2f}x** LitServe's p99.",
        f"- at 1 client, p50 within 2 ms of plain FastAPI: **{s['p50_gap_vs_fastapi_c1_ms']:+.2f} ms**.",
        f"- server RSS flat over {flat['requests']:,} requests at c=32: **{flat['before_mb']:.0f} MB -> "
        f"{flat['after_mb']:.0f} MB** ({flat['errors']} errors, {flat['rps']:,.0f} rps).",
        "",
    ]
    return lines


def main() -> int:
    data = run()
    (OUT / "w2.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    print("\n".join(markdown(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
