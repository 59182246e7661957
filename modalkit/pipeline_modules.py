"""Finding the module a model entry's ``pipeline`` names, as ``python -m`` would, and saying where it was looked for.

``python -m modalkit.cli`` puts the working directory first on ``sys.path``; the ``modalkit`` console script does
not, so a pipeline module beside ``modalkit.yaml`` (``pipeline: "orders:Orders"``) would not be found. Where a
pipeline is imported (the CLI, its local worker processes, ``modalkit serve`` and its workers, a Prefect flow run,
``modal deploy``), a top-level module found nowhere on ``sys.path`` is looked for in the working directory, which
then goes first on ``sys.path`` as ``python -m`` puts it. Nothing is added when the module is found, so a process
that imports pipelines from many folders (a test run) does not collect them on ``sys.path``.

Example:
    >>> import os, sys, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "beside_the_yaml.py"), "w") as f:
    ...     _ = f.write("X = 1\\n")
    >>> here = os.getcwd()
    >>> os.chdir(folder)
    >>> spec = find_top_level("beside_the_yaml.sub")
    >>> spec.name, sys.path[0] == folder
    ('beside_the_yaml', True)
    >>> sys.path.remove(folder); os.chdir(here)
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig

__all__ = ["find_top_level", "not_found_message", "searched_folders"]


def _on_sys_path(folder: str) -> bool:
    real = os.path.realpath(folder)
    return any(os.path.realpath(entry or os.curdir) == real for entry in sys.path)


def find_top_level(module_name: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of ``module_name``'s top-level package or module (nothing is imported), found on ``sys.path`` or
    else in the working directory, which is then put first on ``sys.path``; None when it is in neither."""
    top = module_name.partition(".")[0]
    if not top:
        return None
    spec = importlib.util.find_spec(top)
    if spec is not None:
        return spec
    cwd = os.getcwd()
    if _on_sys_path(cwd):
        return None
    if not (os.path.isfile(os.path.join(cwd, f"{top}.py")) or os.path.isdir(os.path.join(cwd, top))):
        return None
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    return importlib.util.find_spec(top)


def searched_folders() -> list[str]:
    """The folders on ``sys.path`` a user's module could be in: all but the standard library's and the installed
    packages' (``site-packages``), as absolute paths, in search order."""
    library = {os.path.realpath(p) for p in (sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")) if p}
    out: list[str] = []
    for entry in sys.path:
        path = os.path.abspath(entry or os.curdir)
        real = os.path.realpath(path)
        if real in library or os.path.basename(real) in ("site-packages", "dist-packages") or real.endswith(".zip"):
            continue
        if real.startswith(tuple(lib + os.sep for lib in library)):  # lib-dynload and the like
            continue
        if path not in out:
            out.append(path)
    return out


def not_found_message(module_name: str, where: str) -> str:
    """Why ``module_name`` could not be imported for ``where`` (a setting's key path): where it was looked for, and
    the ways to make it importable."""
    top = module_name.partition(".")[0]
    cwd = os.getcwd()
    folders = [f for f in searched_folders() if f != cwd]
    elsewhere = f"; on sys.path: {', '.join(folders)}" if folders else ""
    return (
        f"looked in the working directory {cwd}{elsewhere} (besides the standard library and installed packages); "
        f"run modalkit from the folder holding {top}.py (or the package folder {top}/), put that folder on "
        f"PYTHONPATH (PYTHONPATH=/path/to/it modalkit ...), or set {where} to a module that can be imported"
    )
