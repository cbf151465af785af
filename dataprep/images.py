"""Image preparation: decode, validate, convert to RGB, pad or crop, resize.

Pure functions on bytes and PIL images, with only Pillow imported, so they run
in worker processes (decoding a 2K PNG takes ~100 ms; the model must not wait
for it). Nothing here raises for bad input: :func:`prepare` returns an error
string instead, and the stage records it on the row.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from dataprep.errors import Reason, failure
from dataprep.imagecheck import ImageChecks, image_flags

# LLaVA-1.5 pads to a square with the CLIP image mean (image_aspect_ratio=pad),
# so the padding is neutral after the processor normalises it.
CLIP_MEAN_RGB = (122, 116, 104)  # round(255 * (0.48145466, 0.4578275, 0.40821073)), truncated as in LLaVA
DEFAULT_MAX_PIXELS = 64_000_000  # DIV2K is ~2.8 MP; 64 MP leaves room for 8K photos

# Truncated files must fail, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class PrepOptions:
    mode: str = "pad"  # pad (LLaVA-1.5 default) | crop (center crop)
    size: int | None = None  # resize the square to size x size (the model's input side); None keeps it
    max_side: int | None = None  # shrink (never enlarge) the square to at most this side: what a server engine sends
    max_pixels: int = DEFAULT_MAX_PIXELS
    checks: "ImageChecks | None" = None  # record image_flags (dataprep.imagecheck); None: not checked


@dataclass
class Prepared:
    """What a worker sends back: metadata always, pixels only on success."""

    sha256: str
    width: int | None = None
    height: int | None = None
    image: Image.Image | None = None
    error: str | None = None
    flags: list[str] | None = None  # failed image checks, when PrepOptions.checks is set


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB correctly.

    Alpha (RGBA, LA, PA, palette with transparency) is composited on white
    rather than dropped (dropping exposes whatever colour the transparent
    pixels happen to store). 16- and 32-bit greyscale is rescaled to 8 bits
    instead of clipped.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _scale_to_l(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def _scale_to_l(img: Image.Image) -> Image.Image:
    """High bit-depth greyscale -> 8-bit L, by the format's full scale.

    16-bit (I;16, or I holding 0..65535) divides by 65535/255; float images in
    0..1 multiply by 255; anything else is stretched over its own range.
    """
    import numpy as np

    arr = np.asarray(img, dtype=np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535 and hi > 255):
        arr = arr * (255.0 / 65535.0)
    elif img.mode == "I" and lo >= 0 and hi <= 255:
        pass
    elif img.mode == "F" and lo >= 0 and hi <= 1.0:
        arr = arr * 255.0
    else:
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = CLIP_MEAN_RGB) -> Image.Image:
    """Center the image on a square canvas of the fill colour (LLaVA-1.5's expand2square)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def center_crop_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[str, tuple[int, int]] | None = None) -> Image.Image:
    """Decode bytes, EXIF orientation applied. Raises ValueError with a reason.

    ``draft`` (mode, size) lets a JPEG decode at a reduced scale (Pillow's
    ``Image.draft``) when a small picture is enough, e.g. a perceptual hash.
    """
    if not data:
        raise ValueError(failure(Reason.EMPTY_FILE, "zero bytes"))
    try:
        # Pillow's own bomb check already fires in open() (above ~179 MP): keep it
        # off here too, so max_pixels alone decides and the reason is too_large
        with _no_pil_bomb_guard():
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError(failure(Reason.NOT_AN_IMAGE, "Pillow cannot identify the format")) from None
    w, h = img.size
    # Check the header's size before decoding a single pixel (decompression bombs).
    if w * h > max_pixels:
        raise ValueError(failure(Reason.TOO_LARGE, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"))
    try:
        if draft is not None:
            img.draft(*draft)
        with _no_pil_bomb_guard():
            img.load()
    except (OSError, SyntaxError, ValueError) as exc:  # truncated/corrupt data
        raise ValueError(failure(Reason.CORRUPT_IMAGE, exc)) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        pass
    return img


class _no_pil_bomb_guard:
    """Our own max_pixels check replaces Pillow's global one (it warns at 89 MP)."""

    def __enter__(self):
        self._old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc):
        Image.MAX_IMAGE_PIXELS = self._old


def square(img: Image.Image, opts: PrepOptions) -> Image.Image:
    """Pad (or crop) to a square, then resize to ``opts.size``.

    With ``mode="pad"`` the result equals, pixel for pixel, what
    transformers' ``LlavaImageProcessor(do_pad=True)`` feeds its normaliser:
    the same mean-colour padding and one plain bicubic PIL resize. Pillow's
    ``reducing_gap`` (a faster two-stage downscale) must stay off: it changes
    pixels by up to 9/255 against the processor's single resize.
    """
    img = pad_to_square(img) if opts.mode == "pad" else center_crop_square(img)
    if opts.size is not None and img.size != (opts.size, opts.size):
        img = img.resize((opts.size, opts.size), Image.Resampling.BICUBIC)
    elif opts.max_side is not None and img.width > opts.max_side:
        # a 4000x3000 photo padded to 4000x4000 is 48 MB decoded; the openai engine
        # would send it at 1024 anyway, so the batch waiting for the server holds 3 MB
        img = img.resize((opts.max_side, opts.max_side), Image.Resampling.BICUBIC)
    return img


def prepare(data: bytes, opts: PrepOptions = PrepOptions()) -> Prepared:
    """bytes -> RGB square ready for the processor, or an error. Never raises."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = decode(data, opts.max_pixels)
        w, h = img.size
        flags = None
        if opts.checks is not None:
            flags = image_flags(img, opts.checks)  # the full image: a padded square would look uniform
        rgb = to_rgb(img)
        return Prepared(sha256=digest, width=w, height=h, image=square(rgb, opts), flags=flags)
    except ValueError as exc:
        return Prepared(sha256=digest, error=str(exc))
    except Exception as exc:  # any other decoder failure is still one bad row
        return Prepared(sha256=digest, error=failure(Reason.DECODE_ERROR, f"{type(exc).__name__}: {exc}"))
