"""The ``openai`` engine: any OpenAI-compatible chat server (issue 4).

``vllm serve``, SGLang and ``transformers serve`` all speak
``POST /v1/chat/completions``; this engine is how the pipeline scales past one
machine (many servers behind a load balancer, one pipeline). Requests of one
``generate`` call go out concurrently over one ``httpx.AsyncClient`` with at
most ``--concurrency`` in flight. 429, 5xx, timeouts and dropped connections
are retried with exponential backoff and jitter up to ``max_retries`` times;
a request that still fails comes back as a :class:`ChatResult` with ``error``
set, so the stage records an error row and a later resume retries it.

The API key is read from the environment variable named by
``--api-key-env``; only the variable's name is ever stored (manifests hold
``EngineConfig.public_dict()``), and the key is kept out of ``repr`` and of
every error message.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import threading
from typing import TYPE_CHECKING, Any

from dataprep.engines import ChatRequest, ChatResult, ConfigError, EngineConfig

if TYPE_CHECKING:
    from PIL.Image import Image

# A server-side VLM resizes to its own input (336 for LLaVA-1.5); sending a
# padded 2040x2040 DIV2K frame would be ~8 MB of base64 per request for nothing.
MAX_SEND_SIDE = 1024
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


# ------------------------------------------------------------ pure request building


def api_base(base_url: str) -> str:
    """Normalise ``--base-url`` to the ``.../v1`` root (``http://h:8000`` and ``http://h:8000/v1/`` both work)."""
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--base-url {base_url!r} is not an http(s) URL", "--base-url", "e.g. --base-url http://127.0.0.1:8000/v1")
    return url if url.endswith("/v1") else url + "/v1"


def image_data_url(img: "Image", max_side: int = MAX_SEND_SIDE) -> str:
    """RGB PNG as a ``data:image/png;base64,...`` URL, downscaled so its longest side is <= max_side."""
    from PIL import Image as PILImage

    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), PILImage.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """OpenAI chat messages; the image goes first in the last user turn (LLaVA's ``<image>\\n text`` order)."""
    messages: list[dict[str, Any]] = [dict(m) for m in req.messages]
    if req.image is not None:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ValueError("a request with an image needs a user message")
        m = messages[users[-1]]
        m["content"] = [{"type": "image_url", "image_url": {"url": image_data_url(req.image)}}, {"type": "text", "text": m["content"]}]
    return messages


