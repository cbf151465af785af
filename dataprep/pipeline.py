"""Caption then rewrite in one call, one engine choice.

``dataprep pipeline div2k`` is the two stages of the paper's data recipe
(appendix C: LLaVA-1.5 captions, Llama-3.1 rewrites) over one run directory:
``OUT/captions`` then ``OUT/edits``, the same stores and resume rules as
``dataprep caption`` and ``dataprep rewrite`` run one after the other.

Every flag is checked before any work: options of both stages, both engine
configurations, the rules file. A local engine (transformers, vllm) is closed
-- its GPU memory freed -- before the second model loads, so both stages fit
on one GPU. ``openai`` engines are cheap to build, so both are built up front
and a wrong ``--base-url`` or model name fails before the first image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from dataprep.caption import CaptionOptions, run_caption
from dataprep.engines import Engine, EngineConfig, load_engine
from dataprep.errors import ConfigError
from dataprep.executors import ExecutorConfig
from dataprep.promptfile import load_prompt
from dataprep.rewrite import RewriteOptions, inputs_from_captions, run_rewrite
from dataprep.runtime import StageSummary
from dataprep.sources import ImageRef


@dataclass
class PipelineSummary:
    caption: StageSummary
    rewrite: StageSummary

    @property
    def n_failed(self) -> int:
        return self.caption.n_failed + self.rewrite.n_failed


def stage_configs(engine_cfg: EngineConfig, caption_model: str, rewrite_model: str, rewrite_base_url: str | None = None) -> tuple[EngineConfig, EngineConfig]:
    """One engine choice, two models: the shared flags with each stage's model.

    ``rewrite_base_url`` sends the rewrites to another server (``vllm serve``
    serves one model per server); default: the caption server."""
    rew = replace(engine_cfg, model=rewrite_model)
    if rewrite_base_url:
        rew = replace(rew, base_url=rewrite_base_url)
    return replace(engine_cfg, model=caption_model), rew


def run_pipeline(
    refs: Iterable[ImageRef],
    out: Path | str,
    engine_cfg: EngineConfig,
    caption_model: str,
    rewrite_model: str,
    caption_opts: CaptionOptions | None = None,
    rewrite_opts: RewriteOptions | None = None,
    *,
    rewrite_base_url: str | None = None,
    executor: ExecutorConfig | None = None,
    progress: bool = True,
    console=None,
) -> PipelineSummary:
    """Caption ``refs`` into ``out/captions``, then rewrite every caption there into ``out/edits``.

    Raises ConfigError before any work for a bad flag of either stage.
    ``executor`` (an ExecutorConfig) runs both stages there; with Ray each
    stage's replicas load its model on the cluster, none loads here.
    """
    caption_opts = caption_opts or CaptionOptions()
    rewrite_opts = rewrite_opts or RewriteOptions()
    if rewrite_base_url and engine_cfg.engine != "openai":
        raise ConfigError("--rewrite-base-url is for the openai engine", "--rewrite-base-url", "drop it, or use --engine openai")
    cap_cfg, rew_cfg = stage_configs(engine_cfg, caption_model, rewrite_model, rewrite_base_url)
    cap_cfg.require_model()
    rew_cfg.require_model()
    load_prompt(caption_opts.prompt_file)
    load_prompt(rewrite_opts.rules_file, flag="--rules")
    refs = list(refs)
    if executor is not None and executor.is_ray:
        cap = run_caption(refs, out, cap_cfg, caption_opts, executor=executor, progress=progress, console=console)
        texts = inputs_from_captions(Path(out) / "captions")
        rew = run_rewrite(texts, out, rew_cfg, rewrite_opts, executor=executor, progress=progress, console=console)
        return PipelineSummary(caption=cap, rewrite=rew)

    rew_engine: Engine | None = load_engine(rew_cfg) if engine_cfg.engine == "openai" else None
    try:
        cap_engine = load_engine(cap_cfg)
        try:
            cap = run_caption(refs, out, cap_cfg, caption_opts, engine=cap_engine, progress=progress, console=console)
        finally:
            cap_engine.close()  # frees the GPU before the rewrite model loads
        texts = inputs_from_captions(Path(out) / "captions")
        if rew_engine is None:
            rew_engine = load_engine(rew_cfg)
        rew = run_rewrite(texts, out, rew_cfg, rewrite_opts, engine=rew_engine, progress=progress, console=console)
    finally:
        if rew_engine is not None:
            rew_engine.close()
    return PipelineSummary(caption=cap, rewrite=rew)
