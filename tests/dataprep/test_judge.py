"""The judge stage: JSON parsing, the parse-and-retry policy with a scripted engine,
guided decoding on the wire (a loopback OpenAI-compatible judge), resume, and
what `batches --require-judge` and `stats` make of the verdicts."""

from __future__ import annotations

import datetime as dt
import json
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dataprep import stats
from dataprep.batches import BatchOptions, build_batches
from dataprep.engines import ChatRequest, ChatResult, EngineConfig
from dataprep.errors import ConfigError
from dataprep.engines.openai_engine import build_payload
from dataprep.judge import (
    JUDGEMENT_SCHEMA,
    JudgeInput,
    JudgeOptions,
    JudgementError,
    agreement,
    inputs_from_edits,
    judge_with_retries,
    parse_judgement,
    run_judge,
)
from dataprep.store import CAPTIONS_SCHEMA, EDITS_SCHEMA, JUDGE_SCHEMA, ShardWriter, read_table

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def answer(ok1=True, ok2=True, ok7=True, verdict=None) -> str:
    verdict = verdict or ("good" if ok1 and ok2 and ok7 else "bad")
    return json.dumps({"rule1": {"ok": ok1, "reason": "one object: dog -> fox"}, "rule2": {"ok": ok2, "reason": "a fox fits a field"}, "rule7": {"ok": ok7, "reason": "no attribute changed"}, "verdict": verdict})


# ------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "text",
    [
        answer(),
        "```json\n" + answer() + "\n```",
        "Here is my judgement:\n" + answer() + "\nI hope this helps.",
        answer().replace('"good"', '" Good "'),
    ],
)
def test_parse_accepts_the_object_alone_fenced_or_with_chatter(text):
    j = parse_judgement(text)
    assert j.verdict == "good" and j.ok == {"rule1": True, "rule2": True, "rule7": True}
    assert j.reasons["rule1"] == "one object: dog -> fox"


@pytest.mark.parametrize(
    "text, why",
    [
        ("The edit is fine.", "no JSON object"),
        ('{"rule1": {"ok": true, "reason": "x"}, "rule2": ', "invalid JSON"),
        ("[1, 2]", "no JSON object"),
        (json.dumps({"rule1": {"ok": True, "reason": "x"}, "rule2": {"ok": True, "reason": "x"}, "verdict": "good"}), '"rule7" is missing'),
        (answer().replace("true", '"yes"', 1), '"rule1.ok"'),
        (json.dumps({r: {"ok": True} for r in ("rule1", "rule2", "rule7")} | {"verdict": "good"}), '"rule1.reason"'),
        (answer(verdict="fine"), '"verdict" must be'),
        (answer(ok2=False, verdict="good"), "failed rules are ['rule2']"),  # contradicts itself
        (answer(verdict="bad"), "failed rules are none"),
    ],
)
def test_parse_rejects_with_a_reason(text, why):
    with pytest.raises(JudgementError, match=__import__("re").escape(why)):
        parse_judgement(text)


def test_bad_verdict_keeps_which_rules_failed():
    j = parse_judgement(answer(ok7=False))
    assert j.verdict == "bad" and j.ok["rule7"] is False and j.ok["rule1"] is True


# ------------------------------------------------------------ retry policy


PAIRS = {
    "A dog is lying on the grass.": "A fox is lying on the grass.",
    "A small wooden chair stands by a wall.": "A large metal table stands by a wall.",
    "A cat sits on a bench.": "A rocket sits on a bench.",
}


class ScriptedJudge:
    """Answers per source caption from a script (one entry per attempt); records every request."""

    name, model, revision, batch_size = "scripted", "scripted-judge", None, 8

    def __init__(self, script: dict[str, list[str]], fail_on: set[str] = frozenset()):
        self.script, self.fail_on = script, fail_on
        self.calls: list[list[ChatRequest]] = []
        self.seen: dict[str, int] = {}

    def generate(self, requests):
        self.calls.append(requests)
        out = []
        for r in requests:
            source = r.messages[1]["content"].split("\n")[0].removeprefix("Original: ")
            if source in self.fail_on:
                out.append(ChatResult.failed("generate_error: boom"))
                continue
            k = self.seen.get(source, 0)
            self.seen[source] = k + 1
            out.append(ChatResult(text=self.script[source][k], prompt_tokens=50, completion_tokens=40))
        return out

    def image_size(self):
        return None

    def close(self):
        pass


