"""The dataset card (README.md) of ``dataprep export hf``, and the hub push.

The card follows the Hugging Face dataset card layout: YAML metadata first
(``license``, ``task_categories``, ``size_categories``, ``tags``,
``pretty_name``), then what a user needs to trust the pairs: how they were
generated (models, revisions, prompt hashes, sampling, from the stage
manifests), the counts, the rule checker's pass rate per rule, the judge's
pass rate when ``RUN/judge`` exists, and the diversity of the replacements
(:mod:`dataprep.diversity`).

:func:`card_markdown` is pure over the figures :func:`card_facts` reads from a
run directory. :func:`push` uses huggingface_hub's ``HfApi`` (create the repo,
upload one folder in one commit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dataprep import stats
from dataprep.diversity import table_rows
from dataprep.rules import RULES
from dataprep.store import shard_paths

TASK_CATEGORIES = ("text-to-image", "image-to-image", "image-to-text")
TAGS = ("softrepa", "image-editing", "contrastive-learning", "synthetic-captions", "single-concept-edits")

# Hugging Face size_categories buckets (the hub's own labels).
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"))


def size_category(n: int) -> str:
    """The hub's size_categories label for ``n`` rows."""
    for limit, label in _SIZES:
        if n < limit:
            return label
    return "n>100M"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_rows(folder: Path | str) -> dict[str, Any] | None:
    """A generic summary of any stage folder (e.g. ``RUN/judge``, ``RUN/dedup``):
    rows, error rows, and for each boolean column the share that is true, for
    each short string column (<= 20 distinct values) its value counts. None when
    the folder has no shards. Read generically: the stage's own schema is not
    known here."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = shard_paths(folder)
    if not paths:
        return None
    tables = [pq.read_table(p) for p in paths]
    t = pa.concat_tables(tables, promote_options="default")
    out: dict[str, Any] = {"rows": t.num_rows, "errors": 0, "true_share": {}, "values": {}}
    if "error" in t.column_names:
        out["errors"] = t.num_rows - t["error"].null_count
        t = t.filter(pc.is_null(t["error"]))
    out["good_rows"] = t.num_rows
    skip = {"key", "error", "run_id", "created_at", "engine", "model", "model_revision", "prompt_id", "prompt_sha256", "sampling", "finish_reason", "image_id", "image_uri", "source", "target", "raw_output"}
    for name in t.column_names:
        col = t[name]
        if name in skip or not t.num_rows:
            continue
        if pa.types.is_boolean(col.type):
            valid = len(col) - col.null_count
            out["true_share"][name] = round((pc.sum(col).as_py() or 0) / valid, 4) if valid else None
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            counts = pc.value_counts(col.drop_null()).to_pylist()
            if 0 < len(counts) <= 20:
                out["values"][name] = {d["values"]: d["counts"] for d in sorted(counts, key=lambda d: -d["counts"])}
        elif pa.types.is_integer(col.type) and name.endswith(("cluster", "cluster_id")):
            out.setdefault("distinct", {})[name] = len(pc.unique(col.drop_null()))
    return out


def card_facts(run_dir: Path | str, pairs: int, columns: list[str]) -> dict[str, Any]:
    """Everything the card states, read from ``run_dir`` (JSON-safe)."""
    run = Path(run_dir)
    s = stats.collect(run)
    facts: dict[str, Any] = {"pairs": pairs, "columns": columns, "captions": s["captions"], "edits": s["edits"], "diversity": s.get("diversity")}
    for stage in ("captions", "edits"):
        m = _read_json(run / stage / "_manifest.json") or {}
        cfg = m.get("config", {})
        eng = cfg.get("engine", {})
        facts[f"{stage}_generation"] = {
            "model": eng.get("model"),
            "revision": eng.get("revision"),
            "engine": eng.get("engine"),
            "dtype": eng.get("resolved_dtype") or eng.get("dtype"),
            "prompt_id": cfg.get("prompt_id"),
            "prompt_sha256": cfg.get("prompt_sha256"),
            "options": cfg.get("options"),
            "versions": m.get("versions"),
        } if m else None
    facts["judge"] = stage_rows(run / "judge")
    facts["dedup"] = stage_rows(run / "dedup")
    return facts


def _yaml_str(v: str) -> str:
    return json.dumps(v)  # a JSON string is a valid YAML scalar


def card_markdown(facts: dict[str, Any], license: str = "other", pretty_name: str = "SoftREPA single-concept edit pairs") -> str:
    """The README.md text: YAML metadata block, then the sections described in the module doc."""
    n = facts["pairs"]
    lines = ["---", f"license: {license}", f"pretty_name: {_yaml_str(pretty_name)}", "task_categories:"]
    lines += [f"- {c}" for c in TASK_CATEGORIES]
    lines += ["size_categories:", f"- {size_category(n)}", "language:", "- en", "tags:"]
    lines += [f"- {t}" for t in TAGS]
    lines += ["---", "", f"# {pretty_name}", ""]
    lines += [
        "Image / caption / single-concept edit triples for SoftREPA (soft text tokens trained with a "
        "contrastive score-matching loss) and text-guided editing. Captions come from a vision-language "
        "model, edits from an instruction model rewriting each caption so that exactly one concept "
        "changes (SoftREPA paper, appendix C); a rule checker verifies every edit.",
        "",
        f"**Rows: {n}.** License: `{license}`; the images keep the license of their source dataset "
        "(DIV2K, for instance, is for academic research only): check it before redistributing.",
        "",
        "## Generation",
        "",
        "| stage | model | revision | engine | dtype | prompt | prompt sha256 | sampling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage in ("captions", "edits"):
        g = facts.get(f"{stage}_generation")
        if not g:
            lines.append(f"| {stage} | (no manifest) | | | | | | |")
            continue
        o = g.get("options") or {}
        sampling = {k: o[k] for k in ("temperature", "top_p", "max_new_tokens", "seed", "max_attempts", "retry_temperature", "max_target_share") if k in o and o[k] is not None}
        lines.append(f"| {stage} | {g['model']} | {g['revision'] or '-'} | {g['engine'] or '-'} | {g['dtype'] or '-'} | {g['prompt_id'] or '-'} | `{(g['prompt_sha256'] or '-')[:16]}` | `{json.dumps(sampling, sort_keys=True)}` |")
    cap, ed = facts.get("captions"), facts.get("edits")
    lines += ["", "## Counts", "", "| what | value |", "|---|---|", f"| pairs in this dataset | {n} |"]
    if cap:
        lines += [f"| images captioned | {cap['images_captioned']} of {cap['images']} |", f"| caption rows failed | {cap['failed']} |"]
        if cap.get("image_flags"):
            lines.append(f"| caption rows with image flags | {', '.join(f'{k} {v}' for k, v in cap['image_flags'].items())} |")
    if ed:
        lines += [f"| edit rows checked | {ed['checked']} |", f"| edit rows with an engine error | {ed['errors']} |", f"| images with a passing edit | {ed['images_with_passing_edit']} |"]
    lines += ["", "## Rule checker", ""]
    if ed and ed["checked"]:
        lines += [f"Passed: {ed['passed']} of {ed['checked']} ({ed['pass_rate']:.1%}). Rows violating each rule (a row may break several):", "", "| rule | rows | pass rate |", "|---|---|---|"]
        for rule in RULES:
            k = ed["violations"].get(rule, 0)
            lines.append(f"| {rule} | {k} | {1 - k / ed['checked']:.1%} |")
    else:
        lines.append("No checked edits.")
    judge = facts.get("judge")
    if judge:
        lines += ["", "## Judge", "", f"Judge rows: {judge['rows']} ({judge['errors']} with an error)."]
        for name, share in judge["true_share"].items():
            lines.append(f"- `{name}` true: {'-' if share is None else f'{share:.1%}'}")
        for name, counts in judge["values"].items():
            lines.append(f"- `{name}`: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    dedup = facts.get("dedup")
    if dedup:
        lines += ["", "## Deduplication", "", f"Dedup rows: {dedup['rows']}."]
        for name, counts in dedup["values"].items():
            lines.append(f"- `{name}`: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for name, k in dedup.get("distinct", {}).items():
            lines.append(f"- distinct `{name}`: {k}")
    div = facts.get("diversity")
    lines += ["", "## Diversity of the replacements", ""]
    if div and div["replacements"]:
        lines += ["Source concept -> target concept of the passing edits (the checker's spans).", "", "| what | value |", "|---|---|"]
        lines += [f"| {r['what']} | {r['value']} |" for r in table_rows(div)]
    else:
        lines.append("No passing replacements counted.")
    lines += ["", "## Columns", "", ", ".join(f"`{c}`" for c in facts["columns"]), ""]
    lines += [
        "Provenance: `key` is the row's content hash (stage, input, model + revision, prompt sha256, "
        "sampling, seed); `attempts` counts generations; `source_span`/`target_span` are the replaced "
        "phrase and its replacement; `passed`/`violations` the checker's verdict; `run_id` the run that wrote the row.",
        "",
    ]
    return "\n".join(lines)


def push(folder: Path | str, repo_id: str, private: bool = False) -> str:
    """Upload ``folder`` (Parquet data + README.md) as the dataset repo ``repo_id``; returns its URL.

    Raises whatever huggingface_hub raises (no network, no token, no rights);
    the caller reports it.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder), commit_message="dataprep export hf")
    return str(url)


def one_line(exc: BaseException) -> str:
    """An exception as one readable line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg[:300]}" if msg else type(exc).__name__
