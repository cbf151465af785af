"""A run directory -> one card per image, plus the counts the report shows on top.

Pure over the stores: reads ``RUN/captions`` and ``RUN/edits`` (schemas in
:mod:`dataprep.store`) and, when present, any other stage folder of Parquet
shards keyed by image (``RUN/judge``, ``RUN/dedup``), read generically by
column name so the report needs no change when those stages add columns.

A card is a plain JSON-able dict with short keys (the page ships 100k of
them in chunk files)::

    id       image id                      uri, w, h   the image as recorded
    cap      newest good caption (or None) cerr        caption error, if no good caption
    status   passed | failed | error | none            (the chosen edit's verdict)
    src      edit source when it is not the caption    tgt   edit target
    ss, ts   [start, end) of source_span in src (or cap) and of target_span in tgt
    viol     violated rule ids             att         rewrite attempts
    raw      raw model output when it differs from tgt eerr  edit error
    more     how many other edit rows the image has
    cp, ep   caption / edit provenance: [index into the shared provenance table
             (engine, model, revision, prompt, sampling, run id), key, seed,
             finish_reason, prompt_tokens, completion_tokens, created_at]
    judge    {"verdict": ..., other judge columns}     (when RUN/judge exists)
    dup      [{"cluster": ..., "kind": ..., ...}]      duplicate clusters (RUN/dedup)

The chosen edit of an image is its newest passing row, else its newest good
row, else its newest error row (shards sort in run order, see store.new_run_id).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow.parquet as pq

from dataprep.store import shard_paths

#: provenance columns shared by many rows: interned into one table
SHARED_PROV = ("engine", "model", "model_revision", "prompt_id", "prompt_sha256", "sampling", "run_id")
#: per-row provenance, as a list in this order (no key names: 100k cards ship in the page)
ROW_PROV = ("p", "key", "seed", "finish_reason", "prompt_tokens", "completion_tokens", "created_at")
#: optional stage folders and the column names their id / verdict / cluster may have
JUDGE_DIR, DEDUP_DIR = "judge", "dedup"
ID_COLUMNS = ("image_id", "item_id", "id")
VERDICT_COLUMNS = ("verdict", "judge_verdict")
CLUSTER_COLUMNS = ("cluster_id", "cluster")
#: columns of optional folders never shown (bookkeeping, or already on the card)
_HIDDEN = {"key", "prompt_sha256", "sampling", "created_at", "run_id", "prompt_tokens", "completion_tokens", "image_uri", "image_sha256"}


@dataclass
class ReportData:
    """Everything the page needs: cards in display order plus the summary."""

    cards: list[dict[str, Any]]
    provenance: list[dict[str, Any]]
    summary: dict[str, Any]


def span_range(text: str | None, span: str | None) -> list[int] | None:
    """[start, end) of ``span`` in ``text``: its first whole-word occurrence, else its first occurrence.

    The checker stores the replaced phrase and its replacement "as they first
    appear" (dataprep.rules.Verdict), so the first match is the right one.
    """
    if not text or not span:
        return None
    i = text.find(span)
    if i < 0:
        return None
    j = i + len(span)
    if (i == 0 or not _word(text[i - 1])) and (j == len(text) or not _word(text[j])):
        return [i, j]  # the first occurrence is a whole word (the common case, no regex)
    m = re.search(r"(?<!\w)" + re.escape(span) + r"(?!\w)", text)
    if m:
        return [m.start(), m.end()]
    return [i, j]


def _word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _rows(folder: Path, columns: Iterable[str] | None = None) -> Iterable[dict[str, Any]]:
    """Rows of every shard in write order, only the wanted columns each shard has.

    Timestamps arrive as ISO-like strings (Arrow casts them in C; a Python
    datetime per row would dominate at 100k rows).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    for path in shard_paths(folder):
        pf = pq.ParquetFile(path)
        have = pf.schema_arrow.names
        cols = [c for c in columns if c in have] if columns is not None else None
        for batch in pf.iter_batches(columns=cols, batch_size=65_536):
            for i, f in enumerate(batch.schema):
                if pa.types.is_timestamp(f.type) or pa.types.is_date(f.type):
                    batch = batch.set_column(i, f.name, pc.cast(batch.column(i), pa.string()))
            yield from batch.to_pylist()


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