def items() -> list[JudgeInput]:
    return [JudgeInput(f"img/{i}", f"e{i}", True, s, t) for i, (s, t) in enumerate(PAIRS.items())]


def test_retry_asks_again_with_the_problem_until_an_answer_parses():
    dog, chair, cat = PAIRS
    eng = ScriptedJudge({dog: [answer()], chair: ["Looks fine to me.", "```json\n" + answer(ok7=False) + "\n```"], cat: ["{broken", "nope", "still not json"]})
    opts = JudgeOptions(seed=4)
    o_dog, o_chair, o_cat = judge_with_retries(eng, "JUDGE", items(), opts)
    assert (o_dog.judgement.verdict, o_dog.attempts, o_dog.error) == ("good", 1, None)
    assert (o_chair.judgement.verdict, o_chair.attempts, o_chair.judgement.ok["rule7"]) == ("bad", 2, False)
    assert o_cat.judgement is None and o_cat.attempts == 3 and o_cat.error.startswith("unparsable_judgement: ")
    assert o_cat.raw_output == "still not json"  # the last answer is kept for the record
    assert [len(c) for c in eng.calls] == [3, 2, 1]
    first, retry = eng.calls[0][1], eng.calls[1][0]
    assert first.sampling.greedy and len(first.messages) == 2
    assert (retry.sampling.temperature, retry.sampling.seed) == (0.7, 5)
    # the retry shows the model its unusable answer and what was wrong with it
    assert retry.messages[2] == {"role": "assistant", "content": "Looks fine to me."}
    assert "no JSON object" in retry.messages[3]["content"]
    assert all(r.json_schema == JUDGEMENT_SCHEMA for c in eng.calls for r in c)
    assert judge_with_retries(ScriptedJudge({dog: [answer()]}), "J", items()[:1], JudgeOptions(guided=False))[0].result.error is None


def test_engine_error_ends_the_attempts_of_that_pair_only():
    dog, chair, cat = PAIRS
    eng = ScriptedJudge({dog: [answer()], chair: [answer()], cat: []}, fail_on={cat})
    outcomes = judge_with_retries(eng, "J", items(), JudgeOptions())
    assert outcomes[2].error == "generate_error: boom" and outcomes[2].attempts == 1
    assert len(eng.calls) == 1 and all(o.judgement for o in outcomes[:2])


def test_options_fail_early_naming_the_flag():
    for kw, flag in (({"max_attempts": 0}, "--max-attempts"), ({"retry_temperature": 0}, "--retry-temperature"), ({"max_new_tokens": 4}, "--max-new-tokens")):
        with pytest.raises(ConfigError) as e:
            JudgeOptions(**kw)
        assert e.value.flag == flag


# ------------------------------------------------------------ engines: schema on the wire


def test_openai_payload_carries_the_schema_as_response_format():
    req = ChatRequest(messages=[{"role": "user", "content": "x"}], json_schema=JUDGEMENT_SCHEMA)
    rf = build_payload(req, "m")["response_format"]
    assert rf == {"type": "json_schema", "json_schema": {"name": "judgement", "schema": JUDGEMENT_SCHEMA, "strict": True}}
    assert "response_format" not in build_payload(ChatRequest(messages=[{"role": "user", "content": "x"}]), "m")


@pytest.mark.parametrize("api", ["structured_outputs", "guided_decoding"])
def test_vllm_guided_json_uses_the_api_the_installed_vllm_has(monkeypatch, api):
    from dataprep.engines.vllm_engine import guided_json_kwargs

    class Params:
        def __init__(self, json):
            self.json = json

    mod = types.ModuleType("vllm.sampling_params")
    setattr(mod, "StructuredOutputsParams" if api == "structured_outputs" else "GuidedDecodingParams", Params)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", mod)
    kw = guided_json_kwargs(JUDGEMENT_SCHEMA)
    assert list(kw) == [api] and kw[api].json == JUDGEMENT_SCHEMA
    assert guided_json_kwargs(None) == {}


