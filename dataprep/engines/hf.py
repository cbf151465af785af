"""The embedded transformers engine (default).

Loads the model once per process and serves every batch: batched, left-padded
``generate`` with requests grouped by sampling settings and sorted by token
length to cut padding, SDPA attention, and the batch size chosen from free
accelerator memory (``--batch-size auto``). Vision-language models (LLaVA) go
through their processor and ``AutoModelForImageTextToText``; text models
through the tokenizer and ``AutoModelForCausalLM``. Hub ids and local
directories load the same way.

Shared prefix: every rewrite request starts with the same ~600-token
rules prompt (appendix C). For text models the engine computes the KV cache of
the token prefix shared by a batch once, keeps it across calls, and lays each
batch out as ``[prefix][pad...][own suffix]`` with the pads masked, so prefill
only runs on each request's own tokens. Positions come from the attention
mask's cumulative sum, so every row sees exactly the positions and context of
the plain left-padded path (same greedy outputs; a test checks this).
"""

from __future__ import annotations

import copy
import gc
import inspect
import logging
from pathlib import Path
from typing import Any

from dataprep.engines import ChatRequest, ChatResult, EngineConfig
from dataprep.errors import ConfigError, Reason, failure
from dataprep.runtime import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

CPU_BATCH_SIZE = 8
# A shared prefix shorter than this is not worth a cache copy per batch.
MIN_PREFIX_TOKENS = 32
# Tokens per sequence that --batch-size auto budgets for: ~700 prompt tokens
# (rules prompt + caption, or 576 image tokens + text) plus the new tokens.
AUTO_TOKENS_PER_SEQ = 1024


def shared_prefix_len(seqs: list[list[int]], min_suffix: int = 1) -> int:
    """Length of the longest common prefix of ``seqs``, leaving every sequence at least ``min_suffix`` own tokens.

    (generate needs at least one uncached token per row to start from.)
    """
    if not seqs:
        return 0
    limit = min(len(s) for s in seqs) - min_suffix
    n = 0
    first = seqs[0]
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return max(0, n)


