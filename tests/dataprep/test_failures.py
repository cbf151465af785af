"""What happens when things go wrong: no finished row lost, one run per stage
folder, unfinished batch runs refused, every skipped file accounted for,
atomic records, clean exits, workers that die with their parent.

Each test failed on the code before its fix. No model is loaded: a fake
engine stands in where a stage needs one, and the CLI tests stop before the
model would load (that is what they check).

One file of ~630 lines on purpose: it is the catalog of failure modes the
README's "What happens when things go wrong" table points at, one section each.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dataprep.caption import CaptionOptions, run_caption
from dataprep.cli import app
from dataprep.engines import ChatResult, EngineConfig
from dataprep.errors import ConfigError, Reason, failure, read_failure, reason_of
from dataprep.sources import folder
from dataprep.store import (
    CAPTIONS_SCHEMA,
    EDITS_SCHEMA,
    MANIFEST_NAME,
    Manifest,
    ShardWriter,
    read_manifest,
    read_table,
    utcnow,
)
from tests.images_factory import png_bytes

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


class FakeEngine:
    """No model: every request gets the same text."""

    name, model, revision, batch_size = "fake", "fake-model", None, 4

    def image_size(self):
        return 32

    def generate(self, reqs):
        return [ChatResult(text="a picture of a thing", prompt_tokens=3, completion_tokens=5) for _ in reqs]

    def close(self):
        pass


def png(path: Path, size=(24, 16), colour=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(Image.new("RGB", size, colour)))
    return path


def caption_row(key: str, caption, **kw) -> dict:
    return {"image_id": key, "key": key, "caption": caption, "created_at": utcnow(), **kw}


def flat(text: str) -> str:
    """Console output with its line wrapping undone."""
    return " ".join(text.split())


def py(code: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def dataprep_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", COLUMNS="300")
    return subprocess.run([sys.executable, "-m", "dataprep", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------ one vocabulary of reasons

WRITTEN_ERRORS: list[str] = []  # every row error a shard of this module's tests got


@pytest.fixture(autouse=True)
def _record_row_errors(monkeypatch):
    """Collect the ``error`` of every row written to a shard by the tests below
    (in this process), for the vocabulary test at the end of the module."""
    original = ShardWriter.flush

    def flush(self):
        path = original(self)
        if path is not None:
            WRITTEN_ERRORS.extend(e for e in read_table_of(path) if e is not None)
        return path

    monkeypatch.setattr(ShardWriter, "flush", flush)


def read_table_of(path: Path) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["error"]).column("error").to_pylist()


def test_failure_text_is_reason_colon_detail_and_reason_of_reads_it_back():
    assert failure(Reason.TOO_LARGE, "9 bytes") == "too_large: 9 bytes" and failure(Reason.EMPTY_OUTPUT) == "empty_output"
    assert reason_of(failure(Reason.BAD_JSON, "line 3: x: y")) == Reason.BAD_JSON == "bad_json"
    assert read_failure(FileNotFoundError("gone")).startswith("missing_file: ") and read_failure(OSError("crc")) == "read_error: crc"
    with pytest.raises(ValueError):
        failure("no_such_reason", "x")  # type: ignore[arg-type]


# ------------------------------------------------------------ nothing finished is lost


def test_a_row_of_the_wrong_type_becomes_an_error_row_and_the_shard_keeps_the_rest(tmp_path):
    """Before: one int caption made pyarrow refuse the whole shard: every row in it was lost."""
    with ShardWriter(tmp_path, CAPTIONS_SCHEMA, "run", rows_per_shard=10) as w:
        w.add(caption_row("good", "a red cat"))
        w.add(caption_row("number", 5))
        w.add(caption_row("list", ["a", "b"], image_width="wide"))
        w.add(caption_row("failed", None, error="corrupt_image: x"))
    rows = {r["key"]: r for r in read_table(tmp_path, CAPTIONS_SCHEMA).to_pylist()}
    assert sorted(rows) == ["failed", "good", "list", "number"]
    assert rows["good"]["caption"] == "a red cat" and rows["good"]["error"] is None
    assert rows["number"]["caption"] is None and rows["number"]["error"] == "bad_type: column 'caption' got int"
    assert rows["number"]["finish_reason"] == "error"
    assert rows["list"]["error"].startswith("bad_type:") and "'image_width' got str" in rows["list"]["error"]
    assert rows["failed"]["error"] == "corrupt_image: x"  # an error row keeps its own reason


def test_wrong_typed_rewrite_inputs_are_error_rows_and_good_rows_survive(tmp_path):
    """Before: a number caption in --input crashed the shard write and lost the good rows beside it."""
    from dataprep.rewrite import RewriteOptions, inputs_from_file, run_rewrite

    f = tmp_path / "in.jsonl"
    lines = [
        {"id": "good", "caption": "A brown dog is lying on the grass.", "image_uri": "/x/1.png"},
        {"id": "number", "caption": 5},
        {"id": "list", "caption": ["a", "b"]},
        {"id": "null", "caption": None},
        {"id": "uri", "caption": "A red car on a road.", "image_uri": 7},
    ]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))

    class Echo(FakeEngine):
        def generate(self, reqs):
            return [ChatResult(text=r.messages[1]["content"].replace("dog", "fox").replace("car", "bus")) for r in reqs]

    s = run_rewrite(inputs_from_file(f, id_column="id"), tmp_path / "run", EngineConfig(model="fake-model"), RewriteOptions(max_attempts=1), engine=Echo(), progress=False)
    rows = {r["image_id"]: r for r in read_table(tmp_path / "run" / "edits", EDITS_SCHEMA).to_pylist()}
    assert sorted(rows) == ["good", "list", "null", "number", "uri"]
    assert rows["good"]["error"] is None and rows["good"]["target"] == "A brown fox is lying on the grass."
    assert rows["number"]["error"].startswith("bad_type: the caption is int, not text") and rows["number"]["source"] is None
    assert rows["list"]["error"].startswith("bad_type: the caption is list")
    assert rows["null"]["error"].startswith("missing_caption")
    assert rows["uri"]["error"] is None and rows["uri"]["image_uri"] is None  # a bad uri is dropped, the edit kept
    assert (s.done, s.n_failed) == (2, 3)


# ------------------------------------------------------------ atomic records


def test_a_failed_manifest_write_leaves_the_old_one_and_no_temp_file(tmp_path, monkeypatch):
    """Before: a failure at the rename left a .manifest.*.tmp file behind."""
    Manifest(stage="caption", config={}, run_id="r1").write(tmp_path)
    before = (tmp_path / MANIFEST_NAME).read_text()

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError):
        Manifest(stage="caption", config={}, run_id="r2").write(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]
    assert (tmp_path / MANIFEST_NAME).read_text() == before


def test_a_corrupt_manifest_reads_as_absent_with_a_warning(tmp_path):
    """Before: read_manifest raised JSONDecodeError on a half-written manifest."""
    (tmp_path / MANIFEST_NAME).write_text('{"stage": "capt')
    with pytest.warns(RuntimeWarning, match="ignoring unreadable"):
        assert read_manifest(tmp_path) is None
    with pytest.warns(RuntimeWarning):
        Manifest(stage="caption", config={}, run_id="r1").write(tmp_path)  # and a new run replaces it
    assert read_manifest(tmp_path)["run_id"] == "r1"


# ------------------------------------------------------------ one run per stage folder

HOLDER = """
import sys
from dataprep.store import stage_lock
with stage_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()  # hold until the test closes stdin (or kills us)
"""


def _hold(folder: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_on_a_locked_stage_folder_exits_2_naming_the_holder(tmp_path):
    """Before: two runs on one folder both compacted and wrote it at once."""
    from dataprep.store import StageLocked, stage_lock

    png(tmp_path / "imgs" / "a.png")
    holder = _hold(tmp_path / "out" / "captions")
    try:
        # the real CLI, in its own process: stops before the (missing) model loads
        r = dataprep_cli("caption", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-model"))
        err = flat(r.stderr)
        assert r.returncode == 2, err
        assert f"pid {holder.pid}" in err and "--wait-lock" in err and "no-model" not in err and "Traceback" not in err
        # the library raises StageLocked with the holder's record
        with pytest.raises(StageLocked) as exc:
            with stage_lock(tmp_path / "out" / "captions"):
                pass
        assert exc.value.holder["pid"] == holder.pid and exc.value.holder["command"]
        # --wait-lock queues behind the holder and goes on once it is gone (kill -9 releases the OS lock)
        env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="300")
        waiter = subprocess.Popen([sys.executable, "-m", "dataprep", "caption", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-model"), "--wait-lock"],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=3)  # still waiting for the lock
        holder.kill()
        holder.wait()
        _, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 2 and "no-model" in err  # past the lock, now at the model check
    finally:
        holder.kill()
        holder.wait()
    with stage_lock(tmp_path / "out" / "captions"):  # nothing stale left behind
        pass


# ------------------------------------------------------------ partial batch runs


def test_train_refuses_a_batch_run_without_completion_record(tmp_path):
    """Before: softrepa train used whatever shards a killed `dataprep batches` left."""
    from dataprep.batches import BatchOptions, build_batches
    from dataprep.store import shard_paths
    from softrepa.train import read_batch_rows
    from dataprep.errors import ConfigError

    with ShardWriter(tmp_path / "captions", CAPTIONS_SCHEMA, "c") as w:
        for i in range(12):
            w.add(caption_row(f"img/{i}", f"caption number {i} of a thing", image_uri=f"/x/{i}.png"))
    s = build_batches(tmp_path / "captions", tmp_path / "batches", BatchOptions(preset="custom", images=2, prompts=4, rows_per_shard=2))
    record = tmp_path / "batches" / f"_run-{s.run_id}.json"
    assert json.loads(record.read_text())["shards"] == [p.name for p in s.shards]
    assert len(read_batch_rows(tmp_path / "batches")) == s.batches
    shard_paths(tmp_path / "batches")[-1].unlink()  # a shard lost
    with pytest.raises(ConfigError) as exc:
        read_batch_rows(tmp_path / "batches")
    assert exc.value.flag == "--allow-partial"
    record.unlink()  # the run never finished
    with pytest.raises(ConfigError) as exc:
        read_batch_rows(tmp_path / "batches")
    assert exc.value.flag == "--allow-partial" and "did not finish" in str(exc.value)
    assert len(read_batch_rows(tmp_path / "batches", allow_partial=True)) == s.batches - 2


# ------------------------------------------------------------ the source walk


def test_the_folder_walk_accounts_for_every_entry(tmp_path, monkeypatch):
    """Before: broken links, loops, fifos, hidden and non-image files vanished without a word."""
    root = tmp_path / "imgs"
    good = png(root / "a.png")
    png(root / "sub" / "b.jpg")
    png(root / ".hidden.png")
    (root / "notes.txt").write_text("x")
    os.symlink(good, root / "link.png")  # a link to a file is captioned
    os.symlink(root / "gone.png", root / "broken.png")
    os.symlink(root / "loop2.png", root / "loop1.png")
    os.symlink(root / "loop1.png", root / "loop2.png")
    os.symlink(root / "sub", root / "linkdir")
    os.mkfifo(root / "pipe.png")
    (root / "locked").mkdir()
    png(root / "locked" / "c.png")
    real_scandir = os.scandir

    def scandir(path):  # the tests run as root, for whom chmod 000 does not lock a folder
        if Path(path).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    refs = folder(root)
    assert [r.image_id for r in refs] == ["imgs/a.png", "imgs/link.png", "imgs/sub/b.jpg"]
    assert dict(refs.skipped) == {
        "hidden": 1, "not_an_image_extension": 1, "broken_link": 1, "symlink_loop": 2,
        "link_to_folder": 1, "not_a_regular_file": 1, "unreadable_folder": 1,
    }
    s = run_caption(refs, tmp_path / "run", EngineConfig(model="fake-model"), CaptionOptions(workers=0), engine=FakeEngine(), progress=False)
    assert s.done == 3 and s.extra["not captioned: symlink_loop"] == 2
    counts = read_manifest(tmp_path / "run" / "captions")["counts"]
    assert counts["source_skipped.hidden"] == 1 and counts["source_skipped.unreadable_folder"] == 1


# ------------------------------------------------------------ --max-bytes


def test_files_over_max_bytes_are_too_large_rows_and_never_read(tmp_path, monkeypatch):
    """Before: there was no size limit; a 2 GiB file was read whole."""
    import dataprep.caption as caption

    root = tmp_path / "imgs"
    png(root / "small.png")
    with open(root / "huge.png", "wb") as fh:  # 300 MiB on paper, nothing on disk (sparse)
        fh.truncate(300 * 1024 * 1024)
    z = tmp_path / "DIV2K_train_HR.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("DIV2K_train_HR/0001.png", png_bytes(Image.new("RGB", (24, 16))))
        zf.writestr("DIV2K_train_HR/0002.png", b"\0" * 400_000)  # small compressed, large in its header
    read = []
    real = caption.read_bytes
    monkeypatch.setattr(caption, "read_bytes", lambda ref: read.append(ref.image_id) or real(ref))
    from dataprep.sources import div2k

    refs = folder(root) + div2k(z)
    s = run_caption(refs, tmp_path / "run", EngineConfig(model="fake-model"), CaptionOptions(workers=0, max_bytes=300_000), engine=FakeEngine(), progress=False)
    rows = {r["image_id"]: r for r in read_table(tmp_path / "run" / "captions", CAPTIONS_SCHEMA).to_pylist()}
    assert rows["imgs/huge.png"]["error"] == f"too_large: {300 * 1024 * 1024} bytes exceeds --max-bytes 300000"
    assert rows["div2k/0002"]["error"].startswith("too_large: 400000 bytes")
    assert rows["imgs/small.png"]["error"] is None and rows["div2k/0001"]["error"] is None
    assert sorted(read) == ["div2k/0001", "imgs/small.png"] and s.failed["too_large"] == 2
    with pytest.raises(ConfigError):
        CaptionOptions(max_bytes=0)
    assert CaptionOptions().max_bytes == 256 * 1024 * 1024


# ------------------------------------------------------------ clean exits


def test_out_that_is_a_file_exits_2_before_the_model_loads(tmp_path):
    png(tmp_path / "imgs" / "a.png")
    (tmp_path / "out").write_text("I am a file")
    r = runner.invoke(app, ["caption", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-model")], env={"COLUMNS": "300"})
    out = flat(r.output)
    assert r.exit_code == 2 and "--out" in out and "is a file" in out and "no-model" not in out


def test_a_corrupt_or_foreign_shard_exits_2_naming_the_file(tmp_path):
    """Before: a corrupt shard crashed the run after the model loaded, with a traceback."""
    png(tmp_path / "imgs" / "a.png")
    captions = tmp_path / "out" / "captions"
    captions.mkdir(parents=True)
    (captions / "part-x-00000.parquet").write_bytes(b"PAR1 not really parquet")
    args = ["caption", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-model")]
    r = runner.invoke(app, args, env={"COLUMNS": "300"})
    out = flat(r.output)
    assert r.exit_code == 2 and "part-x-00000.parquet" in out and "corrupt" in out and "move" in out
    (captions / "part-x-00000.parquet").unlink()
    with ShardWriter(captions, EDITS_SCHEMA, "y") as w:  # an edits shard copied into captions/
        w.add({"key": "k", "image_id": "i", "source": "s"})
    r = runner.invoke(app, args, env={"COLUMNS": "300"})
    out = flat(r.output)
    assert r.exit_code == 2 and "part-y-00000.parquet" in out and "does not hold this stage's rows" in out


def test_an_input_file_that_is_not_utf8_exits_2_naming_the_flag(tmp_path):
    """Before: UnicodeDecodeError ended `check` and `rewrite --input` with a traceback."""
    f = tmp_path / "pairs.jsonl"
    f.write_bytes('{"source": "a caf\u00e9", "target": "a bar"}\n'.encode("latin-1"))
    r = runner.invoke(app, ["check", str(f)], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "not UTF-8" in flat(r.output) and "iconv" in flat(r.output)
    r = runner.invoke(app, ["rewrite", "--input", str(f), "--text-column", "source", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no-model")], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "--input" in flat(r.output) and "not UTF-8" in flat(r.output)
    prompt = tmp_path / "caption.txt"
    prompt.write_bytes("D\u00e9cris l'image.".encode("latin-1"))
    png(tmp_path / "imgs" / "a.png")
    r = runner.invoke(app, ["caption", "folder", str(tmp_path / "imgs"), "--prompt-file", str(prompt), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no-model")], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "--prompt-file" in flat(r.output) and "not UTF-8" in flat(r.output)


def test_disk_full_is_one_line_and_exit_1_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    """Before: any failure but a ConfigError ended in a bare traceback."""
    import dataprep.cli as cli
    import dataprep.engines
    import dataprep.store as store

    png(tmp_path / "imgs" / "a.png")

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "part.parquet")

    monkeypatch.setattr(dataprep.engines, "load_engine", lambda cfg: FakeEngine())
    monkeypatch.setattr(store.pq, "write_table", no_space)
    argv = ["dataprep", "caption", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--workers", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert "No space left on device" in err and "free disk space" in err and "--debug" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(sys, "argv", argv[:2] + ["--debug"] + argv[2:])  # after the subcommand works too
    with pytest.raises(OSError):
        cli.main()
    monkeypatch.setenv("DATAPREP_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(OSError):
        cli.main()


def test_ctrl_c_says_the_finished_shards_are_kept_and_exits_130(tmp_path, monkeypatch, capsys):
    """Before: typer turned the KeyboardInterrupt into a silent exit 130, so run_cli's message never showed."""
    import dataprep.cli as cli
    import dataprep.engines

    png(tmp_path / "imgs" / "a.png")

    def ctrl_c(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataprep.engines, "load_engine", ctrl_c)
    monkeypatch.setattr(sys, "argv", ["dataprep", "caption", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--workers", "0"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 130
    assert "interrupted: finished shards are kept" in capsys.readouterr().err


def test_softrepa_cli_failure_is_one_line_and_exit_1(monkeypatch, capsys):
    import softrepa.cli as scli
    import softrepa.train

    def gone(cfg):
        raise ConnectionError("server at 127.0.0.1:9 went away")

    monkeypatch.setattr(softrepa.train, "train", gone)
    monkeypatch.setattr(sys, "argv", ["softrepa", "train", "--preset", "sd3", "--batches", ".", "--model", "m", "--out", "o"])
    with pytest.raises(SystemExit) as exc:
        scli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "ConnectionError: server at 127.0.0.1:9 went away" in err and "Traceback" not in err


# ------------------------------------------------------------ workers die with their parent

PARENT = """
import sys, time
from dataprep.caption import _KeySpec, _ordered_map
from dataprep.images import PrepOptions
from dataprep.sources import ImageRef

def refs():
    yield ImageRef("x/a.png", "folder", sys.argv[1])
    print("started", flush=True)
    time.sleep(600)  # the parent hangs here, its pool alive, until the test kills it
    yield ImageRef("x/b.png", "folder", sys.argv[1])

spec = _KeySpec(model="m", revision=None, prompt_sha256="p", sampling="{}", seed=None, prep=PrepOptions())
for item in _ordered_map(refs(), spec, workers=2, window=1):
    print("got", item.input.image_id, flush=True)
"""


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to find the workers")
def test_decode_workers_end_after_kill_9_of_their_parent(tmp_path):
    """Before: pool workers outlived a killed parent, blocked on their task queue forever."""
    img = png(tmp_path / "a.png")
    parent = py(PARENT.replace("sys.argv[1]", repr(str(img))))
    workers: list[int] = []
    try:
        lines = [parent.stdout.readline().strip() for _ in range(2)]
        assert lines == ["got x/a.png", "started"], parent.stderr.read() if parent.poll() is not None else lines
        workers = _children(parent.pid)  # one of them decoded a.png: they are up
        assert workers, "no worker process found"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        for _ in range(200):  # up to 20 s on a loaded machine; typically well under a second
            if not any(_alive(w) for w in workers):
                break
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), f"workers {workers} outlived their parent"
    finally:
        parent.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


# ------------------------------------------------------------ exports


def test_exports_copy_only_files_that_decode_as_images(tmp_path):
    """Before: a file replaced by text after captioning was exported as an 'image'."""
    from dataprep.export import export_piebench, export_softrepa

    good = png(tmp_path / "imgs" / "0001.png")
    fake = tmp_path / "imgs" / "0002.png"
    fake.write_text("not an image any more")
    cut = tmp_path / "imgs" / "0003.png"
    cut.write_bytes(png_bytes(Image.new("RGB", (64, 64), (5, 6, 7)))[:60])
    run = tmp_path / "run"
    with ShardWriter(run / "edits", EDITS_SCHEMA, "r") as w:
        for n, p in enumerate((good, fake, cut)):
            w.add({"image_id": f"div2k/{n}", "image_uri": str(p), "source": "A red cat on a mat.", "target": "A red dog on a mat.", "passed": True, "violations": [], "key": f"k{n}", "created_at": utcnow()})
    for export, images in ((export_softrepa, "."), (export_piebench, "annotation_images")):
        s = export(run, tmp_path / export.__name__, link=False)
        assert s.pairs == 1 and s.skipped["image_not_decodable"] == 2
        assert sorted(p.name for p in (tmp_path / export.__name__ / images).iterdir() if p.suffix == ".png") == ["0001.png"]


def test_wrong_typed_items_of_an_evaluate_pairs_file_are_error_pairs(tmp_path):
    """Before: str() turned a null prompt into the prompt "None" (and a non-object item crashed)."""
    from softrepa.evaluate import load_pairs

    png(tmp_path / "0001.png")
    (tmp_path / "pairs.json").write_text(json.dumps([
        {"prompt": "a red cat", "img_path": "0001.png", "tgt_prompt": "a red dog"},
        {"prompt": None, "img_path": "0001.png", "tgt_prompt": "a red dog"},
        {"prompt": "a red cat", "img_path": 7, "tgt_prompt": "a red dog"},
        ["not", "an", "object"],
    ]))
    good, null, number, listed = load_pairs(tmp_path / "pairs.json")
    assert good.error is None and (good.source, good.target) == ("a red cat", "a red dog")
    assert null.error == "bad_type: item 1: prompt is missing"
    assert number.error == "bad_type: item 2: img_path is int"
    assert listed.error == "bad_type: item 3: list, not an object"
    assert len({good.pair_id, null.pair_id, number.pair_id, listed.pair_id}) == 4


def test_batches_on_a_corrupt_caption_shard_or_a_locked_folder_is_a_config_error(tmp_path):
    """Before: a corrupt caption shard crashed `dataprep batches` midway with a pyarrow traceback."""
    from dataprep.batches import BatchOptions, build_batches
    from dataprep.store import stage_lock

    with ShardWriter(tmp_path / "captions", CAPTIONS_SCHEMA, "c") as w:
        for i in range(8):
            w.add(caption_row(f"img/{i}", f"caption number {i}", image_uri=f"/x/{i}.png"))
    (tmp_path / "captions" / "part-z-00000.parquet").write_bytes(b"garbage")
    opts = BatchOptions(preset="custom", images=2, prompts=4)
    with pytest.raises(ConfigError) as exc:
        build_batches(tmp_path / "captions", tmp_path / "batches", opts)
    assert exc.value.flag == "--captions" and "part-z-00000.parquet" in str(exc.value)
    (tmp_path / "captions" / "part-z-00000.parquet").unlink()
    with stage_lock(tmp_path / "batches"):  # re-entrant in one process: the build itself goes on
        build_batches(tmp_path / "captions", tmp_path / "batches", opts)
    holder = _hold(tmp_path / "batches")
    try:
        with pytest.raises(ConfigError) as exc:
            build_batches(tmp_path / "captions", tmp_path / "batches", opts)
        assert exc.value.flag == "--out" and f"pid {holder.pid}" in str(exc.value)
    finally:
        holder.kill()
        holder.wait()


def test_max_bytes_measures_images_inside_a_dataset_without_copying_them(tmp_path):
    """Before: an image embedded in a `datasets` row had no size check at all."""
    import datasets

    from dataprep.sources import hf_dataset, stored_size

    small = Image.new("RGB", (4, 4))
    big = Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3))  # noise: PNG cannot shrink it
    ds = datasets.Dataset.from_dict({"image": [small, big]}).cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "d.parquet"))
    refs = list(hf_dataset(str(tmp_path / "d.parquet")))
    sizes = [stored_size(r) for r in refs]
    assert sizes[0] < 1000 < 200_000 < sizes[1]
    s = run_caption(refs, tmp_path / "run", EngineConfig(model="fake-model"), CaptionOptions(workers=0, max_bytes=100_000), engine=FakeEngine(), progress=False)
    assert s.done == 1 and s.failed["too_large"] == 1


