"""The ``vllm`` engine: in-process ``vllm.LLM`` for one big GPU box.

Both stages: LLaVA gets its image through vLLM's multimodal inputs
(``{"prompt": ..., "multi_modal_data": {"image": pil}}``, the prompt rendered
with the model's own chat template so vLLM expands ``<image>``); text models
get the rendered chat prompt. Prefix caching is on, so the rules prompt that
starts every rewrite request is computed once and shared in the paged KV
cache. Every request of a ``generate`` call is submitted at once (vLLM
schedules them continuously), each with its own ``SamplingParams`` (seed
included). ``close()`` shuts the engine down and frees GPU memory, so one
process can caption, then rewrite, on one GPU.

Request building (prompt text, inputs dict, sampling kwargs, result parsing,
LLM kwargs) is pure and tested without vllm; only :class:`VLLMEngine` imports it.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any, Callable

from dataprep.engines import ChatRequest, ChatResult, EngineConfig, Sampling
from dataprep.errors import ConfigError, Reason, failure
from dataprep.engines.hf import chat_messages, load_config

log = logging.getLogger(__name__)

INSTALL_FIX = 'pip install "softrepa-dataprep[vllm]" on a Linux machine with an NVIDIA GPU, or use --engine transformers'
# Llama-3.1 declares 131k positions; a KV cache that long does not fit beside
# 8B weights on one GPU and our prompts are ~1k tokens, so cap what vLLM reserves.
MAX_MODEL_LEN = 8192
DEFAULT_BATCH = 256  # requests per generate() call: one shard's worth


# ------------------------------------------------------------ pure request building


def render_prompt(apply_chat_template: Callable[..., str], req: ChatRequest, is_vision: bool, drop_prefix: str | None = None) -> str:
    """Prompt text through the model's chat template (``<image>`` placeholder for vision models).

    ``drop_prefix`` (see :func:`template_bos`) is cut from the start of the text.
    """
    text = apply_chat_template(chat_messages(req, is_vision), add_generation_prompt=True, tokenize=False)
    if drop_prefix and text.startswith(drop_prefix):
        text = text[len(drop_prefix):]
    return text


def template_bos(tokenizer: Any) -> str | None:
    """The BOS text to cut from rendered prompts, or None.

    ``LLM.generate`` tokenizes a text prompt with ``add_special_tokens=True``;
    Llama-3.1's chat template already writes ``<|begin_of_text|>``, so the model
    would see two BOS tokens (vllm-project/vllm#9519) and rewrite differently
    from the transformers engine, which shares its content keys. When the
    tokenizer adds BOS itself, the template's copy is dropped: exactly one remains.
    """
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return None
    return bos if tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos_id] else None


def vllm_input(prompt: str, image=None) -> dict[str, Any]:
    """One vLLM prompt dict; the PIL image goes in ``multi_modal_data``."""
    item: dict[str, Any] = {"prompt": prompt}
    if image is not None:
        item["multi_modal_data"] = {"image": image.convert("RGB") if image.mode != "RGB" else image}
    return item


def sampling_kwargs(s: Sampling, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``SamplingParams(**kwargs)`` for one request; greedy is temperature 0."""
    kw: dict[str, Any] = {"max_tokens": s.max_new_tokens, "temperature": 0.0 if s.greedy else s.temperature, "top_p": 1.0 if s.greedy else s.top_p}
    if s.seed is not None:
        kw["seed"] = s.seed
    kw.update(extra or {})
    return kw


def guided_json_kwargs(schema: dict[str, Any] | None) -> dict[str, Any]:
    """``SamplingParams`` kwargs that constrain the output to the JSON ``schema``.

    vLLM renamed its guided decoding: ``structured_outputs=StructuredOutputsParams(json=...)``
    in current releases, ``guided_decoding=GuidedDecodingParams(json=...)`` before
    (docs.vllm.ai, features/structured_outputs). Empty for no schema.
    """
    if schema is None:
        return {}
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(json=schema)}
    return {"structured_outputs": StructuredOutputsParams(json=schema)}


def to_result(output: Any) -> ChatResult:
    """A ``vllm.RequestOutput`` (duck-typed) -> ChatResult with finish reason and token counts."""
    if not getattr(output, "outputs", None):
        return ChatResult.failed("generate_error: vllm returned no completion")
    c = output.outputs[0]
    reason = getattr(c, "finish_reason", None)
    if reason not in ("stop", "length"):
        return ChatResult.failed(failure(Reason.GENERATE_ERROR, f"vllm finished with {reason!r}"))
    return ChatResult(
        text=(c.text or "").strip(),
        finish_reason=reason,
        prompt_tokens=len(getattr(output, "prompt_token_ids", None) or []),
        completion_tokens=len(getattr(c, "token_ids", None) or []),
    )


