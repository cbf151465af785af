"""What every run shows in the Prefect UI: counts, pass rate by rule,
throughput, links to the shard folders, and a progress bar while a stage runs.

Table rows are built by pure functions (tested without a server); the
``publish_*`` helpers only hand them to Prefect. Artifact keys name the
dataset and stage, so the UI keeps one versioned history per stage.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import pyarrow.parquet as pq

from dataprep.runtime import StageSummary
from dataprep.store import read_manifest, shard_paths
from dataprep import diversity
from dataprep.judge import agreement


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-")


def merge_summaries(stage: str, out_dir: Path, parts: Iterable[tuple[StageSummary, int, bool]]) -> StageSummary:
    """One summary for a stage run from its shard calls.

    ``parts`` holds (summary, shard size, cached): a shard Prefect answered from
    its cache did no work in this run, so all its rows count as skipped.
    """
    total = StageSummary(stage=stage, out_dir=out_dir, run_id="")
    run_ids, wall = [], 0.0
    for s, n, cached in parts:
        if cached:
            total.skipped += n
            total.extra["cached shards"] = total.extra.get("cached shards", 0) + 1
            continue
        total.done += s.done
        total.skipped += s.skipped
        total.failed.update(s.failed)
        total.truncated += s.truncated
        total.shards.extend(s.shards)
        for k, v in s.extra.items():  # counts add up across shards; rates and texts do not
            if isinstance(v, int) and not isinstance(v, bool):
                total.extra[k] = total.extra.get(k, 0) + v
        wall += s.wall_s
        run_ids.append(s.run_id)
    total.run_id = ",".join(run_ids)
    total.wall_s = wall  # time inside the stage calls (model time), not flow overhead
    return total


def counts_rows(summary: StageSummary) -> list[dict[str, Any]]:
    """done / skipped / failed-by-reason / throughput as (metric, value) rows."""
    rows = [
        {"metric": "done (this run)", "value": summary.done},
        {"metric": "skipped (already done)", "value": summary.skipped},
        {"metric": "failed", "value": summary.n_failed},
    ]
    rows += [{"metric": f"failed: {reason}", "value": n} for reason, n in sorted(summary.failed.items(), key=lambda kv: (-kv[1], kv[0]))]
    if summary.truncated:
        rows.append({"metric": "hit max_new_tokens", "value": summary.truncated})
    for k, v in summary.extra.items():
        if isinstance(v, (int, float, str)):
            rows.append({"metric": k, "value": round(v, 4) if isinstance(v, float) else v})
    rows.append({"metric": "wall time in stage (s)", "value": round(summary.wall_s, 2)})
    rows.append({"metric": f"throughput ({summary.unit}/s)", "value": round(summary.rate, 3)})
    return rows


def rule_rows(edits_dir: Path | str) -> list[dict[str, Any]]:
    """The checker's pass rate overall and per rule, over every good edit row.

    A rule's pass rate is the share of rewrites that do not violate it.
    """
    n = passed = 0
    violated: Counter[str] = Counter()
    for path in shard_paths(edits_dir):
        t = pq.read_table(path, columns=["passed", "violations", "error"])
        for ok, rules, err in zip(t.column("passed").to_pylist(), t.column("violations").to_pylist(), t.column("error").to_pylist()):
            if err is not None:
                continue
            n += 1
            passed += bool(ok)
            violated.update(set(rules or ()))
    if n == 0:
        return []
    rows = [{"rule": "all rules (passed)", "rows": n, "violations": n - passed, "pass_rate": round(passed / n, 4)}]
    rows += [{"rule": r, "rows": n, "violations": v, "pass_rate": round(1 - v / n, 4)} for r, v in sorted(violated.items(), key=lambda kv: (-kv[1], kv[0]))]
    return rows


def diversity_rows(edits_dir: Path | str) -> list[dict[str, Any]]:
    """The replacement diversity of the passing edits (dataprep.diversity) as (what, value) rows."""
    summary = diversity.from_edits(edits_dir).summary()
    return diversity.table_rows(summary) if summary["replacements"] else []


def judge_agreement_rows(judge_dir: Path | str) -> list[dict[str, Any]]:
    """Checker x judge as table rows.

    One row per checker verdict (judge good / bad counts, ``share`` judged
    good), then ``agreement``: checker-passed judged good, checker-failed
    judged bad, and their ``share`` of every judged pair.
    """
    a = agreement(judge_dir)
    if a is None:
        return []
    rows = []
    for checker in ("passed", "failed"):
        good, bad = a["table"][checker]["good"], a["table"][checker]["bad"]
        if good + bad:
            rows.append({"checker": checker, "judge_good": good, "judge_bad": bad, "share": round(good / (good + bad), 4)})
    rows.append({"checker": "agreement", "judge_good": a["table"]["passed"]["good"], "judge_bad": a["table"]["failed"]["bad"], "share": None if a["agreement"] is None else round(a["agreement"], 4)})
    return rows


def dedup_rows(dedup_dir: Path | str) -> list[dict[str, Any]]:
    """The last dedup run's counts as (metric, value) rows."""
    m = read_manifest(dedup_dir)
    if m is None:
        return []
    return [{"metric": k, "value": v} for k, v in m.get("counts", {}).items()] + [{"metric": f"image error: {k}", "value": v} for k, v in m.get("failures", {}).items()]