# ------------------------------------------------------------ the stage on a store


def write_run(root: Path) -> None:
    """Captions of 6 images; edits: 4 passing (img/0..3), 1 checker-failed (img/4), 1 error row (img/5)."""
    dog, chair, cat = PAIRS
    sources = [dog, chair, cat, "A boat floats on a lake.", "A red car on a street.", "A lamp on a desk."]
    targets = [PAIRS[dog], PAIRS[chair], PAIRS[cat], "A swan floats on a lake.", "A blue car on a street.", None]
    with ShardWriter(root / "captions", CAPTIONS_SCHEMA, "r1") as w:
        for i, s in enumerate(sources):
            w.add(dict(image_id=f"img/{i}", image_uri=f"/data/{i}.png", caption=s, key=f"c{i}", created_at=T0))
    with ShardWriter(root / "edits", EDITS_SCHEMA, "r1") as w:
        for i, (s, t) in enumerate(zip(sources, targets)):
            err = "generate_error: x" if t is None else None
            w.add(dict(image_id=f"img/{i}", source=s, target=t, passed=i < 4, violations=[] if i < 4 else ["color_change"], key=f"e{i}", error=err, created_at=T0))


SCRIPT = {
    "A dog is lying on the grass.": [answer()],
    "A small wooden chair stands by a wall.": ["not json", answer(ok7=False)],
    "A cat sits on a bench.": [answer(ok2=False)],
    "A boat floats on a lake.": [answer()],
    "A red car on a street.": [answer(ok7=False)],
}


def test_stage_writes_rows_with_provenance_and_resumes_by_key(tmp_path):
    write_run(tmp_path)
    items_, left = inputs_from_edits(tmp_path / "edits")
    assert [i.image_id for i in items_] == ["img/0", "img/1", "img/2", "img/3"]
    assert dict(left) == {"edit_error_rows": 1, "edit_failed_rows (grade them with --all)": 1}
    eng = ScriptedJudge({k: list(v) for k, v in SCRIPT.items()})
    s = run_judge(items_, tmp_path, EngineConfig(model="scripted-judge"), engine=eng, progress=False, left_out=left)
    assert (s.done, s.n_failed, s.skipped) == (4, 0, 0)
    assert s.extra["judged good"] == "2 of 4 (50.0%)" and s.extra["parsed only after a retry"] == 1
    rows = {r["image_id"]: r for r in read_table(tmp_path / "judge", JUDGE_SCHEMA).to_pylist()}
    r1 = rows["img/1"]
    assert (r1["verdict"], r1["rule7_ok"], r1["attempts"], r1["edit_key"], r1["edit_passed"]) == ("bad", False, 2, "e1", True)
    assert r1["model"] == "scripted-judge" and r1["prompt_id"] == "judge.txt" and len(r1["prompt_sha256"]) == 64 and r1["key"]
    assert json.loads(r1["sampling"])["temperature"] == 0.7  # the kept answer came from a retry
    assert rows["img/2"]["rule2_ok"] is False and rows["img/0"]["rule1_reason"] == "one object: dog -> fox"
    manifest = json.loads((tmp_path / "judge" / "_manifest.json").read_text())
    assert manifest["counts"]["checker_pass.judge_good"] == 2 and manifest["counts"]["checker_pass.judge_bad"] == 2
    # rerun: every key has a good row, the model is not asked again
    again = ScriptedJudge({})
    s2 = run_judge(items_, tmp_path, EngineConfig(model="scripted-judge"), engine=again, progress=False)
    assert (s2.done, s2.skipped, again.calls) == (0, 4, [])
    # another judge model is another key: graded afresh, and the newest verdict speaks for the pair
    other = ScriptedJudge({k: [answer()] for k in SCRIPT})
    other.model = "other-judge"
    run_judge(items_, tmp_path, EngineConfig(model="other-judge"), engine=other, progress=False)
    assert agreement(tmp_path / "judge")["table"]["passed"] == {"good": 4, "bad": 0}


