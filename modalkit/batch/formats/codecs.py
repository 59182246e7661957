"""Compression codecs a file name may declare: gzip (``.gz``)."""

from __future__ import annotations

import gzip
import zlib
from typing import IO, cast

from modalkit.batch.formats.base import Codec

__all__ = ["CODECS", "Gzip", "codec_named"]


class Gzip(Codec):
    """gzip, decompressed on the fly while reading (not seekable, so a ``.gz`` file is one chunk)."""

    name = "gzip"
    suffixes = (".gz",)
    corrupt_errors = (EOFError, gzip.BadGzipFile, zlib.error)

    def open(self, stream: IO[bytes]) -> IO[bytes]:
        return cast(IO[bytes], gzip.GzipFile(fileobj=stream, mode="rb"))


CODECS: dict[str, Codec] = {codec.name: codec for codec in (Gzip(),)}


def codec_named(name: str) -> Codec:
    """The codec called ``name`` (a ChunkSpec's ``compression``)."""
    return CODECS[name]