def build_payload(req: ChatRequest, model: str) -> dict[str, Any]:
    """The JSON body of one ``/v1/chat/completions`` call; ``model`` is sent exactly as given."""
    s = req.sampling
    body: dict[str, Any] = {
        "model": model,
        "messages": build_messages(req),
        "max_tokens": s.max_new_tokens,
        "temperature": 0.0 if s.greedy else s.temperature,
        "top_p": 1.0 if s.greedy else s.top_p,
        "stream": False,
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if req.json_schema is not None:
        # OpenAI structured outputs; vllm serve and SGLang take the same field
        name = str(req.json_schema.get("title") or "answer")
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": req.json_schema, "strict": True}}
    return body


def parse_response(data: Any) -> ChatResult:
    """A chat-completion JSON body -> ChatResult; a malformed body becomes an error result."""
    try:
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        finish = choice.get("finish_reason") or "stop"
    except (KeyError, IndexError, TypeError, AttributeError):
        return ChatResult.failed(f"bad_response: no choices[0].message in {str(data)[:200]!r}")
    if finish not in ("stop", "length"):
        # vLLM / SGLang answer 200 with "abort" (and OpenAI with "content_filter")
        # around a partial text: an error row that resume retries, not a caption
        return ChatResult.failed(f"generate_error: the server finished with {finish!r}")
    usage = data.get("usage") or {}
    return ChatResult(
        text=text.strip(),
        finish_reason=finish,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def backoff_delay(attempt: int, base_s: float, cap_s: float, retry_after: str | None = None, rng: random.Random | None = None) -> float:
    """Seconds before retry ``attempt`` (0-based): full-jitter exponential, or the server's Retry-After."""
    if retry_after:
        try:
            return min(cap_s, max(0.0, float(retry_after)))
        except ValueError:
            pass  # an HTTP date: fall back to our own schedule
    r = rng or random
    return min(cap_s, base_s * (2**attempt)) * (0.5 + r.random() / 2)


def httpx_timeout():
    import httpx

    return httpx.TimeoutException


# ------------------------------------------------------------ engine


class OpenAIEngine:
    """Chat requests against an OpenAI-compatible server at ``cfg.base_url``."""

    name = "openai"
    backoff_base_s = 0.5  # first retry waits ~0.5 s, then 1, 2, 4 ... (capped)
    backoff_cap_s = 30.0

    def __init__(self, cfg: EngineConfig):
        try:
            import httpx  # noqa: F401
        except ImportError:  # pragma: no cover - httpx is a core dependency
            raise ConfigError("httpx is not installed", "--engine openai", "pip install httpx") from None
        if not cfg.base_url:
            raise ConfigError("the openai engine needs a server", "--base-url", "e.g. --base-url http://127.0.0.1:8000/v1")
        if cfg.concurrency < 1:
            raise ConfigError(f"--concurrency {cfg.concurrency} must be at least 1", "--concurrency", "e.g. 64")
        self.cfg = cfg
        self.model = cfg.model
        self.revision = cfg.revision
        self.base = api_base(cfg.base_url)
        self.__key = self._read_key(cfg.api_key_env)
        self.concurrency = cfg.concurrency
        # requests per generate() call: two per slot keeps the slots busy while the
        # last ones finish, and bounds the images a caption stage holds decoded
        self.batch_size = int(cfg.batch_size) if cfg.batch_size != "auto" else 2 * cfg.concurrency
        self.max_retries = max(0, cfg.max_retries)
        self.timeout_s = cfg.timeout_s
        self._check_server()

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIEngine(base={self.base!r}, model={self.model!r}, concurrency={self.concurrency})"

    @staticmethod
    def _read_key(env: str | None) -> str | None:
        if not env:
            return None
        key = os.environ.get(env)
        if not key:
            raise ConfigError(f"environment variable {env} is not set or empty", "--api-key-env", f"export {env}=<your key>, or drop --api-key-env for a server without auth")
        return key

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.__key}"} if self.__key else {}

    def _check_server(self) -> None:
        """GET /v1/models (or /health): fail before any input is read if nobody answers."""
        import httpx

        root = self.base[: -len("/v1")]
        try:
            with httpx.Client(timeout=min(10.0, self.timeout_s), headers=self._headers()) as c:
                r = c.get(self.base + "/models")
                if r.status_code in (401, 403):
                    raise ConfigError(f"the server at {self.base} refused the API key (HTTP {r.status_code})", "--api-key-env", "name the environment variable that holds a valid key")
                if r.status_code == 200:
                    self._check_model(c, r)
                    return
                h = c.get(root + "/health")
                if h.status_code != 200:
                    raise ConfigError(f"the server at {self.base} answers neither /v1/models nor /health (HTTP {r.status_code}/{h.status_code})", "--base-url", "point it at an OpenAI-compatible server, e.g. http://HOST:8000/v1")
        except httpx.HTTPError as exc:
            raise ConfigError(
                f"no OpenAI-compatible server reachable at {self.base} ({type(exc).__name__})",
                "--base-url",
                "start one (e.g. `vllm serve MODEL --port 8000` or `transformers serve`) and check host and port",
            ) from None

    def _check_model(self, client, listing) -> None:
        """A model the listing lacks gets one 1-token probe: vllm serve and SGLang answer 404 for
        a model they do not serve, transformers serve lists only loaded models and loads others."""
        try:
            listed = [m["id"] for m in listing.json().get("data", [])]
        except Exception:  # a non-standard listing: let the requests decide
            return
        if self.model in listed:
            return
        probe = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0.0}
        try:
            r = client.post(self.base + "/chat/completions", json=probe, timeout=self.timeout_s)
        except httpx_timeout():  # a server still loading the model: let the requests decide
            return
        if r.status_code in (400, 404, 422) and ("model" in r.text.lower() or r.status_code == 404):
            served = ", ".join(listed[:10]) or "none listed"
            raise ConfigError(f"the server at {self.base} does not serve {self.model!r} (HTTP {r.status_code}; it lists: {served})", "--model", "pass one of the served model names")

    # ------------------------------------------------------------ generation

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """One result per request, in order; failures are results with ``error`` set."""
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._generate_all(requests))
        # called from inside an event loop (an async Prefect task): run on a private one
        box: list[list[ChatResult]] = []
        t = threading.Thread(target=lambda: box.append(asyncio.run(self._generate_all(requests))))
        t.start()
        t.join()
        return box[0]

    async def _generate_all(self, requests: list[ChatRequest]) -> list[ChatResult]:
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits, headers=self._headers()) as client:

            async def one(req: ChatRequest) -> ChatResult:
                try:
                    body = build_payload(req, self.model)
                except Exception as exc:  # e.g. an image PIL cannot encode: this row only
                    return ChatResult.failed(f"request_error: {type(exc).__name__}: {exc}")
                async with sem:
                    return await self._post(client, body)

            return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _post(self, client, body: dict[str, Any]) -> ChatResult:
        import httpx

        url = self.base + "/chat/completions"
        last = "unknown"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                r = await client.post(url, json=body)
            except httpx.TimeoutException as exc:
                last = f"timeout: no answer within {self.timeout_s:g} s ({type(exc).__name__})"
            except httpx.TransportError as exc:  # refused, reset, dropped mid-response
                last = f"connection_error: {type(exc).__name__}: {exc}"
            else:
                if r.status_code == 200:
                    try:
                        return parse_response(r.json())
                    except ValueError:
                        return ChatResult.failed(f"bad_response: body is not JSON: {r.text[:200]!r}")
                detail = r.text[:300].replace("\n", " ")
                if r.status_code not in RETRY_STATUS:  # 400 (context too long), 404 (model): retrying cannot help
                    return ChatResult.failed(f"http_{r.status_code}: {detail}")
                last = f"http_{r.status_code}: {detail}"
                retry_after = r.headers.get("retry-after")
            if attempt < self.max_retries:
                await asyncio.sleep(backoff_delay(attempt, self.backoff_base_s, self.backoff_cap_s, retry_after))
        return ChatResult.failed(f"{last} (after {self.max_retries + 1} attempts)")

    def image_size(self) -> int | None:
        return None  # the server resizes for its model; images are capped at MAX_SEND_SIDE on the wire

    def close(self) -> None:
        pass  # clients live per generate() call; nothing held between calls