class _Interner:
    def __init__(self) -> None:
        self.table: list[dict[str, Any]] = []
        self._index: dict[str, int] = {}

    def __call__(self, row: dict[str, Any]) -> int:
        g = row.get
        key = (g("engine"), g("model"), g("model_revision"), g("prompt_id"), g("prompt_sha256"), g("sampling"), g("run_id"))  # = SHARED_PROV
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.table)
            self.table.append({k: row.get(k) for k in SHARED_PROV})
        return i


def _prov(row: dict[str, Any], intern: _Interner) -> list[Any]:
    """The row's provenance in :data:`ROW_PROV` order; ``p`` indexes the shared table."""
    g = row.get
    return [intern(row), g("key"), g("seed"), g("finish_reason"), g("prompt_tokens"), g("completion_tokens"), g("created_at")]


def _edit_rank(row: dict[str, Any]) -> int:
    if row.get("error") is not None:
        return 0
    return 2 if row.get("passed") else 1


def _first(columns: Iterable[str], names: Iterable[str]) -> str | None:
    have = set(columns)
    return next((c for c in names if c in have), None)


def _optional_rows(folder: Path) -> tuple[list[dict[str, Any]], str | None]:
    """All rows of an optional stage folder and its id column (None: not keyed by image)."""
    paths = shard_paths(folder)
    if not paths:
        return [], None
    id_col = _first(pq.read_schema(paths[0]).names, ID_COLUMNS)
    return (list(_rows(folder)) if id_col else []), id_col


