"""The openai engine against hostile and broken servers (real HTTP servers on loopback).

- No secret leaves the process: a server that echoes the key and the
  ``Authorization`` header back in error bodies, in malformed bodies and in
  its completions never gets them into a row, a manifest, a log line, the
  summary or the Prefect counts artifact.
- One bad response harms one request: every malformed body is that
  request's error row with a reason naming the field; the rest is kept.
- ``--timeout`` is a total deadline: a server trickling bytes cannot hold a
  request past it.
- ``--max-inflight`` bounds the request payloads (encoded images) alive at once.
- A fleet: least-loaded choice, a dead server set aside and probed again.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from dataprep.engines import ChatRequest, EngineConfig, Sampling, load_engine
from dataprep.engines import openai_engine
from dataprep.engines.openai_engine import Fleet, parse_response
from dataprep.engines.redact import redact

KEY = "zq9-opaque-credential-77f1c0de"  # not sk-shaped: only the exact-value rule can catch it


class Hostile(BaseHTTPRequestHandler):
    """``/v1/chat/completions`` answers according to the user message (``mode:...``)."""

    def log_message(self, *a):
        pass

    def do_GET(self):
        self._send(200, json.dumps({"object": "list", "data": [{"id": "served-model"}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(body)
        self.server.auth.append(self.headers.get("Authorization"))
        text = body["messages"][-1]["content"]
        if isinstance(text, list):  # an image request
            text = text[-1]["text"]
        headers = dict(self.headers.items())
        echo = f"request headers: {headers}; Authorization: {self.headers.get('Authorization')}"
        mode = text.split(":", 1)[1] if text.startswith("mode:") else "ok"
        answer = self.server.bodies.get(mode)
        if mode == "401":
            return self._send(401, json.dumps({"error": {"message": f"invalid key {KEY}", "headers": headers}}).encode())
        if mode == "500":
            return self._send(500, f"upstream failed.\n{echo}".encode())
        if mode == "shape":
            return self._send(200, json.dumps({"you_sent": headers}).encode())
        if mode == "nonjson":
            return self._send(200, f"<html>{echo}</html>".encode(), "text/html")
        if mode == "content":
            return self._send(200, completion(f"A dog. {echo}"))
        if mode == "trickle":
            return self._trickle(completion("A dog."))
        if answer is not None:
            return self._send(200, answer)
        self._send(200, completion(f"echo {text}"))

    def _send(self, status, data: bytes, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _trickle(self, data: bytes):
        """Headers at once, then one byte every 0.1 s: never idle long enough for a per-read timeout."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            for i in range(len(data)):
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:  # the client gave up: what the deadline is for
            self.close_connection = True


def completion(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"content": text}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}).encode()


@pytest.fixture
def hostile():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    srv.daemon_threads = True
    srv.seen, srv.bodies, srv.auth = [], {}, []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def ask(*texts, image=None):
    return [ChatRequest(messages=[{"role": "user", "content": t}], image=image, sampling=Sampling(max_new_tokens=4)) for t in texts]


# ------------------------------------------------------------ secrets


def test_redact_removes_keys_headers_and_url_credentials():
    text = (
        f'key {KEY}; "Authorization": "Bearer abc.def-123"; '
        "authorization: Basic dXNlcjpwYXNz, x-api-key=k3y-v4lue; sk-proj-ABCDEFGH12345678 hf_abcdefghijklmnopqrstuv; "
        "http://alice:pw0rd@host:8000/v1?api_key=QQQQ&model=m"
    )
    out = redact(text, [KEY])
    for secret in (KEY, "abc.def-123", "dXNlcjpwYXNz", "k3y-v4lue", "ABCDEFGH12345678", "abcdefghijklmnopqrstuv", "pw0rd", "QQQQ"):
        assert secret not in out
    assert "model=m" in out and "host:8000/v1" in out  # only the credentials go
    assert redact("a dog on the grass, 3 cats", [KEY, "", None]) == "a dog on the grass, 3 cats"


