"""How varied the replacements of a dataset are: source concept -> target concept.

Rule 3 of ``prompts/edit.txt`` (paper, appendix C) asks the rewriter to
"ensure diversity in word choices across different modifications". No single
pair can break it: a rewriter that turns half of all dogs into cats passes
every per-pair rule and teaches the soft tokens one contrast. This module
measures it over many pairs, from the rule checker's spans (``source_span`` ->
``target_span`` of passing rows, see :mod:`dataprep.rules`).

Pure: stdlib only (pyarrow is imported by :func:`from_edits` alone). Used by
``dataprep check``, ``dataprep stats``, the rewrite stage's steering
(``--max-target-share``), the Prefect artifacts and the dataset card.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dataprep.rules import check, lemma
from dataprep.store import shard_paths

_WORD = re.compile(r"\w+(?:['’\-]\w+)*")
_DETERMINERS = frozenset("a an the this that these those some its their his her".split())


def concept(span: str | None) -> str | None:
    """A span as a concept name: lower case, determiners dropped, each word's
    plural/possessive folded ("Dogs" -> "dog", "the fox's" -> "fox").
    None or a span without words gives None."""
    if not span:
        return None
    words = [lemma(w) for w in _WORD.findall(span)]
    while words and words[0] in _DETERMINERS:
        words = words[1:]
    return " ".join(words) or None


def entropy_bits(counts: Iterable[int]) -> float:
    """Shannon entropy (bits) of a distribution given by its counts; 0 when empty."""
    counts = [c for c in counts if c > 0]
    n = sum(counts)
    return max(0.0, -sum(c / n * math.log2(c / n) for c in counts)) if n else 0.0  # max: no "-0.0"


@dataclass
class Diversity:
    """Counts of (source concept, target concept) over the passing edits added.

    ``add`` takes the checker's spans; a row without both is not a replacement
    and is not counted. Shares are of ``n``, the replacements counted.
    """

    pairs: Counter = field(default_factory=Counter)  # (source, target) -> edits
    targets: Counter = field(default_factory=Counter)  # target -> edits

    @property
    def n(self) -> int:
        return sum(self.targets.values())

    def add(self, source_span: str | None, target_span: str | None) -> str | None:
        """Count one replacement; returns its target concept (None: not counted)."""
        s, t = concept(source_span), concept(target_span)
        if s is None or t is None:
            return None
        self.pairs[(s, t)] += 1
        self.targets[t] += 1
        return t

    def share(self, target: str | None) -> float:
        """The share of the counted edits whose target concept is ``target``."""
        n = self.n
        return self.targets.get(target, 0) / n if n and target is not None else 0.0

    def top_target(self) -> tuple[str | None, float]:
        """(most common target concept, its share); ties go to the name first in sort order."""
        if not self.targets:
            return None, 0.0
        t = min(self.targets, key=lambda k: (-self.targets[k], k))
        return t, self.targets[t] / self.n

    def top_pairs(self, k: int = 10) -> list[tuple[str, str, int, float]]:
        """The ``k`` most common (source, target, edits, share), most common first."""
        n = self.n
        ranked = sorted(self.pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [(s, t, c, c / n) for (s, t), c in ranked]

    def summary(self, k: int = 10) -> dict[str, Any]:
        """Plain-dict figures (JSON-safe): counts, top target share, entropies, top pairs.

        ``target_entropy_bits``: entropy of the target concepts; 2 to that
        power is the effective number of targets (as many equally used ones
        would give the same entropy).
        """
        top, share = self.top_target()
        h_t = entropy_bits(self.targets.values())
        return {
            "replacements": self.n,
            "distinct_pairs": len(self.pairs),
            "distinct_targets": len(self.targets),
            "top_target": top,
            "top_target_share": round(share, 4),
            "target_entropy_bits": round(h_t, 4),
            "effective_targets": round(2**h_t, 2) if self.n else 0.0,
            "pair_entropy_bits": round(entropy_bits(self.pairs.values()), 4),
            "top_pairs": [{"source": s, "target": t, "edits": c, "share": round(f, 4)} for s, t, c, f in self.top_pairs(k)],
        }


def from_rows(rows: Iterable[dict[str, Any]]) -> Diversity:
    """Count the passing rows (``passed`` true, no ``error``) of checker output or an edits store."""
    d = Diversity()
    for r in rows:
        if r.get("passed") is True and r.get("error") is None:
            d.add(r.get("source_span"), r.get("target_span"))
    return d


def from_edits(folder: Path | str, skip_keys: set[str] | frozenset[str] = frozenset()) -> Diversity:
    """Count the passing rows of an edits store folder (``OUT/edits``), shard by
    shard, leaving out rows whose ``key`` is in ``skip_keys``. A passing row
    without spans (written by other tools) is re-checked for them."""
    import pyarrow.parquet as pq

    d = Diversity()
    for path in shard_paths(folder):
        t = pq.read_table(path, columns=["key", "passed", "error", "source_span", "target_span", "source", "target"]).to_pydict()
        for key, ok, err, s, tg, src, tgt in zip(t["key"], t["passed"], t["error"], t["source_span"], t["target_span"], t["source"], t["target"]):
            if ok is True and err is None and key not in skip_keys:
                if s is None and tg is None and src and tgt:
                    v = check(src, tgt)
                    s, tg = v.source_span, v.target_span
                d.add(s, tg)
    return d


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """``summary()`` as (metric, value) rows then one row per top pair: for tables and artifacts."""
    rows: list[dict[str, Any]] = [
        {"what": "replacements counted", "value": summary["replacements"]},
        {"what": "distinct pairs / targets", "value": f"{summary['distinct_pairs']} / {summary['distinct_targets']}"},
        {"what": "most common target (share)", "value": f"{summary['top_target']} ({summary['top_target_share']:.1%})" if summary["top_target"] else "-"},
        {"what": "target entropy (bits; effective targets)", "value": f"{summary['target_entropy_bits']:.2f} ({summary['effective_targets']:.1f})"},
        {"what": "pair entropy (bits)", "value": f"{summary['pair_entropy_bits']:.2f}"},
    ]
    rows += [{"what": f"pair {p['source']} -> {p['target']}", "value": f"{p['edits']} ({p['share']:.1%})"} for p in summary["top_pairs"]]
    return rows


def render(summary: dict[str, Any], title: str = "diversity: replacements (source -> target concept)") -> Any:
    """A rich Table of :func:`table_rows`."""
    from rich.table import Table

    t = Table(title=title, header_style="bold")
    t.add_column("what")
    t.add_column("value", justify="right")
    for r in table_rows(summary):
        t.add_row(r["what"], str(r["value"]))
    return t
