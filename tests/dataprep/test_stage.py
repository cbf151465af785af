"""The model-stage runner on a toy stage: resume, one row per key, failures by reason, the manifest.

The toy stage is the smallest real one: a record, its three functions and
nothing else, run by :func:`dataprep.stage.run_model_stage` with a fake
engine. Each test states a rule the runner owns for every stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pytest

from dataprep.engines import ChatRequest, ChatResult, EngineConfig, Sampling
from dataprep.promptfile import Prompt
from dataprep.stage import Generated, ModelId, ModelStage, Preparation, Tally, Task, run_model_stage
from dataprep.store import PROVENANCE_FIELDS, content_key, read_table, sha256_text

SCHEMA = pa.schema([pa.field("word", pa.string()), pa.field("upper", pa.string()), *PROVENANCE_FIELDS])
SAMPLING = Sampling(max_new_tokens=8)


@dataclass(frozen=True)
class Word:
    text: str


class Upper:
    """A fake engine: upper-cases the user message; "boom" fails, "long" hits the token limit."""

    name, model, revision, batch_size = "fake", "fake-model", None, 2

    def __init__(self):
        self.batches: list[list[str]] = []
        self.closed = False

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        words = [r.messages[-1]["content"] for r in requests]
        self.batches.append(words)
        return [
            ChatResult.failed("server_error: 500 from the fake") if w == "boom" else ChatResult(text=w.upper(), finish_reason="length" if w == "long" else "stop")
            for w in words
        ]

    def close(self):
        self.closed = True


class _Letters(Tally):
    def __init__(self):
        self.letters = 0

    def add(self, task, out):
        self.letters += len(out.result.text)

    def extra(self):
        return {"letters written": self.letters}

    def counts(self):
        return {"letters": self.letters}


@dataclass
class UpperStage(ModelStage[Word, Generated]):
    opts: dict
    prompt: Prompt

    name = "upper"
    folder = "upper"
    schema = SCHEMA

    @property
    def sampling(self) -> Sampling:
        return SAMPLING

    def key(self, item: Word, model: ModelId) -> str:
        return content_key(self.name, sha256_text(item.text), model.model, model.revision, self.prompt.sha256, SAMPLING.to_dict(), None)

    def input_error(self, item: Word) -> str | None:
        return None if item.text else "missing_text: the input is empty"

    def infer(self, engine, tasks: list[Task[Word]]) -> list[Generated]:
        results = engine.generate([ChatRequest(messages=[{"role": "user", "content": t.input.text}], sampling=SAMPLING) for t in tasks])
        return [Generated(r, SAMPLING, r.error) for r in results]

    def row(self, task: Task[Word], out: Generated | None) -> dict:
        return {"word": task.input.text, "upper": out.result.text if out is not None else None}

    def tally(self) -> Tally:
        return _Letters()

    def manifest_config(self) -> dict:
        return {"options": self.opts, "prompt_id": self.prompt.prompt_id, "prompt_sha256": self.prompt.sha256}


PROMPT = Prompt("upper.txt", "Upper-case it.", sha256_text("Upper-case it."))


def run(tmp_path, words, engine=None, **kw):
    engine = engine or Upper()
    summary = run_model_stage(UpperStage({}, PROMPT), [Word(w) for w in words], tmp_path, EngineConfig(model="fake-model"), engine=engine, progress=False, **kw)
    return summary, engine


def rows(tmp_path) -> dict[str, dict]:
    return {r["word"]: r for r in read_table(tmp_path / "upper", SCHEMA).to_pylist()}


def manifest(tmp_path) -> dict:
    return json.loads((tmp_path / "upper" / "_manifest.json").read_text())


def test_rows_get_the_stage_columns_and_provenance_in_batches_of_the_engine(tmp_path):
    s, engine = run(tmp_path, ["a", "b", "c"])
    assert (s.done, s.skipped, s.n_failed) == (3, 0, 0)
    assert engine.batches == [["a", "b"], ["c"]]  # batch_size 2, input order
    r = rows(tmp_path)["b"]
    assert r["upper"] == "B" and r["error"] is None and r["model"] == "fake-model" and r["prompt_id"] == "upper.txt"
    assert r["sampling"] == SAMPLING.to_json() and r["run_id"] == s.run_id and r["finish_reason"] == "stop"
    assert not engine.closed  # a given engine belongs to the caller


def test_resume_skips_done_keys_and_retries_error_rows(tmp_path):
    run(tmp_path, ["a", "boom", ""])
    s, engine = run(tmp_path, ["a", "boom", "", "d"])
    assert (s.done, s.skipped) == (1, 1) and dict(s.failed) == {"server_error": 1, "missing_text": 1}
    assert engine.batches == [["boom", "d"]]  # "a" is done; the empty input never reaches the model
    assert len(rows(tmp_path)) == 4  # retried keys keep one row each (compaction)
    forced, engine = run(tmp_path, ["a"], force=True)
    assert (forced.done, forced.skipped) == (1, 0) and engine.batches == [["a"]] and len(rows(tmp_path)) == 4


def test_a_key_met_twice_is_done_once(tmp_path):
    s, engine = run(tmp_path, ["a", "a", "b", "a"])
    assert (s.done, s.skipped) == (2, 2) and engine.batches == [["a", "b"]]
    assert len(read_table(tmp_path / "upper", SCHEMA)) == 2


def test_failures_are_counted_by_reason_and_written_as_error_rows(tmp_path):
    s, _ = run(tmp_path, ["boom", "", "x", "long"])
    assert dict(s.failed) == {"server_error": 1, "missing_text": 1} and (s.done, s.truncated) == (2, 1)
    r = rows(tmp_path)
    assert r["boom"]["error"] == "server_error: 500 from the fake" and r["boom"]["finish_reason"] == "error"
    assert r[""]["error"].startswith("missing_text:") and r[""]["upper"] is None and r[""]["sampling"] == SAMPLING.to_json()


def test_manifest_has_one_shape_with_the_stage_counts_and_engine(tmp_path):
    s, _ = run(tmp_path, ["ab", "boom", "long"])
    m = manifest(tmp_path)
    assert m["stage"] == "upper" and m["run_id"] == s.run_id and m["finished_at"]
    assert m["counts"] == {"done": 2, "skipped": 0, "failed": 1, "left_out": 0, "truncated": 1, "letters": 6}
    assert m["failures"] == {"server_error": 1}
    assert m["config"]["engine"]["model"] == "fake-model" and m["config"]["prompt_id"] == "upper.txt"
    assert m["config"]["executor"]["executor"] == "local"
    assert s.extra == {"letters written": 6}


def test_an_error_mid_run_keeps_finished_rows_and_writes_the_manifest(tmp_path):
    class Dies(Upper):
        def generate(self, requests):
            if len(self.batches) == 1:
                raise ConnectionError("server went away")
            return super().generate(requests)

    with pytest.raises(ConnectionError):
        run(tmp_path, ["a", "b", "c", "d"], engine=Dies(), rows_per_shard=1)
    assert set(rows(tmp_path)) == {"a", "b"} and manifest(tmp_path)["counts"]["done"] == 2
    s, engine = run(tmp_path, ["a", "b", "c", "d"])
    assert (s.done, s.skipped) == (2, 2) and engine.batches == [["c", "d"]]


def test_an_engine_the_runner_loads_is_closed_also_after_an_error(tmp_path, monkeypatch):
    import dataprep.engines

    loaded: list[Upper] = []
    monkeypatch.setattr(dataprep.engines, "load_engine", lambda cfg: loaded.append(Upper()) or loaded[-1])
    s = run_model_stage(UpperStage({}, PROMPT), [Word("a")], tmp_path, EngineConfig(model="fake-model"), progress=False)
    assert s.done == 1 and loaded[0].closed
    with pytest.raises(AttributeError):  # a record the stage cannot key
        run_model_stage(UpperStage({}, PROMPT), [None], tmp_path, EngineConfig(model="fake-model"), progress=False)
    assert loaded[1].closed


@dataclass
class PreparedUpperStage(UpperStage):
    """The caption shape: the key is known only once an input is read, so tasks come from preparation."""

    prepares = True

    def preparation(self, model: ModelId, done: frozenset[str], engine) -> Preparation:
        def prepare(item: Word) -> Task[Word]:
            key = self.key(item, model)
            return Task(item, key, error=self.input_error(item), skipped=key in done)

        return Preparation(prepare=prepare)


def test_a_preparing_stage_resumes_dedupes_and_counts_the_same_way(tmp_path):
    def run_prepared(words, engine=None):
        engine = engine or Upper()
        return run_model_stage(PreparedUpperStage({}, PROMPT), [Word(w) for w in words], tmp_path, EngineConfig(model="fake-model"), engine=engine, progress=False), engine

    s, engine = run_prepared(["a", "", "a", "boom"])
    assert (s.done, s.skipped) == (1, 1) and dict(s.failed) == {"missing_text": 1, "server_error": 1}
    assert len(read_table(tmp_path / "upper", SCHEMA)) == 3  # "a" once
    s, engine = run_prepared(["a", "b"])
    assert (s.done, s.skipped) == (1, 1) and engine.batches == [["b"]]
