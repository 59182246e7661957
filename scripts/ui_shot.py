#!/usr/bin/env python3
"""``make ui-shot``: a headless Chromium screenshot of a batch job's flow run page in the Prefect UI.

Starts a Prefect server of its own (SQLite under a temporary PREFECT_HOME, a free loopback port), runs the demo's
sample reviews through flow ``batch-inference`` against it, opens the flow run's page on its Artifacts tab in
Debian's ``chromium --headless`` and writes the picture (default ``docs/ui-shot.png``), then stops the server.

    python scripts/ui_shot.py [--out docs/ui-shot.png] [--records 5000] [--tab Artifacts]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ui-shot: the Prefect server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("ui-shot: the Prefect server did not answer in time")


def latest_flow_run(api: str) -> str:
    body = json.dumps({"sort": "START_TIME_DESC", "limit": 1, "flows": {"name": {"any_": ["batch-inference"]}}})
    request = urllib.request.Request(f"{api}/flow_runs/filter", body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        runs = json.loads(reply.read())
    if not runs:
        raise SystemExit("ui-shot: no batch-inference flow run on the server")
    return str(runs[0]["id"])


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("ui-shot: no chromium on PATH; install Debian's: apt-get install chromium")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "ui-shot.png")
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--tab", default="Artifacts")
    args = parser.parse_args(argv)
    browser = chromium()
    work = Path(tempfile.mkdtemp(prefix="modalkit-ui-shot-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"{url}/api", "PREFECT_UI_API_URL": f"{url}/api"}  # fmt: skip
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=(work / "server.log").open("wb"), start_new_session=True,
    )  # fmt: skip
    try:
        wait_healthy(f"{url}/api", server)
        print(f"ui-shot: Prefect server on {url}; running the demo job against it", file=sys.stderr)
        from modalkit.demo import prepare_demo

        setup = prepare_demo(work / "demo", args.records)
        job = [str(BIN / "modalkit"), "batch", setup.params["input_uri"], setup.params["output_uri"], "--config",
               setup.params["config"], "--success-queue", setup.params["success_queue"], "--failure-queue",
               setup.params["failure_queue"], "--json"]  # fmt: skip
        subprocess.run(job, env=env, cwd=work, check=True, stdout=subprocess.DEVNULL)
        run_id = latest_flow_run(f"{url}/api")
        page = f"{url}/runs/flow-run/{run_id}?tab={args.tab}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shot = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--hide-scrollbars", "--window-size=1600,1500", "--virtual-time-budget=20000",
             f"--user-data-dir={work / 'chromium'}", f"--screenshot={args.out.resolve()}", page],
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        if shot.returncode != 0 or not args.out.exists():
            raise SystemExit(f"ui-shot: chromium failed ({shot.returncode}): {shot.stderr.strip()[-500:]}")
        print(f"ui-shot: {page} -> {args.out}", file=sys.stderr)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
