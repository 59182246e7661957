#!/usr/bin/env python3
"""What a job of many small S3 objects costs in requests, by kind: the figures behind docs/scale.md.

A real ``moto_server`` on a free loopback port holds ``N`` small JSONL objects (``S3REQ_FILES``, default 5,000, of
``S3REQ_RECORDS`` records each, default 3). ``modalkit batch`` runs the job (local backend, 2 workers, an id field)
against a Prefect server started for it, then runs it again unchanged (the no-op rerun: what a resume costs when
every chunk is committed). moto_server logs every request it serves; the lines logged during each run are counted
by kind: LIST (a listing page), GET (whole or ranged), HEAD, PUT, DELETE, and other.

    .venv/bin/python bench/s3_requests.py                 # 5,000 objects
    S3REQ_FILES=500 .venv/bin/python bench/s3_requests.py # a quick look

Prints one JSON object: per run, its wall, the summary's chunks and records, and the requests by kind, plus
the per-file and per-chunk rates the docs extrapolate from.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
from procs import free_port
from run import BIN, PY, PrefectServer

FILES = int(os.environ.get("S3REQ_FILES", "5000"))
RECORDS = int(os.environ.get("S3REQ_RECORDS", "3"))
REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')

CONFIG = """# written by bench/s3_requests.py
app_settings:
  queue_config:
    backend: none
  job_config:
    backend: local
    local_workers: 2
model_settings:
  default_model: sentiment
  model_entries:
    sentiment:
      pipeline: modalkit.examples.sentiment:SentimentPipeline
"""


def kind(method: str, path: str) -> str:
    if method == "GET" and ("list-type=" in path or "prefix=" in path or "delimiter=" in path):
        return "LIST"
    return method


def count(log: Path, start: int) -> tuple[dict[str, int], int]:
    """Requests by kind in ``log`` past byte ``start``, and where the log ends now."""
    data = log.read_bytes()
    kinds: collections.Counter[str] = collections.Counter()
    for match in REQUEST.finditer(data[start:].decode(errors="replace")):
        kinds[kind(match.group(1), match.group(2))] += 1
    return dict(sorted(kinds.items())), len(data)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="modalkit-s3req-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "moto.log"
    aws = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    with log.open("wb") as sink:
        moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    server = None
    try:
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")  # fmt: skip
        for _ in range(100):
            try:
                s3.list_buckets()
                break
            except Exception:
                time.sleep(0.1)
        s3.create_bucket(Bucket="bench")
        words = ["great value, love it", "terrible, it broke after a day", "fine"]

        def put(n: int) -> None:
            body = "".join(json.dumps({"id": f"r{n}-{i}", "text": words[(n + i) % 3]}) + "\n" for i in range(RECORDS))
            s3.put_object(Bucket="bench", Key=f"in/part-{n:06d}.jsonl", Body=body.encode())

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(FILES)))
        config = work / "modalkit.yaml"
        config.write_text(CONFIG)
        server = PrefectServer()
        env = {**os.environ, **aws, "PREFECT_API_URL": server.api_url, "MODALKIT_HOME": str(work / "home")}
        cmd = [PY, "-m", "modalkit.cli", "batch", "s3://bench/in/", "s3://bench/out", "--config", str(config),
               "--id-field", "id", "--json"]  # fmt: skip
        _, mark = count(log, 0)
        runs: dict[str, Any] = {}
        for name in ("job", "no-op rerun"):
            started = time.perf_counter()
            done = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=3600)
            wall = time.perf_counter() - started
            time.sleep(0.5)  # moto logs a request after answering it
            requests, mark = count(log, mark)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            runs[name] = {"wall_s": round(wall, 2), "chunks": summary["chunks"], "records": summary["records"],
                          "chunks_skipped": summary["chunks_skipped"], "requests": requests}  # fmt: skip
        job = runs["job"]
        print(json.dumps({
            "files": FILES, "records_per_file": RECORDS, "runs": runs,
            "requests_per_file": round(sum(job["requests"].values()) / FILES, 3),
            "requests_per_chunk_excluding_input_gets": round(
                (sum(job["requests"].values()) - job["requests"].get("GET", 0)) / job["chunks"], 2
            ),
        }, indent=2))  # fmt: skip
        return 0
    finally:
        if server is not None:
            server.stop()
        moto.terminate()
        moto.wait(timeout=20)


if __name__ == "__main__":
    raise SystemExit(main())
