"""The editing evaluator end to end on tiny models: a run directory and an official JSON in, scores and tables out."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dataprep.errors import ConfigError
from dataprep.store import EDITS_SCHEMA, ShardWriter
from softrepa.evaluate import EvalConfig, Setting, evaluate_edit, load_pairs, summarize, table_markdown
from softrepa.metrics import MetricConfig, missing_metrics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pipelines, metric_models):
    from softrepa.tokens import SoftTokens, TokenConfig, save_tokens

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-eval")
    sd3 = tiny_pipelines["sd3"]
    from types import SimpleNamespace

    torch.manual_seed(0)
    transformer_config = json.loads((sd3 / "transformer" / "config.json").read_text())
    tokens = SoftTokens(TokenConfig.preset("sd3", SimpleNamespace(**transformer_config)))
    save_tokens(tokens, root / "tokens")
    return {"sd3": sd3, "tokens": root / "tokens", **metric_models}


def _png(path, seed, size=(36, 32)):
    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8")).save(path)
    return path


def _run_dir(root):
    """A run directory as the pipeline writes it: RUN/edits shards pointing at PNGs."""
    imgs = root / "images"
    imgs.mkdir(parents=True)
    rows = [
        dict(image_id="div2k/0001", image_uri=str(_png(imgs / "0001.png", 1)), source="a red house", target="a blue house", passed=True),
        dict(image_id="div2k/0002", image_uri="file://" + str(_png(imgs / "0002.png", 2)), source="a cat on grass", target="a dog on grass", passed=True),
        dict(image_id="div2k/0003", image_uri=str(_png(imgs / "0003.png", 3)), source="a tree", target="two trees", passed=False),  # failed the rules
        dict(image_id="div2k/0004", image_uri=str(imgs / "missing.png"), source="a boat", target="a ship", passed=True),  # image gone
        dict(image_id="div2k/0005", image_uri=str(imgs / "0001.png"), source="x", target=None, passed=None, error="engine: timeout"),
    ]
    with ShardWriter(root / "edits", EDITS_SCHEMA, run_id="test") as w:
        for i, r in enumerate(rows):
            w.add({**r, "key": f"k{i}", "violations": [], "attempts": 1})
    return root


def _metrics(tiny, metrics=("clip", "pickscore", "lpips", "imagereward", "hpsv2", "fid")):
    return MetricConfig(metrics=metrics, clip_model=str(tiny["clip"]), pickscore_model=str(tiny["clip"]), pickscore_processor=None,
                        lpips_model=str(tiny["lpips"]), device="cpu", batch_size=2)


FAST = dict(steps=4, size=32, device="cpu", progress=False)


def test_run_directory_gives_per_image_scores_and_the_summary_table(tiny, tmp_path):
    run = _run_dir(tmp_path / "run")
    out = tmp_path / "eval"
    cfg = EvalConfig(pairs=str(run), model=str(tiny["sd3"]), out=str(out), tokens=str(tiny["tokens"]), tgt_cfgs=(5.0, 7.0), n_max=3,
                     metrics=_metrics(tiny), **FAST)
    res = evaluate_edit(cfg)

    # every error-free edit with a target, as the paper (its published pairs fail the
    # checker): 0001, 0002, 0003 (failed the rules) and 0004 (image missing -> per-row error)
    assert res.n_pairs == 4
    settings = [s.setting_id for s in cfg.settings()]
    assert len(settings) == 4  # 2 methods x 2 target CFGs
    scores = pq.read_table(res.scores_path).to_pylist()
    assert len(scores) == 4 * 4
    good = [r for r in scores if r["error"] is None]
    bad = [r for r in scores if r["error"] is not None]
    assert {r["image_id"] for r in bad} == {"div2k/0004"} and all(r["error"].startswith("image") for r in bad)
    assert len(good) == 12
    for r in good:
        assert -1 <= r["clip"] <= 1 and r["lpips"] >= 0 and r["pickscore"] is not None
        assert (out / "images" / r["setting"]).is_dir()
    assert res.n_edited == 12 and res.n_failed == 4
    # the checker's verdict is a column, so the table can be split by it
    assert {r["image_id"]: r["passed"] for r in scores} == {"div2k/0001": True, "div2k/0002": True, "div2k/0003": False, "div2k/0004": True}
    assert "3 of 4 pairs passed the rule checker" in res.markdown
    split = res.markdown.split("Only the 3 pairs that passed the rule checker")[1]
    assert "| FlowEdit | 3 | 5 | 2 (1 failed) |" in split  # 0001, 0002 scored; 0004's image is missing
    only = load_pairs(run, passed_only=True)
    assert sorted(p.image_id for p in only) == ["div2k/0001", "div2k/0002", "div2k/0004"]

    # the table: one row per method x CFG, paper columns, n/a + install hint for what is missing
    assert [(r["method"], r["tgt_cfg"]) for r in res.table] == [
        ("FlowEdit", 5.0), ("FlowEdit", 7.0), ("FlowEdit + soft tokens", 5.0), ("FlowEdit + soft tokens", 7.0)]
    md = res.summary_md.read_text()
    for col in ("ImageReward", "PickScore", "CLIP", "HPS", "FID", "LPIPS"):
        assert col in md
    for name, hint in missing_metrics(cfg.metrics.metrics).items():
        assert hint in md
    csv_lines = res.summary_csv.read_text().strip().splitlines()
    assert csv_lines[0].startswith("method,n_max,tgt_cfg,pairs,failed,imagereward,pickscore,clip")
    assert len(csv_lines) == 5
    # tokens change the edit: same CFG, different method -> different images
    tok = next(s for s in cfg.settings() if s.method == "flowedit+tokens" and s.tgt_cfg == 5.0)
    van = next(s for s in cfg.settings() if s.method == "flowedit" and s.tgt_cfg == 5.0)
    pid = next(r["pair_id"] for r in good)
    a = np.asarray(Image.open(out / "images" / tok.setting_id / f"{pid}.png"))
    b = np.asarray(Image.open(out / "images" / van.setting_id / f"{pid}.png"))
    assert not np.array_equal(a, b)
    manifest = json.loads(res.manifest_path.read_text())
    assert manifest["counts"]["failed"] == 4 and manifest["failures"] == {"image": 4}
    assert {"done", "skipped", "failed", "left_out", "truncated"} <= manifest["counts"].keys()  # the counts every manifest has


def test_rerun_reuses_edited_images_and_redoes_only_what_is_missing(tiny, tmp_path):
    pairs = tmp_path / "pairs.json"
    _png(tmp_path / "a.png", 5)
    _png(tmp_path / "b.png", 6)
    pairs.write_text(json.dumps([
        {"prompt": "a red car", "img_path": "a.png", "tgt_prompt": "a red bus"},
        {"prompt": "a cup of tea", "img_path": "b.png", "tgt_prompt": "a cup of coffee"},
    ]))
    cfg = EvalConfig(pairs=str(pairs), model=str(tiny["sd3"]), out=str(tmp_path / "eval"), n_max=2, tgt_cfgs=(4.0,),
                     metrics=_metrics(tiny, ("clip", "lpips")), **FAST)
    first = evaluate_edit(cfg)
    assert (first.n_edited, first.n_reused) == (2, 0)
    setting = cfg.settings()[0].setting_id
    edited = sorted((tmp_path / "eval" / "images" / setting).glob("*.png"))
    assert len(edited) == 2
    before = edited[0].read_bytes()
    edited[1].unlink()  # as if the run had been killed before this one
    second = evaluate_edit(cfg)
    assert (second.n_edited, second.n_reused) == (1, 1)
    assert edited[0].read_bytes() == before
    assert pq.read_table(second.scores_path).num_rows == 2
    # metrics not requested are reported as such, not silently dropped
    assert "not requested" in second.unavailable["pickscore"]
    # anything else that changes the pixels (here the seed) must not reuse those images
    from dataclasses import replace

    third = evaluate_edit(replace(cfg, seed=1))
    assert (third.n_edited, third.n_reused) == (2, 0)


def test_official_prompts_editing_json_resolves_images_next_to_it(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    _png(ref / "0001.png", 1)
    (ref / "prompts_editing.json").write_text(json.dumps([{"prompt": "s", "img_path": "0001.png", "tgt_prompt": "t"}]))
    (p,) = load_pairs(ref / "prompts_editing.json")
    assert p.image_path == str(ref / "0001.png") and (p.source, p.target) == ("s", "t")
    assert p.pair_id.startswith("0001-")


def test_an_official_layout_json_loads(editing_pairs):
    import pathlib

    pairs = load_pairs(editing_pairs)
    assert len(pairs) == 2 and all(pathlib.Path(p.image_path).exists() for p in pairs)
    assert len({p.pair_id for p in pairs}) == 2


def test_summary_means_and_missing_values():
    s = Setting("flowedit", 33, 13.5)
    rows = [
        {"setting": s.setting_id, "error": None, "clip": 0.2, "lpips": 0.1},
        {"setting": s.setting_id, "error": None, "clip": 0.4, "lpips": 0.3},
        {"setting": s.setting_id, "error": "image: gone", "clip": None, "lpips": None},
    ]
    (row,) = summarize(rows, [s], {s.setting_id: 50.0}, ("clip", "lpips", "fid"))
    assert row["clip"] == pytest.approx(0.3) and row["lpips"] == pytest.approx(0.2)
    assert row["fid"] == 50.0 and row["imagereward"] is None
    assert (row["pairs"], row["failed"]) == (2, 1)
    md = table_markdown([row], {"imagereward": "not installed (pip install image-reward)"})
    assert "| FlowEdit | 33 | 13.5 | 2 (1 failed) | n/a |" in md
    assert "pip install image-reward" in md


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"pairs": "/no/such/run"}, "--pairs"),
        ({"methods": ("flowedit+tokens",)}, "--tokens"),
        ({"n_max": 99}, "--n-max"),
        ({"limit": 0}, "--limit"),
    ],
)
def test_bad_eval_config_names_the_flag_before_any_work(tmp_path, kwargs, flag):
    base = dict(pairs=str(tmp_path), model="unused", out=str(tmp_path / "out"))
    with pytest.raises(ConfigError) as err:
        EvalConfig(**{**base, **kwargs}).validate()
    assert err.value.flag == flag
    assert not (tmp_path / "out").exists()


def test_fid_is_computed_per_setting_from_source_and_edited_features(tiny, tmp_path, monkeypatch):
    """FID wiring with a stand-in feature network (pytorch-fid's Inception needs a download)."""
    import softrepa.metrics as metrics

    real_load = metrics.load_scorers
    seen = []

    def features(images):  # [B, 3]: mean colour per image
        seen.append(len(images))
        return metrics.pil_to_tensor(images).mean(dim=(2, 3))

    def load_with_fid(cfg):
        s = real_load(cfg)
        s.fid = features
        s.unavailable.pop("fid", None)
        return s

    monkeypatch.setattr(metrics, "load_scorers", load_with_fid)
    pairs = tmp_path / "pairs.json"
    items = []
    for i in range(3):
        _png(tmp_path / f"{i}.png", 10 + i)
        items.append({"prompt": f"a photo {i}", "img_path": f"{i}.png", "tgt_prompt": f"a painting {i}"})
    pairs.write_text(json.dumps(items))
    cfg = EvalConfig(pairs=str(pairs), model=str(tiny["sd3"]), out=str(tmp_path / "eval"), n_max=2, tgt_cfgs=(3.0, 6.0),
                     metrics=_metrics(tiny, ("clip", "fid")), **FAST)
    res = evaluate_edit(cfg)
    fids = [r["fid"] for r in res.table]
    assert all(f is not None and f >= 0 for f in fids)
    assert fids[0] != fids[1]  # different guidance -> different edited sets
    assert sum(seen) == 3 + 3 + 3  # sources once, edited once per setting
    assert "pytorch-fid" not in res.markdown


def test_cli_evaluate_edit_on_a_run_directory_prints_the_table(tiny, tmp_path):
    from typer.testing import CliRunner

    from softrepa.cli import app

    run = _run_dir(tmp_path / "run")
    out = tmp_path / "eval"
    args = ["evaluate-edit", "--pairs", str(run), "--model", str(tiny["sd3"]), "--out", str(out), "--tokens", str(tiny["tokens"]),
            "--steps", "4", "--n-max", "2", "--tgt-cfg", "6", "--size", "32", "--device", "cpu", "--tiny-metrics", "--limit", "2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "| FlowEdit | 2 | 6 | 2 |" in res.output and "| FlowEdit + soft tokens | 2 | 6 | 2 |" in res.output
    assert "pip install" in res.output  # missing optional metrics are named
    assert (out / "summary.md").exists() and (out / "scores.parquet").exists()
    # beside the tables: the grid page and one PNG per pair (softrepa.grids)
    assert (out / "grids" / "index.html").exists() and len(list((out / "grids").glob("*.png"))) == 2
    assert "grids: file://" in res.output


def test_cli_bad_flag_value_exits_2_with_the_flag(tmp_path):
    from typer.testing import CliRunner

    from softrepa.cli import app

    res = CliRunner().invoke(app, ["evaluate-edit", "--pairs", str(tmp_path), "--out", str(tmp_path / "o"), "--tgt-cfg", "nine"])
    assert res.exit_code == 2
    assert "--tgt-cfg" in res.output


def test_an_installed_optional_metric_is_scored_from_the_edited_files(tiny, tmp_path, monkeypatch):
    """Stand-in ImageReward package with the real API (load(name, device).score(prompt, path) -> float)."""
    import importlib.machinery
    import sys
    import types

    calls = []

    class Model:
        def score(self, prompt, path):
            calls.append((prompt, path))
            return float(np.asarray(Image.open(path)).mean())  # a function of the edited pixels

    fake = types.ModuleType("ImageReward")
    fake.__spec__ = importlib.machinery.ModuleSpec("ImageReward", None)
    fake.load = lambda name, device="cpu": Model()
    monkeypatch.setitem(sys.modules, "ImageReward", fake)

    pairs = tmp_path / "pairs.json"
    _png(tmp_path / "a.png", 21)
    pairs.write_text(json.dumps([{"prompt": "a red car", "img_path": "a.png", "tgt_prompt": "a red bus"}]))
    cfg = EvalConfig(pairs=str(pairs), model=str(tiny["sd3"]), out=str(tmp_path / "eval"), n_max=2, tgt_cfgs=(4.0,),
                     metrics=_metrics(tiny, ("clip", "imagereward")), **FAST)
    res = evaluate_edit(cfg)
    (row,) = pq.read_table(res.scores_path).to_pylist()
    assert calls == [("a red bus", row["edited_image"])]
    assert row["imagereward"] == pytest.approx(float(np.asarray(Image.open(row["edited_image"])).mean()))
    assert "imagereward" not in res.unavailable and res.table[0]["imagereward"] == pytest.approx(row["imagereward"])


def test_tokens_of_another_backbone_are_a_config_error_naming_tokens(tmp_path):
    """SD1.5 tokens cannot drive SD3's FlowEdit: say so before loading the model."""
    from softrepa.tokens import SoftTokens, TokenConfig, save_tokens

    save_tokens(SoftTokens(TokenConfig(backbone="sd1.5", n_tokens=2, n_layers=1, dim=8, t_dependent=False, apply=("down",))), tmp_path / "tok")
    pairs = tmp_path / "prompts_editing.json"
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    pairs.write_text('[{"prompt": "a dog", "img_path": "a.png", "tgt_prompt": "a fox"}]')
    with pytest.raises(ConfigError) as exc:
        evaluate_edit(EvalConfig(pairs=str(pairs), model=str(tmp_path / "no-model-needed"), out=str(tmp_path / "out"), tokens=str(tmp_path / "tok"), metrics=MetricConfig(metrics=("clip",))))
    assert exc.value.flag == "--tokens"


def test_rerun_with_other_pairs_into_the_same_out_is_refused_and_keeps_the_scores(tiny, tmp_path):
    """scores.parquet and the summary are per input: other --pairs into the same --out would replace them silently."""
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    _png(tmp_path / "a.png", 5)
    _png(tmp_path / "b.png", 6)
    first.write_text(json.dumps([{"prompt": "a red car", "img_path": "a.png", "tgt_prompt": "a red bus"}]))
    second.write_text(json.dumps([{"prompt": "a cup of tea", "img_path": "b.png", "tgt_prompt": "a cup of coffee"}]))
    cfg = EvalConfig(pairs=str(first), model=str(tiny["sd3"]), out=str(tmp_path / "eval"), n_max=2, tgt_cfgs=(4.0,),
                     metrics=_metrics(tiny, ("clip",)), **FAST)
    res = evaluate_edit(cfg)
    before = pq.read_table(res.scores_path).column("pair_id").to_pylist()
    from dataclasses import replace

    with pytest.raises(ConfigError) as err:
        evaluate_edit(replace(cfg, pairs=str(second)))
    assert err.value.flag == "--pairs" and "--out" in str(err.value) and str(first) in str(err.value)
    assert pq.read_table(res.scores_path).column("pair_id").to_pylist() == before  # the first input's scores are kept
    again = evaluate_edit(replace(cfg, pairs=str(tmp_path / "." / "a.json")))  # the same input by another spelling continues
    assert (again.n_edited, again.n_reused) == (0, 1)
    other = evaluate_edit(replace(cfg, pairs=str(second), out=str(tmp_path / "eval-b")))
    assert other.n_edited == 1


def test_evaluate_reports_like_the_data_stages(tiny, tmp_path):
    from dataprep.runtime import StageSummary
    from dataprep.store import read_manifest

    res = evaluate_edit(EvalConfig(pairs=str(_run_dir(tmp_path / "run")), model=str(tiny["sd3"]), out=str(tmp_path / "eval"), n_max=2,
                                   tgt_cfgs=(4.0,), metrics=_metrics(tiny, ("clip",)), **FAST))
    man = read_manifest(tmp_path / "eval")
    assert man["stage"] == "evaluate-edit" and man["run_id"] == res.summary.run_id and man["finished_at"]
    assert isinstance(res.summary, StageSummary) and res.summary.stage == "evaluate-edit"
    assert (res.summary.done, res.summary.skipped, res.summary.n_failed) == (res.n_edited, res.n_reused, res.n_failed)
    assert dict(res.summary.failed) == man["failures"] and "image" in man["failures"]  # the missing file, by reason


@pytest.mark.parametrize("kwargs, flag", [({"n_max": 99}, "--n-max"), ({"limit": 0}, "--limit"), ({"rows": "table7"}, "--rows"),
                                          ({"methods": ("sdedit",)}, "--methods"), ({"dtype": "bf16"}, "--dtype")])
def test_invalid_eval_values_cannot_be_built(kwargs, flag):
    """Values are checked when the config is built; what must exist on disk, when the run starts."""
    with pytest.raises(ConfigError) as err:
        EvalConfig(**{"pairs": "/not/yet", "model": "m", "out": "o", **kwargs})
    assert err.value.flag == flag
    with pytest.raises(ConfigError, match="--metrics"):
        MetricConfig(metrics=("clip", "bleu"))
    EvalConfig(pairs="/not/yet", model="m", out="o", methods=("flowedit", "flowedit+tokens"))  # the recipe's, before training