def test_no_secret_reaches_rows_manifest_logs_summary_or_artifacts(hostile, tmp_path, monkeypatch, caplog):
    """A server that echoes the key and the Authorization header everywhere it can."""
    from rich.console import Console

    from dataprep import store
    from dataprep.rewrite import RewriteInput, RewriteOptions, run_rewrite
    from dataprep.runtime import print_summary
    from flows.artifacts import counts_rows

    monkeypatch.setenv("LEAKY_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    cfg = EngineConfig(engine="openai", model="served-model", base_url=url(hostile), api_key_env="LEAKY_KEY", max_retries=1, concurrency=4)
    engine = load_engine(cfg)
    engine.backoff_base_s = 0.001
    modes = ["401", "500", "shape", "nonjson", "content", "ok"]
    items = [RewriteInput(image_id=f"img/{m}", text=f"mode:{m}") for m in modes]
    summary = run_rewrite(items, tmp_path, cfg, RewriteOptions(max_attempts=1, max_new_tokens=8), engine=engine, progress=False)
    engine.close()
    assert hostile.auth and set(hostile.auth) == {f"Bearer {KEY}"}  # the key went out ...
    rows = {r["image_id"]: r for r in store.read_table(tmp_path / "edits", store.EDITS_SCHEMA).to_pylist()}
    assert len(rows) == len(modes)
    # ... and every error is still an accurate reason, only without the key
    assert rows["img/401"]["error"].startswith("http_401: ") and "invalid key [REDACTED]" in rows["img/401"]["error"]
    assert rows["img/500"]["error"].startswith("http_500: ") and "2 attempts" in rows["img/500"]["error"]
    assert rows["img/shape"]["error"].startswith("bad_response: no 'choices'")
    assert rows["img/nonjson"]["error"].startswith("bad_response: body is not JSON")
    assert rows["img/content"]["error"] is None and rows["img/content"]["raw_output"].startswith("A dog.")
    assert rows["img/ok"]["error"] is None
    out = io.StringIO()
    print_summary(summary, Console(file=out, width=200))
    everything = [
        json.dumps(list(rows.values()), default=str),
        *(p.read_text() for p in (tmp_path / "edits").iterdir() if p.suffix == ".json"),
        caplog.text,
        out.getvalue(),
        json.dumps(counts_rows(summary), default=str),
        repr(engine),
    ]
    for text in everything:
        assert KEY not in text and KEY[:12] not in text  # not even a truncated piece
        assert re.search(r"Bearer (?!\[REDACTED\])\S", text) is None
    assert "[REDACTED]" in rows["img/500"]["error"]  # the reason stays readable, only the key is gone
    manifest = store.read_manifest(tmp_path / "edits")
    assert manifest["config"]["engine"]["api_key_env"] == "LEAKY_KEY"
    # a key in the URL (user:password@ or ?api_key=) never reaches a manifest either
    creds = EngineConfig(engine="openai", model="m", base_url=f"http://user:{KEY}@h:8000/v1,http://h2:8000/v1?api_key={KEY}").public_dict()
    assert KEY not in json.dumps(creds) and "h2:8000/v1" in creds["base_url"]


# ------------------------------------------------------------ malformed bodies


MALFORMED = {
    # body -> the reason must name this
    "[]": "the body is an array",
    '"just text"': "the body is a string",
    "null": "the body is null",
    '{"id": "x"}': "no 'choices' field",
    '{"error": {"message": "overloaded"}}': "the server sent an error",
    '{"choices": "abc"}': "'choices' is a string",
    '{"choices": {}}': "'choices' is an object",
    '{"choices": []}': "'choices' is empty",
    '{"choices": [null]}': "choices[0] is null",
    '{"choices": [5]}': "choices[0] is an integer",
    '{"choices": [{}]}': "choices[0].message is missing",
    '{"choices": [{"message": "hi"}]}': "choices[0].message is a string",
    '{"choices": [{"message": {}}]}': "choices[0].message.content is missing",
    '{"choices": [{"message": {"content": null}}]}': "choices[0].message.content is null",
    '{"choices": [{"message": {"content": 5}}]}': "choices[0].message.content is an integer",
    '{"choices": [{"message": {"content": ["a"]}}]}': "choices[0].message.content is an array",
    '{"choices": [{"message": {"content": "a"}, "finish_reason": 3}]}': "choices[0].finish_reason is an integer",
    '{"choices": [{"message": {"content": "a"}}], "usage": []}': "'usage' is an array",
    '{"choices": [{"message": {"content": "a"}}], "usage": "many"}': "'usage' is a string",
    '{"choices": [{"message": {"content": "a"}}], "usage": {"prompt_tokens": "abc"}}': "usage.prompt_tokens is a string",
    '{"choices": [{"message": {"content": "a"}}], "usage": {"completion_tokens": 2.5}}': "usage.completion_tokens is a number",
    '{"choices": [{"message": {"content": "a"}}], "usage": {"completion_tokens": -1}}': "usage.completion_tokens is an integer",
    '{"choices": [{"message": {"content": "a"}}], "usage": {"prompt_tokens": true}}': "usage.prompt_tokens is a boolean",
}


@pytest.mark.parametrize("body", list(MALFORMED))
def test_parse_response_names_the_bad_field(body):
    res = parse_response(json.loads(body))
    assert res.finish_reason == "error" and res.text == ""
    assert res.error.startswith("bad_response: ") and MALFORMED[body] in res.error


def test_each_malformed_body_is_one_error_row_and_the_batch_is_kept(hostile):
    hostile.bodies = {f"m{i}": body.encode() for i, body in enumerate(MALFORMED)}
    hostile.bodies["gzip"] = b"not really gzip"
    modes = [f"m{i}" for i in range(len(MALFORMED))]
    texts = [f"mode:{m}" for m in modes] + ["good 1", "good 2"]
    eng = load_engine(EngineConfig(engine="openai", model="served-model", base_url=url(hostile), concurrency=4, max_retries=0))
    out = eng.generate(ask(*texts))
    eng.close()
    assert len(out) == len(texts)
    for m, body, res in zip(modes, MALFORMED, out):
        assert res.finish_reason == "error" and MALFORMED[body] in res.error, (body, res.error)
    assert [r.text for r in out[-2:]] == ["echo good 1", "echo good 2"] and all(r.error is None for r in out[-2:])


def test_timeout_is_a_total_deadline_against_a_trickling_server(hostile):
    """Each byte arrives within the per-read timeout; only a total deadline ends the request."""
    eng = load_engine(EngineConfig(engine="openai", model="served-model", base_url=url(hostile), timeout_s=1.0, max_retries=0))
    out = eng.generate(ask("mode:trickle", "fine"))
    eng.close()
    assert out[0].finish_reason == "error" and out[0].error.startswith("timeout: ")
    assert out[1].text == "echo fine"  # the other request of the batch is unharmed


# ------------------------------------------------------------ bounded payloads


class _Tracked(dict):
    """A payload dict that a WeakSet can see (plain dicts cannot be weakly referenced)."""

    __hash__ = object.__hash__  # by identity: each payload counts once
    __eq__ = object.__eq__


def test_max_inflight_bounds_payloads_alive_at_once(hostile, monkeypatch):
    alive: "weakref.WeakSet[_Tracked]" = weakref.WeakSet()
    peak = [0]
    real = openai_engine.build_payload

    def tracked(req, model):
        body = _Tracked(real(req, model))
        alive.add(body)
        peak[0] = max(peak[0], len(alive))
        return body

    monkeypatch.setattr(openai_engine, "build_payload", tracked)
    img = Image.new("RGB", (64, 48), (10, 20, 30))
    eng = load_engine(EngineConfig(engine="openai", model="served-model", base_url=url(hostile), concurrency=2, max_inflight=3))
    out = eng.generate(ask(*[f"describe {i}" for i in range(24)], image=img))
    assert [r.error for r in out] == [None] * 24 and len(hostile.seen) == 24
    assert 1 <= peak[0] <= 3  # 24 requests, never more than --max-inflight payloads at once
    assert len(alive) == 0  # nothing held between calls
    eng.close()


# ------------------------------------------------------------ fleets (pure bookkeeping)


def test_fleet_picks_least_loaded_sets_dead_servers_aside_and_probes_them_again():
    f = Fleet(["a", "b", "c"], probe_s=2.0, probe_cap_s=8.0)
    a, b, c = f.servers
    a.inflight, b.inflight, c.inflight = 3, 1, 2
    assert f.pick(0.0) is b
    b.inflight = 3
    assert f.pick(0.0) is c
    idle = Fleet(["a", "b"])  # ties go round-robin: an idle fleet is filled evenly
    assert {idle.pick(0.0).base for _ in range(2)} == {"a", "b"}
    f.down(c, now=10.0)  # c dropped a connection
    assert not c.up(11.0) and f.pick(11.0) is not c
    assert f.pick(12.0) is c  # probe time: c is eligible again (and least loaded)
    f.down(c, now=12.0)
    assert c.down_until == 16.0  # a second failure in a row doubles the wait ...
    f.down(c, now=16.0)
    f.down(c, now=16.0)
    assert c.down_until == 24.0  # ... up to the cap
    f.ok(c)
    assert c.up(16.0) and c.failures == 0
    for s in f.servers:
        f.down(s, now=100.0)
    assert f.pick(100.5) is min(f.servers, key=lambda s: s.down_until)  # all down: the first due back


def test_fleet_moves_work_off_a_dead_server(hostile, tmp_path):
    """Two loopback servers; one stops listening after the engine started: every request succeeds on the other."""
    other = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    other.daemon_threads = True
    other.seen, other.bodies, other.auth = [], {}, []
    t = threading.Thread(target=other.serve_forever, daemon=True)
    t.start()
    eng = load_engine(EngineConfig(engine="openai", model="served-model", base_url=f"{url(hostile)},{url(other)}", concurrency=4, max_retries=0))
    first = eng.generate(ask(*[f"a{i}" for i in range(8)]))
    assert all(r.error is None for r in first) and hostile.seen and other.seen  # both took work
    other.shutdown()
    other.server_close()
    seen_before = len(hostile.seen)
    out = eng.generate(ask(*[f"b{i}" for i in range(12)]))  # max_retries=0: only failover can save them
    assert [r.text for r in out] == [f"echo b{i}" for i in range(12)]
    assert len(hostile.seen) - seen_before == 12
    dead = next(s for s in eng.fleet.servers if s.base == url(other))
    assert dead.failures >= 1  # set aside after its refused connections
    eng.close()


def test_cli_takes_repeated_and_comma_base_urls_and_checks_max_inflight(hostile, tmp_path):
    from typer.testing import CliRunner

    from dataprep import store
    from dataprep.cli import app

    other = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    other.daemon_threads = True
    other.seen, other.bodies, other.auth = [], {}, []
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        src = tmp_path / "caps.jsonl"
        src.write_text("".join(json.dumps({"id": f"c{i}", "caption": f"A dog number {i}."}) + "\n" for i in range(6)))
        base = ["rewrite", "--input", str(src), "--out", str(tmp_path / "run"), "--engine", "openai", "--model", "served-model", "--max-attempts", "1"]
        res = CliRunner().invoke(app, base + ["--base-url", url(hostile), "--base-url", url(other) + "," + url(hostile), "--concurrency", "2", "--max-inflight", "2"])
        assert res.exit_code == 0, res.output
        assert store.read_manifest(tmp_path / "run" / "edits")["config"]["engine"]["base_url"] == f"{url(hostile)},{url(other)}"
        rows = store.read_table(tmp_path / "run" / "edits", store.EDITS_SCHEMA).to_pylist()
        assert len(rows) == 6 and all(r["error"] is None for r in rows) and len(hostile.seen) + len(other.seen) == 6
        bad = CliRunner().invoke(app, base + ["--base-url", url(hostile), "--max-inflight", "0"])
        assert bad.exit_code == 2 and "--max-inflight" in bad.output
    finally:
        other.shutdown()
        other.server_close()


class Slow(Hostile):
    """Holds each completion 50 ms and records the most requests it had open at once."""

    def do_POST(self):
        srv = self.server
        with srv.lock:
            srv.open += 1
            srv.peak = max(srv.peak, srv.open)
        try:
            time.sleep(0.05)
            super().do_POST()
        finally:
            with srv.lock:
                srv.open -= 1


def test_concurrency_bounds_requests_on_the_wire_over_all_connection_pools():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    srv.daemon_threads = True
    srv.seen, srv.bodies, srv.auth, srv.lock, srv.open, srv.peak = [], {}, [], threading.Lock(), 0, 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        eng = load_engine(EngineConfig(engine="openai", model="served-model", base_url=url(srv), concurrency=12))
        assert len(eng.generate(ask("warm"))) == 1 and len(eng._clients) == 2  # 12 connections in pools of 8: two pools
        out = eng.generate(ask(*[f"q{i}" for i in range(60)]))
        eng.close()
        assert [r.text for r in out] == [f"echo q{i}" for i in range(60)]
        assert 2 <= srv.peak <= 12
    finally:
        srv.shutdown()
        srv.server_close()


def test_caption_stage_holds_images_no_larger_than_the_engine_sends(hostile, tmp_path):
    """The decoders shrink a big photo to the 1024 side the engine sends (a 4000x3000 photo
    padded to a square is 48 MB decoded, 3 MB at 1024); smaller images are never enlarged."""
    import base64

    from dataprep.caption import CaptionOptions, run_caption
    from dataprep.sources import folder

    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (2500, 1200), (200, 10, 10)).save(d / "big.png")
    Image.new("RGB", (300, 200), (10, 200, 10)).save(d / "small.png")
    cfg = EngineConfig(engine="openai", model="served-model", base_url=url(hostile))
    eng = load_engine(cfg)
    held, real = [], eng.generate

    def generate(requests):
        held.extend(r.image.size for r in requests)
        return real(requests)

    eng.generate = generate
    s = run_caption(folder(d), tmp_path / "run", cfg, CaptionOptions(workers=0, max_new_tokens=4), engine=eng, progress=False)
    eng.close()
    assert s.done == 2 and sorted(held) == [(300, 300), (1024, 1024)]
    sent = sorted(Image.open(io.BytesIO(base64.b64decode(b["messages"][-1]["content"][0]["image_url"]["url"].split(",", 1)[1]))).size for b in hostile.seen)
    assert sent == [(300, 300), (1024, 1024)]  # what the server gets is what it got before


def test_a_base_url_with_another_engine_is_a_config_error():
    """--base-url with the default transformers engine was silently ignored (the local model ran)."""
    from dataprep.engines import EngineConfig
    from dataprep.errors import ConfigError

    with pytest.raises(ConfigError, match="--engine openai"):
        EngineConfig(engine="transformers", model="m", base_url="http://127.0.0.1:9/v1")
    EngineConfig(engine="openai", model="m", base_url="http://127.0.0.1:9/v1")
