"""Opening and saving the evaluator's images (sources, edits): any fsspec URL in, PNG out, never a half-written file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dataprep.store import atomic_file


def open_image(path: str) -> "Any":
    """Open a local path or any fsspec URL as an RGB PIL image."""
    from PIL import Image

    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    with Image.open(path) as im:
        return im.convert("RGB")


def save_image_atomic(image: "Any", path: Path) -> None:
    with atomic_file(path, fsync=False) as tmp:
        image.save(tmp, format="PNG")
