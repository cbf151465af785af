"""One engine interface for every backend.

A list of :class:`ChatRequest` goes in, a list of :class:`ChatResult` of the
same length and order comes out. A request that fails comes back as a result
with ``error`` set; an engine raises only for problems that would make every
request fail (bad configuration, model not found), and raises them from its
constructor, before any input is read.

Backends (imported lazily, so ``dataprep --help`` stays fast):

- ``transformers``: embedded, the default (:mod:`dataprep.engines.hf`)
- ``vllm``: in-process ``vllm.LLM`` (:mod:`dataprep.engines.vllm_engine`)
- ``openai``: any OpenAI-compatible server (:mod:`dataprep.engines.openai_engine`)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from dataprep.engines.redact import redact
from dataprep.errors import ConfigError
from dataprep.runtime import at_least, check_device, check_dtype, option

if TYPE_CHECKING:  # PIL is only needed for type hints here
    from PIL.Image import Image

ENGINES = ("transformers", "vllm", "openai")


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_dict(self) -> dict[str, Any]:
        """The part that changes outputs (and so the content key); seed is stored apart."""
        d = asdict(self)
        d.pop("seed")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class ChatRequest:
    """OpenAI-style messages; the image (if any) belongs to the last user turn.

    ``messages`` content is plain text; engines add the image placeholder in
    the form their model expects.
    """

    messages: list[dict[str, str]]
    image: "Image | None" = None
    sampling: Sampling = field(default_factory=Sampling)
    request_id: str = ""
    # A JSON schema the answer must follow. Engines that can constrain decoding
    # (vllm structured outputs, OpenAI ``response_format``) do; the others
    # ignore it and the caller parses and retries.
    json_schema: dict[str, Any] | None = None


@dataclass
class ChatResult:
    text: str = ""
    finish_reason: str = "stop"  # stop | length | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @classmethod
    def failed(cls, reason: str) -> "ChatResult":
        return cls(text="", finish_reason="error", error=reason)


class Engine(Protocol):
    name: str
    model: str
    revision: str | None

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]: ...

    def image_size(self) -> int | None:
        """Side of the square image the model consumes (None: send as is)."""
        ...

    def close(self) -> None: ...


@dataclass
class EngineConfig:
    """Flags shared by every stage that talks to a model (one field per flag). Invalid values cannot be built.

    ``model`` may stay empty until a stage fills in its default
    (:meth:`require_model` checks it before an engine loads).
    """

    engine: str = option("transformers", "Backend: transformers (embedded, default), vllm (in-process, CUDA), openai (any OpenAI-compatible server).", panel="Engine")
    model: str = option("", "Model: hub id or local directory.", panel="Engine")
    revision: str | None = option(None, "Model revision (branch, tag or commit) on the hub.", panel="Engine")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps.", panel="Engine")
    dtype: str = option("auto", "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.", panel="Engine")
    batch_size: str = option("auto", "Requests per generate call: an integer, or auto (from free GPU memory; 8 on CPU).", panel="Engine")
    quantize: str | None = option(None, "Load weights with bitsandbytes: 4bit (NF4, like the paper's 4-bit LLaVA) or 8bit. Needs the quant extra and a CUDA GPU.", panel="Engine")
    trust_remote_code: bool = False
    # vllm
    tensor_parallel_size: int = option(1, "vllm: GPUs to shard the model over.", panel="Engine")
    gpu_memory_utilization: float = option(0.9, "vllm: fraction of GPU memory it may take.", panel="Engine")
    # openai: one URL, or a comma-separated fleet (least-loaded first)
    base_url: str | None = option(None, "openai: server URL, e.g. http://127.0.0.1:8000/v1. Repeat it (or give a comma list) for a fleet: each request goes to the least-loaded server, and a server that drops connections is set aside while the others take its work.", panel="Engine")
    api_key_env: str | None = option(None, "openai: name of the environment variable holding the API key (the key itself is never logged).", panel="Engine")
    concurrency: int = option(64, "openai: requests in flight at once.", panel="Engine")
    max_retries: int = option(5, "openai: retries per request on 429, 5xx, timeouts and dropped connections (exponential backoff).", panel="Engine")
    # per attempt, a total deadline (connect + upload + whole answer)
    timeout_s: float = option(120.0, "openai: seconds per request attempt, a total deadline (connect, upload and the whole answer, also from a server that trickles bytes).", flag="--timeout", panel="Engine")
    # request payloads (encoded images) alive at once; None: concurrency
    max_inflight: int | None = option(None, "openai: requests whose payload (the encoded image) exists at once; bounds memory on large images. Default: --concurrency.", panel="Engine")

    def require_model(self) -> "EngineConfig":
        if not self.model:
            raise ConfigError("no model given", "--model", "pass a hub id or a local model directory")
        return self

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}", "--engine", f"use one of {', '.join(ENGINES)}")
        if self.batch_size != "auto":
            try:
                if int(self.batch_size) < 1:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"invalid batch size {self.batch_size!r}", "--batch-size", "use a positive integer or 'auto'") from None
        if self.quantize not in (None, "4bit", "8bit"):
            raise ConfigError(f"invalid quantization {self.quantize!r}", "--quantize", "use 4bit or 8bit")
        check_device(self.device)  # here: torch would only refuse it after the weights loaded (minutes for 13B)
        check_dtype(self.dtype)
        if self.engine != "openai" and self.base_url:  # ignoring it would run the local model the user meant to replace
            raise ConfigError(f"--base-url is for --engine openai, not {self.engine}", "--base-url", "add --engine openai to use the server(s), or drop --base-url")
        if self.engine == "openai" and not split_base_urls(self.base_url):
            raise ConfigError("the openai engine needs a server", "--base-url", "e.g. --base-url http://127.0.0.1:8000/v1")
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ConfigError(f"--max-inflight {self.max_inflight} must be at least 1", "--max-inflight", "leave it out (default: --concurrency)")
        # the engine-specific values too: a bad one is refused whichever engine runs
        at_least(self.concurrency, 1, "--concurrency", "e.g. 64")
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout {self.timeout_s} must be positive", "--timeout", "e.g. 120")
        at_least(self.max_retries, 0, "--max-retries", "0 for no retries; default 5")
        at_least(self.tensor_parallel_size, 1, "--tensor-parallel-size", "e.g. 1, 2, 4 or 8")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization {self.gpu_memory_utilization} is not in (0, 1]", "--gpu-memory-utilization", "e.g. 0.9")

    def public_dict(self) -> dict[str, Any]:
        """For manifests: never contains a secret (only the env var's name; URLs lose any
        ``user:password@`` part and key-like query parameters)."""
        d = asdict(self)
        if d["base_url"]:
            d["base_url"] = redact(d["base_url"])
        return d


def split_base_urls(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``--base-url`` values (repeated, comma lists, or both) -> one list of URLs, order kept, no duplicates."""
    if not value:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        for url in str(item).split(","):
            url = url.strip()
            if url and url not in out:
                out.append(url)
    return out


def load_engine(cfg: EngineConfig) -> Engine:
    """Build the engine named by ``cfg.engine``; raises ConfigError early."""
    cfg.require_model()
    if cfg.engine == "transformers":
        from dataprep.engines.hf import TransformersEngine

        return TransformersEngine(cfg)
    if cfg.engine == "vllm":
        from dataprep.engines.vllm_engine import VLLMEngine

        return VLLMEngine(cfg)
    if cfg.engine == "openai":
        from dataprep.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(cfg)
    raise AssertionError(cfg.engine)  # __post_init__ guards this
