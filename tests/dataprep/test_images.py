from __future__ import annotations

import pytest
from PIL import Image

from dataprep.images import CLIP_MEAN_RGB, PrepOptions, center_crop_square, decode, pad_to_square, prepare, to_rgb
from tests.images_factory import bad_images, exif_rotated_jpeg, png_bytes


def test_alpha_is_composited_on_white_not_dropped():
    # fully transparent red: dropping alpha would show red, compositing shows white
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)


def test_la_and_palette_with_transparency():
    la = Image.new("LA", (2, 2), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (2, 2), 0)
    p.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    p.info["transparency"] = 0
    assert to_rgb(p).getpixel((0, 0)) == (255, 255, 255)
    p.info.pop("transparency")
    assert to_rgb(p).getpixel((0, 0)) == (10, 20, 30)


def test_cmyk_and_16bit_convert_correctly():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = to_rgb(cmyk).getpixel((0, 0))
    assert r > 200 and g < 50 and b < 50
    deep = Image.new("I;16", (2, 2), 65535)
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)  # full scale, not clipped garbage
    mid = Image.new("I;16", (2, 2), 32896)  # 128 * 257
    assert to_rgb(mid).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied():
    img = decode(exif_rotated_jpeg(40, 20))
    assert img.size == (20, 40)  # rotated to portrait


def test_pad_to_square_centres_on_clip_mean():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = pad_to_square(img)
    assert sq.size == (40, 40)
    assert sq.getpixel((0, 0)) == CLIP_MEAN_RGB
    assert sq.getpixel((20, 20)) == (255, 0, 0)
    assert sq.getpixel((20, 9)) == CLIP_MEAN_RGB and sq.getpixel((20, 10)) == (255, 0, 0)


def test_center_crop_keeps_the_middle():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 20, 10))
    crop = center_crop_square(img)
    assert crop.size == (10, 10) and crop.getpixel((0, 0)) == (255, 255, 255)


def test_prepare_resizes_to_model_side_and_reports_original_size():
    data = png_bytes(Image.new("RGB", (200, 100), (5, 6, 7)))
    prep = prepare(data, PrepOptions(mode="pad", size=30))
    assert prep.error is None and (prep.width, prep.height) == (200, 100)
    assert prep.image.size == (30, 30) and prep.image.mode == "RGB"
    assert len(prep.sha256) == 64


@pytest.mark.parametrize("name", ["zero.png", "truncated.png", "text.png", "broken.tiff", "huge.png"])
def test_bad_files_give_a_reason_not_an_exception(tmp_path, name):
    expected = bad_images(tmp_path)[name]
    prep = prepare((tmp_path / name).read_bytes())
    assert prep.image is None
    assert prep.error.split(":")[0] in expected.split("|"), prep.error


def test_size_guard_is_ours_above_pillows_own_bomb_limit():
    """Over Pillow's ~179 MP limit, open() itself raised: the row said decode_error
    and a larger --max-pixels was ignored."""
    import io

    from PIL import Image

    from dataprep.images import PrepOptions, prepare

    buf = io.BytesIO()
    Image.new("1", (14000, 14000)).save(buf, "PNG")  # 196 MP, a few hundred kB
    assert prepare(buf.getvalue()).error.startswith("too_large:")
    assert prepare(buf.getvalue(), PrepOptions(max_pixels=150_000_000)).error.startswith("too_large:")
