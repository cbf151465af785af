"""The one atomic write: readers see the old file or the new one, never a part.

Every file the project writes in place (shards, manifests, records, reports,
thumbnails, token files, images, plots) goes through :func:`atomic_file`: a
hidden temp name in the same folder (same file system, so the rename is
atomic; pyarrow, pandas and datasets skip names starting with "."), fsync,
then ``os.replace``. On any failure (disk full, a kill) the temp file is
removed and the old file, if any, is left as it was.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import pyarrow as pa


@contextmanager
def atomic_file(path: Path | str, suffix: str = ".tmp", fsync: bool = True) -> Iterator[Path]:
    """``with atomic_file(path) as tmp: <write tmp>``: ``path`` gets the bytes on success.

    ``suffix``: the temp name's ending, for writers that pick the format by
    extension (matplotlib's ``savefig``). ``fsync=False`` for files that are
    cheap to redo and many (thumbnails, copied images): the rename still makes
    them whole or absent, only a power cut may lose the newest ones.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes, fsync: bool = True) -> Path:
    with atomic_file(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) atomically; see :func:`atomic_file`."""
    with atomic_file(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    """A JSON record (indented, sorted keys, anything else as ``str``), atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_table_atomic(table: "pa.Table", path: Path | str) -> None:
    """A Parquet file (zstd), atomically: a killed run never leaves half a shard."""
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
