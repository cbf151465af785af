"""Row identity and run ids: what makes a rerun skip finished work."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import uuid
from typing import Any

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_key(
    stage: str,
    input_sha256: str,
    model: str,
    model_revision: str | None,
    prompt_sha256: str,
    sampling: dict[str, Any] | str,
    seed: int | None,
) -> str:
    """The row's identity: same inputs, model, prompt and sampling -> same key.

    Changing any of them changes the key, so a rerun never reuses a stale row.
    The engine is deliberately not part of it: vLLM and transformers serve the
    same model, and a row from either satisfies the other.
    """
    if not isinstance(sampling, str):
        sampling = json.dumps(sampling, sort_keys=True)
    payload = json.dumps(
        [stage, input_sha256, model, model_revision or "", prompt_sha256, sampling, seed],
        separators=(",", ":"),
    )
    return sha256_text(payload)


def new_run_id() -> str:
    """UTC time to the microsecond first: shard names sort in run order, which
    :func:`compact` relies on to find the newest row."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:6]


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)
