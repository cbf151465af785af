"""Records beside the shards: the folder's manifest and each run's completion record.

The shards are the data; these JSON files describe them (config, package
versions, counts, failures by reason) and are written atomically. A record
that is missing or unreadable never stops a run: it reads as absent.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from dataprep.store.atomic import atomic_write_json
from dataprep.store.keys import utcnow


def package_versions(names: Iterable[str] = ("softrepa-dataprep", "torch", "transformers", "diffusers", "vllm", "pyarrow", "pillow", "datasets")) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# The leading underscore matters: pyarrow, pandas and datasets skip files
# starting with "_" or ".", so `pd.read_parquet("OUT/captions")` reads the
# shards of a stage folder directly, manifest and temp files included beside them.
MANIFEST_NAME = "_manifest.json"


def read_json_record(path: Path | str) -> Any | None:
    """A manifest or completion record, or None when absent or unreadable.

    A corrupt record (a crash of an older version mid-write, a hand edit) is
    treated as absent with a warning: the shards are the data, the record only
    describes them, so a bad one must never stop a run.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.warn(f"ignoring unreadable {path}: {exc}", RuntimeWarning, stacklevel=2)
        return None


def read_manifest(folder: Path | str) -> dict[str, Any] | None:
    """The folder's manifest as a dict; None when absent, corrupt or not an object."""
    data = read_json_record(Path(folder) / MANIFEST_NAME)
    return data if isinstance(data, dict) else None


@dataclass
class Manifest:
    stage: str
    config: dict[str, Any]
    run_id: str
    counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=package_versions)
    started_at: str = field(default_factory=lambda: utcnow().isoformat())
    finished_at: str | None = None

    def write(self, folder: Path | str) -> Path:
        """Write the manifest; earlier runs are kept under ``runs``."""
        path = Path(folder) / MANIFEST_NAME
        old = read_manifest(folder) or {}
        history = [r for r in old.get("runs", []) if isinstance(r, dict)] if isinstance(old.get("runs"), list) else []
        this = {k: v for k, v in self.__dict__.items()}
        history = [r for r in history if r.get("run_id") != self.run_id] + [
            {k: this[k] for k in ("run_id", "started_at", "finished_at", "counts")}
        ]
        return atomic_write_json(path, dict(this, runs=history))


def run_record_path(folder: Path | str, run_id: str) -> Path:
    """``_run-<run_id>.json``: written last, atomically, when a run finished all its shards."""
    return Path(folder) / f"_run-{run_id}.json"


def write_run_record(folder: Path | str, run_id: str, shards: list[Path], **fields: Any) -> Path:
    """Mark run ``run_id`` complete: its shard names and ``fields``, written atomically.

    A reader that finds no record (or an unreadable one) knows the run did
    not finish: the shards present may be only part of it.
    """
    return atomic_write_json(run_record_path(folder, run_id), {"run_id": run_id, **fields, "shards": [Path(p).name for p in shards]})


def read_run_record(folder: Path | str, run_id: str) -> dict[str, Any] | None:
    """The completion record of ``run_id``, or None (absent or unreadable: not complete)."""
    data = read_json_record(run_record_path(folder, run_id))
    return data if isinstance(data, dict) and isinstance(data.get("shards"), list) else None
