"""Importing modalkit is cheap: no config read, no heavy libraries, public names resolved lazily.

Each check runs in a fresh interpreter (this test process has already imported more than ``modalkit``), in an
empty working directory and an environment without MODALKIT_ variables, with warnings turned into errors.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import modalkit

HEAVY = ("modal", "boto3", "botocore", "prefect", "s3fs", "numpy")


# defines loaded_heavy(): the heavy libraries (top-level package names) the interpreter has imported so far
PRELUDE = f"""
import json, sys
def loaded_heavy():
    return sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
"""


def run_python(code: str, cwd: Path) -> Any:
    """Run ``code`` in a fresh interpreter; it prints one JSON value on its last line, which is returned."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODALKIT_")}
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", PRELUDE + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_modalkit_loads_no_heavy_library(tmp_path: Path) -> None:
    result = run_python(
        """
        import modalkit
        print(json.dumps({"heavy": loaded_heavy(), "file": modalkit.__file__}))
        """,
        tmp_path,
    )

    assert result["heavy"] == []
    assert Path(str(result["file"])).resolve() == Path(modalkit.__file__).resolve()


def test_import_modalkit_reads_no_configuration(tmp_path: Path) -> None:
    (tmp_path / "modalkit.yaml").write_text("app_settings: [this is: not valid\n")
    (tmp_path / ".env").write_text("MODALKIT_APP_SETTINGS__BATCH_CONFIG__MAX_BATCH_SIZE=0\n")

    result = run_python(
        """
        import json, modalkit
        print(json.dumps({"version": modalkit.__version__}))
        """,
        tmp_path,
    )

    assert result["version"] == modalkit.__version__


def test_settings_and_pipeline_modules_load_no_heavy_library(tmp_path: Path) -> None:
    # the CLI and flows load settings and pipeline classes; the example pipeline imports numpy only when built
    result = run_python(
        """
        from modalkit.settings import Settings
        from modalkit.inference_pipeline import import_pipeline
        settings = Settings.load()
        import_pipeline("modalkit.examples.sentiment:SentimentPipeline")
        print(json.dumps({"heavy": loaded_heavy(), "batch": settings.app_settings.batch_config.max_batch_size}))
        """,
        tmp_path,
    )

    assert result["heavy"] == []
    assert result["batch"] == 256


def test_every_public_name_resolves_lazily(tmp_path: Path) -> None:
    result = run_python(
        """
        import importlib, json, modalkit
        before = set(vars(modalkit))
        missing = [n for n in modalkit.__all__ if n in before]
        wrong = [
            n for n in modalkit.__all__
            if getattr(modalkit, n) is not getattr(importlib.import_module(modalkit._EXPORTS[n]), n)
        ]
        print(json.dumps({
            "loaded_before": missing,
            "wrong": wrong,
            "not_in_dir": sorted(set(modalkit.__all__) - set(dir(modalkit))),
            "unknown_raises": not hasattr(modalkit, "NoSuchName"),
        }))
        """,
        tmp_path,
    )

    assert result == {"loaded_before": [], "wrong": [], "not_in_dir": [], "unknown_raises": True}


def test_star_import_gives_every_public_name(tmp_path: Path) -> None:
    result = run_python(
        """
        import json
        import modalkit
        namespace = {}
        exec("from modalkit import *", namespace)
        print(json.dumps(sorted(set(modalkit.__all__) - set(namespace))))
        """,
        tmp_path,
    )

    assert result == []


def test_all_matches_the_lazy_export_map() -> None:
    assert sorted(modalkit.__all__) == sorted(modalkit._EXPORTS)
    assert len(modalkit.__all__) == len(set(modalkit.__all__))


def test_type_checking_imports_match_the_lazy_export_map() -> None:
    # the TYPE_CHECKING block is what mypy and IDEs see; it must import each name from the module _EXPORTS names
    tree = ast.parse(Path(modalkit.__file__).read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    imported = {
        alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }

    assert imported == modalkit._EXPORTS


# the batch engine is pure: where chunks run (runners, Modal) and how they are orchestrated (Prefect) stay outside
_NOT_IN_THE_ENGINE = ("modal", "prefect", "flows", "tasks", "modalkit.runners", "modalkit.local",
                      "modalkit.modal_config", "modalkit.modal_service", "modalkit.modal_app", "modalkit.fast_api",
                      "modalkit.cli")  # fmt: skip


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at the top or deferred inside a function (relative imports resolved)."""
    package = "modalkit." + ".".join(path.relative_to(Path(modalkit.__file__).parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] + "." if node.level else ""
            found.append((node.lineno, base + (node.module or "")))
    return found


def test_the_batch_engine_imports_no_runtime_module_modal_or_prefect_not_even_deferred() -> None:
    engine = Path(modalkit.__file__).parent / "batch"
    offending = [
        f"{path.name}:{line}: {module}"
        for path in sorted(engine.rglob("*.py"))
        for line, module in _imports(path)
        if any(module == banned or module.startswith(banned + ".") for banned in _NOT_IN_THE_ENGINE)
    ]

    assert len(list(engine.rglob("*.py"))) >= 8
    assert offending == []


def test_importing_every_batch_engine_module_loads_no_runtime_module(tmp_path: Path) -> None:
    result = run_python(
        """
        import importlib, pkgutil
        import modalkit.batch
        for info in pkgutil.walk_packages(modalkit.batch.__path__, "modalkit.batch."):
            importlib.import_module(info.name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("modal", "prefect")
                        or m.startswith(("modalkit.runners", "modalkit.modal_")))
        print(json.dumps(loaded))
        """,
        tmp_path,
    )

    assert result == []
