"""Bounded-size JPEG thumbnails for the report (``DIR/thumbs``), resumable.

A thumbnail's file name hashes the image uri and the size, so a rerun reuses
what is there and a new size writes new files. Reading goes through
:func:`dataprep.sources.read_bytes` (plain paths and ``zip://`` members, as
the caption stage recorded them); decoding through :mod:`dataprep.images`
rules (header size check first, EXIF orientation, every mode to RGB). A bad
image is that card's error text, never the run's.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable

from dataprep.errors import Reason, failure
from dataprep.images import to_rgb
from dataprep.sources import ImageRef, read_bytes
from dataprep.store import atomic_file

JPEG_QUALITY = 82


def thumb_name(uri: str, size: int) -> str:
    return hashlib.sha256(f"{size}\x1f{uri}".encode()).hexdigest()[:20] + ".jpg"


def make_thumb(uri: str, dest: str, size: int, max_pixels: int) -> tuple[str, int, int] | str:
    """Write one thumbnail (longest side <= ``size``); (file name, width, height) or an error string."""
    from PIL import Image, ImageOps

    try:
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        data = read_bytes(ImageRef(image_id="", source="", uri=path))
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                return failure(Reason.TOO_LARGE, f"{im.width}x{im.height}")
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, far faster
            im = ImageOps.exif_transpose(to_rgb(im))
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
            out = Path(dest)
            with atomic_file(out, fsync=False) as tmp:  # many, and cheap to redo
                im.save(tmp, format="JPEG", quality=JPEG_QUALITY, optimize=True)
            return out.name, im.width, im.height
    except Exception as exc:  # noqa: BLE001 -- any unreadable image is this card's error, the report goes on
        return f"{type(exc).__name__}: {exc}"


def _one(args: tuple[str, str, int, int]) -> tuple[str, int, int] | str:
    return make_thumb(*args)


def make_thumbs(uris: Iterable[str], folder: Path, size: int, workers: int = 0, max_pixels: int = 64_000_000, progress=None) -> dict[str, tuple[str, int, int] | str]:
    """uri -> (file name, w, h) or error text; existing thumbnails are reused as they are.

    ``progress(done, total)`` is called as thumbnails are found or made.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    result: dict[str, tuple[str, int, int] | str] = {}
    todo = []
    unique = list(dict.fromkeys(u for u in uris if u))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, len(unique))

    for uri in unique:
        dest = folder / thumb_name(uri, size)
        if dest.exists():
            try:
                with Image.open(dest) as im:
                    result[uri] = (dest.name, im.width, im.height)
                tick()
                continue
            except OSError:
                pass  # a damaged thumbnail is remade
        todo.append((uri, str(dest), size, max_pixels))
    if workers > 0 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for args, res in zip(todo, pool.map(_one, todo, chunksize=16)):
                result[args[0]] = res
                tick()
    else:
        for args in todo:
            result[args[0]] = _one(args)
            tick()
    return result
