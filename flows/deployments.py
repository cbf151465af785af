"""The three deployments and ``dataprep serve``.

- ``prepare/prepare-div2k``: caption -> rewrite -> batches on a cron schedule
  (nightly by default); its parameters default to DIV2K and are overridable
  per run (UI, ``run_deployment``, ``prefect deployment run``).
- ``train/train-on-new-shards``: a DeploymentEventTrigger on
  ``softrepa.shards.written`` starts it with the event's shard paths.
- ``evaluate_edit/evaluate-edit``: a DeploymentEventTrigger on
  ``softrepa.tokens.written`` (only for tokens whose run asked for an
  evaluation) starts it with the new tokens and the run's edit pairs.

``serve_all`` serves them from one local process (``prefect.serve``); the
same definitions live in ``prefect.yaml`` for work pools and workers.
"""

from __future__ import annotations

import inspect
from typing import Any

from prefect.events import DeploymentEventTrigger

from flows.defaults import DEFAULT_DATA, DEFAULT_OUT, NIGHTLY
from flows.flows import SHARDS_EVENT, TOKENS_EVENT, evaluate_edit, prepare, train
from dataprep.errors import ConfigError

PREPARE = "prepare-div2k"
TRAIN = "train-on-new-shards"
EVALUATE = "evaluate-edit"
PREPARE_CONCURRENCY = 1


def train_trigger() -> DeploymentEventTrigger:
    """New batch shards of any dataset and preset -> a training run on exactly those."""
    return DeploymentEventTrigger(
        name="train on new batch shards",
        expect={SHARDS_EVENT},
        match={"prefect.resource.id": "softrepa.shards.*"},
        parameters={
            "shards": "{{ event.payload.shards }}",
            "preset": "{{ event.payload.preset }}",
            "dataset": "{{ event.payload.dataset }}",
            "run_dir": "{{ event.payload.run_dir }}",
            "train_options": "{{ event.payload.train }}",
            "eval_options": "{{ event.payload.evaluate }}",
        },
    )


def evaluate_trigger() -> DeploymentEventTrigger:
    """New soft tokens from a run that asked for an evaluation -> FlowEdit evaluation."""
    return DeploymentEventTrigger(
        name="evaluate new soft tokens",
        expect={TOKENS_EVENT},
        match={"prefect.resource.id": "softrepa.tokens.*", "softrepa.evaluate": "true"},
        parameters={
            "pairs": "{{ event.payload.pairs }}",
            "model": "{{ event.payload.model }}",
            "tokens": "{{ event.payload.tokens }}",
            "eval_options": "{{ event.payload.evaluate }}",
        },
    )


def prepare_parameters(data: str = DEFAULT_DATA, out: str = DEFAULT_OUT, **overrides: Any) -> dict[str, Any]:
    """Default parameters of ``prepare-div2k``; ``overrides`` are prepare() parameters."""
    known = set(inspect.signature(prepare.fn).parameters)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown prepare parameter(s) {unknown}; known: {sorted(known)}")
    return {"data": data, "out": out, **{k: v for k, v in overrides.items() if v is not None}}


def deployments(cron: str = NIGHTLY, timezone: str | None = None, prepare_params: dict[str, Any] | None = None) -> list:
    """The three RunnerDeployments (module entrypoints: importable from any cwd)."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.runner import EntrypointType

    kw = dict(entrypoint_type=EntrypointType.MODULE_PATH, tags=["softrepa"])
    return [
        prepare.to_deployment(
            name=PREPARE,
            schedules=[CronSchedule(cron=cron, timezone=timezone)],
            parameters=prepare_params or prepare_parameters(),
            # one run at a time (the second waits, ENQUEUE): two nightly runs never write one store at once
            concurrency_limit=PREPARE_CONCURRENCY,
            description="Caption DIV2K with LLaVA-1.5, rewrite with Llama-3.1 under the single-concept rules, build contrastive batch shards; new shards start training.",
            **kw,
        ),
        train.to_deployment(name=TRAIN, triggers=[train_trigger()], description="Soft-token training on the shards named by a softrepa.shards.written event.", **kw),
        evaluate_edit.to_deployment(name=EVALUATE, triggers=[evaluate_trigger()], description="FlowEdit with and without the new soft tokens on the run's caption/edit pairs.", **kw),
    ]


def validate_cron(cron: str, timezone: str | None = None) -> None:
    """Raise ConfigError (naming --cron) for an expression Prefect would reject."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        raise ConfigError(f"invalid cron schedule {cron!r} (timezone {timezone}): {exc.errors()[0]['msg']}", "--cron/--timezone", "five fields, e.g. '0 2 * * *' for 02:00 nightly; an IANA zone like Europe/Berlin") from None


def serve_all(cron: str = NIGHTLY, timezone: str | None = None, prepare_params: dict[str, Any] | None = None, limit: int | None = None) -> None:
    """Register the three deployments and run their flows from this process until interrupted."""
    from prefect import serve

    validate_cron(cron, timezone)
    serve(*deployments(cron, timezone, prepare_params), limit=limit)