def test_a_corrupt_exports_registry_is_replaced_not_fatal(tmp_path):
    """Before: a registry holding a JSON list (not an object) ended the export with AttributeError."""
    from dataprep.export import export_softrepa

    good = png(tmp_path / "imgs" / "0001.png")
    run = tmp_path / "run"
    with ShardWriter(run / "edits", EDITS_SCHEMA, "r") as w:
        w.add({"image_id": "div2k/1", "image_uri": str(good), "source": "A red cat on a mat.", "target": "A red dog on a mat.", "passed": True, "violations": [], "key": "k", "created_at": utcnow()})
    (run / "exports.json").write_text("[1, 2")
    with pytest.warns(RuntimeWarning):
        export_softrepa(run, tmp_path / "out")
    (run / "exports.json").write_text("[1, 2]")
    export_softrepa(run, tmp_path / "out")
    assert [e["pairs"] for e in json.loads((run / "exports.json").read_text())["exports"]] == [1]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_shards_written_before_later_columns_resume_untouched(tmp_path):
    """Shards from before image_flags / note were added still belong to their stage.

    check_shards refused them (missing columns), which would have stopped
    every existing run folder from resuming after an upgrade.
    """
    import pyarrow as pa

    from dataprep.store import CAPTIONS_SCHEMA, EDITS_SCHEMA, LATER_COLUMNS, check_shards, done_keys, read_table, write_table_atomic

    for name, schema in (("captions", CAPTIONS_SCHEMA), ("edits", EDITS_SCHEMA)):
        old = pa.schema([f for f in schema if f.name not in LATER_COLUMNS])
        assert len(old) < len(schema)
        row = {f.name: None for f in old} | {"key": f"k-{name}", "image_id": "div2k/0001"}
        folder = tmp_path / name
        folder.mkdir()
        write_table_atomic(pa.Table.from_pylist([row], schema=old), folder / "part-old-00000.parquet")
        check_shards(folder, schema)  # no ConfigError
        assert done_keys(folder) == {f"k-{name}"}
        t = read_table(folder, schema)
        assert t.num_rows == 1 and all(t.column(c).null_count == 1 for c in LATER_COLUMNS if c in schema.names)


def test_zz_every_reason_the_tests_above_wrote_is_in_the_vocabulary():
    """Runs last in this module: the error rows the failure tests made (caption,
    rewrite and store coercion) carry only reasons of dataprep.errors.Reason."""
    if not WRITTEN_ERRORS:
        pytest.skip("run with the tests above (they write the error rows)")
    vocabulary = {r.value for r in Reason}
    assert {reason_of(e) for e in WRITTEN_ERRORS} <= vocabulary, sorted({reason_of(e) for e in WRITTEN_ERRORS} - vocabulary)