def llm_kwargs(cfg: EngineConfig, is_vision: bool, max_positions: int | None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM``; raises ConfigError for settings vLLM cannot honour."""
    if cfg.quantize == "8bit":
        raise ConfigError("vllm has no in-flight 8-bit bitsandbytes loading", "--quantize", "use --quantize 4bit, or --engine transformers for 8bit")
    local = Path(cfg.model).expanduser()
    kw: dict[str, Any] = {
        "model": str(local) if local.exists() else cfg.model,
        "revision": cfg.revision,
        "dtype": cfg.dtype,  # auto | float32 | bfloat16 | float16: vLLM's own names
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enable_prefix_caching": True,
        "trust_remote_code": cfg.trust_remote_code,
        "seed": 0,
    }
    if cfg.quantize == "4bit":
        kw["quantization"] = "bitsandbytes"
    if max_positions and max_positions > MAX_MODEL_LEN:
        kw["max_model_len"] = MAX_MODEL_LEN
    if is_vision:
        kw["limit_mm_per_prompt"] = {"image": 1}
    return kw


def require_vllm(device: str) -> None:
    """ConfigError (with the install line) unless vllm imports and CUDA is there."""
    if device == "cpu" or device == "mps":
        raise ConfigError(f"the vllm engine runs on CUDA GPUs, not --device {device}", "--engine", "use --engine transformers on this device")
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"vllm is not installed ({exc})", "--engine vllm", INSTALL_FIX) from None
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("vllm needs a CUDA GPU and none is visible", "--engine vllm", "run on a GPU machine (check nvidia-smi and CUDA_VISIBLE_DEVICES), or use --engine transformers")


# ------------------------------------------------------------ engine


class VLLMEngine:
    name = "vllm"

    def __init__(self, cfg: EngineConfig, **llm_overrides: Any):
        """``llm_overrides`` go to ``vllm.LLM`` last (benchmarks: ``load_format="dummy"`` for random weights)."""
        require_vllm(cfg.device)
        from vllm import LLM

        self.cfg = cfg
        self.model = cfg.model
        self.revision = cfg.revision
        config = load_config(cfg.model, cfg.revision, cfg.trust_remote_code)  # clear errors for a missing model
        self.is_vision = getattr(config, "vision_config", None) is not None
        tc = getattr(config, "text_config", config)
        kwargs = llm_kwargs(cfg, self.is_vision, getattr(tc, "max_position_embeddings", None)) | llm_overrides
        self.batch_size = int(cfg.batch_size) if cfg.batch_size != "auto" else DEFAULT_BATCH
        self.sampling_extra: dict[str, Any] = {}  # benchmarks: e.g. min_tokens/ignore_eos for a fixed length
        try:
            self.llm = LLM(**kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"vllm cannot load {cfg.model!r}: {exc}", "--model", "check the id/directory, --gpu-memory-utilization and --tensor-parallel-size") from None
        if self.is_vision:
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(kwargs["model"], revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
            self._template = self.processor.apply_chat_template
            self._drop_bos = template_bos(self.processor.tokenizer)
        else:
            self.processor = None
            self._template = self.llm.get_tokenizer().apply_chat_template
            self._drop_bos = template_bos(self.llm.get_tokenizer())

    def image_size(self) -> int | None:
        if self.processor is None:
            return None
        ip = self.processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        size = getattr(ip, "size", None) or {}
        return crop.get("height") or size.get("shortest_edge") or size.get("height")

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        from vllm import SamplingParams

        results: list[ChatResult | None] = [None] * len(requests)
        items, params, where = [], [], []
        for i, r in enumerate(requests):
            try:
                items.append(vllm_input(render_prompt(self._template, r, self.is_vision, self._drop_bos), r.image))
                params.append(SamplingParams(**sampling_kwargs(r.sampling, self.sampling_extra), **guided_json_kwargs(r.json_schema)))
                where.append(i)
            except Exception as exc:  # one request's template or sampling error fails that row only
                results[i] = ChatResult.failed(failure(Reason.TEMPLATE_ERROR, exc))
        for i, res in zip(where, self._run(items, params)):
            results[i] = res
        return [r if r is not None else ChatResult.failed(failure(Reason.INTERNAL, "no result")) for r in results]

    def _run(self, items: list[dict], params: list) -> list[ChatResult]:
        """All at once; if vLLM rejects the batch (e.g. one prompt too long), isolate the bad request."""
        if not items:
            return []
        try:
            return [to_result(o) for o in self.llm.generate(items, params, use_tqdm=False)]
        except Exception as exc:
            if len(items) == 1:
                return [ChatResult.failed(failure(Reason.GENERATE_ERROR, f"{type(exc).__name__}: {exc}"))]
            log.warning("vllm rejected a batch of %d (%s); retrying one by one", len(items), exc)
            return [r for it, p in zip(items, params) for r in self._run([it], [p])]

    def close(self) -> None:
        """Shut the engine (and its worker processes) down and free GPU memory."""
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            shutdown = getattr(llm, "shutdown", None)  # newer vLLM
            try:
                if callable(shutdown):
                    shutdown()
                else:
                    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
                    if core is not None and hasattr(core, "shutdown"):
                        core.shutdown()
            except Exception as exc:  # teardown must not lose a finished run
                log.warning("vllm shutdown: %s", exc)
            try:
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                destroy_distributed_environment()
            except Exception:
                pass
            del llm
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
