#!/usr/bin/env python3
"""``make ui-shot``: a headless Chromium screenshot of a batch job's flow run page in the Prefect UI.

Starts modalkit's managed local Prefect server under a temporary MODALKIT_HOME (SQLite, a free loopback port),
runs the demo's sample reviews through flow ``batch-inference`` against it, opens the flow run's page on its
Artifacts tab in Debian's ``chromium --headless`` and writes the picture (default ``docs/ui-shot.png``) and one of
the job's markdown report (``docs/ui-shot-report.png``), then stops the server.

    python scripts/ui_shot.py [--out docs/ui-shot.png] [--records 5000] [--tab Artifacts]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_and_report(api_url: str) -> tuple[str, str]:
    """The newest batch-inference flow run on the server, and the id of its markdown report."""
    os.environ["PREFECT_API_URL"] = api_url  # before Prefect is imported: its settings are read once
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["batch-inference"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)  # fmt: skip
        if not runs:
            raise SystemExit("ui-shot: no batch-inference flow run on the server")
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])))
    reports = [a for a in artifacts if (a.key or "").startswith("batch-report-")]
    if not reports:
        raise SystemExit("ui-shot: the flow run has no batch-report artifact")
    return str(runs[0].id), str(reports[0].id)


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
    # modalkit's managed local server, kept under this temporary home and stopped at the end
    os.environ.update({"MODALKIT_HOME": str(work), "PREFECT_HOME": str(work / "prefect-home"),
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})  # fmt: skip
    os.environ.pop("PREFECT_API_URL", None)
    from modalkit.cli_prefect import ensure_server, stop_server
    from modalkit.demo import prepare_demo

    try:
        server = ensure_server()
        print(f"ui-shot: Prefect server on {server.ui_url}; running the demo job against it", file=sys.stderr)
        setup = prepare_demo(work / "demo", args.records)
        job = [str(BIN / "modalkit"), "batch", setup.params["input_uri"], setup.params["output_uri"], "--config",
               setup.params["config"], "--success-queue", setup.params["success_queue"], "--failure-queue",
               setup.params["failure_queue"], "--json"]  # fmt: skip
        subprocess.run(job, cwd=work, check=True, stdout=subprocess.DEVNULL)
        run_id, report = run_and_report(server.api_url)
        page = f"{server.ui_url}/runs/flow-run/{run_id}?tab={args.tab}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report_out = args.out.with_name(args.out.stem + "-report" + args.out.suffix)
        run_png, report_png = screenshots(
            browser,
            [(page, args.tab, "batch-report-"),
             (f"{server.ui_url}/artifacts/artifact/{report}", None, "Failures by error type")],
            work / "chromium",
        )  # fmt: skip
        args.out.write_bytes(run_png)
        report_out.write_bytes(report_png)
        print(f"ui-shot: {page} -> {args.out}; the markdown report -> {report_out}", file=sys.stderr)
    finally:
        stop_server()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