def test_unparsable_pairs_are_error_rows_that_the_next_run_retries(tmp_path):
    write_run(tmp_path)
    items_, _ = inputs_from_edits(tmp_path / "edits")
    eng = ScriptedJudge({k: ["no", "no", "no"] for k in SCRIPT})
    s = run_judge(items_[:1], tmp_path, EngineConfig(model="scripted-judge"), engine=eng, progress=False)
    assert s.n_failed == 1 and dict(s.failed) == {"unparsable_judgement": 1}
    fixed = ScriptedJudge({k: [answer()] for k in SCRIPT})
    s2 = run_judge(items_[:1], tmp_path, EngineConfig(model="scripted-judge"), engine=fixed, progress=False)
    assert (s2.done, s2.skipped) == (1, 0)
    t = read_table(tmp_path / "judge", JUDGE_SCHEMA)
    assert t.num_rows == 1 and t["verdict"].to_pylist() == ["good"]  # compaction kept the good row only


def test_all_grades_failing_pairs_and_stats_show_the_2x2_table(tmp_path):
    write_run(tmp_path)
    items_, _ = inputs_from_edits(tmp_path / "edits", all_edits=True)
    assert len(items_) == 5
    run_judge(items_, tmp_path, EngineConfig(model="scripted-judge"), JudgeOptions(all_edits=True), engine=ScriptedJudge({k: list(v) for k, v in SCRIPT.items()}), progress=False)
    a = agreement(tmp_path / "judge")
    assert a["table"] == {"passed": {"good": 2, "bad": 2}, "failed": {"good": 0, "bad": 1}}
    assert a["agreement"] == pytest.approx(3 / 5) and a["rule_failures"] == {"rule1": 0, "rule2": 1, "rule7": 2}
    st = stats.collect(tmp_path)
    assert st["judge"]["judged"] == 5
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(stats.render(st))
    text = console.export_text()
    assert "checker passed: judge good / bad" in text and "2 / 2" in text
    assert "checker failed: judge good / bad" in text and "0 / 1" in text and "60.0%" in text


def test_batches_require_judge_uses_only_judged_good_edits(tmp_path):
    write_run(tmp_path)
    items_, _ = inputs_from_edits(tmp_path / "edits")
    run_judge(items_, tmp_path, EngineConfig(model="scripted-judge"), engine=ScriptedJudge({k: list(v) for k, v in SCRIPT.items()}), progress=False)
    opts = dict(preset="custom", images=2, prompts=4, drop_last=False)
    plain = build_batches(tmp_path / "captions", tmp_path / "b1", BatchOptions(**opts), edits_dir=tmp_path / "edits")
    judged = build_batches(tmp_path / "captions", tmp_path / "b2", BatchOptions(**opts, require_judge=True), edits_dir=tmp_path / "edits")
    assert plain.edits_available == 4 and judged.edits_available == 2
    assert judged.skipped["edit_not_judged_good"] == 2

    def hard(folder):
        return {p for path in folder.glob("part-*.parquet") for row in pq.read_table(path).to_pylist() for p, k in zip(row["prompts"], row["prompt_kinds"]) if k == "hard_negative"}

    assert hard(tmp_path / "b2") == {PAIRS["A dog is lying on the grass."], "A swan floats on a lake."}
    assert PAIRS["A cat sits on a bench."] in hard(tmp_path / "b1")  # judged bad (rule 2): only without the flag
    with pytest.raises(ConfigError, match="--require-judge"):
        build_batches(tmp_path / "captions", tmp_path / "b3", BatchOptions(**opts, require_judge=True), edits_dir=tmp_path / "edits", judge_dir=tmp_path / "nothing")


# ------------------------------------------------------------ a real server on loopback, through the CLI


class JudgeServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge: a valid judgement only when asked for the schema (as a guided server)."""

    def log_message(self, *a):
        pass

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "judge-model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(body)
        guided = body.get("response_format", {}).get("type") == "json_schema"
        text = answer(ok2="rocket" not in body["messages"][1]["content"]) if guided else "Sure! The edit looks good."
        self._send(200, {"choices": [{"message": {"content": text}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 90, "completion_tokens": 60}})

    def _send(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def judge_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), JudgeServer)
    srv.seen = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_cli_judges_through_an_openai_server_with_response_format(tmp_path, judge_server):
    from dataprep.cli import app

    write_run(tmp_path)
    url = f"http://127.0.0.1:{judge_server.server_address[1]}/v1"
    base = ["judge", "--out", str(tmp_path), "--engine", "openai", "--base-url", url, "--model", "judge-model", "--max-attempts", "2"]
    # unguided: the server chats instead of answering JSON; every pair ends as an error row
    r = CliRunner().invoke(app, [*base, "--no-guided", "--strict"])
    assert r.exit_code == 1, r.output
    assert "unparsable_judgement" in r.output and all("response_format" not in b for b in judge_server.seen)
    judge_server.seen.clear()
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 0, r.output
    assert len(judge_server.seen) == 4 and all(b["response_format"]["json_schema"]["schema"] == JUDGEMENT_SCHEMA for b in judge_server.seen)
    assert agreement(tmp_path / "judge")["table"]["passed"] == {"good": 3, "bad": 1}
    r = CliRunner().invoke(app, ["stats", str(tmp_path)])
    assert r.exit_code == 0 and "checker and judge agree" in r.output


def test_cli_bad_configuration_exits_2_before_any_model(tmp_path):
    from dataprep.cli import app

    r = CliRunner().invoke(app, ["judge", "--out", str(tmp_path), "--model", "x"])
    assert r.exit_code == 2 and "no edit shards" in r.output and "--edits" in r.output
    write_run(tmp_path)
    r = CliRunner().invoke(app, ["judge", "--out", str(tmp_path), "--model", "x", "--max-attempts", "0"])
    assert r.exit_code == 2 and "--max-attempts" in r.output


def test_tiny_llama_through_the_transformers_engine_retries_then_records_errors(tmp_path, tiny_models):
    """The real model path: chat template with the retry's assistant turn, no schema support, error rows."""
    write_run(tmp_path)
    items_, _ = inputs_from_edits(tmp_path / "edits")
    cfg = EngineConfig(model=str(tiny_models / "llama"), device="cpu", batch_size="4")
    s = run_judge(items_[:2], tmp_path, cfg, JudgeOptions(max_attempts=2, max_new_tokens=16), progress=False)
    # a random model never writes a judgement: each pair was asked twice, then kept as an error row
    assert s.done == 0 and dict(s.failed) == {"unparsable_judgement": 2}
    rows = read_table(tmp_path / "judge", JUDGE_SCHEMA).to_pylist()
    assert [r["attempts"] for r in rows] == [2, 2] and all(r["engine"] == "transformers" and r["verdict"] is None for r in rows)


def test_flow_task_grades_the_run_through_the_server(tmp_path, judge_server):
    """flows.tasks.judge_task (called as a plain function): inputs, engine cache, stage."""
    from flows.tasks import judge_task, release_engines

    write_run(tmp_path)
    cfg = EngineConfig(engine="openai", model="judge-model", base_url=f"http://127.0.0.1:{judge_server.server_address[1]}")
    try:
        s = judge_task.fn(tmp_path, cfg, JudgeOptions(all_edits=True))
    finally:
        release_engines()
    assert s.done == 5 and s.extra["agrees with the checker"] == "3 of 5 (60.0%)"


def test_judge_has_the_wait_lock_flag_its_locked_folder_error_tells_you_to_pass(tmp_path, monkeypatch):
    """A judge run on a folder another run holds exits 2 with 'pass --wait-lock to queue behind it'.
    Before: judge had no --wait-lock ('No such option'); caption and rewrite had it."""
    import dataprep.judge as judge_mod
    from dataprep.cli import app

    assert "--wait-lock" in CliRunner().invoke(app, ["judge", "--help"], env={"COLUMNS": "200"}).output
    seen = {}
    monkeypatch.setattr(judge_mod, "run_model_stage", lambda *a, **kw: seen.update(kw))
    judge_mod.run_judge([], tmp_path, EngineConfig(model="m"), JudgeOptions(wait_lock=True))
    assert seen["wait_lock"] is True
