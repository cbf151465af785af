"""The judge stage: an instruction model grades edit pairs under ``OUT/judge``.

The rule checker (:mod:`dataprep.rules`) sees string properties. Three rules
of ``prompts/edit.txt`` need judgement it cannot give: rule 1 (one meaningful
concept), rule 2 ("significantly different but contextually appropriate") and
rule 7 (one feature at a time, also inside a replaced phrase). An LLM grades
each passing pair (``--all``: every checked pair) with ``prompts/judge.txt`` and
answers one JSON object::

    {"rule1": {"ok": bool, "reason": str}, "rule2": {...}, "rule7": {...}, "verdict": "good" | "bad"}

Decoding is constrained to that schema where the engine can (vLLM structured
outputs, OpenAI ``response_format``); every answer is parsed and validated
anyway, and one that does not parse is asked again (attempt k > 1 samples at
``retry_temperature`` with seed ``seed + k - 1`` and tells the model what was
wrong). An answer still unusable after ``max_attempts`` is an error row, which
the next run retries. Rows follow ``JUDGE_SCHEMA``; keys, shards, manifest,
resume and compaction work as in the other model stages.

:func:`judged_good` and :func:`agreement` read the store for ``batches
--require-judge`` and ``stats``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow.parquet as pq

from dataprep.engines import ChatRequest, ChatResult, Engine, EngineConfig, Sampling
from dataprep.errors import ConfigError, Reason, failure
from dataprep.executors import ExecutorConfig
from dataprep.promptfile import Prompt, load_prompt
from dataprep.rewrite import DEFAULT_MODEL  # the judge is an instruction model, by default the rewriter's
from dataprep.runtime import MAX_NEW_TOKENS_HELP, RETRY_TEMPERATURE_HELP, StageOptions, StageSummary, at_least, option, wait_lock_help
from dataprep.stage import ModelId, ModelStage, Tally, Task, run_model_stage
from dataprep.store import EDITS_SCHEMA, JUDGE_SCHEMA, check_shards, content_key, iter_rows, sha256_text, shard_paths

STAGE = "judge"
RULES = ("rule1", "rule2", "rule7")  # the numbers of prompts/edit.txt the judge grades
GOOD, BAD = "good", "bad"

# The answer's JSON schema, sent to engines that constrain decoding.
JUDGEMENT_SCHEMA: dict[str, Any] = {
    "title": "judgement",
    "type": "object",
    "properties": {
        **{
            r: {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}, "reason": {"type": "string"}},
                "required": ["ok", "reason"],
                "additionalProperties": False,
            }
            for r in RULES
        },
        "verdict": {"type": "string", "enum": [GOOD, BAD]},
    },
    "required": [*RULES, "verdict"],
    "additionalProperties": False,
}


# ------------------------------------------------------------ parsing (pure)


class JudgementError(ValueError):
    """An answer that is not a usable judgement; the message says why (sent back on retry)."""


@dataclass(frozen=True)
class Judgement:
    ok: dict[str, bool]
    reasons: dict[str, str]
    verdict: str  # good | bad


_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def parse_judgement(text: str) -> Judgement:
    """The judgement in a model answer; raises JudgementError naming the problem.

    Accepts the object alone, in a Markdown code fence, or after a short
    preamble (the first ``{`` starts it; text after the object is ignored).
    Each rule needs a boolean ``ok`` and a string ``reason``; ``verdict``
    must be good or bad and agree with the rules (good exactly when every
    rule is ok): a contradictory answer is not trusted either way.
    """
    s = _FENCE.sub("", (text or "").strip())
    start = s.find("{")
    if start < 0:
        raise JudgementError("no JSON object in the answer")
    try:
        obj, _ = json.JSONDecoder().raw_decode(s[start:])
    except json.JSONDecodeError as exc:
        raise JudgementError(f"invalid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(obj, dict):
        raise JudgementError("the answer is not a JSON object")
    ok: dict[str, bool] = {}
    reasons: dict[str, str] = {}
    for r in RULES:
        part = obj.get(r)
        if not isinstance(part, dict):
            raise JudgementError(f'"{r}" is missing or not an object')
        if not isinstance(part.get("ok"), bool):
            raise JudgementError(f'"{r}.ok" is missing or not true/false')
        reason = part.get("reason")
        if not isinstance(reason, str):
            raise JudgementError(f'"{r}.reason" is missing or not a string')
        ok[r], reasons[r] = part["ok"], reason.strip()
    verdict = obj.get("verdict")
    verdict = verdict.strip().lower() if isinstance(verdict, str) else verdict
    if verdict not in (GOOD, BAD):
        raise JudgementError('"verdict" must be "good" or "bad"')
    if (verdict == GOOD) != all(ok.values()):
        failed = [r for r in RULES if not ok[r]]
        raise JudgementError(f'"verdict" is {verdict!r} but the failed rules are {failed or "none"}: good means every rule is ok')
    return Judgement(ok, reasons, verdict)


# ------------------------------------------------------------ options


@dataclass(frozen=True)
class JudgeInput:
    """One edit pair to grade; ``edit_passed`` is the rule checker's verdict on it."""

    image_id: str | None
    edit_key: str | None
    edit_passed: bool
    source: str
    target: str


@dataclass(frozen=True)
class JudgeOptions(StageOptions):
    """What to grade and how; the fields are `dataprep judge`'s flags. Invalid values cannot be built."""

    prompt_file: str = option("judge.txt", "Judge instruction (system message); a bare name means the shipped prompts/ file.", panel="Judge")
    # also grade pairs the checker failed (the 2x2 agreement table)
    all_edits: bool = option(False, "Also grade pairs the rule checker failed (stats then shows the full checker x judge table).", flag="--all", panel="Input")
    guided: bool = option(True, "Constrain decoding to the JSON schema where the engine can (vllm structured outputs, OpenAI response_format); turn off for a server that rejects response_format. Answers are always parsed and retried.", flag="--guided/--no-guided", panel="Judge")
    max_attempts: int = option(3, "Answers per pair until one parses; then an error row (retried by the next run).", panel="Judge")
    temperature: float = option(0.0, "Attempt 1: 0 = greedy (default).", panel="Sampling")
    retry_temperature: float = option(0.7, RETRY_TEMPERATURE_HELP, panel="Sampling")
    # three one-sentence reasons fit in ~150 tokens
    max_new_tokens: int = option(384, MAX_NEW_TOKENS_HELP, panel="Sampling")
    wait_lock: bool = option(False, wait_lock_help("judge"), panel="Run")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self.max_attempts, 1, "--max-attempts", "use 1 or more; default 3")
        at_least(self.temperature, 0, "--temperature", "0 for greedy")
        if self.max_attempts > 1 and self.retry_temperature <= 0:
            raise ConfigError("--retry-temperature must be > 0: a greedy retry repeats the unusable answer", "--retry-temperature", "e.g. 0.7 (the default), or --max-attempts 1")
        at_least(self.max_new_tokens, 16, "--max-new-tokens", "e.g. 384")

    def attempt_sampling(self, attempt: int) -> Sampling:
        if attempt == 1:
            return Sampling(temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed)
        return Sampling(temperature=self.retry_temperature, max_new_tokens=self.max_new_tokens, seed=self.seed + attempt - 1)

    def policy(self) -> dict[str, Any]:
        """What decides the answers, for the content key (``max_attempts`` left out, as in rewrite)."""
        return {"first": self.attempt_sampling(1).to_dict(), "retry_temperature": self.retry_temperature, "guided": self.guided}


