"""The rewrite stage's retry and diversity-steering policy (see :mod:`dataprep.rewrite`).

Pure but for the engine: given captions and an engine, which attempts to
request and which one to keep. No store, no keys, no rows: the stage and the
runner (:mod:`dataprep.stage`) do that. The options come in as a
:class:`RetryOptions` (``RewriteOptions`` is one), so this module does not
import the stage.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Protocol

from dataprep import diversity
from dataprep.engines import ChatRequest, ChatResult, Engine, Sampling
from dataprep.errors import Reason, failure
from dataprep.rules import Verdict, check


class RetryOptions(Protocol):
    """What the policy reads of the stage's options."""

    max_attempts: int
    max_target_share: float | None
    share_min_edits: int

    def attempt_sampling(self, attempt: int) -> Sampling: ...


@dataclass
class Outcome:
    """The kept attempt for one caption."""

    target: str | None
    raw_output: str | None
    verdict: Verdict | None  # None when the engine failed
    attempts: int
    sampling: Sampling
    result: ChatResult
    error: str | None = None
    first_passed: bool = False
    note: str | None = None  # non-fatal remark stored with the row (diversity steering)


def messages(rules_text: str, caption: str) -> list[dict[str, str]]:
    """The paper's layout: the rules as the system message, the caption as the user message."""
    return [{"role": "system", "content": rules_text}, {"role": "user", "content": caption}]


def rewrite_with_retries(
    engine: Engine,
    rules_text: str,
    captions: list[str],
    opts: RetryOptions,
    ids: list[str] | None = None,
    start: list[int] | None = None,
) -> list[Outcome]:
    """Rewrite ``captions`` (one batch) under the retry policy; one Outcome each, same order.

    Each round sends one ``engine.generate`` call holding only the captions
    still failing (the engine groups requests by sampling). An engine error
    for a caption ends its attempts with ``error`` set (the next run retries
    it); empty or rule-breaking output is a checker failure and is retried.
    ``start[i]`` is caption i's first attempt (default 1): a rerun with a
    larger ``max_attempts`` continues after the attempts already made, which
    would only repeat (greedy, then fixed seeds).
    """
    n = len(captions)
    ids = ids or [str(i) for i in range(n)]
    attempt = list(start) if start is not None else [1] * n
    outcomes: list[Outcome | None] = [None] * n
    todo = [i for i in range(n) if attempt[i] <= opts.max_attempts]
    while todo:
        requests = [
            ChatRequest(messages=messages(rules_text, captions[i]), sampling=opts.attempt_sampling(attempt[i]), request_id=f"{ids[i]}#{attempt[i]}")
            for i in todo
        ]
        results = engine.generate(requests)
        still: list[int] = []
        for i, req, res in zip(todo, requests, results):
            if res.error is not None:
                outcomes[i] = Outcome(None, res.text or None, None, attempt[i], req.sampling, res, error=res.error)
                continue
            verdict = check(captions[i], res.text)
            first = attempt[i] == 1 and verdict.passed
            outcomes[i] = Outcome(res.text.strip(), res.text, verdict, attempt[i], req.sampling, res, first_passed=first)
            if not verdict.passed and attempt[i] < opts.max_attempts:
                attempt[i] += 1
                still.append(i)
        todo = still
    missing = ChatResult.failed("internal: the engine returned no result for this request")
    return [o if o is not None else Outcome(None, None, None, 0, opts.attempt_sampling(1), missing, error=missing.error) for o in outcomes]


def _over(counts: diversity.Diversity, target: str | None, opts: RetryOptions) -> bool:
    return target is not None and counts.n >= opts.share_min_edits and counts.share(target) > opts.max_target_share


def steer_targets(
    engine: Engine,
    rules_text: str,
    captions: list[str],
    outcomes: list[Outcome],
    opts: RetryOptions,
    counts: diversity.Diversity,
    ids: list[str] | None = None,
) -> list[Outcome]:
    """Apply ``--max-target-share`` to one batch's outcomes, in input order; updates ``counts``.

    Caption i's outcome is final once judged against ``counts`` plus the final
    outcomes of captions 0..i-1 (the sequential rule of the module doc). Extra
    attempts continue the attempt numbering (sampling of attempt k, see
    :meth:`RetryOptions.attempt_sampling`), so each is the same request
    whatever the batch. To keep batching, each round asks the engine at once
    for the next attempt of every caption that is over the share under the
    current assumptions (a caption still waiting is assumed to keep its
    outcome); rounds repeat until every caption is decided. An attempt a later
    round no longer needs is simply unused.
    """
    n = len(captions)
    ids = ids or [str(i) for i in range(n)]
    extra: dict[tuple[int, int], Outcome] = {}
    while True:
        c = diversity.Diversity(Counter(counts.pairs), Counter(counts.targets))
        final: list[Outcome] = []
        needs: dict[int, int] = {}
        for i, o in enumerate(outcomes):
            if o.error is not None or o.verdict is None or not o.verdict.passed:
                final.append(o)
                continue
            target = diversity.concept(o.verdict.target_span)
            if not _over(c, target, opts):
                c.add(o.verdict.source_span, o.verdict.target_span)
                final.append(o)
                continue
            share, counted = c.share(target), c.n
            kept, k = None, o.attempts + 1
            while k <= opts.max_attempts:
                r = extra.get((i, k))
                if r is None:
                    needs[i] = k
                    break
                if r.error is None and r.verdict is not None and r.verdict.passed and not _over(c, diversity.concept(r.verdict.target_span), opts):
                    kept = r
                    break
                k += 1
            why = failure(Reason.TARGET_SHARE, f"{target!r} was {share:.1%} of {counted} passing edits (> --max-target-share {opts.max_target_share:g})")
            if kept is not None:
                kept = replace(kept, note=f"{why}; attempt {kept.attempts} replaced attempt {o.attempts}")
            else:
                kept = replace(o, attempts=max(o.attempts, opts.max_attempts), note=f"{why}; kept: no other passing target in {opts.max_attempts} attempts")
            c.add(kept.verdict.source_span, kept.verdict.target_span)
            final.append(kept)
        if not needs:
            counts.pairs, counts.targets = c.pairs, c.targets
            return final
        todo = sorted(needs.items())
        requests = [
            ChatRequest(messages=messages(rules_text, captions[i]), sampling=opts.attempt_sampling(k), request_id=f"{ids[i]}#{k}")
            for i, k in todo
        ]
        for (i, k), req, res in zip(todo, requests, engine.generate(requests)):
            if res.error is not None:
                extra[(i, k)] = Outcome(None, res.text or None, None, k, req.sampling, res, error=res.error)
            else:
                extra[(i, k)] = Outcome(res.text.strip(), res.text, check(captions[i], res.text), k, req.sampling, res)
