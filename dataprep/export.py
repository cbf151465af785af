"""Exports of a run's caption/edit pairs.

- :func:`export_softrepa`: ``prompts_editing.json`` in the official SoftREPA
  editing format (a list of ``{"prompt", "img_path", "tgt_prompt"}``, as in
  ``shared/reference/softrepa/samples/prompts_editing.json``), the images
  copied (or symlinked) beside it so ``img_path`` resolves from the json's
  folder.
- :func:`export_piebench`: a PIE-Bench style ``mapping_file.json`` (id ->
  ``image_path``, ``original_prompt``, ``editing_prompt``, ``blended_word``)
  with the images under ``annotation_images/``. The ``[ ]`` mark exactly the
  rule checker's changed regions (``dataprep.rules.check``: ``source_spans``
  in the original, ``target_spans`` in the edit), as PIE-Bench marks the
  edited words; ``blended_word`` is "<source word> <target word>", the last
  word of the first changed span on each side (e.g. "dog fox"). A caption
  that already holds ``[`` or ``]`` makes the marks ambiguous; none is escaped.
- :func:`export_hf`: a `datasets` dataset with an ``Image`` column and the
  edits' provenance columns, saved with ``save_to_disk`` beside a dataset card
  (``README.md``, see :mod:`dataprep.hfcard`), optionally pushed to the hub.

Only edits that passed the checker (and have no error) are exported unless
``include_failed``. One pair per image: its newest passing edit (with
``include_failed``, the newest edit when none passed). An image that cannot
be read is skipped and counted, and the export goes on. Each export writes
``export.json`` beside its files and registers itself in the run's
``exports.json`` so ``dataprep stats`` can list it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep import hfcard
from dataprep.errors import ConfigError, Reason, failure
from dataprep.images import decode
from dataprep.rules import check
from dataprep.sources import ImageRef, read_bytes
from dataprep.store import atomic_write_bytes, atomic_write_text, edit_skip, read_json_record, shard_paths, utcnow

EXPORT_KINDS = ("softrepa", "piebench", "hf")


@dataclass(frozen=True)
class ExportEdit:
    """The edit row an export writes for one image (softrepa.evaluate's ``Pair``
    is another thing: a pair to edit and score)."""

    image_id: str
    image_uri: str | None
    source: str
    target: str
    passed: bool
    violations: tuple[str, ...] = ()
    # the edit row's provenance columns (PROVENANCE_COLUMNS that the store has)
    provenance: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


# Edit-row columns `export hf` keeps beside each pair, so a published row can be
# traced to the model, revision, prompt and run that made it.
PROVENANCE_COLUMNS = ("key", "engine", "model", "model_revision", "prompt_id", "prompt_sha256", "sampling", "seed", "attempts", "source_span", "target_span", "finish_reason", "run_id", "note")


@dataclass
class ExportSummary:
    kind: str
    out: Path
    pairs: int
    skipped: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    push: dict[str, Any] | None = None  # export hf --push-to-hub: repo, private, ok, url or error


# ---------------------------------------------------------------- reading a run


def load_pairs(run_dir: Path | str, include_failed: bool = False) -> tuple[list[ExportEdit], Counter]:
    """One (caption, edit) pair per image from ``RUN_DIR/edits``, sorted by image id.

    Usable is :func:`dataprep.store.edit_skip`'s decision (``passed`` required
    unless ``include_failed``). Among an image's usable rows a passing one
    beats a failing one, then the newest ``created_at`` wins. The image uri
    falls back to ``RUN_DIR/captions`` when the edit row has none.
    """
    run = Path(run_dir)
    edits = run / "edits"
    if not shard_paths(edits):
        raise ConfigError(f"no edit shards in {edits}", "--run", "pass the OUT folder of a `dataprep rewrite` run (it holds edits/)")
    skipped: Counter = Counter()
    best: dict[str, tuple[tuple[bool, int], ExportEdit]] = {}
    cols = ["image_id", "image_uri", "source", "target", "passed", "violations", "error", "created_at"]
    for path in shard_paths(edits):
        prov_cols = [c for c in PROVENANCE_COLUMNS if c in pq.read_schema(path).names]
        for b in pq.ParquetFile(path).iter_batches(columns=cols + prov_cols):
            ts = b.column("created_at").cast("int64").to_pylist()
            data = [b.column(c).to_pylist() for c in cols[:-1]]
            created = [None if d is None else d.isoformat() for d in b.column("created_at").to_pylist()]
            prov = [dict(zip(prov_cols, vals), created_at=c) for c, *vals in zip(created, *(b.column(c).to_pylist() for c in prov_cols))]
            for (image_id, uri, source, target, passed, violations, err), t, pv in zip(zip(*data), ts, prov):
                why = edit_skip({"error": err, "passed": passed, "source": source, "target": target}, require_passed=not include_failed)
                if why is not None:
                    skipped[why] += 1
                    continue
                rank = (passed is True, -1 if t is None else t)
                cur = best.get(image_id)
                if cur is None or rank >= cur[0]:
                    if cur is not None:
                        skipped[Reason.SUPERSEDED_ROWS] += 1
                    best[image_id] = (rank, ExportEdit(image_id, uri, source, target, passed is True, tuple(violations or ()), pv))
                else:
                    skipped[Reason.SUPERSEDED_ROWS] += 1
    missing_uri = [k for k, (_, p) in best.items() if not p.image_uri]
    if missing_uri:
        uris = _caption_uris(run / "captions", set(missing_uri))
        for k in missing_uri:
            rank, p = best[k]
            best[k] = (rank, ExportEdit(p.image_id, uris.get(k), p.source, p.target, p.passed, p.violations, p.provenance))
    return [best[k][1] for k in sorted(best)], skipped


def _caption_uris(captions: Path, wanted: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in shard_paths(captions):
        t = pq.read_table(path, columns=["image_id", "image_uri"])
        for image_id, uri in zip(t.column("image_id").to_pylist(), t.column("image_uri").to_pylist()):
            if image_id in wanted and uri:
                out[image_id] = uri
    return out


# ---------------------------------------------------------------- images


def _uri_name(uri: str) -> str:
    """File name an image uri points at (``zip://member::archive`` -> member's name)."""
    if uri.startswith("zip://"):
        uri = uri[len("zip://") :].split("::", 1)[0]
    return PurePosixPath(uri.replace("\\", "/")).name


def _slug(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("_") or "image"


def file_names(pairs: list[ExportEdit]) -> dict[str, str]:
    """image_id -> file name in the export: the uri's own name ("0001.png", as
    the reference file has it) unless two images share it, then the image id."""
    names = {p.image_id: _uri_name(p.image_uri) for p in pairs if p.image_uri}
    taken = Counter(names.values())
    out = {}
    for image_id, name in names.items():
        if taken[name] > 1 or not name:
            name = _slug(image_id) + PurePosixPath(name).suffix
        out[image_id] = name
    return out


class NotAnImage(ValueError):
    """The file at a pair's uri does not decode as an image (its reason is the message)."""


def place_image(uri: str, dest: Path, link: bool) -> None:
    """Copy (or symlink, for plain local files) the image at ``uri`` to ``dest``.

    Only files that decode as images are placed: the file may have changed
    since it was captioned (replaced, truncated, overwritten by a text file),
    and an export is handed to other tools as images. Raises
    :class:`NotAnImage` for such a file, OSError/KeyError/ValueError with the
    cause when it cannot be read at all.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    local = Path(uri)
    data = read_bytes(ImageRef("export", "export", uri))  # zip members cannot be linked: copied
    if not data:
        raise NotAnImage(failure(Reason.EMPTY_FILE, "zero bytes"))
    try:
        decode(data)
    except ValueError as exc:
        raise NotAnImage(str(exc)) from None
    if link and not uri.startswith("zip://") and local.is_file():
        os.symlink(local.resolve(), dest)
        return
    atomic_write_bytes(dest, data, fsync=False)  # one of many copies, cheap to redo


def _with_images(pairs: list[ExportEdit], image_dir: Path, link: bool, skipped: Counter, progress: Callable[[int, int], None] | None) -> Iterator[tuple[ExportEdit, str]]:
    names = file_names(pairs)
    for n, p in enumerate(pairs, 1):
        if progress:
            progress(n, len(pairs))
        if p.image_id not in names:
            skipped[Reason.IMAGE_URI_MISSING] += 1
            continue
        try:
            place_image(p.image_uri or "", image_dir / names[p.image_id], link)
        except NotAnImage:
            skipped[Reason.IMAGE_NOT_DECODABLE] += 1
            continue
        except Exception:  # OSError, KeyError, ValueError, zipfile.BadZipFile (bad CRC), RuntimeError (encrypted): this image only
            skipped[Reason.IMAGE_UNREADABLE] += 1
            continue
        yield p, names[p.image_id]


# ---------------------------------------------------------------- writers


def _write_json(path: Path, obj: Any) -> None:
    # key order kept (the official prompts_editing.json layout); fsync'd, temp removed on failure
    atomic_write_text(path, json.dumps(obj, indent=4, ensure_ascii=False) + "\n")


def _finish(kind: str, run_dir: Path | str, out: Path, pairs: int, skipped: Counter, files: list[Path], include_failed: bool, extra: dict[str, Any] | None = None) -> ExportSummary:
    summary = ExportSummary(kind, out, pairs, {str(k): v for k, v in sorted(skipped.items())}, files)
    record = {"kind": kind, "path": str(out.resolve()), "run": str(Path(run_dir).resolve()), "pairs": pairs, "include_failed": include_failed, "skipped": summary.skipped, "created_at": utcnow().isoformat(), **(extra or {})}
    _write_json(out / "export.json", record)
    registry = Path(run_dir) / "exports.json"
    old = read_json_record(registry)  # a corrupt registry is read as empty, with a warning
    entries = old.get("exports") if isinstance(old, dict) and isinstance(old.get("exports"), list) else []
    entries = [e for e in entries if isinstance(e, dict) and e.get("path") != record["path"]] + [record]
    _write_json(registry, {"exports": entries})
    return summary


def export_softrepa(run_dir: Path | str, out: Path | str, include_failed: bool = False, link: bool = False, progress: Callable[[int, int], None] | None = None) -> ExportSummary:
    """``OUT/prompts_editing.json`` + images, in the official SoftREPA editing format."""
    out = Path(out)
    pairs, skipped = load_pairs(run_dir, include_failed)
    entries = [{"prompt": p.source, "img_path": name, "tgt_prompt": p.target} for p, name in _with_images(pairs, out, link, skipped, progress)]
    _write_json(out / "prompts_editing.json", entries)
    return _finish("softrepa", run_dir, out, len(entries), skipped, [out / "prompts_editing.json"], include_failed)


def bracket(text: str, spans: tuple[tuple[int, int], ...]) -> str:
    """Wrap each non-empty ``[start, end)`` range of ``text`` in ``[ ]``."""
    for start, end in sorted(s for s in spans if s[1] > s[0])[::-1]:
        text = f"{text[:start]}[{text[start:end]}]{text[end:]}"
    return text


def head_word(span: str | None) -> str:
    """Last word of a span ("an umbrella" -> "umbrella"): PIE-Bench loaders split
    ``blended_word`` on a space into one source word and one target word."""
    words = re.findall(r"[\w'-]+", span or "")
    return words[-1] if words else ""


def piebench_entry(p: ExportEdit, image_path: str) -> dict[str, Any]:
    """One mapping_file.json value; the brackets are the checker's changed regions."""
    v = check(p.source, p.target)
    blended = f"{head_word(v.source_span)} {head_word(v.target_span)}" if head_word(v.source_span) and head_word(v.target_span) else ""
    return {
        "image_path": image_path,
        "original_prompt": bracket(p.source, v.source_spans),
        "editing_prompt": bracket(p.target, v.target_spans),
        "blended_word": blended,
        "image_id": p.image_id,
        "passed": p.passed,
        "violations": list(p.violations),
    }


def export_piebench(run_dir: Path | str, out: Path | str, include_failed: bool = False, link: bool = False, progress: Callable[[int, int], None] | None = None) -> ExportSummary:
    """``OUT/mapping_file.json`` + ``OUT/annotation_images/``, PIE-Bench style."""
    out = Path(out)
    pairs, skipped = load_pairs(run_dir, include_failed)
    mapping = {f"{n:012d}": piebench_entry(p, name) for n, (p, name) in enumerate(_with_images(pairs, out / "annotation_images", link, skipped, progress))}
    _write_json(out / "mapping_file.json", mapping)
    return _finish("piebench", run_dir, out, len(mapping), skipped, [out / "mapping_file.json"], include_failed)


def _judge_by_edit(run: Path) -> dict[Any, str]:
    """Newest judge row per edit, as JSON text, from ``RUN/judge`` when it exists.

    The judge stage's rows are matched generically: by ``edit_key`` (the edit
    row's key) when the judge rows have it, else by (image_id, target). Its
    provenance and text columns are left out of the JSON.
    """
    paths = shard_paths(run / "judge")
    if not paths:
        return {}
    drop = {"key", "engine", "model_revision", "prompt_id", "prompt_sha256", "sampling", "seed", "finish_reason", "prompt_tokens", "completion_tokens", "created_at", "source", "raw_output", "image_uri"}
    out: dict[Any, tuple[str, str]] = {}
    for path in paths:
        for r in pq.read_table(path).to_pylist():
            if r.get("error") is not None:
                continue
            link = ("key", r["edit_key"]) if "edit_key" in r else ("pair", r.get("image_id"), r.get("target"))
            when = str(r.get("created_at") or "")
            if link not in out or when >= out[link][0]:
                out[link] = (when, json.dumps({k: v for k, v in r.items() if k not in drop}, default=str, sort_keys=True))
    return {k: v for k, (_, v) in out.items()}


def export_hf(
    run_dir: Path | str,
    out: Path | str,
    include_failed: bool = False,
    push_to_hub: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    private: bool = False,
    license: str = "other",
) -> ExportSummary:
    """A `datasets` dataset saved to ``OUT`` with a dataset card, optionally pushed.

    Columns: ``image`` (an Image column), image_id, source, target, passed,
    violations, then the edit row's provenance (:data:`PROVENANCE_COLUMNS`,
    ``created_at`` as ISO text) and ``judge`` (the judge stage's verdict as
    JSON text when ``RUN/judge`` exists, else null). ``OUT/README.md`` is the
    dataset card (:mod:`dataprep.hfcard`). With ``push_to_hub`` the Parquet
    data and the card are uploaded with huggingface_hub (``private`` repo when
    asked). A failed push never loses the export: it is saved before the push
    and registered whatever the push did; the summary's ``push`` (also in the
    registry entry) says why (``ok`` false, ``error`` one line).
    """
    import datasets

    out = Path(out)
    run = Path(run_dir)
    pairs, skipped = load_pairs(run_dir, include_failed)
    judged = _judge_by_edit(run)
    strings = [c for c in PROVENANCE_COLUMNS if c not in ("seed", "attempts")]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "target": datasets.Value("string"),
            "passed": datasets.Value("bool"),
            "violations": datasets.Sequence(datasets.Value("string")),
            **{c: datasets.Value("string") for c in strings},
            "seed": datasets.Value("int64"),
            "attempts": datasets.Value("int32"),
            "created_at": datasets.Value("string"),
            "judge": datasets.Value("string"),
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = features.arrow_schema
    push: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".hf-export-") as tmp:
        staged, table_path = Path(tmp) / "images", Path(tmp) / "pairs.parquet"
        # Rows go to a Parquet file in small chunks, so DIV2K's multi-MB PNGs never
        # sit in memory together; `datasets` then reads that file by path.
        with pq.ParquetWriter(table_path, schema) as writer:
            chunk: list[dict[str, Any]] = []
            for p, name in _with_images(pairs, staged, False, skipped, progress):
                data = (staged / name).read_bytes()
                (staged / name).unlink()  # one image staged at a time
                prov = {c: p.provenance.get(c) for c in (*PROVENANCE_COLUMNS, "created_at")}
                judge = judged.get(("key", prov["key"])) or judged.get(("pair", p.image_id, p.target))
                chunk.append({"image": {"bytes": data, "path": name}, "image_id": p.image_id, "source": p.source, "target": p.target, "passed": p.passed, "violations": list(p.violations), **prov, "judge": judge})
                if len(chunk) >= 32:
                    writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                    chunk.clear()
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
        ds = datasets.Dataset.from_parquet(str(table_path), features=features, cache_dir=str(Path(tmp) / "cache"))
        ds.save_to_disk(str(out))
        n = len(ds)
        card = hfcard.card_markdown(hfcard.card_facts(run, n, list(features)), license=license)
        (out / "README.md").write_text(card, encoding="utf-8")
        if push_to_hub:
            # the hub layout: Parquet under data/ (its viewer and load_dataset
            # read it) and the card as README.md
            hub = Path(tmp) / "hub"
            (hub / "data").mkdir(parents=True)
            ds.to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
            (hub / "README.md").write_text(card, encoding="utf-8")
            push = {"repo": push_to_hub, "private": private}
            try:
                push.update(ok=True, url=hfcard.push(hub, push_to_hub, private=private))
            except Exception as exc:  # no network, no token, no rights: the local export stays
                push.update(ok=False, error=hfcard.one_line(exc))
    summary = _finish("hf", run_dir, out, n, skipped, [out, out / "README.md"], include_failed, extra={"push": push} if push else None)
    summary.push = push
    return summary
