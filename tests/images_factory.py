"""Small images of every awkward kind, written to disk for source/caption tests.

The good ones are the demo's (dataprep.tiny.write_demo_images); the bad ones
exist only here, with the error reason each must produce.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dataprep.tiny import encode_image as png_bytes, exif_rotated_jpeg, write_demo_images as good_images  # noqa: F401


def bad_images(folder: Path) -> dict[str, str]:
    """file name -> the error reason the pipeline must record for it."""
    folder.mkdir(parents=True, exist_ok=True)
    good = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    tiff = png_bytes(Image.new("RGB", (32, 32)), "TIFF")
    (folder / "broken.tiff").write_bytes(tiff[:8] + b"\x00" * 40)  # header claims TIFF, body is garbage
    # 9000 x 9000 = 81 MP > the 64 MP default: rejected from the header, never decoded
    (folder / "huge.png").write_bytes(png_bytes(Image.new("1", (9000, 9000))))
    return {
        "zero.png": "empty_file",
        "truncated.png": "corrupt_image",
        "text.png": "not_an_image",
        "broken.tiff": "not_an_image|corrupt_image",
        "huge.png": "too_large",
    }
