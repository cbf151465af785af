"""The rewrite stage: tiny random Llama end to end, the retry policy with a scripted engine."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dataprep.engines import ChatResult, EngineConfig, load_engine
from dataprep.errors import ConfigError
from dataprep.rewrite import KEPT_FAILING, RewriteInput, RewriteOptions, inputs_from_captions, inputs_from_file, rewrite_with_retries, run_rewrite
from dataprep.store import CAPTIONS_SCHEMA, EDITS_SCHEMA, ShardWriter, read_table

DOG = "A dog is lying on the grass."
CAT = "A cat sits on a wooden bench in a park."
CAR = "A red car is parked on the street."
SCRIPT = {
    DOG: ["A fox is lying on the grass."],  # passes at once
    CAT: ["Here is the modified text: An owl sits on a wooden bench in a park.", "An owl sits on a wooden swing in a park.", "An owl sits on a wooden bench in a park."],
    CAR: ["A blue car is parked on the street.", "A blue car is parked on the road.", "A green car is parked on the street."],  # never passes
}


class ScriptedEngine:
    """Returns the scripted output for (caption, attempt); records every request."""

    name, model, revision, batch_size = "scripted", "scripted-llm", None, 8

    def __init__(self, script=SCRIPT, fail_on: set[str] = frozenset()):
        self.script, self.fail_on = script, fail_on
        self.calls: list[list] = []
        self.seen: dict[str, int] = {}

    def generate(self, requests):
        self.calls.append(requests)
        out = []
        for r in requests:
            system, user = r.messages
            assert system["role"] == "system" and user["role"] == "user"
            if user["content"] in self.fail_on:
                out.append(ChatResult.failed("generate_error: boom"))
                continue
            k = self.seen.get(user["content"], 0)
            self.seen[user["content"]] = k + 1
            out.append(ChatResult(text=self.script[user["content"]][k], prompt_tokens=10, completion_tokens=5))
        return out

    def image_size(self):
        return None

    def close(self):
        pass


def inputs(*texts: str) -> list[RewriteInput]:
    return [RewriteInput(image_id=f"img/{i}", text=t, image_uri=f"/data/{i}.png") for i, t in enumerate(texts)]


def edits(out: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in read_table(out / "edits", EDITS_SCHEMA).to_pylist()}


# ------------------------------------------------------------ retry policy


def test_retry_policy_keeps_the_first_passing_attempt_else_the_last():
    eng = ScriptedEngine()
    opts = RewriteOptions(seed=10)
    rules = "RULES"
    dog, cat, car = rewrite_with_retries(eng, rules, [DOG, CAT, CAR], opts)
    assert (dog.verdict.passed, dog.attempts, dog.target) == (True, 1, "A fox is lying on the grass.")
    assert (cat.verdict.passed, cat.attempts, cat.target) == (True, 3, SCRIPT[CAT][2])
    assert (car.verdict.passed, car.attempts, car.target) == (False, 3, SCRIPT[CAR][2])  # the last, not the first
    assert car.verdict.violations == ("color_change",)
    assert dog.first_passed and not cat.first_passed
    # attempt 1 greedy with all three captions; retries only for the failing ones,
    # sampled at 0.7 with a new seed each time
    assert [len(c) for c in eng.calls] == [3, 2, 2]
    samplings = [c[0].sampling for c in eng.calls]
    assert [s.temperature for s in samplings] == [0.0, 0.7, 0.7]
    assert [s.seed for s in samplings] == [10, 11, 12]
    assert all(r.messages[0]["content"] == rules for c in eng.calls for r in c)
    assert cat.sampling.seed == 12 and dog.sampling.greedy


def test_retry_policy_never_edits_output_into_passing():
    eng = ScriptedEngine({CAT: ['"An owl sits on a wooden bench in a park."'] * 3})
    (o,) = rewrite_with_retries(eng, "R", [CAT], RewriteOptions(max_attempts=3))
    assert not o.verdict.passed and o.verdict.violations == ("quoted",)
    assert o.target == o.raw_output == '"An owl sits on a wooden bench in a park."'  # quotes kept, as generated
    assert o.attempts == 3


def test_one_attempt_means_greedy_only_and_engine_errors_stop_retries():
    eng = ScriptedEngine(fail_on={DOG})
    dog, car = rewrite_with_retries(eng, "R", [DOG, CAR], RewriteOptions(max_attempts=1))
    assert len(eng.calls) == 1
    assert dog.error and dog.verdict is None
    assert car.attempts == 1 and not car.verdict.passed
    eng = ScriptedEngine(fail_on={DOG})
    dog, car = rewrite_with_retries(eng, "R", [DOG, CAR], RewriteOptions(max_attempts=3))
    assert dog.attempts == 1 and dog.error  # an engine error is not retried in this run
    assert car.attempts == 3


@pytest.mark.parametrize(
    "kw,flag",
    [({"max_attempts": 0}, "--max-attempts"), ({"retry_temperature": 0.0}, "--retry-temperature"), ({"temperature": -1.0}, "--temperature"), ({"top_p": 0.0}, "--top-p"), ({"rows_per_shard": 0}, "--rows-per-shard")],
)
def test_bad_options_name_the_flag(kw, flag):
    with pytest.raises(ConfigError) as exc:
        RewriteOptions(**kw)
    assert exc.value.flag == flag


# ------------------------------------------------------------ the stage with a scripted engine


def test_stage_writes_rows_counts_rules_and_skips_caption_errors(tmp_path):
    items = inputs(DOG, CAT, CAR) + [RewriteInput("img/bad", None, error="decode_error: truncated"), RewriteInput("img/empty", "  ")]
    s = run_rewrite(items, tmp_path, EngineConfig(model="scripted-llm"), RewriteOptions(), engine=ScriptedEngine(), progress=False)
    rows = edits(tmp_path)
    assert set(rows) == {"img/0", "img/1", "img/2", "img/empty"}  # the caption error row is skipped
    assert s.done == 3 and s.failed == {"missing_caption": 1}
    assert s.extra["caption error rows (skipped)"] == 1 and s.extra[KEPT_FAILING] == 1
    assert s.extra["passed the rules"].startswith("2 of 3") and s.extra["passed on attempt 1 (greedy)"].startswith("1 of 3")
    dog, car = rows["img/0"], rows["img/2"]
    assert (dog["source"], dog["target"], dog["passed"], dog["attempts"]) == (DOG, "A fox is lying on the grass.", True, 1)
    assert (dog["source_span"], dog["target_span"], dog["violations"]) == ("dog", "fox", [])
    assert dog["image_uri"] == "/data/0.png" and dog["prompt_id"] == "edit.txt" and len(dog["prompt_sha256"]) == 64
    assert json.loads(dog["sampling"])["temperature"] == 0.0 and dog["seed"] == 0
    assert (car["passed"], car["attempts"], car["violations"]) == (False, 3, ["color_change"])
    assert json.loads(car["sampling"])["temperature"] == 0.7 and car["seed"] == 2  # the kept (last) attempt's settings
    assert rows["img/empty"]["error"].startswith("missing_caption")
    manifest = json.loads(next((tmp_path / "edits").glob("*manifest.json")).read_text())
    assert manifest["counts"]["passed"] == 2 and manifest["counts"]["violations.color_change"] == 1
    assert manifest["counts"]["caption_errors_skipped"] == 1


def test_resume_skips_finished_rows_and_more_attempts_retry_only_failing_ones(tmp_path):
    opts = RewriteOptions(max_attempts=1)
    run_rewrite(inputs(DOG, CAR), tmp_path, EngineConfig(model="m"), opts, engine=ScriptedEngine(), progress=False)
    again = ScriptedEngine()
    s = run_rewrite(inputs(DOG, CAR), tmp_path, EngineConfig(model="m"), opts, engine=again, progress=False)
    assert (s.done, s.skipped, again.calls) == (0, 2, [])
    # store.new_run_id() has 1 s resolution and compaction orders shards by run
    # id, so a superseding run must start in a later second
    time.sleep(1.1)
    more = ScriptedEngine()
    s = run_rewrite(inputs(DOG, CAR), tmp_path, EngineConfig(model="m"), RewriteOptions(max_attempts=3), engine=more, progress=False)
    assert (s.done, s.skipped) == (1, 1)
    assert {r.messages[1]["content"] for c in more.calls for r in c} == {CAR}
    # continued after the attempt already made: attempts 2 and 3, sampled, seeds 1 and 2
    assert [(c[0].sampling.temperature, c[0].sampling.seed) for c in more.calls] == [(0.7, 1), (0.7, 2)]
    rows = edits(tmp_path)
    assert len(rows) == 2 and rows["img/1"]["attempts"] == 3  # the retried row replaced the old one
    forced = ScriptedEngine()
    s = run_rewrite(inputs(DOG, CAR), tmp_path, EngineConfig(model="m"), RewriteOptions(max_attempts=3, force=True), engine=forced, progress=False)
    assert s.done == 2 and len(edits(tmp_path)) == 2


def test_same_caption_on_two_images_keeps_both_rows(tmp_path):
    items = [RewriteInput("a", DOG), RewriteInput("b", DOG)]
    script = {DOG: ["A fox is lying on the grass."] * 2}
    run_rewrite(items, tmp_path, EngineConfig(model="m"), RewriteOptions(), engine=ScriptedEngine(script), progress=False)
    assert set(edits(tmp_path)) == {"a", "b"}


def test_missing_rules_file_is_a_config_error_before_the_model_loads(tmp_path):
    with pytest.raises(ConfigError) as exc:
        run_rewrite(inputs(DOG), tmp_path, EngineConfig(model=str(tmp_path / "no-model")), RewriteOptions(rules_file=str(tmp_path / "nope.txt")))
    assert exc.value.flag == "--rules"
    assert not (tmp_path / "edits").exists()


# ------------------------------------------------------------ inputs


def write_captions(folder: Path, rows: list[dict]) -> None:
    base = {"key": "k", "error": None}
    with ShardWriter(folder, CAPTIONS_SCHEMA, "20260101T000000-test") as w:
        for i, r in enumerate(rows):
            w.add(base | {"key": f"k{i}"} | r)


def test_inputs_from_captions_and_files(tmp_path):
    write_captions(tmp_path / "captions", [{"image_id": "div2k/0001", "caption": DOG, "image_uri": "u1"}, {"image_id": "div2k/0002", "caption": None, "error": "decode_error: x"}])
    got = inputs_from_captions(tmp_path / "captions")
    assert [(i.image_id, i.text, i.image_uri, i.error) for i in got] == [("div2k/0001", DOG, "u1", None), ("div2k/0002", None, None, "decode_error: x")]
    with pytest.raises(ConfigError) as exc:
        inputs_from_captions(tmp_path / "missing")
    assert exc.value.flag == "--captions"
    f = tmp_path / "caps.jsonl"
    f.write_text(json.dumps({"name": "x", "text": DOG}) + "\n" + json.dumps({"name": "y", "text": CAT}) + "\n")
    got = inputs_from_file(f, text_column="text", id_column="name")
    assert [(i.image_id, i.text) for i in got] == [("x", DOG), ("y", CAT)]
    assert [i.image_id for i in inputs_from_file(f, text_column="text")] == ["caps/000000", "caps/000001"]
    with pytest.raises(ConfigError) as exc:
        inputs_from_file(f)  # no "caption" column
    assert exc.value.flag == "--text-column"


# ------------------------------------------------------------ tiny random Llama, loaded by path


@pytest.fixture(scope="module")
def llama_cfg(tiny_models) -> EngineConfig:
    return EngineConfig(model=str(tiny_models / "llama"), batch_size="4")


def test_tiny_llama_end_to_end_and_second_run_generates_nothing(tmp_path, llama_cfg):
    engine = load_engine(llama_cfg)
    try:
        opts = RewriteOptions(max_new_tokens=8, max_attempts=2)
        items = inputs(DOG, CAT, CAR)
        s = run_rewrite(items, tmp_path, llama_cfg, opts, engine=engine, progress=False)
        rows = edits(tmp_path)
        assert s.done == 3 and s.n_failed == 0 and len(rows) == 3
        for r in rows.values():
            assert r["error"] is None and r["model"] == llama_cfg.model and r["engine"] == "transformers"
            assert r["raw_output"] is not None and r["completion_tokens"] > 0 and r["prompt_tokens"] > 0
            assert 1 <= r["attempts"] <= 2
            # random weights break the rules; a failing row used every attempt
            assert r["passed"] or r["attempts"] == 2
            assert r["passed"] == (r["violations"] == [])
        again = run_rewrite(items, tmp_path, llama_cfg, opts, engine=engine, progress=False)
        assert (again.done, again.skipped) == (0, 3)
        assert len(edits(tmp_path)) == 3
    finally:
        engine.close()


def test_cli_rewrites_a_caption_store_with_the_tiny_llama(tmp_path, llama_cfg):
    write_captions(tmp_path / "captions", [{"image_id": "div2k/0001", "caption": DOG}, {"image_id": "div2k/0002", "caption": CAT}])
    args = ["rewrite", "--out", str(tmp_path), "--model", llama_cfg.model, "--max-new-tokens", "8", "--max-attempts", "1", "--device", "cpu"]
    res = CliRunner().invoke(app_(), args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "passed the rules" in res.output
    assert set(edits(tmp_path)) == {"div2k/0001", "div2k/0002"}
    bad = CliRunner().invoke(app_(), args + ["--max-attempts", "0"])
    assert bad.exit_code == 2 and "--max-attempts" in bad.output


def app_():
    from dataprep.cli import app

    return app


def test_quantized_model_is_another_model_for_resume(tmp_path):
    """--quantize 4bit loads other weights: full-precision edits must not be skipped as done."""
    run_rewrite(inputs(DOG), tmp_path, EngineConfig(model="scripted-llm"), RewriteOptions(), engine=ScriptedEngine(), progress=False)
    q = run_rewrite(inputs(DOG), tmp_path, EngineConfig(model="scripted-llm", quantize="4bit"), RewriteOptions(), engine=ScriptedEngine(), progress=False)
    assert (q.done, q.skipped) == (1, 0) and len(read_table(tmp_path / "edits", EDITS_SCHEMA)) == 2
