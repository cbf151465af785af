from __future__ import annotations

import zipfile

import pytest
from PIL import Image

from dataprep.errors import ConfigError
from dataprep.sources import div2k, folder, hf_dataset, parse_ids, read_bytes
from tests.images_factory import good_images, png_bytes


@pytest.fixture()
def div2k_dir(tmp_path):
    d = tmp_path / "DIV2K_train_HR"
    d.mkdir()
    for n in (1, 2, 3, 801):
        (d / f"{n:04d}.png").write_bytes(png_bytes(Image.new("RGB", (8, 6), (n % 256, 0, 0))))
    (d / "notes.txt").write_text("ignored")
    return d


def test_div2k_folder_ids_split_and_limit(div2k_dir):
    refs = div2k(div2k_dir)
    assert [r.image_id for r in refs] == ["div2k/0001", "div2k/0002", "div2k/0003"]
    assert [r.image_id for r in div2k(div2k_dir, split="valid")] == ["div2k/0801"]
    assert [r.image_id for r in div2k(div2k_dir, limit=2)] == ["div2k/0001", "div2k/0002"]
    assert [r.image_id for r in div2k(div2k_dir, ids="2-3")] == ["div2k/0002", "div2k/0003"]


def test_div2k_requested_but_missing_id_is_kept_as_a_ref(div2k_dir):
    refs = div2k(div2k_dir, ids="3-4")
    assert [r.image_id for r in refs] == ["div2k/0003", "div2k/0004"]
    with pytest.raises(FileNotFoundError):
        read_bytes(refs[1])


def test_div2k_zip_is_read_without_extracting(div2k_dir, tmp_path):
    z = tmp_path / "DIV2K_train_HR.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(div2k_dir.glob("*.png")):
            zf.write(p, f"DIV2K_train_HR/{p.name}")
    refs = div2k(z)
    assert [r.image_id for r in refs] == ["div2k/0001", "div2k/0002", "div2k/0003"]
    assert refs[0].uri.startswith("zip://DIV2K_train_HR/0001.png::")
    assert read_bytes(refs[1]) == (div2k_dir / "0002.png").read_bytes()
    # the same chained URL opens with fsspec (how softrepa reads images)
    import fsspec

    with fsspec.open(refs[1].uri, "rb") as fh:
        assert fh.read() == (div2k_dir / "0002.png").read_bytes()


@pytest.mark.parametrize(
    "kwargs,flag",
    [({"data": "/nonexistent/DIV2K"}, "--data"), ({"split": "test"}, "--split"), ({"ids": "x-y"}, "--ids"), ({"ids": "900"}, "--ids")],
)
def test_div2k_bad_configuration_names_the_flag(div2k_dir, kwargs, flag):
    args = {"data": div2k_dir} | kwargs
    with pytest.raises(ConfigError) as exc:
        div2k(**args)
    assert exc.value.flag == flag and exc.value.fix


def test_parse_ids():
    assert parse_ids("1-3,7,9-10") == {1, 2, 3, 7, 9, 10}
    assert parse_ids(None) is None


def test_folder_is_recursive_with_stable_ids(tmp_path):
    good_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "readme.md").write_text("not an image")
    refs = folder(tmp_path / "imgs")
    ids = [r.image_id for r in refs]
    assert "imgs/nested/pic.webp" in ids and "imgs/rgb_64x48.png" in ids
    assert len(ids) == 10 and ids == sorted(ids)
    assert [r.image_id for r in folder(tmp_path / "imgs", name="x", limit=2)] == ["x/cmyk_20x30.jpg", "x/deep_32x32.png"]


def test_hf_parquet_dataset_offline(tmp_path):
    import datasets

    imgs = [Image.new("RGB", (10, 10), (i, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": imgs, "uid": ["a", "b", "c"]}).cast_column("image", datasets.Image())
    path = tmp_path / "data.parquet"
    ds.to_parquet(str(path))
    refs = list(hf_dataset(str(path), id_column="uid"))
    assert [r.image_id for r in refs] == ["data.parquet/train/a", "data.parquet/train/b", "data.parquet/train/c"]
    assert all(r.data is None for r in refs)  # refs hold no pixels; bytes are fetched when read
    assert Image.open(__import__("io").BytesIO(read_bytes(refs[2]))).getpixel((0, 0)) == (2, 0, 0)
    with pytest.raises(ConfigError) as exc:
        list(hf_dataset(str(path), image_column="pixels"))
    assert exc.value.flag == "--image-column"
