"""The openai engine: request building, retries against a scripted server, and
both stages end to end against a real ``transformers serve`` on loopback,
including a server killed mid-run and a resume that completes every row once."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from dataprep.engines import ChatRequest, EngineConfig, Sampling, load_engine
from dataprep.errors import ConfigError
from dataprep.engines.openai_engine import api_base, backoff_delay, build_payload, parse_response

# ------------------------------------------------------------ pure request building


def test_api_base_normalises_and_rejects():
    assert api_base("http://h:8000") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(ConfigError, match="--base-url"):
        api_base("h:8000")


def test_payload_text_and_sampling():
    req = ChatRequest(messages=[{"role": "system", "content": "rules"}, {"role": "user", "content": "a dog"}], sampling=Sampling(temperature=0.7, top_p=0.9, max_new_tokens=33, seed=5))
    body = build_payload(req, "org/Model-8B")
    assert body["model"] == "org/Model-8B"
    assert body["messages"] == [{"role": "system", "content": "rules"}, {"role": "user", "content": "a dog"}]
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (33, 0.7, 0.9, 5)
    greedy = build_payload(ChatRequest(messages=[{"role": "user", "content": "x"}], sampling=Sampling(top_p=0.5)), "m")
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0 and "seed" not in greedy


def test_payload_image_is_png_data_url_in_last_user_turn():
    img = Image.new("RGB", (3000, 1500), (9, 200, 30))
    req = ChatRequest(messages=[{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "describe"}], image=img)
    msgs = build_payload(req, "m")["messages"]
    assert msgs[0]["content"] == "first"  # only the last user turn carries the image
    part_img, part_text = msgs[2]["content"]
    assert part_text == {"type": "text", "text": "describe"}
    url = part_img["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert back.format == "PNG" and back.size == (1024, 512)  # capped on the wire, aspect kept
    assert back.getpixel((10, 10)) == (9, 200, 30)
    assert req.messages[2]["content"] == "describe"  # the request itself is untouched


def test_parse_response():
    ok = parse_response({"choices": [{"message": {"content": " hi "}, "finish_reason": "length"}], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    assert (ok.text, ok.finish_reason, ok.prompt_tokens, ok.completion_tokens, ok.error) == ("hi", "length", 7, 3, None)
    bad = parse_response({"error": "boom"})
    assert bad.error.startswith("bad_response") and bad.finish_reason == "error"
    # a 200 around an aborted generation is an error row, not a good row with finish_reason stop
    for reason in ("abort", "content_filter"):
        cut = parse_response({"choices": [{"message": {"content": "A dog on the"}, "finish_reason": reason}]})
        assert cut.finish_reason == "error" and reason in cut.error and cut.text == ""
    assert parse_response({"choices": [{"message": {"content": "A dog."}}]}).finish_reason == "stop"  # no reason given


def test_backoff_grows_is_capped_and_honours_retry_after():
    rng = random.Random(0)
    d = [backoff_delay(a, 0.5, 8.0, rng=rng) for a in range(8)]
    assert 0.25 <= d[0] <= 0.5 and 2.0 <= d[3] <= 4.0 and max(d) <= 8.0
    assert backoff_delay(0, 0.5, 30.0, retry_after="3") == 3.0
    assert backoff_delay(2, 0.5, 30.0, retry_after="Wed, 21 Oct 2015 07:28:00 GMT") <= 2.0


# ------------------------------------------------------------ a scripted server (retries, auth)


class Scripted(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions from a per-server script of status codes."""

    def log_message(self, *a):  # keep test output clean
        pass

    def do_GET(self):
        srv = self.server
        if srv.key and self.headers.get("Authorization") != f"Bearer {srv.key}":
            return self._send(401, {"error": "bad key"})
        self._send(200, {"object": "list", "data": [{"id": "served-model"}]})

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["model"] != "served-model":  # what vllm serve answers for a model it does not serve
            return self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
        with srv.lock:
            srv.seen.append(body)
            status = srv.script.pop(0) if srv.script else 200
        if status == "drop":  # close the connection without an answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if status != 200:
            return self._send(status, {"error": "try later"}, {"Retry-After": "0"} if status == 429 else {})
        text = body["messages"][-1]["content"]
        self._send(200, {"choices": [{"message": {"content": f"echo {text}"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 4, "completion_tokens": 2}})

    def _send(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    srv.script, srv.seen, srv.lock, srv.key = [], [], threading.Lock(), None
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def scripted_engine(srv, **kw):
    cfg = EngineConfig(engine="openai", model="served-model", base_url=f"http://127.0.0.1:{srv.server_address[1]}", concurrency=1, **kw)
    eng = load_engine(cfg)
    eng.backoff_base_s = 0.001
    return eng


def ask(*texts):
    return [ChatRequest(messages=[{"role": "user", "content": t}], sampling=Sampling(max_new_tokens=4)) for t in texts]


def test_retries_429_5xx_and_dropped_connections_then_succeeds(scripted):
    scripted.script = [429, 503, "drop", 500]
    out = scripted_engine(scripted, max_retries=5).generate(ask("a"))
    assert out[0].error is None and out[0].text == "echo a"
    assert len(scripted.seen) == 5  # 4 failures + 1 success


def test_request_that_keeps_failing_becomes_error_result_and_others_survive(scripted):
    scripted.script = [503, 503, 503]  # the first request uses up its 3 attempts; the second gets 200s
    out = scripted_engine(scripted, max_retries=2).generate(ask("a", "b"))
    assert out[0].finish_reason == "error" and out[0].error.startswith("http_503") and "3 attempts" in out[0].error
    assert out[1].text == "echo b" and out[1].error is None


def test_client_errors_are_not_retried(scripted):
    scripted.script = [400]
    out = scripted_engine(scripted, max_retries=5).generate(ask("a"))
    assert out[0].error.startswith("http_400") and len(scripted.seen) == 1


def test_api_key_from_env_is_sent_and_never_exposed(scripted, monkeypatch):
    scripted.key = "sk-secret-123"
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    eng = scripted_engine(scripted, api_key_env="MY_KEY")
    assert eng.generate(ask("a"))[0].text == "echo a"
    assert "sk-secret" not in repr(eng) and "sk-secret" not in json.dumps(eng.cfg.public_dict())
    monkeypatch.setenv("MY_KEY", "wrong")
    with pytest.raises(ConfigError, match="--api-key-env"):
        scripted_engine(scripted, api_key_env="MY_KEY")
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(ConfigError, match="MY_KEY is not set"):
        scripted_engine(scripted, api_key_env="MY_KEY")


def test_unknown_model_and_unreachable_server_fail_at_construction(scripted):
    with pytest.raises(ConfigError, match="--model"):
        load_engine(EngineConfig(engine="openai", model="other", base_url=f"http://127.0.0.1:{scripted.server_address[1]}/v1"))
    port = free_port()
    with pytest.raises(ConfigError, match="--base-url") as e:
        load_engine(EngineConfig(engine="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1"))
    assert f"127.0.0.1:{port}" in str(e.value)


# ------------------------------------------------------------ a real transformers serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path) -> tuple[subprocess.Popen, str]:
    """`transformers serve` on a free loopback port; models load on demand by path."""
    from transformers.utils.import_utils import is_serve_available

    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if not is_serve_available() or exe is None:
        pytest.skip('transformers serve needs its serving extra: pip install "transformers[serving]"')
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([exe, "serve", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    pytest.fail(f"transformers serve did not answer /health in 120 s: {log.read_text()[-2000:]}")


def kill_during_second_batch(engine, doomed: subprocess.Popen) -> None:
    """Wrap ``engine.generate`` so that ``doomed`` is killed while the second batch is in flight."""
    real_generate, calls, killer = engine.generate, [], []

    def generate(requests):
        calls.append(len(requests))
        if len(calls) == 2:
            killer.append(threading.Timer(0.05, stop_server, args=(doomed,)))
            killer[0].start()
        out = real_generate(requests)
        if killer:
            killer[0].join()
        return out

    engine.generate = generate


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and nothing else
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url = start_server(tmp_path_factory.mktemp("serve") / "serve.log")
    yield url
    stop_server(proc)


def caption_refs(samples_dir, tmp_path, n_extra=10):
    from dataprep.sources import div2k, folder

    gen = tmp_path / "gen"
    gen.mkdir()
    for i in range(n_extra):
        Image.new("RGB", (40 + i, 30), (20 * i, 100, 200 - 10 * i)).save(gen / f"img{i:02d}.png")
    return div2k(samples_dir) + folder(gen)


def openai_cfg(url, model, **kw):
    return EngineConfig(engine="openai", model=str(model), base_url=url, **kw)


def read_rows(out: Path, stage: str = "captions"):
    from dataprep import store

    schema = {"captions": store.CAPTIONS_SCHEMA, "edits": store.EDITS_SCHEMA}[stage]
    return store.read_table(out / stage, schema).to_pylist()


@pytest.mark.server
def test_caption_through_transformers_serve(server, tiny_models, samples_dir, tmp_path):
    from dataprep.caption import CaptionOptions, run_caption

    refs = caption_refs(samples_dir, tmp_path, n_extra=4)
    cfg = openai_cfg(server, tiny_models / "llava", concurrency=4)
    summary = run_caption(refs, tmp_path / "run", cfg, CaptionOptions(max_new_tokens=6, workers=0), progress=False)
    rows = read_rows(tmp_path / "run")
    assert summary.done == len(refs) == 6 and summary.n_failed == 0
    assert sorted(r["image_id"] for r in rows) == sorted(r.image_id for r in refs)
    for r in rows:
        assert r["engine"] == "openai" and r["model"] == str(tiny_models / "llava")
        assert r["caption"] and r["error"] is None and r["completion_tokens"] >= 1
        # the image reached the model: LLaVA's prompt is longer than the text alone
        assert r["prompt_tokens"] > 25
    from dataprep.store import read_manifest

    manifest = read_manifest(tmp_path / "run" / "captions")
    assert manifest["config"]["engine"]["base_url"] == server


@pytest.mark.server
def test_pipeline_cli_runs_both_stages_through_the_server(server, tiny_models, samples_dir, tmp_path, monkeypatch):
    """`dataprep pipeline div2k --engine openai`: captions by the tiny LLaVA, rewrites by the tiny Llama, one server."""
    from typer.testing import CliRunner

    from dataprep.cli import app

    monkeypatch.setenv("TINY_KEY", "unused-by-transformers-serve")
    args = ["pipeline", "div2k", "--data", str(samples_dir), "--out", str(tmp_path / "run"), "--engine", "openai", "--base-url", server,
            "--api-key-env", "TINY_KEY", "--concurrency", "4", "--caption-model", str(tiny_models / "llava"), "--rewrite-model", str(tiny_models / "llama"),
            "--caption-max-new-tokens", "6", "--rewrite-max-new-tokens", "8", "--max-attempts", "2", "--workers", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    caps, edits = read_rows(tmp_path / "run"), read_rows(tmp_path / "run", "edits")
    assert sorted(r["image_id"] for r in caps) == sorted(r["image_id"] for r in edits) == ["div2k/0001", "div2k/0002"]
    assert all(r["engine"] == "openai" and r["caption"] and r["error"] is None for r in caps)
    by_id = {r["image_id"]: r for r in caps}
    for e in edits:
        assert e["engine"] == "openai" and e["model"] == str(tiny_models / "llama") and e["error"] is None
        assert e["source"] == by_id[e["image_id"]]["caption"] and 1 <= e["attempts"] <= 2 and e["completion_tokens"] >= 1
    from dataprep.store import read_manifest

    for stage in ("captions", "edits"):  # the key's value is never written, only the variable's name
        text = (tmp_path / "run" / stage).joinpath(next(p.name for p in (tmp_path / "run" / stage).iterdir() if "manifest" in p.name)).read_text()
        assert "unused-by-transformers-serve" not in text and read_manifest(tmp_path / "run" / stage)["config"]["engine"]["api_key_env"] == "TINY_KEY"
    # a second run finds every row done: nothing is generated again
    before = {(r["image_id"], r["run_id"]) for r in caps + edits}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert {(r["image_id"], r["run_id"]) for r in read_rows(tmp_path / "run") + read_rows(tmp_path / "run", "edits")} == before


@pytest.mark.server
def test_server_killed_mid_run_then_resume_completes_each_row_once(server, tiny_models, samples_dir, tmp_path):
    """Rows of a killed server are error rows, never lost; a resume fills exactly those."""
    from dataprep.caption import CaptionOptions, run_caption

    refs = caption_refs(samples_dir, tmp_path)  # 12 images
    opts = CaptionOptions(max_new_tokens=6, workers=0)
    doomed, url = start_server(tmp_path / "doomed.log")
    engine = load_engine(openai_cfg(url, tiny_models / "llava", concurrency=2, batch_size="3", max_retries=1))
    engine.backoff_base_s = 0.01
    kill_during_second_batch(engine, doomed)
    try:
        first = run_caption(refs, tmp_path / "run", openai_cfg(url, tiny_models / "llava"), opts, engine=engine, progress=False)
    finally:
        stop_server(doomed)
    rows = read_rows(tmp_path / "run")
    assert sorted(r["image_id"] for r in rows) == sorted(r.image_id for r in refs)  # every row recorded once
    good = {r["image_id"]: r for r in rows if r["error"] is None}
    bad = [r for r in rows if r["error"] is not None]
    assert len(good) >= 3 and len(bad) >= 6  # batch 1 finished before the kill; batches 3-4 ran after it
    assert all(r["caption"] for r in good.values())
    assert all(r["finish_reason"] == "error" and r["error"].split(":")[0] in ("connection_error", "timeout", "http_500", "http_502", "http_503") for r in bad)
    assert first.done == len(good) and first.n_failed == len(bad)

    # resume against a live server (same model path -> same keys)
    second = run_caption(refs, tmp_path / "run", openai_cfg(server, tiny_models / "llava", concurrency=4), opts, progress=False)
    assert (second.skipped, second.done, second.n_failed) == (len(good), len(bad), 0)
    rows = read_rows(tmp_path / "run")
    assert sorted(r["image_id"] for r in rows) == sorted(r.image_id for r in refs)
    assert all(r["error"] is None and r["caption"] for r in rows)
    for r in rows:  # rows finished before the kill were kept, not regenerated
        if r["image_id"] in good:
            assert r["run_id"] == good[r["image_id"]]["run_id"] and r["key"] == good[r["image_id"]]["key"]


@pytest.mark.server
def test_a_model_the_server_has_not_loaded_yet_is_accepted(server, tiny_models):
    """transformers serve lists only loaded models; the 1-token probe tells 'not loaded' from 'not served'."""
    llava = load_engine(openai_cfg(server, tiny_models / "llava"))
    assert llava.generate(ask("hello"))[0].error is None  # now the server lists llava
    llama = load_engine(openai_cfg(server, tiny_models / "llama"))  # not listed, but servable
    assert llama.generate(ask("a dog"))[0].error is None


@pytest.mark.server
def test_pipeline_sends_rewrites_to_the_rewrite_server(server, scripted, tiny_models, samples_dir, tmp_path):
    """--rewrite-base-url: captions from one server, rewrites from another (one model per vllm serve)."""
    from dataprep.caption import CaptionOptions
    from dataprep.pipeline import run_pipeline
    from dataprep.rewrite import RewriteOptions
    from dataprep.sources import div2k

    rewrite_url = f"http://127.0.0.1:{scripted.server_address[1]}/v1"
    s = run_pipeline(div2k(samples_dir), tmp_path, EngineConfig(engine="openai", base_url=server), str(tiny_models / "llava"), "served-model",
                     CaptionOptions(max_new_tokens=6, workers=0), RewriteOptions(max_new_tokens=8, max_attempts=1), rewrite_base_url=rewrite_url, progress=False)
    captions = {r["image_id"]: r["caption"] for r in read_rows(tmp_path)}
    assert s.caption.done == 2 and sorted(m["messages"][-1]["content"] for m in scripted.seen) == sorted(captions.values())
    edits = read_rows(tmp_path, "edits")
    assert {e["image_id"] for e in edits} == set(captions) and all(e["raw_output"] == f"echo {captions[e['image_id']]}" for e in edits)
    with pytest.raises(ConfigError, match="--rewrite-base-url"):
        run_pipeline(div2k(samples_dir), tmp_path, EngineConfig(device="cpu"), "a", "b", rewrite_base_url=rewrite_url, progress=False)


@pytest.mark.server
def test_fleet_server_killed_mid_run_every_row_completes_once_through_the_other(server, tiny_models, tmp_path):
    """--base-url A,B: B is killed while a batch is in flight; its requests move to A, and
    every rewrite row is written once and good, although no request may be retried (max_retries=0)."""
    from dataprep.rewrite import RewriteInput, RewriteOptions, run_rewrite

    items = [RewriteInput(image_id=f"cap/{i:02d}", text=f"A {c} dog sits on a {s} bench.") for i, (c, s) in enumerate((c, s) for c in ("brown", "black", "white", "small") for s in ("wooden", "stone", "metal", "red"))]
    doomed, doomed_url = start_server(tmp_path / "doomed.log")
    cfg = openai_cfg(f"{server},{doomed_url}", tiny_models / "llama", concurrency=4, batch_size="4", max_retries=0)
    engine = load_engine(cfg)
    kill_during_second_batch(engine, doomed)  # B dies with a batch in flight
    try:
        summary = run_rewrite(items, tmp_path / "run", cfg, RewriteOptions(max_attempts=1, max_new_tokens=8), engine=engine, progress=False)
    finally:
        stop_server(doomed)
        engine.close()
    rows = read_rows(tmp_path / "run", "edits")
    assert sorted(r["image_id"] for r in rows) == [it.image_id for it in items]  # each row exactly once
    assert all(r["error"] is None and r["completion_tokens"] >= 1 for r in rows), [r["error"] for r in rows if r["error"]]
    assert (summary.done, summary.n_failed) == (len(items), 0)
    a, b = engine.fleet.servers
    assert a.sent > 0 and b.sent > 0  # both servers took work (least-loaded spreads it) ...
    assert b.failures >= 1  # ... and B's dropped or refused connections set it aside


@pytest.mark.parametrize("bad,flag", [
    (dict(concurrency=0), "--concurrency"), (dict(timeout_s=0.0), "--timeout"), (dict(max_retries=-1), "--max-retries"),
    (dict(max_inflight=0), "--max-inflight"), (dict(tensor_parallel_size=0), "--tensor-parallel-size"),
    (dict(gpu_memory_utilization=1.5), "--gpu-memory-utilization"),
])
def test_engine_config_refuses_bad_engine_values_when_built(bad, flag):
    """Every engine flag is checked where the config is built, whichever engine is picked.
    Before: --max-retries -1 was silently taken as 0, and the others were checked only by the
    engine that uses them (so `--engine vllm --tensor-parallel-size 0` said 'vllm is not installed')."""
    with pytest.raises(ConfigError) as err:
        EngineConfig(model="m", **bad)
    assert err.value.flag == flag
