"""The store: one object per process that reads, writes and lists URIs; here over fsspec's in-memory filesystem
and local paths. Importing it runs nothing (the umask is read when a file is first written, without changing it)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from modalkit.batch.storage import Store, default_store, join
from modalkit.exceptions import StorageError


@pytest.fixture
def memory_root() -> str:
    """A fresh folder on fsspec's in-memory filesystem (shared by the process: each test takes its own)."""
    return f"memory://modalkit-test-{uuid.uuid4().hex[:8]}"


def test_a_store_over_memory_writes_reads_lists_and_deletes(memory_root: str) -> None:
    store = Store({"memory": MemoryFileSystem()})
    store.write_bytes(join(memory_root, "a", "x.json"), b"1")
    store.write_bytes(join(memory_root, "a", "_hidden.json"), b"2")
    assert store.create_exclusive(join(memory_root, "claim.json"), b"mine")
    assert not store.create_exclusive(join(memory_root, "claim.json"), b"theirs")

    assert store.read_bytes(join(memory_root, "claim.json")) == b"mine"
    assert store.list_names(memory_root) == ["claim.json"]
    assert store.list_names(memory_root, folders=True) == ["a", "claim.json"]
    skipped: list[str] = []
    assert [f.key for f in store.list_files(memory_root, skipped)] == ["a/x.json", "claim.json"]
    assert skipped == ["a/_hidden.json"]
    with store.open_input(join(memory_root, "a", "x.json")) as fh:
        assert fh.read() == b"1"
    store.delete(join(memory_root, "claim.json"))
    assert not store.exists(join(memory_root, "claim.json"))


def test_a_missing_input_is_a_storage_error_naming_it(memory_root: str) -> None:
    with pytest.raises(StorageError, match=f"input {memory_root}/nothing does not exist"):
        Store().list_files(f"{memory_root}/nothing")


def test_the_default_store_is_one_per_process() -> None:
    assert default_store() is default_store()


def test_importing_the_store_leaves_the_umask_alone_and_files_get_its_modes(tmp_path: Path) -> None:
    code = (
        "import os\n"
        "os.umask(0o027)\n"
        "def refuse(mask): raise AssertionError('umask changed')\n"
        "os.umask = refuse\n"
        "from modalkit.batch.storage import Store\n"
        f"Store().write_bytes({str(tmp_path / 'f.txt')!r}, b'x')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640
