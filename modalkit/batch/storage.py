"""Reading and writing URIs: ``s3://bucket/key``, ``file:///path`` and plain local paths, through fsspec.

Every call translates botocore/fsspec/OS errors into :class:`~modalkit.exceptions.StorageError` and retries the
transient ones (a dropped connection, throttling, a 5xx) with backoff for about half a minute, so a short outage
of S3 costs a pause, not a failed chunk. Writes are atomic: a local file is written aside and renamed, an S3
object appears whole on PUT.

Example:
    >>> import tempfile
    >>> from modalkit.batch import storage
    >>> out = storage.join(tempfile.mkdtemp(), "hello.txt")
    >>> storage.write_bytes(out, b"hi")
    >>> storage.read_bytes(out)
    b'hi'
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, ParamSpec, TypeVar

import orjson
from tenacity import RetryCallState, retry, retry_if_exception, wait_exponential, wait_random

from modalkit.exceptions import StorageError, is_retryable, storage_errors

__all__ = [
    "StoredFile",
    "create_exclusive",
    "delete",
    "exists",
    "filesystem",
    "is_remote",
    "join",
    "list_files",
    "list_names",
    "open_input",
    "read_bytes",
    "remove_staging_dirs",
    "strip_protocol",
    "upload_file",
    "write_bytes",
]

P = ParamSpec("P")
R = TypeVar("R")
#: How long storage calls keep retrying transient errors before giving up (seconds).
RETRY_SECONDS = 30.0
READ_BUFFER = 1024 * 1024
_STAGING_PREFIX = ".staging-"
REMOTE_READ_BUFFER = 8 * 1024 * 1024


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, StorageError) and is_retryable(exc)


def _out_of_time(state: RetryCallState) -> bool:
    return (state.seconds_since_start or 0.0) >= RETRY_SECONDS  # read at each try, so that tests may shorten it


def with_retries(fn: Callable[P, R]) -> Callable[P, R]:
    """Retry ``fn`` on retryable StorageErrors with exponential backoff, for up to RETRY_SECONDS.

    This is the one retry layer of a storage call: the S3 client below makes a single attempt per call.
    """
    wrapped = retry(
        retry=retry_if_exception(_transient),
        stop=_out_of_time,
        wait=wait_exponential(multiplier=0.2, max=4.0) + wait_random(0, 0.2),
        reraise=True,
    )(fn)
    return functools.wraps(fn)(wrapped)


def is_remote(uri: str) -> bool:
    """True for object-store URIs (``s3://``), False for local paths and ``file://``."""
    return "://" in uri and not uri.startswith("file://")


def strip_protocol(uri: str) -> str:
    """The path part: ``s3://b/k`` -> ``b/k``, ``file:///x`` -> ``/x``, a plain path unchanged."""
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if "://" in uri:
        return uri.split("://", 1)[1]
    return uri


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI with '/'."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def filesystem(uri: str) -> tuple[Any, str]:
    """The fsspec filesystem for ``uri`` (cached per process) and the path within it."""
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        return _s3(), strip_protocol(uri)
    if is_remote(uri):
        import fsspec

        with storage_errors(f"opening {uri}"):
            fs, path = fsspec.core.url_to_fs(uri)
        return fs, path
    return _local(), os.path.abspath(strip_protocol(uri))


@functools.cache
def _local() -> Any:
    import fsspec

    return fsspec.filesystem("file")


def _s3() -> Any:
    # fsspec caches instances by their arguments (and per process), so this is cheap after the first call
    from modalkit.aws import s3_storage_options

    return _one_attempt_s3fs()(**s3_storage_options(), default_block_size=8 * 1024 * 1024)


@functools.cache
def _one_attempt_s3fs() -> type:
    """s3fs, making one attempt per call: it retries 5 times itself, botocore up to 5 times under it, and
    with_retries above that; three layers multiplied how long an outage took to report."""
    import s3fs

    class OneAttemptS3FileSystem(s3fs.S3FileSystem):
        retries = 1

    return OneAttemptS3FileSystem


@with_retries
def exists(uri: str) -> bool:
    """Whether a file or object exists at ``uri``."""
    fs, path = filesystem(uri)
    with storage_errors(f"checking {uri}"):
        return bool(fs.exists(path))


@with_retries
def read_bytes(uri: str) -> bytes:
    """The whole content of ``uri``."""
    fs, path = filesystem(uri)
    with storage_errors(f"reading {uri}"):
        return bytes(fs.cat_file(path))


@with_retries
def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (readers see the old content or the new, never a part)."""
    fs, path = filesystem(uri)
    with storage_errors(f"writing {uri}"):
        if is_remote(uri):
            fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _write_temporary(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise


@with_retries
def create_exclusive(uri: str, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only when nothing is there, atomically; True when this call created it.

    Two writers racing for one path: exactly one creates it (S3 conditional write ``If-None-Match: *``, a hard
    link of a finished temporary file locally), the other gets False and reads what the winner wrote.
    """
    fs, path = filesystem(uri)
    with storage_errors(f"creating {uri}"):
        if is_remote(uri):
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _write_temporary(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            _remove_quietly(tmp)
        return True


def _write_temporary(path: str, data: bytes) -> str:
    """A finished temporary file beside ``path`` holding ``data``, with the mode a new file gets (umask)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the modes part files get
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: os.umask can only be read by setting it


@with_retries
def upload_file(local_path: str, uri: str) -> None:
    """Copy a finished local file to ``uri`` (a rename when ``uri`` is local; multipart upload on S3)."""
    fs, path = filesystem(uri)
    with storage_errors(f"writing {uri}"):
        if is_remote(uri):
            fs.put_file(local_path, path)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(local_path, path)


def local_staging_dir(uri: str) -> str:
    """A directory for files on their way to ``uri``: beside it when local (so the final move is a rename).

    Raises:
        StorageError: the directory cannot be made (a read-only or full file system), naming it.
    """
    if is_remote(uri):
        with storage_errors("making a local staging directory"):
            return tempfile.mkdtemp(prefix="modalkit-")
    path = os.path.join(os.path.dirname(filesystem(uri)[1]), f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
    with storage_errors(f"making the staging directory {path}"):
        os.makedirs(path, exist_ok=True)
    return path


def remove_staging_dirs(output_uri: str) -> int:
    """Remove the staging folders left under a local output by workers that were killed; returns how many.

    Call it only when no chunk of the job runs (the job's end): a live worker's staging folder looks the same.
    """
    if is_remote(output_uri):
        return 0  # remote outputs stage in the worker's temp folder, which goes with the worker
    root = filesystem(output_uri)[1]
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(root):
            if entry.is_dir(follow_symlinks=False) and entry.name.startswith(_STAGING_PREFIX):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
    return removed


@with_retries
def delete(uri: str) -> None:
    """Delete ``uri`` if it exists."""
    fs, path = filesystem(uri)
    with storage_errors(f"deleting {uri}"):
        if fs.exists(path):
            fs.rm_file(path)


@with_retries
def list_names(uri: str, folders: bool = False) -> list[str]:
    """Names of the files (and with ``folders``, the folders) directly under the folder ``uri`` (one listing call);
    empty when it does not exist."""
    fs, path = filesystem(uri)
    with storage_errors(f"listing {uri}"):
        if is_remote(uri):
            fs.invalidate_cache(path)  # s3fs caches listings: another process may have written since
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
    kinds = ("file", "directory") if folders else ("file",)
    return sorted(str(entry["name"]).rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") in kinds)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


@dataclass(frozen=True)
class StoredFile:
    """One input file: where it is, its key under the input root, size and version tag (S3 ETag, or a hash of a
    local file's content)."""

    uri: str
    key: str
    size: int
    etag: str


@with_retries
def list_files(uri: str, skipped: list[str] | None = None) -> list[StoredFile]:
    """Files under ``uri`` (or ``uri`` itself when it is a file), sorted by key.

    Under a folder, hidden files and folders (``.name``, ``_name``: our own ``_chunks``, ``_failures``,
    ``_manifest.json`` among them) are skipped, and their keys appended to ``skipped`` when it is given; a file
    named on its own is taken whatever its name.

    Raises:
        StorageError: ``uri`` does not exist.
    """
    fs, path = filesystem(uri)
    protocol = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    hashes = _ContentHashes()
    single = False
    with storage_errors(f"listing {uri}"):
        if not fs.exists(path):
            raise StorageError(f"input {uri} does not exist", retryable=False)
        info = fs.info(path)
        if info.get("type") == "file":
            entries = {path: info}
            root = os.path.dirname(path.rstrip("/"))
            single = True
        else:
            entries = fs.find(path, detail=True)
            root = path.rstrip("/")
    files = []
    for name, meta in entries.items():
        if meta.get("islink"):  # a local symlink: listed as "other" with the link's own size; take its target's
            with storage_errors(f"listing {uri}"):
                meta = fs.info(name)
        if meta.get("type") not in (None, "file"):
            continue
        key = name[len(root) :].lstrip("/") if name.startswith(root) else os.path.basename(name)
        if not single and any(part.startswith((".", "_")) for part in key.split("/")):
            if skipped is not None:
                skipped.append(key)
            continue  # hidden files, and our own _chunks/_failures/_manifest.json
        if is_remote(uri):
            etag = str(meta.get("ETag") or meta.get("etag") or "")
        else:
            with storage_errors(f"reading {name}"):
                etag = hashes.version(name)
        files.append(StoredFile(uri=f"{protocol}{name}", key=key, size=int(meta.get("size") or 0), etag=etag))
    if hashes.dirty:
        hashes.save()
    return sorted(files, key=lambda f: f.key)


class _ContentHashes:
    """A local file's version is a hash of its content, so that ``touch`` keeps a job's identity and an edit does
    not. Hashes are cached by (path, size, mtime, inode) under ``$MODALKIT_HOME/cache``: a file is read once, and
    again only after it was touched or changed."""

    MAX_ENTRIES = 20_000

    def __init__(self) -> None:
        home = os.environ.get("MODALKIT_HOME") or os.path.expanduser("~/.modalkit")
        self.path = os.path.join(home, "cache", "content-hashes.json")
        self.dirty = False
        try:
            with open(self.path, "rb") as fh:
                self.cache: dict[str, str] = orjson.loads(fh.read())
        except (OSError, orjson.JSONDecodeError):
            self.cache = {}

    def version(self, path: str) -> str:
        st = os.stat(path)
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        found = self.cache.get(key)
        if found is None:
            with open(path, "rb") as fh:
                found = "sha1:" + hashlib.file_digest(fh, lambda: hashlib.sha1(usedforsecurity=False)).hexdigest()
            self.cache[key] = found
            self.dirty = True
        return found

    def save(self) -> None:
        entries = list(self.cache.items())[-self.MAX_ENTRIES :]
        with contextlib.suppress(OSError):  # a cache: a read-only home only costs the hashing again next time
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(orjson.dumps(dict(entries)))
            os.replace(tmp, self.path)


@contextlib.contextmanager
def open_input(uri: str) -> Iterator[IO[bytes]]:
    """Open ``uri`` for buffered binary reading (the formats' codecs decompress on top)."""
    fs, path = filesystem(uri)
    with contextlib.ExitStack() as stack:
        with storage_errors(f"opening {uri}"):
            if is_remote(uri):
                raw = stack.enter_context(fs.open(path, "rb", cache_type="none"))
                stream: IO[bytes] = stack.enter_context(io.BufferedReader(raw, buffer_size=REMOTE_READ_BUFFER))
            else:
                stream = stack.enter_context(open(path, "rb", buffering=READ_BUFFER))
        yield stream