def user_message(item: JudgeInput) -> str:
    return f"Original: {item.source}\nModified: {item.target}"


def messages(prompt_text: str, item: JudgeInput, previous: str | None = None, problem: str | None = None) -> list[dict[str, str]]:
    """System = the judge prompt, user = the pair; a retry adds the unusable answer and what was wrong with it."""
    out = [{"role": "system", "content": prompt_text}, {"role": "user", "content": user_message(item)}]
    if problem is not None:
        out += [
            {"role": "assistant", "content": previous or ""},
            {"role": "user", "content": f"That answer cannot be used: {problem}. Answer again with exactly one JSON object in the form given."},
        ]
    return out


# ------------------------------------------------------------ retry policy (pure but for the engine)


@dataclass
class JudgeOutcome:
    judgement: Judgement | None
    raw_output: str | None
    attempts: int
    sampling: Sampling
    result: ChatResult
    error: str | None = None


def judge_with_retries(engine: Engine, prompt_text: str, items: list[JudgeInput], opts: JudgeOptions) -> list[JudgeOutcome]:
    """Grade ``items`` (one batch); one outcome each, same order.

    Each round sends one ``engine.generate`` call with the items still
    without a usable answer. An engine error ends an item's attempts (error
    set; the next run retries it); an unparsable answer is asked again until
    ``max_attempts``, then kept as ``unparsable_judgement`` error.
    """
    n = len(items)
    schema = JUDGEMENT_SCHEMA if opts.guided else None
    attempt = [1] * n
    last: list[tuple[str | None, str | None]] = [(None, None)] * n  # (previous answer, problem)
    outcomes: list[JudgeOutcome | None] = [None] * n
    todo = list(range(n))
    while todo:
        reqs = [
            ChatRequest(messages=messages(prompt_text, items[i], *last[i]), sampling=opts.attempt_sampling(attempt[i]), request_id=f"{items[i].edit_key}#{attempt[i]}", json_schema=schema)
            for i in todo
        ]
        results = engine.generate(reqs)
        still = []
        for i, req, res in zip(todo, reqs, results):
            if res.error is not None:
                outcomes[i] = JudgeOutcome(None, res.text or None, attempt[i], req.sampling, res, error=res.error)
                continue
            try:
                outcomes[i] = JudgeOutcome(parse_judgement(res.text), res.text, attempt[i], req.sampling, res)
            except JudgementError as exc:
                outcomes[i] = JudgeOutcome(None, res.text, attempt[i], req.sampling, res, error=failure(Reason.UNPARSABLE_JUDGEMENT, exc))
                if attempt[i] < opts.max_attempts:
                    attempt[i] += 1
                    last[i] = (res.text, str(exc))
                    still.append(i)
        todo = still
    missing = ChatResult.failed("internal: the engine returned no result for this request")
    return [o if o is not None else JudgeOutcome(None, None, 0, opts.attempt_sampling(1), missing, error=missing.error) for o in outcomes]


