"""The README's Python blocks run, and print what their comments say they print."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_blocks() -> list[str]:
    return BLOCK.findall((REPO / "README.md").read_text(encoding="utf-8"))


def expected_output(block: str) -> list[str]:
    """The comment lines right after each ``print(...)`` statement."""
    lines = block.splitlines()
    expected = []
    for i, line in enumerate(lines):
        if line.startswith("print("):
            j = i + 1
            while j < len(lines) and lines[j].startswith("# "):
                expected.append(lines[j][2:])
                j += 1
    return expected


def test_the_readme_has_python_blocks_with_outputs_to_check() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 4
    assert sum(bool(expected_output(b)) for b in blocks) >= 3


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs_and_prints_what_it_says(index: int, tmp_path: Path) -> None:
    block = python_blocks()[index]
    shutil.copy(REPO / "modalkit.yaml", tmp_path / "modalkit.yaml")
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(block, encoding="utf-8")
    # run as a module, not as __main__: a block guarded by `if __name__ == "__main__":` is only compiled
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"import runpy; runpy.run_path({str(script)!r}, run_name='readme')"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,  # a block that runs a job starts a local Prefect server first (70 s seen on a loaded 2-core box)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected_output(block)


def test_the_readmes_automation_is_the_first_one_of_automations_modalkit_alerts_yaml() -> None:
    import yaml

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    (shown,) = [yaml.safe_load(b)[0] for b in blocks if "modalkit.job.failed" in b]
    first = yaml.safe_load((REPO / "automations" / "modalkit-alerts.yaml").read_text(encoding="utf-8"))
    first = first["automations"][0]
    assert shown["name"] == first["name"]
    assert shown["trigger"] == first["trigger"]
    assert [(a["type"], a["subject"]) for a in shown["actions"]] == [
        (a["type"], a["subject"]) for a in first["actions"]
    ]