def middle_pad(prefix: list[int], suffixes: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Rows ``prefix + pads + suffix`` of equal length and their attention masks (pads 0).

    Shape: B rows of ``len(prefix) + max(len(suffix))`` tokens. With positions
    taken from the mask's cumulative sum, each row is the plain unpadded
    prompt ``prefix + suffix`` to the model.
    """
    width = max(len(s) for s in suffixes)
    ids, mask = [], []
    for s in suffixes:
        gap = width - len(s)
        ids.append(list(prefix) + [pad_id] * gap + list(s))
        mask.append([1] * len(prefix) + [0] * gap + [1] * len(s))
    return ids, mask


def chat_messages(req: ChatRequest, is_vision: bool) -> list[dict[str, Any]]:
    """Messages for a chat template. Vision models get list-of-parts content
    with an ``{"type": "image"}`` part first in the last user turn (LLaVA's
    ``<image>\n text``); text models get the messages as they are."""
    messages: list[dict[str, Any]] = [dict(m) for m in req.messages]
    if not is_vision:
        return messages
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError("a request needs a user message")
    out = []
    for i, m in enumerate(messages):
        parts: list[dict[str, Any]] = [{"type": "text", "text": m["content"]}]
        if i == users[-1] and req.image is not None:
            parts.insert(0, {"type": "image"})
        out.append({"role": m["role"], "content": parts})
    return out


def auto_batch_size(free_bytes: int, text_config, tokens_per_seq: int = AUTO_TOKENS_PER_SEQ, dtype_bytes: int = 2, cap: int = 256) -> int:
    """Sequences that fit in 85% of ``free_bytes``: KV cache per token
    (2 x layers x kv_heads x head_dim x dtype bytes) x tokens, plus 25% for
    prefill activations and the cache growing by concatenation."""
    tc = text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    per_seq = 2 * tc.num_hidden_layers * kv_heads * head_dim * dtype_bytes * tokens_per_seq * 1.25
    return int(max(1, min(cap, 0.85 * free_bytes // per_seq)))


def load_config(model: str, revision: str | None, trust_remote_code: bool = False):
    """AutoConfig with one clear message for every way a model can be missing."""
    from transformers import AutoConfig

    local = Path(model).expanduser()
    if (model.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").is_file():
        raise ConfigError(f"no model at {local} (config.json missing)", "--model", "pass a directory written by save_pretrained, or a hub id")
    try:
        return AutoConfig.from_pretrained(str(local) if local.exists() else model, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:
        text = str(exc)
        if "gated" in text.lower() or "401" in text or "403" in text or "restricted" in text.lower():
            raise ConfigError(
                f"model {model!r} needs a licence you have not accepted, or a token",
                "--model",
                f"accept the licence on https://huggingface.co/{model} and run `huggingface-cli login` (or set HF_TOKEN)",
            ) from None
        raise ConfigError(
            f"cannot find model {model!r} ({text.splitlines()[0] if text else type(exc).__name__})",
            "--model",
            "check the hub id and your network, or download it first (`huggingface-cli download ID`) "
            "and pass the local directory; offline, set HF_HUB_OFFLINE=1 with a populated cache",
        ) from None


class TransformersEngine:
    name = "transformers"

    def __init__(self, cfg: EngineConfig):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        self.cfg = cfg
        self.model = cfg.model
        self.revision = cfg.revision
        config = load_config(cfg.model, cfg.revision, cfg.trust_remote_code)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.is_vision = hasattr(config, "vision_config") and config.vision_config is not None
        path = str(Path(cfg.model).expanduser()) if Path(cfg.model).expanduser().exists() else cfg.model
        kwargs: dict[str, Any] = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=self.dtype)
        if cfg.quantize:
            kwargs["quantization_config"] = _bnb_config(cfg.quantize, self.device, self.dtype)
            kwargs["device_map"] = {"": self.device}
        try:
            kwargs["attn_implementation"] = "sdpa"
            if self.is_vision:
                self.processor = AutoProcessor.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
                self.tokenizer = self.processor.tokenizer
                self.net = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
            else:
                self.processor = None
                self.tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
                self.net = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as exc:
            raise ConfigError(f"cannot load model {cfg.model!r}: {exc}", "--model", "check the id or directory") from None
        if not cfg.quantize:
            self.net.to(self.device)
        self._setup()

    @classmethod
    def from_model(cls, net, tokenizer, processor=None, cfg: EngineConfig | None = None) -> "TransformersEngine":
        """Wrap a model already in memory (benchmarks with random weights of real shapes; callers that built it).

        ``net`` must be on its device already; ``processor`` is required for a vision model.
        """
        self = cls.__new__(cls)
        self.cfg = cfg or EngineConfig(model=getattr(net.config, "_name_or_path", "") or "in-memory")
        self.model = self.cfg.model
        self.revision = self.cfg.revision
        self.device = str(net.device)
        self.dtype = net.dtype
        self.is_vision = getattr(net.config, "vision_config", None) is not None
        if self.is_vision and processor is None:
            raise ConfigError("a vision model needs its processor", None, "pass processor=")
        self.processor = processor
        self.tokenizer = processor.tokenizer if processor is not None else tokenizer
        self.net = net
        self._setup()
        return self

    def _setup(self) -> None:
        self.net.eval()
        self.tokenizer.padding_side = "left"  # decoder-only batching: pad on the left
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = self._batch_size()
        # the shared-prefix KV cache: (prefix token ids, cache of batch 1), reused across calls
        self.share_prefix = not self.is_vision
        self._prefix: tuple[tuple[int, ...], Any] | None = None
        self._cache_kw = "cache" if "cache" in inspect.signature(self.net.forward).parameters else "past_key_values"
        # extra generate() kwargs for benchmarks (e.g. min_new_tokens for a fixed output length)
        self.generate_kwargs: dict[str, Any] = {}

    # ------------------------------------------------------------ info

    def image_size(self) -> int | None:
        if not self.is_vision:
            return None
        ip = self.processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        size = getattr(ip, "size", None) or {}
        return crop.get("height") or size.get("shortest_edge") or size.get("height")

    def _batch_size(self) -> int:
        if self.cfg.batch_size != "auto":
            return int(self.cfg.batch_size)
        if not self.device.startswith("cuda"):
            return CPU_BATCH_SIZE
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        tc = getattr(self.net.config, "text_config", self.net.config)
        return auto_batch_size(free, tc, dtype_bytes=torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else 2)

    # ------------------------------------------------------------ generation

    def render(self, req: ChatRequest) -> str:
        """Messages -> prompt text with the model's chat template (image placeholder included)."""
        messages = chat_messages(req, self.is_vision)
        if self.is_vision:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        import torch

        # no_grad per call, never torch.set_grad_enabled(False): that is global
        # and would silently freeze training later in the same process (flows).
        with torch.no_grad():
            return self._generate(requests)

    def _generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        results: list[ChatResult | None] = [None] * len(requests)
        prompts: list[str | None] = []
        for i, r in enumerate(requests):
            try:
                prompts.append(self.render(r))
            except Exception as exc:  # a template that rejects one request fails that row only
                prompts.append(None)
                results[i] = ChatResult.failed(failure(Reason.TEMPLATE_ERROR, exc))
        # group by sampling (one generate call has one setting), then by length
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(requests):
            if prompts[i] is not None:
                groups.setdefault(r.sampling, []).append(i)
        # token length for text models (what padding costs); LLaVA's 576 image
        # tokens are the same for every row, so text length orders those
        lengths = {i: len(p) for i, p in enumerate(prompts) if p is not None}
        if not self.is_vision:
            lengths = {i: len(self.tokenizer(prompts[i], add_special_tokens=False)["input_ids"]) for i in lengths}
        for sampling, idx in groups.items():
            idx.sort(key=lambda i: lengths[i])
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                for i, res in zip(chunk, self._generate_safe([requests[i] for i in chunk], [prompts[i] for i in chunk])):
                    results[i] = res
        return [r if r is not None else ChatResult.failed(failure(Reason.INTERNAL, "no result")) for r in results]

    def _generate_safe(self, reqs: list[ChatRequest], prompts: list[str]) -> list[ChatResult]:
        """Run a batch; on OOM split it, on another error isolate the bad request."""
        import torch

        try:
            return self._generate_batch(reqs, prompts)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(reqs) == 1:
                return [ChatResult.failed(failure(Reason.OUT_OF_MEMORY, "one request does not fit; lower --max-new-tokens or use --quantize"))]
            half = len(reqs) // 2
            self.batch_size = max(1, half)
            log.warning("out of memory at batch %d; continuing with batch %d", len(reqs), self.batch_size)
            return self._generate_safe(reqs[:half], prompts[:half]) + self._generate_safe(reqs[half:], prompts[half:])
        except Exception as exc:
            if len(reqs) == 1:
                return [ChatResult.failed(failure(Reason.GENERATE_ERROR, f"{type(exc).__name__}: {exc}"))]
            out: list[ChatResult] = []
            for r, p in zip(reqs, prompts):
                out.extend(self._generate_safe([r], [p]))
            return out

    def _inputs(self, reqs: list[ChatRequest], prompts: list[str]):
        if self.is_vision:
            images = [r.image for r in reqs]
            if any(im is None for im in images):
                if not all(im is None for im in images):
                    raise ValueError("a batch mixes requests with and without images")
                images = None
            return self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
        # the chat template already holds BOS; do not add a second one
        return self.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)

    def _prefix_inputs(self, prompts: list[str]) -> tuple[dict[str, Any], Any] | None:
        """Middle-padded inputs and a per-batch copy of the shared-prefix cache, or None (no useful prefix)."""
        import torch

        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        n = shared_prefix_len(ids)
        if self._prefix is not None:
            cached = self._prefix[0]
            # keep a cached prefix that every row still starts with: no recomputation
            if len(cached) <= n and tuple(ids[0][: len(cached)]) == cached:
                n = len(cached)
        if n < MIN_PREFIX_TOKENS:
            return None
        if len(ids) == 1 and (self._prefix is None or n != len(self._prefix[0])):
            return None  # a lone request (an isolated retry): keep the shared cache, run it plainly
        prefix = tuple(ids[0][:n])
        if self._prefix is None or self._prefix[0] != prefix:
            t = torch.tensor([prefix], device=self.device)
            out = self.net(input_ids=t, attention_mask=torch.ones_like(t), use_cache=True)
            cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]  # renamed in transformers 5.2x
            self._prefix = (prefix, cache)
        past = copy.deepcopy(self._prefix[1])
        past.batch_repeat_interleave(len(prompts))
        rows, mask = middle_pad(list(prefix), [x[n:] for x in ids], self.tokenizer.pad_token_id)
        inputs = {"input_ids": torch.tensor(rows, device=self.device), "attention_mask": torch.tensor(mask, device=self.device)}
        return inputs, past

    def _generate_batch(self, reqs: list[ChatRequest], prompts: list[str]) -> list[ChatResult]:
        import torch

        s = reqs[0].sampling
        gen: dict[str, Any] = dict(max_new_tokens=s.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        shared = self._prefix_inputs(prompts) if self.share_prefix else None
        if shared is not None:
            inputs, gen[self._cache_kw] = shared
        else:
            inputs = self._inputs(reqs, prompts).to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        if s.greedy:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            gen.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=None)
            if s.seed is not None:
                torch.manual_seed(s.seed)
        out = self.net.generate(**inputs, **gen, **self.generate_kwargs)
        n_in = inputs["input_ids"].shape[1]
        new = out[:, n_in:]
        eos = self._eos_ids()
        results = []
        mask = inputs["attention_mask"]
        for row, toks in enumerate(new.tolist()):
            stop_at = next((k for k, t in enumerate(toks) if t in eos), None)
            if stop_at is None:
                kept = [t for t in toks if t != self.tokenizer.pad_token_id] if self.tokenizer.pad_token_id not in eos else toks
                finish = "length" if len(toks) >= s.max_new_tokens else "stop"
            else:
                kept, finish = toks[:stop_at], "stop"
            text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
            results.append(
                ChatResult(
                    text=text,
                    finish_reason=finish,
                    prompt_tokens=int(mask[row].sum()),
                    completion_tokens=len(kept) + (finish == "stop" and stop_at is not None),
                )
            )
        return results

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.net, "generation_config", None), self.net.config, self.tokenizer):
            v = getattr(src, "eos_token_id", None)
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
        return ids

    def close(self) -> None:
        import torch

        self.net = None
        self._prefix = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _bnb_config(quantize: str, device: str, dtype):
    if not device.startswith("cuda"):
        raise ConfigError("bitsandbytes quantization needs a CUDA GPU", "--quantize", "drop --quantize on CPU, or run on a GPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("bitsandbytes is not installed", "--quantize", 'pip install "softrepa-dataprep[quant]"') from None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        # NF4 with double quantization, as the paper's 4bit/llava-v1.5-13b-3GB checkpoint
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)