# ------------------------------------------------------------ inputs


def inputs_from_edits(folder: Path | str, all_edits: bool = False) -> tuple[list[JudgeInput], Counter]:
    """Checked edit rows of ``OUT/edits`` to grade, and what was left out by reason.

    Error rows and rows without a target are never graded; checker-failed
    rows only with ``all_edits``.
    """
    folder = Path(folder)
    if not shard_paths(folder):
        raise ConfigError(f"no edit shards in {folder}", "--edits", "run `dataprep rewrite --out RUN` first")
    check_shards(folder, EDITS_SCHEMA, "--edits")
    items: list[JudgeInput] = []
    left: Counter = Counter()
    for r in iter_rows(folder, EDITS_SCHEMA, columns=["image_id", "key", "source", "target", "passed", "error"]):
        if r["error"] is not None:
            left["edit_error_rows"] += 1
        elif not (r["target"] or "").strip() or not (r["source"] or "").strip():
            left["edit_empty_rows"] += 1
        elif not r["passed"] and not all_edits:
            left["edit_failed_rows (grade them with --all)"] += 1
        else:
            items.append(JudgeInput(r["image_id"], r["key"], bool(r["passed"]), r["source"], r["target"].strip()))
    return items, left


def judge_key(item: JudgeInput, model: str, revision: str | None, prompt_sha256: str, opts: JudgeOptions) -> str:
    # the pair's texts and image decide the answer; the edit row's key does not
    input_sha = sha256_text(json.dumps([item.image_id, item.source, item.target]))
    return content_key(STAGE, input_sha, model, revision, prompt_sha256, opts.policy(), opts.seed)


