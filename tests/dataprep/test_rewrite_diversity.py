"""Diversity steering of the rewrite stage (--max-target-share) with a scripted engine."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dataprep import diversity
from dataprep.engines import ChatResult, EngineConfig
from dataprep.errors import ConfigError
from dataprep.rewrite import RewriteInput, RewriteOptions, rewrite_with_retries, run_rewrite, steer_targets
from dataprep.store import EDITS_SCHEMA, read_table


def caption(i: int) -> str:
    return f"A dog sits on bench {i}."


class AttemptEngine:
    """Output per (caption, attempt); the attempt is read from the request id ("id#k")."""

    name, model, revision = "scripted", "scripted-llm", None

    def __init__(self, outputs: dict[int, str], batch_size: int = 8):
        self.outputs, self.batch_size = outputs, batch_size  # attempt -> animal
        self.calls: list[list[str]] = []

    def generate(self, requests):
        self.calls.append([r.request_id for r in requests])
        out = []
        for r in requests:
            text = r.messages[1]["content"]
            k = int(r.request_id.rsplit("#", 1)[1])
            out.append(ChatResult(text=text.replace("dog", self.outputs[k]), prompt_tokens=3, completion_tokens=3))
        return out

    def image_size(self):
        return None

    def close(self):
        pass


OPTS = RewriteOptions(max_attempts=3, max_target_share=0.5, share_min_edits=2)


def test_over_share_rewrites_are_retried_in_input_order():
    eng = AttemptEngine({1: "cat", 2: "fox", 3: "owl"})
    captions = [caption(i) for i in range(6)]
    first = rewrite_with_retries(eng, "R", captions, OPTS)
    counts = diversity.Diversity()
    final = steer_targets(eng, "R", captions, first, OPTS, counts)
    # i0, i1: fewer than share_min_edits counted; i2: cat 2/2 > 0.5 -> fox;
    # i3: cat 2/3 -> fox; i4: cat 2/4 is not over -> cat; i5: cat 3/5 -> fox
    assert [o.verdict.target_span for o in final] == ["cat", "cat", "fox", "fox", "cat", "fox"]
    assert [o.attempts for o in final] == [1, 1, 2, 2, 1, 2]
    assert all(o.verdict.passed for o in final)
    assert final[2].note.startswith("target_share: 'cat' was 100.0% of 2 passing edits") and final[4].note is None
    assert counts.targets == {"cat": 3, "fox": 3}
    # one rule round, then one steering round for the four speculative retries,
    # then none: the second walk finds every attempt it needs
    assert len(eng.calls) == 2 and eng.calls[1] == ["2#2", "3#2", "4#2", "5#2"]
    # retries are sampled: retry temperature, a new seed per attempt
    assert final[2].sampling.temperature == 0.7 and final[2].sampling.seed == 1


def test_a_rewrite_that_stays_over_is_kept_with_a_note_never_dropped():
    eng = AttemptEngine({1: "cat", 2: "cat", 3: "cat"})
    captions = [caption(i) for i in range(4)]
    final = steer_targets(eng, "R", captions, rewrite_with_retries(eng, "R", captions, OPTS), OPTS, diversity.Diversity())
    assert [o.verdict.target_span for o in final] == ["cat"] * 4
    assert [o.attempts for o in final] == [1, 1, 3, 3]
    assert "kept: no other passing target in 3 attempts" in final[2].note
    assert final[2].sampling.seed == 0  # the kept output is attempt 1's


def run(tmp_path, captions, opts, batch_size=8, limit=None):
    eng = AttemptEngine({1: "cat", 2: "fox", 3: "owl"}, batch_size)
    items = [RewriteInput(f"img/{i:02d}", t) for i, t in enumerate(captions)]
    s = run_rewrite(items[:limit] if limit else items, tmp_path, EngineConfig(model="scripted-llm"), opts, engine=eng, progress=False)
    rows = sorted(read_table(tmp_path / "edits", EDITS_SCHEMA).to_pylist(), key=lambda r: r["image_id"])
    return s, rows


def test_stage_is_deterministic_across_batch_sizes_and_resumes_exactly(tmp_path):
    captions = [caption(i) for i in range(9)]
    opts = RewriteOptions(max_attempts=2, max_target_share=0.4, share_min_edits=2, rows_per_shard=2)
    s, whole = run(tmp_path / "a", captions, opts)
    targets = [r["target_span"] for r in whole]
    assert len(whole) == 9 and all(r["passed"] for r in whole)
    assert targets.count("fox") > 0 and targets.count("cat") > 0
    assert s.extra["replaced for --max-target-share"] == targets.count("fox")
    noted = [r for r in whole if r["note"]]
    assert {r["target_span"] for r in noted if "kept:" in r["note"]} <= {"cat", "fox"}
    # batch size 1 and 3 give the same rows
    for bs in (1, 3):
        _, other = run(tmp_path / f"b{bs}", captions, opts, batch_size=bs)
        assert [r["target_span"] for r in other] == targets
    # killed after 4 captions (simulated by --limit), then resumed: the count
    # starts from the rows already in the store, so the result is the same
    run(tmp_path / "c", captions, opts, limit=4)
    s2, resumed = run(tmp_path / "c", captions, opts)
    assert s2.skipped == 4 and [r["target_span"] for r in resumed] == targets
    assert [r["note"] for r in resumed] == [r["note"] for r in whole]


def test_steering_off_changes_nothing(tmp_path):
    _, rows = run(tmp_path, [caption(i) for i in range(5)], RewriteOptions(max_attempts=2))
    assert [r["target_span"] for r in rows] == ["cat"] * 5 and all(r["note"] is None for r in rows)


@pytest.mark.parametrize("kw,flag", [({"max_target_share": 0.0}, "--max-target-share"), ({"max_target_share": 1.5}, "--max-target-share"), ({"max_target_share": 0.2, "share_min_edits": 0}, "--share-min-edits")])
def test_bad_share_options_name_the_flag(kw, flag):
    with pytest.raises(ConfigError) as exc:
        RewriteOptions(**kw)
    assert exc.value.flag == flag


def test_cli_flag_reaches_the_options(tmp_path):
    from dataprep.cli import app

    res = CliRunner().invoke(app, ["rewrite", "--out", str(tmp_path), "--model", str(tmp_path / "no-model"), "--max-target-share", "2"])
    assert res.exit_code == 2 and "--max-target-share" in res.output
