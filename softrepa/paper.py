"""The paper's editing settings and published numbers (appendix F, Tables 5 and 6).

Pure data plus one formatter: which (method, NMAX, target CFG) rows each
table has, the values the paper reports for them, and
:func:`side_by_side_markdown`, which prints our summary rows with the paper's
numbers beside them for reference. Nothing here runs a model.

Sources: the rows and numbers are the appendix tables; NMAX (``n_start``) 33
for FlowEdit and 30 with tokens, 50 steps and source CFG 3.5 are the official
README's editing examples (``edit_sd3.py``), which FlowEdit's own
``SD3_exp.yaml`` agrees with for vanilla FlowEdit.
"""

from __future__ import annotations

from typing import Any, Sequence

#: the paper's backbones (Table 3) by preset: the default model of evaluate-edit, the recipe and the flows' training
BACKBONE_MODELS = {
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
SD3_MODEL = BACKBONE_MODELS["sd3"]  # FlowEdit (evaluate-edit, the recipe) runs on SD3

#: summary-table column order (as in the paper)
COLUMNS = ("imagereward", "pickscore", "clip", "hpsv2", "fid", "lpips")
LABELS = {"imagereward": "ImageReward", "pickscore": "PickScore", "clip": "CLIP", "hpsv2": "HPS", "fid": "FID", "lpips": "LPIPS"}
LOWER_IS_BETTER = {"fid", "lpips"}

#: NMAX per method (official README: ``--n_start 33`` vanilla, ``--n_start 30`` with tokens)
N_MAX = {"flowedit": 33, "flowedit+tokens": 30}

#: target CFG rows per table and method
ROWS = {
    "table5": {"flowedit": (13.5, 16.5, 19.5), "flowedit+tokens": (9.0, 11.0, 13.0)},  # DIV2K
    "table6": {"flowedit": (13.5, 16.5, 19.5), "flowedit+tokens": (7.0, 9.0, 11.0, 13.0)},  # Cat2Dog
}
TABLE_TITLES = {"table5": "Table 5 (DIV2K)", "table6": "Table 6 (Cat2Dog)"}


#: the paper's means per table and method: one row per target CFG of ``ROWS``
#: (same order), columns ``COLUMNS``; the NMAX is ``N_MAX[method]``
NUMBERS: dict[str, dict[str, tuple[tuple[float, ...], ...]]] = {
    "table5": {
        "flowedit": ((0.380, 21.749, 0.261, 0.255, 52.038, 0.154),
                     (0.466, 21.824, 0.263, 0.259, 55.371, 0.180),
                     (0.510, 21.869, 0.265, 0.261, 58.069, 0.200)),
        "flowedit+tokens": ((0.466, 21.884, 0.263, 0.260, 52.633, 0.149),
                            (0.564, 21.985, 0.268, 0.265, 56.900, 0.178),
                            (0.627, 22.050, 0.272, 0.270, 59.710, 0.201)),
    },
    "table6": {
        "flowedit": ((0.937, 20.726, 0.225, 0.266, 197.1, 0.199),
                     (0.908, 20.641, 0.229, 0.272, 201.05, 0.217),
                     (0.882, 20.572, 0.232, 0.276, 202.92, 0.234)),
        "flowedit+tokens": ((1.111, 21.143, 0.226, 0.269, 198.71, 0.173),
                            (1.144, 21.221, 0.234, 0.283, 208.18, 0.204),
                            (1.144, 21.224, 0.239, 0.290, 214.72, 0.230),
                            (1.135, 21.200, 0.241, 0.293, 219.35, 0.252)),
    },
}


def paper_value(table: str, method: str, tgt_cfg: float) -> tuple[int, dict[str, float]] | None:
    """(the paper's NMAX, its numbers) for one method and target CFG, or None when the table has no such row."""
    cfgs = ROWS.get(table, {}).get(method, ())
    if float(tgt_cfg) not in cfgs:
        return None
    return N_MAX[method], dict(zip(COLUMNS, NUMBERS[table][method][cfgs.index(float(tgt_cfg))]))


def side_by_side_markdown(rows: Sequence[dict[str, Any]], table: str = "table5") -> str:
    """Our summary rows (``softrepa.evaluate.summarize`` output, with ``method_id``)
    each followed by the paper's row for the same method and target CFG, if it has one.

    The paper's numbers are for reference only: they come from the full DIV2K
    set on SD3-medium at 1024 px; a run on other data, models, sizes or NMAX
    is not comparable.
    """
    head = ["Model", "NMAX", "target CFG", "source"] + [LABELS[c] + ("↓" if c in LOWER_IS_BETTER else "↑") for c in COLUMNS]
    lines = [f"{TABLE_TITLES.get(table, table)}: ours, with the paper's numbers below each row for reference", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["n_max"]), f"{r['tgt_cfg']:g}", f"ours ({r['pairs']} pairs)"]
        cells += ["n/a" if r.get(c) is None else f"{r[c]:.3f}" for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
        ref = paper_value(table, r.get("method_id", ""), r["tgt_cfg"])
        if ref is not None:
            n_max, values = ref
            lines.append("| " + " | ".join(["", str(n_max), f"{r['tgt_cfg']:g}", "paper"] + [f"{values[c]:.3f}" for c in COLUMNS]) + " |")
    return "\n".join(lines) + "\n"
