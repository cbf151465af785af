"""`export hf`: provenance columns, the dataset card, --private, a push that fails."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from dataprep.export import export_hf
from dataprep.hfcard import card_markdown, size_category
from dataprep.store import ShardWriter
from tests.export_run import make_export_run


@pytest.fixture
def run(tmp_path):
    """The export tests' run dir: passing, failed, superseded, error and unreadable edits."""
    return make_export_run(tmp_path)


def add_judge(root):
    """A judge stage folder as `dataprep judge` writes it (JUDGE_SCHEMA): rows linked to edits by edit_key."""
    from dataprep.store import JUDGE_SCHEMA, ShardWriter

    rows = [
        {"key": "j0", "source": "source j0", "target": "target j0", "edit_key": "k0", "image_id": "div2k/0001", "edit_passed": True, "verdict": "good", "rule1_ok": True, "rule1_reason": "one concept", "error": None},
        {"key": "j1", "source": "source j1", "target": "target j1", "edit_key": "k1", "image_id": "other/0001", "edit_passed": True, "verdict": "bad", "rule1_ok": False, "rule1_reason": "unrealistic", "error": None},
        {"key": "j2", "source": "source j2", "target": "target j2", "edit_key": "k2", "image_id": "div2k/0003", "edit_passed": True, "verdict": None, "error": "parse_error: no JSON"},
    ]
    with ShardWriter(root / "judge", JUDGE_SCHEMA, run_id="r1") as w:
        for r in rows:
            w.add(r)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_export_keeps_provenance_and_writes_the_card(run, tmp_path):  # noqa: F811
    import datasets

    from dataprep.store import Manifest

    root, _ = run
    add_judge(root)
    engine = {"model": "meta-llama/Llama-3.1-8B-Instruct", "engine": "vllm", "revision": "abc123", "resolved_dtype": "bfloat16"}
    Manifest(stage="rewrite", run_id="r1", config={"engine": engine, "prompt_id": "edit.txt", "prompt_sha256": "f" * 64, "options": {"temperature": 0.0, "max_attempts": 3}}).write(root / "edits")
    s = export_hf(root, tmp_path / "hf", license="cc-by-4.0")
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(ds) == s.pairs == 5
    for col in ("key", "model", "model_revision", "prompt_sha256", "attempts", "source_span", "target_span", "passed", "violations", "run_id", "created_at", "judge"):
        assert col in ds.column_names, col
    row = ds.filter(lambda r: r["image_id"] == "div2k/0001")[0]
    assert row["key"] == "k0" and row["run_id"] is None and row["created_at"].startswith("2026-01-01T01:00")
    assert json.loads(row["judge"])["verdict"] == "good" and json.loads(row["judge"])["rule1_ok"] is True
    assert ds.filter(lambda r: r["image_id"] == "div2k/0003")[0]["judge"] is None  # the judge row is an error row
    card = (tmp_path / "hf" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "cc-by-4.0" and meta["size_categories"] == ["n<1K"]
    assert "text-to-image" in meta["task_categories"]
    for section in ("## Generation", "## Counts", "## Rule checker", "## Judge", "## Diversity of the replacements", "## Columns"):
        assert section in card, section
    assert '| edits | meta-llama/Llama-3.1-8B-Instruct | abc123 | vllm | bfloat16 | edit.txt | `ffffffffffffffff` | `{"max_attempts": 3, "temperature": 0.0}` |' in card
    assert "| captions | (no manifest) |" in card
    assert "| multiple_concepts | 2 |" in card  # two failed rows in the fixture
    assert "`rule1_ok` true: 50.0%" in card and "`verdict`: good 1, bad 1" in card
    assert "pair dog -> fox" in card
    assert datasets.load_from_disk(str(tmp_path / "hf")).num_rows == 5  # the card does not disturb load_from_disk


def test_card_without_manifests_judge_or_edits_still_renders():
    facts = {"pairs": 12_000, "columns": ["image", "source"], "captions": None, "edits": None, "diversity": None, "captions_generation": None, "edits_generation": None, "judge": None, "dedup": None}
    card = card_markdown(facts)
    assert front_matter(card)["size_categories"] == ["10K<n<100K"] and front_matter(card)["license"] == "other"
    assert "No checked edits." in card and "## Judge" not in card
    assert [size_category(n) for n in (0, 999, 1000, 10**6)] == ["n<1K", "n<1K", "1K<n<10K", "1M<n<10M"]


def test_failed_push_says_why_and_keeps_the_export_registered(run, tmp_path, monkeypatch):  # noqa: F811
    root, _ = run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = export_hf(root, tmp_path / "hf", push_to_hub="someone/softrepa-pairs", private=True)
    assert s.push["ok"] is False and s.push["private"] is True and "\n" not in s.push["error"] and s.push["error"]
    assert (tmp_path / "hf" / "README.md").exists() and (tmp_path / "hf" / "dataset_info.json").exists()
    entries = json.loads((root / "exports.json").read_text())["exports"]
    (entry,) = [e for e in entries if e["kind"] == "hf"]
    assert entry["pairs"] == 5 and entry["push"]["ok"] is False and entry["push"]["repo"] == "someone/softrepa-pairs"


def test_cli_failed_push_is_one_line_and_exit_1(run, tmp_path):  # noqa: F811
    from dataprep.cli import app

    root, _ = run
    res = CliRunner(env={"HF_HUB_OFFLINE": "1"}).invoke(app, ["export", "hf", str(tmp_path / "hf"), "--run", str(root), "--push-to-hub", "someone/x", "--private"], terminal_width=300)
    assert res.exit_code == 1, res.output
    assert "export hf: 5 pairs" in res.output
    failed = [line for line in res.output.splitlines() if "push to someone/x failed" in line]
    assert len(failed) == 1 and "the local export is kept" in failed[0]
    assert "Traceback" not in res.output
    assert (tmp_path / "hf" / "README.md").exists()


@pytest.fixture
def refusing_hub(monkeypatch):
    """A real HTTP server on 127.0.0.1 standing in for the hub: it records each
    request and answers 401, as the hub does for a token without write access."""
    import http.server
    import threading

    from huggingface_hub import constants

    seen: list[tuple[str, str, dict]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            try:
                payload = json.loads(body) if body else {}
            except ValueError:
                payload = {}
            seen.append((self.command, self.path, payload))
            data = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    yield seen
    server.shutdown()
    server.server_close()
    thread.join()


def test_push_asks_the_hub_for_a_private_repo_and_reports_its_refusal(run, tmp_path, refusing_hub):  # noqa: F811
    s = export_hf(run[0], tmp_path / "hf", push_to_hub="me/pairs", private=True)
    (body,) = [b for m, p, b in refusing_hub if (m, p) == ("POST", "/api/repos/create")]
    assert body["visibility"] == "private" and body["type"] == "dataset" and (body["organization"], body["name"]) == ("me", "pairs")
    assert s.push["ok"] is False and "401" in s.push["error"] and "\n" not in s.push["error"]
    assert (tmp_path / "hf" / "README.md").exists()
