"""The two passes of ``softrepa evaluate-edit``: edit every pair under every setting, then score every image.

:func:`edit_all` loads SD3 (and the soft tokens) only when an edited image is
missing, writes each image under a temp name and renames it, and records a
per-(pair, setting) error instead of stopping; :func:`score_all` scores the
images one batch at a time and accumulates FID features per setting.
``cfg`` is a :class:`softrepa.evaluate.EvalConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from dataprep.errors import ConfigError, Reason, failure
from dataprep.runtime import progress_bar
from softrepa import metrics
from softrepa.edit import SD3FlowEditor, load_sd3
from softrepa.eval_pairs import Pair
from softrepa.images import open_image, save_image_atomic
from softrepa.metrics import PER_IMAGE, TAKES_PATHS, frechet_distance
from softrepa.token_files import NeedsContextEmbedder, read_official
from softrepa.tokens import load_tokens


def _batches(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def edit_all(cfg: Any, pairs: Sequence[Pair], out: Path) -> tuple[dict[tuple[str, str], str], int, int]:
    """Edit every pair under every setting; returns ({(pair, setting): error}, n_edited, n_reused).

    Writes ``images/source/<pair>.png`` (the source at the edit size) and
    ``images/<setting>/<pair>.png``; existing edited images are kept.
    """
    settings = cfg.settings()
    todo = [(p, s) for p in pairs for s in settings if not (out / "images" / s.setting_id / f"{p.pair_id}.png").exists()]
    missing_sources = [p for p in pairs if not (out / "images" / cfg.source_folder / f"{p.pair_id}.png").exists()]
    errors: dict[tuple[str, str], str] = {}
    n_reused = len(pairs) * len(settings) - len(todo)
    if not todo and not missing_sources:
        return errors, 0, n_reused

    import torch

    tokens = None
    project_later = False  # 4096-wide official tokens: projected once the model (its context_embedder) is loaded
    if cfg.tokens and any(s.method == "flowedit+tokens" for s in settings):
        try:
            # the official release ships torch pickles (dc_tokens.pth); ours is safetensors + JSON
            official = (Path(cfg.tokens) / "dc_tokens.pth").exists() and not (Path(cfg.tokens) / "tokens.json").exists()
            tokens = read_official(cfg.tokens, "sd3") if official else load_tokens(cfg.tokens)
        except NeedsContextEmbedder:
            project_later = True
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot load soft tokens from {cfg.tokens}: {exc}", flag="--tokens", fix="pass a folder written by softrepa train") from exc
    if tokens is not None and getattr(tokens.config, "backbone", "sd3") != "sd3":
        raise ConfigError(f"{cfg.tokens} holds {tokens.config.backbone} tokens; FlowEdit here runs on SD3", flag="--tokens", fix="pass tokens trained with softrepa train --preset sd3")
    pipe = load_sd3(cfg.model, device=cfg.device, dtype=cfg.dtype, revision=cfg.revision)
    if project_later:
        try:
            tokens = read_official(cfg.tokens, "sd3", pipe.transformer.context_embedder)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load soft tokens from {cfg.tokens}: {exc}", flag="--tokens", fix="pass tokens made for this --model") from exc
    editor = SD3FlowEditor(pipe, tokens)
    n_edited = 0
    by_pair: dict[str, list[Any]] = {}  # pair id -> settings still to edit
    for p, s in todo:
        by_pair.setdefault(p.pair_id, []).append(s)
    with progress_bar("evaluate-edit", None, cfg.progress) as bar:
        task = bar.add_task("FlowEdit", total=len(todo))
        for p in pairs:
            wanted = by_pair.get(p.pair_id, [])
            src_png = out / "images" / cfg.source_folder / f"{p.pair_id}.png"
            if not wanted and src_png.exists():
                continue
            if p.error is not None:
                for s in settings:
                    errors[(p.pair_id, s.setting_id)] = p.error
                bar.advance(task, len(wanted))
                continue
            try:
                image = open_image(p.image_path)
            except Exception as exc:  # noqa: BLE001 -- bad input is a per-row error (corrupt, missing, unreadable)
                for s in settings:
                    errors[(p.pair_id, s.setting_id)] = failure(Reason.IMAGE, f"{type(exc).__name__}: {exc}")
                bar.advance(task, len(wanted))
                continue
            w, h = editor.target_size(*image.size, cfg.size)
            if not src_png.exists():
                from PIL import Image

                save_image_atomic(image.resize((w, h), Image.BICUBIC), src_png)
            try:
                x_src = editor.encode_image(image, cfg.size)
            except (RuntimeError, ValueError) as exc:  # e.g. out of memory at size 0 on a huge image
                for s in wanted:
                    errors[(p.pair_id, s.setting_id)] = failure(Reason.ENCODE, f"{type(exc).__name__}: {exc}")
                bar.advance(task, len(wanted))
                continue
            for s in wanted:
                try:
                    z = editor.edit_latent(x_src, p.source, p.target, cfg.edit_config(s), use_tokens=s.method == "flowedit+tokens")
                    save_image_atomic(editor.decode(z)[0], out / "images" / s.setting_id / f"{p.pair_id}.png")
                    n_edited += 1
                except (RuntimeError, ValueError) as exc:  # e.g. out of memory on one huge image: record, go on
                    errors[(p.pair_id, s.setting_id)] = failure(Reason.EDIT, f"{type(exc).__name__}: {exc}")
                bar.advance(task)
    del editor, pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the metric models come next
    return errors, n_edited, n_reused


def score_all(cfg: Any, pairs: Sequence[Pair], out: Path, errors: dict[tuple[str, str], str]) -> tuple[list[dict[str, Any]], dict[str, float | None], dict[str, str]]:
    """Score every edited image; returns (per-image rows, FID per setting, unavailable metrics).

    Images are opened one batch at a time (an 800-pair DIV2K run at 1024 px
    would not fit in memory at once); FID features accumulate per batch.
    """
    import torch

    scorers = metrics.load_scorers(cfg.metrics)  # looked up on the module: tests stand a feature network in
    per_image = [m for m in PER_IMAGE if m in cfg.metrics.metrics and m in scorers.per_image]
    unavailable = dict(scorers.unavailable)
    rows: list[dict[str, Any]] = []
    fid: dict[str, float | None] = {}
    src_feats: list[torch.Tensor] = []
    fid_failed = False
    settings = cfg.settings()
    with progress_bar("evaluate-edit", None, cfg.progress) as bar:
        task = bar.add_task("scoring", total=len(pairs) * len(settings))
        for si, s in enumerate(settings):
            edit_feats: list[torch.Tensor] = []
            mine = []
            for p in pairs:
                row: dict[str, Any] = {"pair_id": p.pair_id, "image_id": p.image_id, "passed": p.passed, "setting": s.setting_id, "method": s.method,
                                       "n_max": s.n_max, "tgt_cfg": s.tgt_cfg, "source_prompt": p.source, "target_prompt": p.target,
                                       "source_image": str(out / "images" / cfg.source_folder / f"{p.pair_id}.png"),
                                       "edited_image": str(out / "images" / s.setting_id / f"{p.pair_id}.png"),
                                       "error": errors.get((p.pair_id, s.setting_id)), **{m: None for m in PER_IMAGE}}
                rows.append(row)
                mine.append(row)
            for batch in _batches(mine, cfg.metrics.batch_size):
                ready, eds, srcs = [], [], []
                for r in batch:
                    if r["error"] is not None:
                        continue
                    try:
                        eds.append(open_image(r["edited_image"]))
                        srcs.append(open_image(r["source_image"]))
                        ready.append(r)
                    except Exception as exc:  # noqa: BLE001 -- a missing/corrupt file is this row's error
                        del eds[len(ready):], srcs[len(ready):]
                        r["error"] = failure(Reason.IMAGE, f"{type(exc).__name__}: {exc}")
                for m in per_image if ready else []:
                    try:
                        prompts = [r["target_prompt"] for r in ready]
                        if m == "lpips":
                            vals = scorers.per_image[m](srcs, eds)
                        elif m in TAKES_PATHS:
                            vals = scorers.per_image[m]([r["edited_image"] for r in ready], prompts)
                        else:
                            vals = scorers.per_image[m](eds, prompts)
                    except (RuntimeError, ValueError) as exc:
                        for r in ready:
                            r["error"] = r["error"] or f"{m}: {type(exc).__name__}: {exc}"
                        continue
                    for r, v in zip(ready, vals):
                        r[m] = float(v)
                if scorers.fid is not None and ready:
                    try:
                        edit_feats.append(scorers.fid(eds))
                        if si == 0:  # the source set is the same for every setting
                            src_feats.append(scorers.fid(srcs))
                    except (RuntimeError, ValueError) as exc:  # FID over a partial set would mislead: drop it
                        unavailable.setdefault("fid", f"feature extraction failed: {type(exc).__name__}: {exc}")
                        fid_failed = True
                bar.advance(task, len(batch))
            if scorers.fid is not None and not fid_failed:
                try:
                    fid[s.setting_id] = frechet_distance(torch.cat(src_feats), torch.cat(edit_feats)) if edit_feats else None
                except (RuntimeError, ValueError) as exc:
                    fid[s.setting_id] = None
                    unavailable.setdefault("fid", f"not computed for {s.setting_id}: {exc}")
    return rows, fid, unavailable