# ------------------------------------------------------------ the stage


@dataclass
class _Tally(Tally):
    left_out: dict[str, int]  # edit rows not graded, by reason
    table: Counter = field(default_factory=Counter)  # (checker passed, verdict) of this run's judgements
    retried: int = 0  # judgements that needed more than one answer (how well the model keeps the format)

    def add(self, task: Task[JudgeInput], o: JudgeOutcome) -> None:
        self.table[(task.input.edit_passed, o.judgement.verdict)] += 1
        self.retried += o.attempts > 1

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"not graded: {reason}": k for reason, k in self.left_out.items()}
        n = sum(self.table.values())
        if n:
            good = sum(v for (_, verdict), v in self.table.items() if verdict == GOOD)
            agree = self.table[(True, GOOD)] + self.table[(False, BAD)]
            out["judged good"] = f"{good} of {n} ({good / n:.1%})"
            out["agrees with the checker"] = f"{agree} of {n} ({agree / n:.1%})"
            out["parsed only after a retry"] = self.retried
        return out

    def counts(self) -> dict[str, int]:
        return {**{f"checker_{'pass' if p else 'fail'}.judge_{v}": k for (p, v), k in self.table.items()}, "parsed_after_retry": self.retried}


@dataclass
class JudgeStage(ModelStage[JudgeInput, JudgeOutcome]):
    """Edit pairs in, one judgement row each; unparsable answers are asked again."""

    opts: JudgeOptions
    prompt: Prompt
    left_out: dict[str, int] = field(default_factory=dict)

    name = STAGE
    folder = "judge"
    schema = JUDGE_SCHEMA

    def key(self, item: JudgeInput, model: ModelId) -> str:
        return judge_key(item, model.model, model.revision, self.prompt.sha256, self.opts)

    def infer(self, engine: Engine, tasks: list[Task[JudgeInput]]) -> list[JudgeOutcome]:
        return judge_with_retries(engine, self.prompt.text, [t.input for t in tasks], self.opts)

    def row(self, task: Task[JudgeInput], o: JudgeOutcome | None) -> dict[str, Any]:
        item, j = task.input, (o.judgement if o is not None else None)
        cols: dict[str, Any] = {"image_id": item.image_id, "edit_key": item.edit_key, "edit_passed": item.edit_passed, "source": item.source, "target": item.target}
        cols["verdict"] = j.verdict if j else None
        for r in RULES:
            cols[f"{r}_ok"] = j.ok[r] if j else None
            cols[f"{r}_reason"] = j.reasons[r] if j else None
        return cols | {"raw_output": o.raw_output if o else None, "attempts": o.attempts if o else 0}

    def tally(self) -> Tally:
        return _Tally(dict(self.left_out))


def run_judge(items: Iterable[JudgeInput], out: Path | str, engine_cfg: EngineConfig, opts: JudgeOptions = JudgeOptions(), *,
              engine: Engine | None = None, executor: ExecutorConfig | None = None, progress: bool = True, left_out: Counter | None = None) -> StageSummary:
    """Grade every pair of ``items`` into ``out/judge``; returns the summary.

    Options, prompt and model are checked (and the model loaded) before any
    row is written. Pass ``engine`` to reuse a loaded model; ``executor``
    (default local) says where the model runs. ``left_out``: edit rows not
    graded, by reason, for the summary.
    """
    prompt = load_prompt(opts.prompt_file, flag="--prompt-file")
    if not engine_cfg.model:
        engine_cfg.model = DEFAULT_MODEL
    stage = JudgeStage(opts, prompt, left_out=dict(left_out or {}))
    return run_model_stage(stage, items, out, engine_cfg, engine=engine, executor=executor, progress=progress,
                           force=opts.force, rows_per_shard=opts.rows_per_shard, wait_lock=opts.wait_lock)


