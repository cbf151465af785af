"""Image sources -> a stream of :class:`ImageRef`.

A ref is cheap and picklable (id, uri, and for in-memory datasets the bytes),
so worker processes read, hash and decode it. Ids are stable across runs:
``div2k/0001``, ``<folder name>/<relative path>``, ``<dataset>/<split>/<row>``.

URIs are local paths or fsspec-style chained URLs (``zip://member::/abs.zip``)
that :func:`read_bytes` here and ``fsspec.open`` in ``softrepa`` both open.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import zipfile
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from dataprep.errors import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DIV2K_SPLITS = {"train": (1, 800), "valid": (801, 900)}


@dataclass(frozen=True)
class HFRow:
    """Where an image stored inside a `datasets` dataset lives (read lazily)."""

    name_or_path: str
    split: str
    image_column: str
    index: int


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    source: str  # div2k | folder | hf
    uri: str
    data: bytes | None = None  # in-memory bytes (tests, small sources)
    row: HFRow | None = None  # an image embedded in a datasets dataset, fetched when read


class RefList(list):
    """Refs in caption order, plus what the source walk met and did not caption.

    ``skipped`` maps a reason (``hidden``, ``not_an_image_extension``,
    ``broken_link``, ``symlink_loop``, ``link_to_folder``,
    ``not_a_regular_file``, ``unreadable_folder``, ...) to a count; the caption
    stage prints it and writes it to the manifest, so nothing is dropped
    silently.
    """

    def __init__(self, refs=(), skipped: Counter | dict | None = None):
        super().__init__(refs)
        self.skipped: Counter = Counter(skipped or {})


# ------------------------------------------------------------------ reading


def stored_size(ref: ImageRef) -> int | None:
    """The file's size in bytes from its stat or zip header, without reading it.

    An image inside a `datasets` row is measured in the memory-mapped Arrow
    data (a zero-copy one-row slice), not copied out. None when unknown.
    Raises OSError/KeyError like :func:`read_bytes` for a missing file.
    """
    if ref.data is not None:
        return len(ref.data)
    if ref.row is not None:
        r = ref.row
        cell = _hf_images(r.name_or_path, r.split, r.image_column).with_format("arrow")[r.index].column(r.image_column)[0]
        if not cell.is_valid:
            return None
        data, path = cell["bytes"], cell["path"].as_py()
        if data.is_valid:
            return data.as_buffer().size
        return os.stat(path).st_size if path else None
    if ref.uri.startswith("zip://"):
        member, archive = ref.uri[len("zip://"):].split("::", 1)
        return _open_zip(archive).getinfo(member).file_size
    return os.stat(ref.uri).st_size


@lru_cache(maxsize=8)
def _open_zip(path: str) -> zipfile.ZipFile:
    # One handle per worker process; reading the central directory per image
    # would dominate for 800-member archives.
    return zipfile.ZipFile(path)


def read_bytes(ref: ImageRef) -> bytes:
    """The image file's bytes. Raises OSError/KeyError with the cause."""
    if ref.data is not None:
        return ref.data
    if ref.row is not None:
        r = ref.row
        img = _hf_images(r.name_or_path, r.split, r.image_column)[r.index][r.image_column]
        if not isinstance(img, dict):
            raise FileNotFoundError(f"row {r.index} of {r.name_or_path} has no image ({type(img).__name__})")
        if img.get("bytes") is not None:
            return img["bytes"]
        if img.get("path"):
            return Path(img["path"]).read_bytes()
        raise FileNotFoundError(f"row {r.index} of {r.name_or_path} has no image")
    if ref.uri.startswith("zip://"):
        member, archive = ref.uri[len("zip://"):].split("::", 1)
        return _open_zip(archive).read(member)
    return Path(ref.uri).read_bytes()


# ------------------------------------------------------------------ DIV2K


def parse_ids(spec: str | None) -> set[int] | None:
    """'1-100', '7', '1,5,9-12' -> set of ints (None: all)."""
    if not spec:
        return None
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"cannot parse id range {part!r}", "--ids", "use forms like 1-100 or 1,5,9-12")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConfigError(f"empty id range {part!r}", "--ids", "write the smaller id first, e.g. 1-100")
        out.update(range(lo, hi + 1))
    return out