def publish_quality(dataset: str, run_dir: Path | str) -> None:
    """Replacement diversity of RUN/edits, judge agreement and dedup counts when those stages ran."""
    run = Path(run_dir)
    publish_table(f"{dataset}-rewrite-diversity", diversity_rows(run / "edits"), "replacements (source -> target concept): top pairs, top target share, entropy")
    publish_table(f"{dataset}-judge-agreement", judge_agreement_rows(run / "judge"), "rule checker x LLM judge: judge verdicts per checker verdict, and the share where they agree")
    publish_table(f"{dataset}-dedup-counts", dedup_rows(run / "dedup"), "duplicate clusters: exact/near images, near-duplicate captions, what --dedup keep-one removes")


def links_markdown(title: str, folders: dict[str, Path | str], extra: Iterable[str] = ()) -> str:
    """Markdown with file:// links to output folders and their shard counts."""
    lines = [f"## {title}", ""]
    for name, folder in folders.items():
        p = Path(folder).resolve()
        lines.append(f"- **{name}**: [{p}]({p.as_uri()}) ({len(shard_paths(p))} shards)")
    lines += list(extra)
    return "\n".join(lines) + "\n"


def views_markdown(run: Path | str | None, extra: dict[str, Path | str] | None = None) -> str | None:
    """Markdown with file:// links to what a person looks at: the HTML report, editing grids, training curves.

    ``run``'s views are found by :func:`dataprep.report.views.find_views`;
    ``extra`` (label -> file) adds files this flow just wrote. Files that do
    not exist are left out; None when nothing is left.
    """
    from dataprep.report.views import find_views

    items: dict[str, str] = {}
    for label, path in (extra or {}).items():
        if Path(path).exists():
            items[str(Path(path).resolve())] = label
    if run is not None and Path(run).is_dir():
        for kind, found in find_views(run).items():
            for v in found:
                if v["exists"]:
                    items.setdefault(v["path"], kind)
    if not items:
        return None
    lines = ["## views", ""] + [f"- **{label}**: [{p}]({Path(p).as_uri()})" for p, label in items.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ publishing (needs a Prefect run context)


def publish_counts(dataset: str, summary: StageSummary) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(counts_rows(summary), key=artifact_key(dataset, summary.stage, "counts"), description=f"{summary.stage}: rows done, skipped and failed by reason; throughput")


def publish_rules(dataset: str, edits_dir: Path | str) -> None:
    from prefect.artifacts import create_table_artifact

    rows = rule_rows(edits_dir)
    if rows:
        create_table_artifact(rows, key=artifact_key(dataset, "rewrite", "rules"), description="single-concept checker: pass rate overall and per rule")


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    if rows:
        create_table_artifact(rows, key=artifact_key(key), description=description)


def publish_markdown(key: str, markdown: str, description: str = "") -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown, key=artifact_key(key), description=description)


class Progress:
    """A progress artifact (0-100 %) updated as shard calls finish."""

    def __init__(self, dataset: str, stage: str, total: int):
        from prefect.artifacts import create_progress_artifact

        self.total = max(total, 1)
        self.done = 0
        self.stage = stage
        self.id = create_progress_artifact(0.0, key=artifact_key(dataset, stage, "progress"), description=f"{stage}: shards finished")

    def advance(self, n: int = 1) -> None:
        from prefect.artifacts import update_progress_artifact

        self.done += n
        update_progress_artifact(self.id, 100.0 * self.done / self.total, description=f"{self.stage}: {self.done}/{self.total} shards")


def publish_views(key: str, run: Path | str | None, extra: dict[str, Path | str] | None = None) -> None:
    """A markdown artifact linking the report, grids and curves (nothing when there are none)."""
    md = views_markdown(run, extra)
    if md:
        publish_markdown(key, md, "report, editing grids and training curves: open them from disk")
