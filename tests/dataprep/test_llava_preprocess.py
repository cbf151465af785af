"""Caption inputs equal transformers' LlavaImageProcessor(do_pad=True), pixel for pixel."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dataprep.images import PrepOptions, prepare


def _image(size, mode, seed):
    rng = np.random.RandomState(seed)
    w, h = size
    if mode == "L":
        return Image.fromarray((rng.rand(h, w) * 255).astype("uint8"), "L")
    if mode == "RGBA":
        arr = (rng.rand(h, w, 4) * 255).astype("uint8")
        arr[..., 3] = 255  # opaque: alpha handling is compared on its own below
        return Image.fromarray(arr, "RGBA")
    # smooth gradients plus noise: the bicubic kernel's rounding is exercised, not just noise
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / max(w + h - 2, 1)], -1)
    arr = np.clip(base + rng.randn(h, w, 3) * 20, 0, 255).astype("uint8")
    return Image.fromarray(arr, "RGB")


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def processor():
    # the PIL backend: what LlavaImageProcessor is without torchvision (transformers 5
    # names it LlavaImageProcessorPil; older versions only have the PIL one)
    try:
        from transformers import LlavaImageProcessorPil as cls
    except ImportError:
        from transformers import LlavaImageProcessor as cls
    return cls


@pytest.mark.parametrize(
    "size, mode, side",
    [
        ((401, 257), "RGB", 30),  # strong downscale (where reducing_gap used to differ)
        ((2040, 1356), "RGB", 336),  # a DIV2K frame at LLaVA-1.5's 336
        ((257, 401), "L", 30),  # portrait, greyscale
        ((64, 64), "RGBA", 30),  # square, already padded
        ((23, 37), "RGB", 30),  # upscale
        ((999, 100), "RGB", 336),  # very wide
    ],
)
def test_prepared_square_equals_llava_processor_with_do_pad(processor, size, mode, side):
    img = _image(size, mode, seed=size[0])
    prepared = prepare(_png_bytes(img), PrepOptions(mode="pad", size=side))
    assert prepared.error is None
    # what the processor does before normalising: pad to a square with the mean colour, resize, crop
    raw = processor(do_pad=True, size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                    do_rescale=False, do_normalize=False)
    want = np.asarray(raw(images=img, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
    got = np.asarray(prepared.image, dtype=np.float32)
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"max diff {np.abs(got - want).max()}"
    # and the pixel values the model sees are the same through the full processor
    full = processor(do_pad=True, size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    a = full(images=img, return_tensors="np")["pixel_values"]
    b = full(images=prepared.image, return_tensors="np")["pixel_values"]
    assert np.array_equal(a, b)


def test_reducing_gap_is_what_made_the_difference():
    """The regression this guards: Pillow's reducing_gap resize differs from a plain one."""
    # reducing_gap only acts when shrinking by 2 x gap or more (DIV2K 2040 px -> 336 is 6x)
    img = _image((1200, 800), "RGB", 1)
    from dataprep.images import pad_to_square

    sq = pad_to_square(img)
    plain = np.asarray(sq.resize((100, 100), Image.Resampling.BICUBIC), dtype=int)
    gap = np.asarray(sq.resize((100, 100), Image.Resampling.BICUBIC, reducing_gap=3.0), dtype=int)
    ours = np.asarray(prepare(_png_bytes(img), PrepOptions(mode="pad", size=100)).image, dtype=int)
    assert np.abs(plain - gap).max() > 0
    assert np.array_equal(ours, plain)