def collect(run: Path | str, limit: int | None = None) -> ReportData:
    """Read a run directory into cards (sorted by image id) and the summary counts.

    ``limit``: keep only the first N cards (by image id). Raises nothing for
    a run without edits or captions: such a run simply has fewer fields.
    """
    run = Path(run)
    intern = _Interner()
    cards: dict[str, dict[str, Any]] = {}
    by_key: dict[str, str] = {}  # caption/edit key -> image id (dedup rows may name captions by key)

    def card(image_id: str) -> dict[str, Any]:
        c = cards.get(image_id)
        if c is None:
            c = cards[image_id] = {"id": image_id, "status": "none"}
        return c

    # captions: newest good row per image, else newest error row
    cap_best: dict[str, tuple[bool, dict[str, Any]]] = {}
    for row in _rows(run / "captions"):
        iid = row.get("image_id")
        if iid is None:
            continue
        good = row.get("error") is None
        cur = cap_best.get(iid)
        if cur is None or good or not cur[0]:
            cap_best[iid] = (good, row)
        if row.get("key"):
            by_key[row["key"]] = iid
    for iid, (good, row) in cap_best.items():
        c = card(iid)
        c.update(uri=row.get("image_uri"), w=row.get("image_width"), h=row.get("image_height"))
        if good:
            c["cap"] = row.get("caption")
        else:
            c["cerr"] = row.get("error")
        c["cp"] = _prov(row, intern)

    # edits: newest row of the best rank per image
    edit_best: dict[str, dict[str, Any]] = {}
    edit_count: Counter[str] = Counter()
    for i, row in enumerate(_rows(run / "edits")):
        iid = row.get("image_id") or f"edit/{i:06d}"
        edit_count[iid] += 1
        cur = edit_best.get(iid)
        if cur is None or _edit_rank(row) >= _edit_rank(cur):
            edit_best[iid] = row
        if row.get("key"):
            by_key[row["key"]] = iid
    for iid, row in edit_best.items():
        c = card(iid)
        if c.get("uri") is None and row.get("image_uri"):
            c["uri"] = row["image_uri"]
        src, tgt = row.get("source"), row.get("target")
        if src is not None and src != c.get("cap"):
            c["src"] = src
        c["tgt"] = tgt
        c["ss"] = span_range(src, row.get("source_span"))
        c["ts"] = span_range(tgt, row.get("target_span"))
        c["viol"] = list(row.get("violations") or [])
        c["att"] = row.get("attempts")
        if row.get("raw_output") is not None and row.get("raw_output") != tgt:
            c["raw"] = row["raw_output"]
        if row.get("error") is not None:
            c["eerr"] = row["error"]
            c["status"] = "error"
        else:
            c["status"] = "passed" if row.get("passed") else "failed"
        c["ep"] = _prov(row, intern)
        if edit_count[iid] > 1:
            c["more"] = edit_count[iid] - 1

    # judge: the newest verdict per image (a newer error row does not hide a verdict)
    judge_rows, jid = _optional_rows(run / JUDGE_DIR)
    verdict_col = _first(judge_rows[0].keys(), VERDICT_COLUMNS) if judge_rows else None
    for row in judge_rows:
        iid = row.get(jid)
        iid = iid if iid in cards else by_key.get(iid)
        if iid is None:
            continue
        if row.get("error") is not None and "judge" in cards[iid] and "error" not in cards[iid]["judge"]:
            continue
        shown = {k: _jsonable(v) for k, v in row.items() if k not in _HIDDEN and k != jid and v is not None}
        if verdict_col:
            shown["verdict"] = _jsonable(row.get(verdict_col))
        cards[iid]["judge"] = shown

    # dedup: every cluster an image (or its caption) belongs to
    dedup_rows, did = _optional_rows(run / DEDUP_DIR)
    cluster_col = _first(dedup_rows[0].keys(), CLUSTER_COLUMNS) if dedup_rows else None
    members: Counter[str] = Counter()
    dup_of: list[tuple[str, dict[str, Any]]] = []
    for row in dedup_rows:
        iid = row.get(did)
        iid = iid if iid in cards else by_key.get(iid)
        if iid is None or cluster_col is None or row.get(cluster_col) is None:
            continue
        cid = str(row[cluster_col])
        members[cid] += 1
        shown = {k: _jsonable(v) for k, v in row.items() if k not in _HIDDEN and k not in (did, cluster_col) and v is not None}
        dup_of.append((iid, dict(shown, cluster=cid)))
    for iid, d in dup_of:
        if members[d["cluster"]] > 1:  # a cluster of one is no duplicate
            cards[iid].setdefault("dup", []).append(dict(d, size=members[d["cluster"]]))

    ordered = [cards[k] for k in sorted(cards)]
    if limit is not None:
        ordered = ordered[:limit]
    return ReportData(ordered, intern.table, summarize(ordered, judge=bool(judge_rows), dedup=bool(dedup_rows)))


def summarize(cards: list[dict[str, Any]], judge: bool = False, dedup: bool = False) -> dict[str, Any]:
    """Counts for the top of the page: by status, by violated rule, by judge verdict, duplicates."""
    status = Counter(c["status"] for c in cards)
    rules = Counter(r for c in cards if c["status"] in ("passed", "failed") for r in c.get("viol") or ())
    out: dict[str, Any] = {
        "cards": len(cards),
        "status": {k: status.get(k, 0) for k in ("passed", "failed", "error", "none")},
        "checked": status.get("passed", 0) + status.get("failed", 0),
        "rules": dict(sorted(rules.items(), key=lambda kv: (-kv[1], kv[0]))),
        "captions": sum(1 for c in cards if c.get("cap") is not None),
        "caption_errors": sum(1 for c in cards if c.get("cerr") is not None),
    }
    if judge:
        out["verdicts"] = dict(Counter(str(c["judge"].get("verdict")) for c in cards if "judge" in c).most_common())
    if dedup:
        clusters = {d["cluster"] for c in cards for d in c.get("dup", ())}
        out["duplicates"] = {"clusters": len(clusters), "images": sum(1 for c in cards if c.get("dup"))}
    return out
