"""Reading and writing URIs: ``s3://bucket/key``, ``file:///path``, plain local paths and any other fsspec URI.

A :class:`Store` does it; a process builds one (:func:`default_store`) and passes it to planning, the chunk
processor and the record sender, and a test may pass one over fsspec's in-memory filesystem instead. Every call
translates botocore/fsspec/OS errors into :class:`~modalkit.exceptions.StorageError` and retries the transient ones
(a dropped connection, throttling, a 5xx) with backoff for about half a minute, so a short outage of S3 costs a
pause, not a failed chunk. Writes are atomic: a local file is written aside and renamed, an object appears whole
on PUT.

Example:
    >>> import tempfile
    >>> from modalkit.batch.storage import Store, join
    >>> store = Store()
    >>> out = join(tempfile.mkdtemp(), "hello.txt")
    >>> store.write_bytes(out, b"hi")
    >>> store.read_bytes(out)
    b'hi'
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, ParamSpec, TypeVar

from tenacity import RetryCallState, retry, retry_if_exception, wait_exponential, wait_random

from modalkit.exceptions import StorageError, is_retryable, storage_errors

__all__ = ["Store", "StoredFile", "default_store", "is_remote", "join", "strip_protocol"]

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


@dataclass(frozen=True)
class StoredFile:
    """One input file: where it is, its key under the input root, size and version tag (an object's ETag; empty
    for a local file, whose version planning hashes from its content)."""

    uri: str
    key: str
    size: int
    etag: str
    #: a local file's ``(st_mtime_ns, st_ino)`` as it was listed, so that its content hash is looked up without a
    #: second ``stat``; None for an object
    stamp: tuple[int, int] | None = field(default=None, kw_only=True, compare=False, repr=False)


class _LocalFiles:
    """The local variant: files on this machine's disk, written aside and renamed into place."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def write(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _write_temporary(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise

    def create(self, path: str, data: bytes) -> bool:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _write_temporary(path, data)
        try:
            os.link(tmp, path)  # a hard link of a finished file: atomic, and fails when the name is taken
        except FileExistsError:
            return False
        finally:
            _remove_quietly(tmp)
        return True

    def upload(self, local_path: str, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(local_path, path)

    def staging_dir(self, path: str) -> str:
        staging = os.path.join(os.path.dirname(path), f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
        with storage_errors(f"making the staging directory {staging}"):
            os.makedirs(staging, exist_ok=True)
        return staging

    def remove_staging_dirs(self, root: str) -> int:
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(root):
                if entry.is_dir(follow_symlinks=False) and entry.name.startswith(_STAGING_PREFIX):
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
        return removed

    def forget_listing(self, path: str) -> None:
        pass  # the local filesystem caches no listing

    def file_exists(self, path: str) -> bool:
        return os.path.isfile(path)

    def walk(self, root: str) -> Iterator[tuple[str, os.stat_result]]:
        """Every file under the folder ``root`` with its ``stat``, through ``os.scandir`` (a directory read a
        folder, and the ``stat`` a file needs anyway: fsspec's ``find`` costs a second ``stat`` and its own
        bookkeeping a file, 0.8 s for 20,000 files against 0.4 s). A symlink to a file is taken with its target's
        ``stat``; a symlink to a folder is not followed (as fsspec does not)."""
        folders = [root]
        while folders:
            folder = folders.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    elif entry.is_file():
                        yield entry.path, entry.stat()

    def read(self, path: str) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    def open(self, path: str, stack: contextlib.ExitStack) -> IO[bytes]:
        return stack.enter_context(open(path, "rb", buffering=READ_BUFFER))


class _ObjectFiles:
    """The object-store variant (S3, or any fsspec filesystem): an object appears whole when it is put."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def write(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)

    def create(self, path: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(path, data, mode="create")  # S3: a conditional write, If-None-Match: *
        except FileExistsError:
            return False
        return True

    def upload(self, local_path: str, path: str) -> None:
        self.fs.put_file(local_path, path)  # multipart on S3

    def staging_dir(self, path: str) -> str:
        with storage_errors("making a local staging directory"):
            return tempfile.mkdtemp(prefix="modalkit-")

    def remove_staging_dirs(self, root: str) -> int:
        return 0  # objects stage in the worker's temp folder, which goes with the worker

    def forget_listing(self, path: str) -> None:
        self.fs.invalidate_cache(path)  # s3fs caches listings: another process may have written since

    def read(self, path: str) -> bytes:
        """One GET on S3: s3fs's ``cat_file`` first asks the object's size (a HEAD) to fetch a large one in parts,
        a second request for every marker, manifest and small input file (a packed chunk reads thousands)."""
        if getattr(self.fs, "call_s3", None) is None:
            return bytes(self.fs.cat_file(path))
        return bytes(self.fs.cat_file(path, max_concurrency=1))

    def file_exists(self, path: str) -> bool:
        """One HEAD on S3: s3fs's ``exists`` follows a missing key with a listing (is it a folder?), a second
        request for every check of a marker or a stale file that is not there, which is most of them."""
        call_s3 = getattr(self.fs, "call_s3", None)
        if call_s3 is None:
            return bool(self.fs.exists(path))
        bucket, key, _ = self.fs.split_path(path)
        try:
            call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    def open(self, path: str, stack: contextlib.ExitStack) -> IO[bytes]:
        raw = stack.enter_context(self.fs.open(path, "rb", cache_type="none"))
        return stack.enter_context(io.BufferedReader(raw, buffer_size=REMOTE_READ_BUFFER))


class Store:
    """Reads, writes and lists URIs through fsspec, with the one retry layer; one per process, passed in.

    Local paths and ``file://`` URIs get the local variant (atomic renames, staging beside the output); any other
    protocol the object-store variant over its fsspec filesystem.

    Args:
        filesystems: fsspec filesystems by protocol, used instead of the ones fsspec would make (a test passes
            ``{"memory": MemoryFileSystem()}``; ``memory://`` URIs work without it too).
        s3_options: s3fs options for ``s3://`` URIs; by default they follow the ``AWS_*`` variables as boto3 does
            (:func:`modalkit.aws.s3_storage_options`), read when a call needs S3.
    """

    def __init__(
        self, filesystems: Mapping[str, Any] | None = None, s3_options: Mapping[str, Any] | None = None
    ) -> None:
        self._filesystems = dict(filesystems or {})
        self._s3_options = dict(s3_options) if s3_options is not None else None
        self._local: _LocalFiles | None = None

    def filesystem(self, uri: str) -> tuple[Any, str]:
        """The fsspec filesystem for ``uri`` and the path within it."""
        files, path = self._files(uri)
        return files.fs, path

    def _files(self, uri: str) -> tuple[_LocalFiles | _ObjectFiles, str]:
        if not is_remote(uri):
            if self._local is None:
                self._local = _LocalFiles(_local_fs())
            return self._local, os.path.abspath(strip_protocol(uri))
        protocol = uri.split("://", 1)[0]
        if protocol in self._filesystems:
            fs = self._filesystems[protocol]
            return _ObjectFiles(fs), fs._strip_protocol(uri)
        if protocol in ("s3", "s3a"):
            return _ObjectFiles(self._s3()), strip_protocol(uri)
        import fsspec

        with storage_errors(f"opening {uri}"):
            fs, path = fsspec.core.url_to_fs(uri)
        return _ObjectFiles(fs), path

    def _s3(self) -> Any:
        if self._s3_options is not None:
            options = self._s3_options
        else:
            from modalkit.aws import s3_storage_options

            options = s3_storage_options()
        # fsspec caches instances by their arguments (and per process), so this is cheap after the first call
        return _one_attempt_s3fs()(**options, default_block_size=8 * 1024 * 1024)

    @with_retries
    def exists(self, uri: str) -> bool:
        """Whether a file or object exists at ``uri`` (a folder does not count; on S3, one HEAD request)."""
        files, path = self._files(uri)
        with storage_errors(f"checking {uri}"):
            return files.file_exists(path)

    @with_retries
    def read_bytes(self, uri: str) -> bytes:
        """The whole content of ``uri``."""
        files, path = self._files(uri)
        with storage_errors(f"reading {uri}"):
            return files.read(path)

    @with_retries
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write ``data`` to ``uri`` atomically (readers see the old content or the new, never a part)."""
        files, path = self._files(uri)
        with storage_errors(f"writing {uri}"):
            files.write(path, data)

    @with_retries
    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Write ``data`` to ``uri`` only when nothing is there, atomically; True when this call created it.

        Two writers racing for one path: exactly one creates it (S3 conditional write ``If-None-Match: *``, a hard
        link of a finished temporary file locally), the other gets False and reads what the winner wrote.
        """
        files, path = self._files(uri)
        with storage_errors(f"creating {uri}"):
            return files.create(path, data)

    @with_retries
    def upload_file(self, local_path: str, uri: str) -> None:
        """Copy a finished local file to ``uri`` (a rename when ``uri`` is local; multipart upload on S3)."""
        files, path = self._files(uri)
        with storage_errors(f"writing {uri}"):
            files.upload(local_path, path)

    def local_staging_dir(self, uri: str) -> str:
        """A directory for files on their way to ``uri``: beside it when local (so the final move is a rename).

        Raises:
            StorageError: the directory cannot be made (a read-only or full file system), naming it.
        """
        files, path = self._files(uri)
        return files.staging_dir(path)

    def remove_staging_dirs(self, output_uri: str) -> int:
        """Remove the staging folders left under a local output by workers that were killed; returns how many.

        Call it only when no chunk of the job runs (the job's end): a live worker's staging folder looks the same.
        """
        files, root = self._files(output_uri)
        return files.remove_staging_dirs(root)

    @with_retries
    def delete(self, uri: str) -> None:
        """Delete ``uri`` if it exists."""
        files, path = self._files(uri)
        with storage_errors(f"deleting {uri}"):
            if files.file_exists(path):
                files.fs.rm_file(path)

    @with_retries
    def list_names(self, uri: str, folders: bool = False) -> list[str]:
        """Names of the files (and with ``folders``, the folders) directly under the folder ``uri`` (one listing
        call); empty when it does not exist."""
        files, path = self._files(uri)
        with storage_errors(f"listing {uri}"):
            files.forget_listing(path)
            try:
                entries = files.fs.ls(path, detail=True)
            except FileNotFoundError:
                return []
        kinds = ("file", "directory") if folders else ("file",)
        return sorted(
            str(entry["name"]).rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") in kinds
        )

    @with_retries
    def list_files(self, uri: str, skipped: list[str] | None = None) -> list[StoredFile]:
        """Files under ``uri`` (or ``uri`` itself when it is a file), sorted by key.

        Under a folder, folder markers (keys ending in ``/``) are not files, and hidden files and folders
        (``.name``, ``_name``: our own ``_chunks``, ``_failures``, ``_manifest.json`` among them) are skipped,
        their keys appended to ``skipped`` when it is given; a file named on its own is taken whatever its name.
        An object's ``etag`` is its ETag; a local file's is empty.

        Raises:
            StorageError: ``uri`` does not exist.
        """
        files, path = self._files(uri)
        if isinstance(files, _LocalFiles):
            return _sorted(self._list_local(files, uri, path, skipped))
        fs = files.fs
        protocol = uri.split("://", 1)[0] + "://"
        single = False
        with storage_errors(f"listing {uri}"):
            try:
                info = fs.info(path)  # one look (S3: a HEAD, then a one-key listing for a folder)
            except FileNotFoundError:
                raise StorageError(f"input {uri} does not exist", retryable=False) from None
            if info.get("type") == "file":
                entries = {path: info}
                root = os.path.dirname(path.rstrip("/"))
                single = True
            else:
                entries = fs.find(path, detail=True)
                root = path.rstrip("/")
        out = []
        for name, meta in entries.items():
            if meta.get("type") not in (None, "file") or _is_folder_marker(name):
                continue
            key = name[len(root) :].lstrip("/") if name.startswith(root) else os.path.basename(name)
            if not single and _hidden(key, skipped):
                continue
            etag = str(meta.get("ETag") or meta.get("etag") or "")
            out.append(StoredFile(uri=f"{protocol}{name}", key=key, size=int(meta.get("size") or 0), etag=etag))
        return _sorted(out)

    @staticmethod
    def _list_local(files: _LocalFiles, uri: str, path: str, skipped: list[str] | None) -> list[StoredFile]:
        with storage_errors(f"listing {uri}"):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise StorageError(f"input {uri} does not exist", retryable=False) from None
            if not stat.S_ISDIR(st.st_mode):
                return [StoredFile(path, os.path.basename(path), st.st_size, "", stamp=(st.st_mtime_ns, st.st_ino))]
            root = path.rstrip("/") + "/"
            out = []
            for name, st in files.walk(path):
                key = name[len(root) :]
                if not _hidden(key, skipped):
                    out.append(StoredFile(name, key, st.st_size, "", stamp=(st.st_mtime_ns, st.st_ino)))
        return out

    @contextlib.contextmanager
    def open_input(self, uri: str) -> Iterator[IO[bytes]]:
        """Open ``uri`` for buffered binary reading (the formats' codecs decompress on top)."""
        files, path = self._files(uri)
        with contextlib.ExitStack() as stack:
            with storage_errors(f"opening {uri}"):
                stream = files.open(path, stack)
            yield stream


def _hidden(key: str, skipped: list[str] | None) -> bool:
    """Whether a listed file is hidden (a name on its path starts with ``.`` or ``_``: hidden files, and our own
    ``_chunks``, ``_failures``, ``_manifest.json``), its key appended to ``skipped`` when it is."""
    if not any(part.startswith((".", "_")) for part in key.split("/")):
        return False
    if skipped is not None:
        skipped.append(key)
    return True


def _sorted(files: list[StoredFile]) -> list[StoredFile]:
    return sorted(files, key=lambda f: f.key)


def _is_folder_marker(name: str) -> bool:
    """Whether an object only marks a folder: a key ending in ``/`` (what the S3 console's "Create folder" makes,
    listed by s3fs as a file) or Hadoop's ``name_$folder$``. Neither is a file of the dataset, nor a skipped one."""
    return name.endswith(("/", "_$folder$"))


@functools.cache
def default_store() -> Store:
    """This process's store, made on first use: what a worker, the CLI or a flow passes on."""
    return Store()


@functools.cache
def _local_fs() -> Any:
    import fsspec

    return fsspec.filesystem("file")


@functools.cache
def _one_attempt_s3fs() -> type:
    """s3fs, making one attempt per call: it retries 5 times itself, botocore up to 5 times under it, and
    with_retries above that; three layers multiplied how long an outage took to report."""
    import s3fs

    class OneAttemptS3FileSystem(s3fs.S3FileSystem):
        retries = 1

    return OneAttemptS3FileSystem


def _write_temporary(path: str, data: bytes) -> str:
    """A finished temporary file beside ``path`` holding ``data``, with the mode a new file gets (umask)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600; outputs get the modes part files get
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


@functools.cache
def process_umask() -> int:
    """The process's umask, read once when first needed: from ``/proc/self/status`` on Linux (reading it leaves
    it alone); elsewhere ``os.umask`` is the only way, which sets it and puts it back."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