def div2k(data: Path | str, split: str = "train", ids: str | None = None, limit: int | None = None) -> RefList:
    """DIV2K HR images from the extracted folder or the official zip (not extracted).

    Ids are ``div2k/0001`` .. ``div2k/0800`` (train) or ``0801`` .. ``0900``
    (valid). Ids asked for with ``ids`` but absent from the data come back as
    refs to a missing path, so they become error rows rather than vanish.
    """
    if split not in DIV2K_SPLITS:
        raise ConfigError(f"unknown split {split!r}", "--split", "use train or valid")
    data = Path(data).expanduser()
    if not data.exists():
        raise ConfigError(
            f"DIV2K data not found at {data}",
            "--data",
            "pass the extracted DIV2K_train_HR/ folder or DIV2K_train_HR.zip "
            "(from https://data.vision.ee.ethz.ch/cvl/DIV2K/)",
        )
    lo, hi = DIV2K_SPLITS[split]
    wanted = parse_ids(ids)
    found: dict[int, str] = {}
    skipped: Counter = Counter()
    if data.is_file():
        if not zipfile.is_zipfile(data):
            raise ConfigError(f"{data} is not a zip archive", "--data", "pass the DIV2K folder or the official .zip")
        for name in _open_zip(str(data.resolve())).namelist():
            m = re.search(r"(?:^|/)(\d{4})\.png$", name)
            if m:
                found[int(m.group(1))] = f"zip://{name}::{data.resolve()}"
            elif not name.endswith("/"):
                skipped["not_a_div2k_name"] += 1
    else:
        for p in data.iterdir():
            m = re.fullmatch(r"(\d{4})\.png", p.name)
            if m:
                found[int(m.group(1))] = str(p.resolve())
            else:
                skipped["not_a_div2k_name"] += 1
    numbers = sorted(wanted) if wanted is not None else sorted(n for n in found if lo <= n <= hi)
    chosen = set(numbers)
    skipped["not_selected"] += sum(1 for n in found if n not in chosen)
    if wanted is not None:
        outside = [n for n in numbers if not lo <= n <= hi]
        if outside:
            raise ConfigError(f"ids {outside[:5]} are outside the {split} split ({lo}-{hi})", "--ids", f"use ids in {lo}-{hi} or change --split")
    if not numbers:
        raise ConfigError(f"no DIV2K {split} images (NNNN.png, ids {lo}-{hi}) in {data}", "--data", "point at DIV2K_train_HR/ or DIV2K_valid_HR/ (or their zips)")
    if limit is not None:
        skipped["beyond_limit"] += max(0, len(numbers) - limit)
        numbers = numbers[:limit]
    missing_dir = data if data.is_dir() else data.parent
    return RefList(
        (ImageRef(f"div2k/{n:04d}", "div2k", found.get(n, str((missing_dir / f"{n:04d}.png").resolve()))) for n in numbers),
        +skipped,  # unary plus drops zero counts
    )


# ------------------------------------------------------------------ folders


