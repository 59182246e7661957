#!/usr/bin/env python3
"""``make ui-shot``: a headless Chromium screenshot of a batch job's flow run page in the Prefect UI.

Starts a Prefect server of its own (SQLite under a temporary PREFECT_HOME, a free loopback port), runs the demo's
sample reviews through flow ``batch-inference`` against it, opens the flow run's page on its Artifacts tab in
Debian's ``chromium --headless`` and writes the picture (default ``docs/ui-shot.png``), and one of the job's markdown
report (``docs/ui-shot-report.png``), then stops the server.

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


def artifact_id(api: str, key_prefix: str) -> str:
    body = json.dumps({"sort": "CREATED_DESC", "limit": 50})
    request = urllib.request.Request(f"{api}/artifacts/filter", body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        found = [a for a in json.loads(reply.read()) if str(a.get("key") or "").startswith(key_prefix)]
    if not found:
        raise SystemExit(f"ui-shot: no artifact {key_prefix}* on the server")
    return str(found[0]["id"])


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("ui-shot: no chromium on PATH; install Debian's: apt-get install chromium")


def screenshots(
    browser: str, pages: list[tuple[str, str | None, str | None]], profile: Path, width: int = 1600, height: int = 1500
) -> list[bytes]:
    """A PNG of each ``(url, tab to click, text to wait for)`` once the UI has drawn it, through Chromium's DevTools
    protocol (the UI resets a ``?tab=`` in the URL to its first tab while the run loads, so the tab is clicked)."""
    import base64
    import itertools
    import re

    from websockets.sync.client import connect

    proc = subprocess.Popen(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--hide-scrollbars", f"--window-size={width},{height}", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                port = int(found.group(1))
                break
        if port is None:
            raise SystemExit(f"ui-shot: chromium did not start ({proc.wait(timeout=10)})")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            target = next(t for t in json.loads(reply.read()) if t["type"] == "page")
        ids = itertools.count(1)
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:

            def call(method: str, **params: object) -> dict[str, object]:
                n = next(ids)
                ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    message = json.loads(ws.recv(timeout=60))
                    if message.get("id") == n:
                        return dict(message.get("result", {}))

            def wait_for(js: str, seconds: float) -> bool:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    result = call("Runtime.evaluate", expression=js, returnByValue=True)
                    if dict(result.get("result", {})).get("value") is True:  # type: ignore[call-overload]
                        return True
                    time.sleep(0.5)
                return False

            call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            call("Page.enable")
            shots = []
            for url, tab, text in pages:
                call("Page.navigate", url=url)
                if tab is not None:
                    click = (f"(() => {{ const t = [...document.querySelectorAll('li.p-tab, button, [role=tab]')]"
                             f".find(e => e.textContent.trim() === {json.dumps(tab)}); if (!t) return false; "
                             "t.click(); return true; })()")  # fmt: skip
                    if not wait_for(click, 60):
                        raise SystemExit(f"ui-shot: {url} never showed a {tab!r} tab")
                if text is not None and not wait_for(f"document.body.innerText.includes({json.dumps(text)})", 60):
                    raise SystemExit(f"ui-shot: {url} never showed {text!r}")
                time.sleep(3)  # the cards and charts finish drawing
                shots.append(base64.b64decode(str(call("Page.captureScreenshot", format="png")["data"])))
        return shots
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


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
        report = artifact_id(f"{url}/api", "batch-report-")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report_out = args.out.with_name(args.out.stem + "-report" + args.out.suffix)
        run_png, report_png = screenshots(
            browser,
            [(page, args.tab, "batch-report-"), (f"{url}/artifacts/artifact/{report}", None, "Failures by error type")],
            work / "chromium",
        )
        args.out.write_bytes(run_png)
        report_out.write_bytes(report_png)
        print(f"ui-shot: {page} -> {args.out}; the markdown report -> {report_out}", file=sys.stderr)
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