# ------------------------------------------------------------ reading the store


def latest_judgements(judge_dir: Path | str) -> dict[tuple[str | None, str, str], dict[str, Any]]:
    """Newest good judgement per pair ``(image_id, source, target)``.

    Several judge models (other keys) may have graded one pair: the newest
    ``created_at`` wins, so the latest judge speaks for the pair.
    """
    best: dict[tuple[str | None, str, str], dict[str, Any]] = {}
    cols = ["image_id", "source", "target", "edit_passed", "verdict", *[f"{r}_ok" for r in RULES], "created_at", "error"]
    for path in shard_paths(judge_dir):
        t = pq.read_table(path, columns=cols).to_pylist()
        for r in t:
            if r["error"] is not None or r["verdict"] is None:
                continue
            k = (r["image_id"], (r["source"] or "").strip(), (r["target"] or "").strip())
            r["_t"] = r["created_at"].timestamp() if r["created_at"] is not None else float("-inf")
            cur = best.get(k)
            if cur is None or r["_t"] >= cur["_t"]:
                best[k] = r
    return best


def judged_good(judge_dir: Path | str) -> set[tuple[str | None, str, str]]:
    """Pairs ``(image_id, source, target)`` (ends stripped) whose newest judgement is good."""
    return {k for k, r in latest_judgements(judge_dir).items() if r["verdict"] == GOOD}


def agreement(judge_dir: Path | str) -> dict[str, Any] | None:
    """Checker x judge over the newest judgement per pair, or None without a judge store.

    ``table[checker][judge]`` with checker ``passed``/``failed`` and judge
    ``good``/``bad``; ``agreement`` is the share on the diagonal (None when
    nothing was graded); ``rule_failures`` counts judgements per failed rule.
    """
    if not shard_paths(judge_dir):
        return None
    latest = latest_judgements(judge_dir)
    errors = sum(1 for p in shard_paths(judge_dir) for e in pq.read_table(p, columns=["error"]).column("error").to_pylist() if e is not None)
    table = {"passed": {GOOD: 0, BAD: 0}, "failed": {GOOD: 0, BAD: 0}}
    rules: Counter = Counter()
    for r in latest.values():
        table["passed" if r["edit_passed"] else "failed"][r["verdict"]] += 1
        rules.update(x for x in RULES if r[f"{x}_ok"] is False)
    n = len(latest)
    agree = table["passed"][GOOD] + table["failed"][BAD]
    return {
        "judged": n,
        "errors": errors,
        "table": table,
        "graded_failing": sum(table["failed"].values()) > 0,
        "agreement": agree / n if n else None,
        "rule_failures": {r: rules[r] for r in RULES},
    }


def require_judged(index: Any, judge_dir: Path | str) -> Any:
    """Keep only judged-good edits on a batch index (``batches --require-judge``).

    ``index`` is a :class:`dataprep.batches.CaptionIndex` with edits attached;
    an edit whose newest judgement is not good (bad, unparsable or never
    graded) is removed and counted in ``index.skipped``.
    """
    if not shard_paths(judge_dir):
        raise ConfigError(f"no judge shards in {judge_dir}", "--require-judge", "run `dataprep judge --out RUN` first, or pass --judge DIR")
    good = judged_good(judge_dir)
    for i, image_id in enumerate(index.image_ids):
        for k in range(index.starts[i], index.starts[i + 1]):
            edit = index.edits[k]
            if edit is not None and (image_id, index.texts[k].strip(), edit.strip()) not in good:
                index.edits[k] = None
                index.skipped["edit_not_judged_good"] += 1
    return index
