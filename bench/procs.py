"""Process helpers the benchmarks share: a free loopback port, a process tree's members and its resident memory,
and a command run under the harness's ``treemem.py``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pids: list[int]) -> float:
    """The resident memory of these processes now, in MiB (those gone meanwhile count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total / 2**20


def descendants(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    stat = fh.read()
                ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
            except (OSError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for kid in kids.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def run_under_treemem(
    name: str, cmd: list[str], env: dict[str, str], treemem: Path, mem_file: Path, timeout: float
) -> dict[str, Any]:
    """Run ``cmd`` under the harness's ``treemem.py`` (its figures written to ``mem_file``); returns the command's
    last JSON stdout line, treemem's figures and the process wall.

    Raises:
        RuntimeError: the command failed, with the end of its stderr.
    """
    wrapped = [sys.executable, str(treemem), "--out", str(mem_file), "--interval", "0.25", "--timeout",
               str(timeout), "--", *cmd]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(wrapped, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"result": json.loads(lines[-1]), "mem": json.loads(mem_file.read_text()), "process_wall_s": wall}