def folder(path: Path | str, name: str | None = None, limit: int | None = None) -> RefList:
    """Every image under ``path`` (recursive), sorted, id = name/relative path.

    Links to files are followed (the id keeps the link's own path); links to
    folders are not (they could loop or reach outside ``path``). Everything
    else the walk meets is counted in the result's ``skipped`` by reason (see
    :class:`RefList`); an image-named link that leads nowhere is counted too.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"image folder not found: {root}", "PATH", "pass an existing folder of images")
    prefix = name or root.resolve().name
    skipped: Counter = Counter()
    files = sorted(_walk(root, skipped))
    if not files:
        seen = f" (skipped: {', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))})" if skipped else ""
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}{seen}", "PATH", "pass a folder that holds images")
    if limit is not None:
        if len(files) > limit:
            skipped["beyond_limit"] += len(files) - limit
        files = files[:limit]
    return RefList((ImageRef(f"{prefix}/{p.relative_to(root).as_posix()}", "folder", str(p.resolve())) for p in files), skipped)


def _walk(folder: Path, skipped: Counter) -> Iterator[Path]:
    """Image files under ``folder``; every other entry is counted in ``skipped``."""
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no permission, vanished, not a folder after all
        skipped["unreadable_folder"] += 1
        return
    for entry in entries:
        p = Path(entry.path)
        if entry.name.startswith("."):
            skipped["hidden"] += 1
            continue
        try:
            if entry.is_symlink():
                try:
                    target = os.stat(p)  # follows the link
                except OSError as exc:
                    skipped["symlink_loop" if exc.errno == errno.ELOOP else "broken_link"] += 1
                    continue
                mode = target.st_mode
                if stat.S_ISDIR(mode):
                    skipped["link_to_folder"] += 1
                    continue
            else:
                mode = entry.stat(follow_symlinks=False).st_mode
        except OSError:
            skipped["unreadable_entry"] += 1
            continue
        if stat.S_ISDIR(mode):
            yield from _walk(p, skipped)
        elif not stat.S_ISREG(mode):
            skipped["not_a_regular_file"] += 1  # fifo, socket, device: reading could block forever
        elif p.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped["not_an_image_extension"] += 1
        else:
            yield p


# ------------------------------------------------------------------ Hugging Face datasets


def hf_dataset(
    name_or_path: str,
    split: str = "train",
    image_column: str = "image",
    id_column: str | None = None,
    limit: int | None = None,
) -> Iterator[ImageRef]:
    """Rows of a `datasets` dataset (hub id, local Parquet/imagefolder dir or file).

    Images are read as stored bytes (``decode=False``) so decoding happens in
    the worker pool like every other source.
    """
    ds = _load_hf(name_or_path, split)
    if image_column not in ds.column_names:
        raise ConfigError(f"no column {image_column!r} in {name_or_path} (columns: {ds.column_names})", "--image-column", "name the column that holds the images")
    if id_column and id_column not in ds.column_names:
        raise ConfigError(f"no column {id_column!r} in {name_or_path}", "--id-column", f"use one of {ds.column_names}")
    import datasets

    p = Path(name_or_path).expanduser()
    try:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    except Exception as exc:  # a text or number column cannot hold images
        raise ConfigError(f"column {image_column!r} of {name_or_path} does not hold images ({type(exc).__name__}: {exc})", "--image-column", "name the column that holds the images") from None
    label = p.name if p.exists() else name_or_path
    n = len(ds) if limit is None else min(limit, len(ds))
    # Refs keep no pixels: a 100k-image dataset must not sit in memory twice.
    # Workers fetch each row's bytes themselves (memory-mapped Arrow).
    for i in range(n):
        row = ds[i]
        img = row[image_column] if isinstance(row[image_column], dict) else {}
        # a null id must not collapse rows onto the id "None"; the row number stays unique
        rid = str(row[id_column]) if id_column and row[id_column] is not None else f"{i:06d}"
        path = img.get("path")
        if img.get("bytes") is None and path and Path(path).exists():
            yield ImageRef(f"{label}/{split}/{rid}", "hf", str(Path(path).resolve()))
        else:
            yield ImageRef(f"{label}/{split}/{rid}", "hf", f"dataset-row://{label}/{split}/{i}", row=HFRow(name_or_path, split, image_column, i))


def _load_hf(name_or_path: str, split: str):
    """A `datasets` split from a local Parquet file/folder, a save_to_disk folder, or the hub."""
    import datasets

    p = Path(name_or_path).expanduser()
    try:
        if p.is_file() and p.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(p), split=split)
        if p.is_dir() and any(p.glob("*.parquet")) and not any(p.glob("*.arrow")):
            return datasets.load_dataset("parquet", data_dir=str(p), split=split)
        if p.is_dir() and (p / "dataset_info.json").exists():
            ds = datasets.load_from_disk(str(p))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(name_or_path, split=split)
    except Exception as exc:
        raise ConfigError(f"cannot load dataset {name_or_path!r} split {split!r}: {exc}", "NAME_OR_PATH", "pass a local Parquet file/folder, an imagefolder, or a hub id you can access") from None


@lru_cache(maxsize=4)
def _hf_images(name_or_path: str, split: str, image_column: str):
    """The dataset's image column as stored bytes, opened once per process."""
    import datasets

    return _load_hf(name_or_path, split).select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
