"""The ``openai`` engine: any OpenAI-compatible chat server, or a fleet of them.

``vllm serve``, SGLang and ``transformers serve`` all speak
``POST /v1/chat/completions``; this engine is how the pipeline scales past one
machine: ``--base-url`` repeated names a fleet of servers, and each request
goes to the least-loaded one. Requests go out concurrently over one
``httpx.AsyncClient`` with at most ``--concurrency`` in flight. 429, 5xx,
timeouts and dropped connections are retried with exponential backoff and
jitter up to ``max_retries`` times (a dropped connection moves the request to
another server of the fleet first); a request that still fails comes back as
a :class:`ChatResult` with ``error`` set, so the stage records an error row
and a later resume retries it. A malformed answer is that request's error
only, with a reason naming the field (:func:`parse_response`).

The API key is read from the environment variable named by
``--api-key-env``; only the variable's name is ever stored (manifests hold
``EngineConfig.public_dict()``). Every error text and every generated text
leaves the engine through :meth:`OpenAIEngine.redact`, so neither the key nor
an ``Authorization`` header a server echoes back reaches a row, a manifest, a
log line or a Prefect artifact.

One module of ~560 lines on purpose: request building and response parsing
(pure), the fleet's bookkeeping (pure) and the async client are one wire
protocol that changes together; each section is tested on its own.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dataprep.engines import ChatRequest, ChatResult, EngineConfig, split_base_urls
from dataprep.errors import ConfigError, Reason, failure
from dataprep.engines.redact import redact

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


def _kind(value: Any) -> str:
    """The JSON type name of ``value``, for error reasons ("a string", "null" ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _snippet(value: Any, n: int = 120) -> str:
    return repr(str(value)[:n])


def parse_response(data: Any) -> ChatResult:
    """A chat-completion JSON body -> ChatResult; never raises.

    The body must be an object with a non-empty ``choices`` array whose first
    element holds ``message.content`` (a string) and optionally
    ``finish_reason`` (a string; absent or null means ``stop``); ``usage``, when
    present, is an object of non-negative integers. Anything else (a field of
    the wrong type, a missing field, valid JSON of another shape, null
    content) is an error result whose reason names the field and what it held.
    """
    def bad(what: str) -> ChatResult:
        return ChatResult.failed(failure(Reason.BAD_RESPONSE, what))

    if not isinstance(data, dict):
        return bad(f"the body is {_kind(data)}, not a JSON object: {_snippet(data)}")
    if "choices" not in data:
        if "error" in data:  # some servers answer 200 around an error object
            return bad(f"no 'choices'; the server sent an error: {_snippet(data['error'], 200)}")
        return bad(f"no 'choices' field (keys: {', '.join(sorted(map(str, data))[:10]) or 'none'})")
    choices = data["choices"]
    if not isinstance(choices, list):
        return bad(f"'choices' is {_kind(choices)}, expected an array")
    if not choices:
        return bad("'choices' is empty")
    choice = choices[0]
    if not isinstance(choice, dict):
        return bad(f"choices[0] is {_kind(choice)}, expected an object")
    message = choice.get("message")
    if not isinstance(message, dict):
        return bad(f"choices[0].message is {'missing' if 'message' not in choice else _kind(message)}, expected an object")
    content = message.get("content")
    if content is None:
        return bad(f"choices[0].message.content is {'missing' if 'content' not in message else 'null'}")
    if not isinstance(content, str):
        return bad(f"choices[0].message.content is {_kind(content)}, expected a string")
    finish = choice.get("finish_reason")
    if finish is None:
        finish = "stop"
    elif not isinstance(finish, str):
        return bad(f"choices[0].finish_reason is {_kind(finish)}, expected a string")
    if finish not in ("stop", "length"):
        # vLLM / SGLang answer 200 with "abort" (and OpenAI with "content_filter")
        # around a partial text: an error row that resume retries, not a caption
        return ChatResult.failed(failure(Reason.GENERATE_ERROR, f"the server finished with {finish[:40]!r}"))
    usage = data.get("usage")
    if usage is None:
        usage = {}
    elif not isinstance(usage, dict):
        return bad(f"'usage' is {_kind(usage)}, expected an object")
    counts = []
    for name in ("prompt_tokens", "completion_tokens"):
        n = usage.get(name)
        if n is None:
            n = 0
        elif isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return bad(f"usage.{name} is {_kind(n)} {_snippet(n, 40)}, expected a non-negative integer")
        counts.append(n)
    return ChatResult(text=content.strip(), finish_reason=finish, prompt_tokens=counts[0], completion_tokens=counts[1])


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


async def _deadline(awaitable, seconds: float):
    """``await awaitable`` or raise TimeoutError after ``seconds`` in all."""
    if hasattr(asyncio, "timeout"):  # 3.11+: no extra task per request (wait_for makes one)
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


# ------------------------------------------------------------ a fleet of servers (pure bookkeeping)


@dataclass
class Server:
    """One server of the fleet: where it is, what it is doing, whether it is trusted."""

    base: str  # the .../v1 root
    inflight: int = 0
    down_until: float = 0.0  # monotonic time before which it gets no work
    failures: int = 0  # connection failures in a row
    sent: int = 0  # attempts sent to it (how the work was spread)

    def up(self, now: float) -> bool:
        return self.down_until <= now


class Fleet:
    """Least-loaded choice among servers, with servers that drop connections set aside.

    ``pick`` returns the up server with the fewest requests in flight (ties go
    round-robin, so an idle fleet is filled evenly). A connection failure marks
    its server down for ``probe_s`` seconds, doubling with each failure in a row
    up to ``probe_cap_s``; after that the server is eligible again and its next
    request is the probe: success clears the mark, failure extends it. When
    every server is down, the one due back first is picked (the caller's
    backoff paces those attempts). Not thread-safe: the engine uses it from
    its one event loop.
    """

    def __init__(self, bases: list[str], probe_s: float = 2.0, probe_cap_s: float = 60.0):
        if not bases:
            raise ValueError("a fleet needs at least one server")
        self.servers = [Server(b) for b in bases]
        self.probe_s, self.probe_cap_s = probe_s, probe_cap_s
        self._turn = 0

    def pick(self, now: float, avoid: Server | None = None) -> Server:
        up = [s for s in self.servers if s.up(now) and s is not avoid] or [s for s in self.servers if s.up(now)]
        if not up:
            return min(self.servers, key=lambda s: s.down_until)
        n = len(self.servers)
        self._turn = (self._turn + 1) % n
        order = {id(s): (i - self._turn) % n for i, s in enumerate(self.servers)}
        return min(up, key=lambda s: (s.inflight, order[id(s)]))

    def any_up(self, now: float, besides: Server | None = None) -> bool:
        return any(s.up(now) for s in self.servers if s is not besides)

    def ok(self, server: Server) -> None:
        server.failures, server.down_until = 0, 0.0

    def down(self, server: Server, now: float) -> None:
        server.failures += 1
        server.down_until = now + min(self.probe_cap_s, self.probe_s * 2 ** (server.failures - 1))


# ------------------------------------------------------------ engine


class OpenAIEngine:
    """Chat requests against one OpenAI-compatible server or a fleet of them.

    ``cfg.base_url`` is one URL or a comma-separated list (``--base-url``
    repeated). Each request goes to the least-loaded server; a server that
    refuses or drops connections is set aside (see :class:`Fleet`) and the
    request moves to another one at once, without using up a retry.

    Bounds, whatever the input size:

    - ``--concurrency`` requests on the wire at once (over all servers);
    - ``--max-inflight`` requests whose payload exists at once: a request's
      image is encoded only once it holds one of these slots and released
      when its answer is in, so a batch of 4000x3000 photos never sits
      encoded in memory all together (default: ``--concurrency``);
    - ``--timeout`` seconds per attempt, as a total deadline over connect,
      upload and the whole answer: a server that trickles bytes slowly
      cannot hold a request forever (httpx's own timeouts are per read).

    Requests run on one event loop in a background thread, over httpx clients
    (connection pools of ``POOL_SIZE``) kept for the engine's life, so
    connections are reused across ``generate`` calls and calls from several
    threads share the bounds above.
    """

    name = "openai"
    backoff_base_s = 0.5  # first retry waits ~0.5 s, then 1, 2, 4 ... (capped)
    backoff_cap_s = 30.0
    POOL_SIZE = 8  # connections per httpx pool (see _setup)
    probe_s = 2.0  # a server that dropped a connection gets no work for this long, doubling per failure

    def __init__(self, cfg: EngineConfig):
        try:
            import httpx  # noqa: F401
        except ImportError:  # pragma: no cover - httpx is a core dependency
            raise ConfigError("httpx is not installed", "--engine openai", "pip install httpx") from None
        if not cfg.base_url:
            raise ConfigError("the openai engine needs a server", "--base-url", "e.g. --base-url http://127.0.0.1:8000/v1")
        self.cfg = cfg
        self.model = cfg.model
        self.revision = cfg.revision
        self.__key = self._read_key(cfg.api_key_env)
        self.bases = list(dict.fromkeys(api_base(u) for u in split_base_urls(cfg.base_url)))
        self.base = self.bases[0]
        self.concurrency = cfg.concurrency
        self.max_inflight = cfg.max_inflight or cfg.concurrency
        # requests per generate() call: two per slot keeps the slots busy while the
        # last ones finish, and bounds the images a caption stage holds decoded
        self.batch_size = int(cfg.batch_size) if cfg.batch_size != "auto" else 2 * cfg.concurrency
        self.max_retries = cfg.max_retries
        self.timeout_s = cfg.timeout_s
        for base in self.bases:
            self._check_server(base)
        self.fleet = Fleet(self.bases, self.probe_s)
        self._loop = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return self.redact(f"OpenAIEngine(base={', '.join(self.bases)!r}, model={self.model!r}, concurrency={self.concurrency})")

    def redact(self, text: str) -> str:
        """``text`` without this engine's key or anything credential-shaped (see :mod:`.redact`)."""
        return redact(text, (self.__key,))

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

    def _check_server(self, base: str) -> None:
        """GET /v1/models (or /health): fail before any input is read if nobody answers."""
        try:
            self._check_server_unsafe(base)
        except ConfigError as exc:  # a server's model listing may quote anything
            raise ConfigError(self.redact(str(exc))) from None

    def _check_server_unsafe(self, base: str) -> None:
        import httpx

        root = base[: -len("/v1")]
        shown = redact(base)
        try:
            with httpx.Client(timeout=min(10.0, self.timeout_s), headers=self._headers()) as c:
                r = c.get(base + "/models")
                if r.status_code in (401, 403):
                    raise ConfigError(f"the server at {shown} refused the API key (HTTP {r.status_code})", "--api-key-env", "name the environment variable that holds a valid key")
                if r.status_code == 200:
                    self._check_model(c, r, base)
                    return
                h = c.get(root + "/health")
                if h.status_code != 200:
                    raise ConfigError(f"the server at {shown} answers neither /v1/models nor /health (HTTP {r.status_code}/{h.status_code})", "--base-url", "point it at an OpenAI-compatible server, e.g. http://HOST:8000/v1")
        except httpx.HTTPError as exc:
            fleet = " (every --base-url must answer when the run starts)" if len(self.bases) > 1 else ""
            raise ConfigError(
                f"no OpenAI-compatible server reachable at {shown} ({type(exc).__name__}){fleet}",
                "--base-url",
                "start one (e.g. `vllm serve MODEL --port 8000` or `transformers serve`) and check host and port",
            ) from None

    def _check_model(self, client, listing, base: str) -> None:
        """A model the listing lacks gets one 1-token probe: vllm serve and SGLang answer 404 for
        a model they do not serve, transformers serve lists only loaded models and loads others."""
        try:
            listed = [str(m["id"]) for m in listing.json().get("data", [])]
        except Exception:  # a non-standard listing: let the requests decide
            return
        if self.model in listed:
            return
        probe = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0.0}
        try:
            r = client.post(base + "/chat/completions", json=probe, timeout=self.timeout_s)
        except httpx_timeout():  # a server still loading the model: let the requests decide
            return
        if r.status_code in (400, 404, 422) and ("model" in r.text.lower() or r.status_code == 404):
            served = ", ".join(listed[:10]) or "none listed"
            raise ConfigError(f"the server at {redact(base)} does not serve {self.model!r} (HTTP {r.status_code}; it lists: {served})", "--model", "pass one of the served model names")

    # ------------------------------------------------------------ the event loop

    def _ensure_loop(self):
        """The engine's event loop, started in a daemon thread on first use."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="openai-engine", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
                self._client = None
            return self._loop

    async def _setup(self) -> None:
        """Client and semaphores, made on the engine's loop (they belong to it)."""
        if self._client is None:
            import httpx

            # Several small connection pools instead of one big one: httpcore scans
            # every connection of its pool for each request it places, so one pool of
            # 64 connections costs the client more CPU per request than the HTTP work
            k = max(1, -(-self.concurrency // self.POOL_SIZE))
            per = -(-self.concurrency // k)
            limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
            self._clients = [httpx.AsyncClient(timeout=self.timeout_s, limits=limits, headers=self._headers()) for _ in range(k)]
            self._active = [0] * k
            self._client = self._clients[0]
            self._wire = asyncio.Semaphore(self.concurrency)
            self._payloads = asyncio.Semaphore(self.max_inflight)

    # ------------------------------------------------------------ generation

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """One result per request, in order; failures are results with ``error`` set.

        Safe to call from any thread, also from inside another event loop (an
        async Prefect task): the work runs on the engine's own loop.
        """
        if not requests:
            return []
        fut = asyncio.run_coroutine_threadsafe(self._generate_all(requests), self._ensure_loop())
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    async def _generate_all(self, requests: list[ChatRequest]) -> list[ChatResult]:
        await self._setup()
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, req: ChatRequest) -> ChatResult:
        """One request, end to end; whatever goes wrong is this request's error result only."""
        try:
            async with self._payloads:
                result = await self._encode_and_send(req)
        except Exception as exc:  # a bug or an exception nobody foresaw: one row, not the batch
            result = ChatResult.failed(failure(Reason.INTERNAL, f"{type(exc).__name__}: {exc}"))
        # the boundary: every text that leaves the engine is redacted here
        if result.error is not None:
            result.error = self.redact(result.error)[:500]
        if self.__key and result.text:
            result.text = self.redact(result.text)
        return result

    async def _encode_and_send(self, req: ChatRequest) -> ChatResult:
        # the payload exists only inside this call, which holds a --max-inflight slot
        try:
            if req.image is not None:  # PNG encoding takes ~50 ms: off the loop
                body = await asyncio.to_thread(build_payload, req, self.model)
            else:
                body = build_payload(req, self.model)
        except Exception as exc:  # e.g. an image PIL cannot encode: this row only
            return ChatResult.failed(failure(Reason.REQUEST_ERROR, f"{type(exc).__name__}: {exc}"))
        return await self._post(body)

    async def _post(self, body: dict[str, Any]) -> ChatResult:
        """Send ``body`` until it succeeds, fails for good, or runs out of retries.

        A connection failure sets its server aside and moves the request to
        another up server at once; that failover is not a retry (each request
        gets at most one per other server). Timeouts, 429 and 5xx are retries,
        after a backoff, on the least-loaded server other than the last one.
        """
        import httpx

        loop = asyncio.get_running_loop()
        last, attempt, failovers, server = "unknown", 0, 0, None
        while True:
            retry_after = None
            async with self._wire:  # a wire slot first, then the server least loaded right now
                server = self.fleet.pick(loop.time(), avoid=server)
                server.inflight += 1
                server.sent += 1
                try:
                    # a total deadline: httpx's timeout is per read, and a server that
                    # sends a byte a second never trips it
                    r = await self._send(server.base + "/chat/completions", body)
                except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
                    r, last = None, failure(Reason.TIMEOUT, f"no complete answer within {self.timeout_s:g} s ({type(exc).__name__})")
                except httpx.TransportError as exc:  # refused, reset, dropped mid-response: the server is gone
                    self.fleet.down(server, loop.time())
                    r, last = None, failure(Reason.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}")
                    if failovers < len(self.bases) - 1 and self.fleet.any_up(loop.time(), besides=server):
                        failovers += 1  # another server takes it now; not a retry
                        continue
                except httpx.HTTPError as exc:  # e.g. a body that fails to decompress
                    r, last = None, failure(Reason.BAD_RESPONSE, f"{type(exc).__name__}: {exc}")
                finally:
                    server.inflight -= 1
            if r is not None:
                self.fleet.ok(server)
                if r.status_code == 200:
                    try:
                        data = r.json()
                    except ValueError:
                        return ChatResult.failed(failure(Reason.BAD_RESPONSE, f"body is not JSON: {self.redact(r.text)[:200]!r}"))
                    return parse_response(data)
                detail = self.redact(r.text).replace("\n", " ")[:300]
                if r.status_code not in RETRY_STATUS:  # 400 (context too long), 404 (model): retrying cannot help
                    return ChatResult.failed(f"http_{r.status_code}: {detail}")
                last = f"http_{r.status_code}: {detail}"
                retry_after = r.headers.get("retry-after")
            if attempt >= self.max_retries:
                return ChatResult.failed(f"{last} (after {attempt + 1} attempts)")
            await asyncio.sleep(backoff_delay(attempt, self.backoff_base_s, self.backoff_cap_s, retry_after))
            attempt += 1

    async def _send(self, url: str, body: dict[str, Any]):
        """POST on the pool with the fewest requests (it always has a free connection:
        the wire semaphore keeps the total at --concurrency)."""
        i = min(range(len(self._clients)), key=self._active.__getitem__)
        self._active[i] += 1
        try:
            return await _deadline(self._clients[i].post(url, json=body), self.timeout_s)
        finally:
            self._active[i] -= 1

    def image_size(self) -> int | None:
        return None  # the server resizes for its model; images are capped at MAX_SEND_SIDE on the wire

    # the caption stage's decoders shrink larger images to this side already, so a
    # batch waiting for the server holds 1024x1024 squares, not 48 MB 4000x4000 ones
    max_image_side = MAX_SEND_SIDE

    def close(self) -> None:
        """Close the client and stop the loop thread; a later generate() starts them again."""
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is None:
            return

        async def shutdown() -> None:
            if self._client is not None:
                for client in self._clients:
                    await client.aclose()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        except Exception:  # closing is best effort
            pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()
