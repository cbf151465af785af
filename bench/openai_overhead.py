"""How much the openai engine and the rewrite stage cost beside a bare HTTP client.

One run, one loopback server: a minimal ASGI app under uvicorn (its own
process) that answers every ``/v1/chat/completions`` at once with a fixed
completion, so all the time measured is the client's. Against it:

- ``bare``: an ``httpx.AsyncClient`` loop, ``--concurrency`` requests in flight,
  the same request bodies as the stage, each answer parsed as JSON;
- ``stage``: ``run_rewrite`` (the engine, the rule checker, the rows, Parquet
  shards, the manifest) over the same captions with ``--engine openai``.

Prints one JSON object: rows/s of each (the median over ``--repeat`` runs,
alternating), their ratio, the client CPU time per row of each (what decides
the rate on a dedicated core; wall rates on a shared machine mostly measure
the other jobs) and the peak resident memory of this process. Never
part of CI; needs uvicorn (``pip install -e ".[bench]"``)::

    python bench/openai_overhead.py --rows 2000 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ANSWER = json.dumps({
    "id": "cmpl-bench",
    "object": "chat.completion",
    "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "A brown cat sits on a wooden bench in a park."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 600, "completion_tokens": 12, "total_tokens": 612},
}).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "bench-model", "object": "model"}]}).encode()


async def app(scope, receive, send):
    """The instant server: reads the whole request, answers a fixed completion."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = MODELS if scope["path"].endswith("/models") else ANSWER
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "uvicorn", "bench.openai_overhead:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("uvicorn did not start")


def captions(n: int) -> list[str]:
    colours, things, places = ("brown", "black", "white", "grey", "red"), ("dog", "cat", "horse", "bird"), ("bench", "lawn", "street", "beach", "sofa")
    return [f"A {colours[i % 5]} {things[i // 5 % 4]} rests on a {places[i // 20 % 5]} number {i}." for i in range(n)]


async def bare_loop(url: str, bodies: list[dict], concurrency: int) -> tuple[float, float]:
    """rows/s of the plain client: same bodies, same concurrency, each answer parsed."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(body):
            async with sem:
                r = await client.post(url + "/chat/completions", json=body)
                return r.json()["choices"][0]["message"]["content"]

        t0, c0 = time.perf_counter(), time.process_time()
        out = await asyncio.gather(*(one(b) for b in bodies))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    assert len(out) == len(bodies)
    return len(bodies) / dt, 1000 * dc / len(bodies)


def stage_run(url: str, texts: list[str], concurrency: int, engine, progress: bool) -> tuple[float, float]:
    from dataprep.engines import EngineConfig
    from dataprep.rewrite import RewriteInput, RewriteOptions, run_rewrite

    items = [RewriteInput(image_id=f"bench/{i:06d}", text=t) for i, t in enumerate(texts)]
    cfg = EngineConfig(engine="openai", model="bench-model", base_url=url, concurrency=concurrency)
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        s = run_rewrite(items, d, cfg, RewriteOptions(max_attempts=1, max_new_tokens=64), engine=engine, progress=progress)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    assert s.done == len(items), s.failed
    return len(items) / dt, 1000 * dc / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--progress", action="store_true", help="draw the stage's progress bar, as the CLI does")
    args = ap.parse_args()

    from dataprep.engines import ChatRequest, EngineConfig, Sampling, load_engine
    from dataprep.engines.openai_engine import build_payload
    from dataprep.promptfile import load_prompt
    from dataprep.rewrite import messages

    port = free_port()
    server = start_server(port)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        rules = load_prompt("edit.txt").text
        texts = captions(args.rows)
        bodies = [build_payload(ChatRequest(messages=messages(rules, t), sampling=Sampling(max_new_tokens=64)), "bench-model") for t in texts]
        engine = load_engine(EngineConfig(engine="openai", model="bench-model", base_url=url, concurrency=args.concurrency))
        asyncio.run(bare_loop(url, bodies[:200], args.concurrency))  # warm-up: imports, connections
        stage_run(url, texts[:200], args.concurrency, engine, False)
        bare, stage = [], []
        for _ in range(args.repeat):
            bare.append(asyncio.run(bare_loop(url, bodies, args.concurrency)))
            stage.append(stage_run(url, texts, args.concurrency, engine, args.progress))
        engine.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    b, s = statistics.median(x for x, _ in bare), statistics.median(x for x, _ in stage)
    bc, sc = statistics.median(c for _, c in bare), statistics.median(c for _, c in stage)
    print(json.dumps({
        "rows": args.rows,
        "concurrency": args.concurrency,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "bare_httpx_rows_per_s": round(b, 1),
        "stage_rows_per_s": round(s, 1),
        "ratio": round(s / b, 3),
        # client CPU per row (this process, all threads): the rate each could reach
        # on a free core, robust against other jobs on a shared machine
        "bare_cpu_ms_per_row": round(bc, 3),
        "stage_cpu_ms_per_row": round(sc, 3),
        "cpu_ratio": round(bc / sc, 3),
        "bare_runs": [round(x, 1) for x, _ in bare],
        "stage_runs": [round(x, 1) for x, _ in stage],
        "load_average_1min": round(os.getloadavg()[0], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
