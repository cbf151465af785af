"""The defaults reproduce the paper: guidance rule, T5 length, table rows, LPIPS net, evaluation set, leakage guard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from softrepa.edit import EditConfig, guide
from softrepa.evaluate import EvalConfig, Pair, evaluate_edit, find_leakage
from softrepa.metrics import MetricConfig
from tests.softrepa_fixtures import tiny_pipelines


def test_evaluate_defaults_are_table_5_with_the_official_guidance_and_vgg_lpips(tmp_path):
    cfg = EvalConfig(pairs=str(tmp_path), model="m", out=str(tmp_path / "o"), tokens=str(tmp_path))
    rows = [(s.method, s.n_max, s.tgt_cfg) for s in cfg.settings()]
    assert rows == [("flowedit", 33, 13.5), ("flowedit", 33, 16.5), ("flowedit", 33, 19.5),
                    ("flowedit+tokens", 30, 9.0), ("flowedit+tokens", 30, 11.0), ("flowedit+tokens", 30, 13.0)]
    assert cfg.cfg_rule == "official" and EditConfig().cfg_rule == "official"
    assert (cfg.steps, cfg.src_cfg, cfg.n_min, cfg.size) == (50, 3.5, 0, 1024)  # edit_sd3.py --NFE 50 --src_cfg_scale 3.5, 1024 px
    assert cfg.metrics.lpips_model == "vgg"
    assert cfg.passed_only is False
    cfg.validate()  # the default validates even without the optional lpips package


def test_table_6_rows_add_tokens_at_cfg_7(tmp_path):
    cfg = EvalConfig(pairs=str(tmp_path), model="m", out=str(tmp_path / "o"), tokens=str(tmp_path), rows="table6")
    assert [s.tgt_cfg for s in cfg.settings() if s.method == "flowedit+tokens"] == [7.0, 9.0, 11.0, 13.0]
    assert [s.tgt_cfg for s in cfg.settings() if s.method == "flowedit"] == [13.5, 16.5, 19.5]


def test_official_guidance_is_flowedit_guidance_at_scale_plus_one():
    u, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    w = 9.0
    official = guide(u, c, w, "official")
    assert torch.allclose(official, c + w * (c - u))
    assert torch.allclose(official, guide(u, c, w + 1, "flowedit"), atol=1e-5)  # effective scale w + 1
    assert torch.equal(guide(u, c, w, "softrepa-official"), official)  # the earlier name still works


def test_cli_defaults_equal_the_config_defaults(tmp_path, monkeypatch):
    """Every default the paper needs reaches EvalConfig unchanged through the CLI."""
    from typer.testing import CliRunner

    import softrepa.evaluate as ev
    from softrepa.cli import app

    seen = {}

    class Stop(Exception):
        pass

    def capture(cfg):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(ev, "evaluate_edit", capture)
    res = CliRunner().invoke(app, ["evaluate-edit", "--pairs", str(tmp_path), "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, Stop), res.output
    cfg = seen["cfg"]
    ref = EvalConfig(pairs=str(tmp_path), model=cfg.model, out=str(tmp_path / "o"))
    for name in ("cfg_rule", "rows", "steps", "n_min", "src_cfg", "seed", "size", "passed_only", "n_max", "tgt_cfgs"):
        assert getattr(cfg, name) == getattr(ref, name), name
    assert cfg.metrics.lpips_model == MetricConfig().lpips_model == "vgg"
    # the other rule and table stay reachable by name
    res = CliRunner().invoke(app, ["evaluate-edit", "--pairs", str(tmp_path), "--out", str(tmp_path / "o"), "--guidance-rule", "flowedit", "--rows", "table6"])
    assert (seen["cfg"].cfg_rule, seen["cfg"].rows) == ("flowedit", "table6")


def test_t5_length_is_512_in_training_and_editing():
    """77 CLIP + 512 T5 positions, as the official sampler's encode_prompt, in both code paths."""
    from softrepa.backbone import T5_MAX_LENGTH, PromptCache, load_parts
    from softrepa.edit import SD3FlowEditor, load_sd3

    assert T5_MAX_LENGTH == 512
    model = str(tiny_pipelines()["sd3"])
    parts = load_parts(model, "sd3")
    emb = PromptCache(parts)(["a red cat on a sofa"]).embeds
    assert emb.shape[1] == 77 + 512
    editor = SD3FlowEditor(load_sd3(model, device="cpu", dtype="float32"))
    e, _ = editor.encode_prompt(["a red cat on a sofa"])
    assert e.shape[1] == 77 + 512
    assert torch.allclose(e[0], emb[0], atol=1e-6)  # same text stream for training and editing


# ------------------------------------------------------------------ leakage guard


def _png(path, seed, size=(36, 32)):
    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8")).save(path)
    return path


def _sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_leakage_is_counted_by_sha256_and_by_id(tmp_path):
    a, b, c = _png(tmp_path / "0001.png", 1), _png(tmp_path / "0002.png", 2), _png(tmp_path / "0003.png", 3)
    copy = tmp_path / "renamed.png"
    copy.write_bytes(c.read_bytes())  # same content under another name: caught by sha256
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    pairs = [Pair("p1", "div2k/0001", str(a), "s", "t"), Pair("p2", "x/0002", str(b), "s", "t"), Pair("p3", "renamed", str(copy), "s", "t"),
             Pair("p4", "div2k/0001", str(a), "s", "other target")]  # same image twice counts once
    assert find_leakage(pairs, tokens) is None  # no record: nothing to say
    (tokens / "trained_images.json").write_text(json.dumps({"image_ids": ["div2k/0001", "coco/0002", "div2k/0003"], "sha256": ["", "", _sha(c)]}))
    leak = find_leakage(pairs, tokens)
    assert leak.n_images == 3 and leak.n_trained == 3
    assert leak.overlap == ["div2k/0001", "renamed", "x/0002"]
    assert (leak.by_sha256, leak.by_id) == (1, 2)
    (tokens / "trained_images.json").write_text(json.dumps({"image_ids": ["coco/000000000139"], "sha256": ["ab" * 32]}))
    assert find_leakage(pairs, tokens).overlap == []


def test_evaluate_warns_with_counts_when_evaluation_images_were_trained_on(tmp_path, metric_models):
    from softrepa.tokens import SoftTokens, TokenConfig, save_tokens

    model = tiny_pipelines()["sd3"]
    cfgjson = json.loads((model / "transformer" / "config.json").read_text())
    from types import SimpleNamespace

    torch.manual_seed(0)
    save_tokens(SoftTokens(TokenConfig.preset("sd3", SimpleNamespace(**cfgjson))), tmp_path / "tokens")
    imgs = [_png(tmp_path / f"{i:04d}.png", i) for i in (1, 2)]
    (tmp_path / "tokens" / "trained_images.json").write_text(json.dumps({"image_ids": ["div2k/0001"], "sha256": [_sha(imgs[0])]}))
    pairs = tmp_path / "prompts_editing.json"
    pairs.write_text(json.dumps([{"prompt": "a red car", "img_path": p.name, "tgt_prompt": "a red bus"} for p in imgs]))
    cfg = EvalConfig(pairs=str(pairs), model=str(model), out=str(tmp_path / "eval"), tokens=str(tmp_path / "tokens"),
                     methods=("flowedit+tokens",), tgt_cfgs=(4.0,), n_max=1, steps=2, size=32, device="cpu", progress=False,
                     metrics=MetricConfig(metrics=("clip",), clip_model=str(metric_models["clip"]), pickscore_processor=None, device="cpu"))
    res = evaluate_edit(cfg)
    assert res.leakage is not None and res.leakage.overlap == ["0001"]
    assert "1 of 2 evaluation images were in the tokens' training set" in res.markdown
    assert "(1 by file sha256, 0 by image id / file stem" in res.markdown
    manifest = json.loads(res.manifest_path.read_text())
    assert manifest["counts"]["images_in_training"] == 1

    # the command line says it too (the images are reused: no second edit)
    from typer.testing import CliRunner

    from softrepa.cli import app

    out = CliRunner().invoke(app, ["evaluate-edit", "--pairs", str(pairs), "--model", str(model), "--out", str(tmp_path / "eval"),
                                   "--tokens", str(tmp_path / "tokens"), "--methods", "flowedit+tokens", "--tgt-cfg", "4", "--n-max", "1",
                                   "--steps", "2", "--size", "32", "--device", "cpu", "--metrics", "clip", "--clip-model", str(metric_models["clip"]),
                                   "--pickscore-processor", "model"])
    assert out.exit_code == 0, out.output
    assert "edited 0, reused 2" in out.output
    assert "warning, leakage:" in " ".join(out.output.split()) and "1 of 2 evaluation images" in " ".join(out.output.split())


@pytest.mark.parametrize("bad", ["[1, 2", '{"image_ids": 5}'])
def test_an_unreadable_training_record_names_tokens(tmp_path, bad):
    from dataprep.errors import ConfigError

    (tmp_path / "trained_images.json").write_text(bad)
    with pytest.raises(ConfigError) as err:
        find_leakage([Pair("p", "a", str(tmp_path / "a.png"), "s", "t")], tmp_path)
    assert err.value.flag == "--tokens"


def test_a_rewrite_rerun_replaces_the_older_edit_of_the_same_key(tmp_path):
    """Now that failing edits are evaluated too, a row rewritten by a rerun (same key, newer
    shard) must replace the older attempt rather than add a second pair for the image."""
    from dataprep.store import EDITS_SCHEMA, ShardWriter
    from softrepa.evaluate import load_pairs

    img = _png(tmp_path / "0001.png", 1)
    base = dict(image_id="div2k/0001", image_uri=str(img), source="a red house", violations=[], attempts=1)
    with ShardWriter(tmp_path / "edits", EDITS_SCHEMA, run_id="20260101T000000000000-aaaaaa") as w:
        w.add({**base, "key": "k1", "target": "a red house and a car", "passed": False})
        w.add({**base, "image_id": "div2k/0002", "key": "k2", "target": "a blue house", "passed": True})
    with ShardWriter(tmp_path / "edits", EDITS_SCHEMA, run_id="20260102T000000000000-bbbbbb") as w:
        w.add({**base, "key": "k1", "target": "a red barn", "passed": True, "attempts": 2})
    pairs = load_pairs(tmp_path)
    assert [(p.image_id, p.target, p.passed) for p in pairs] == [("div2k/0001", "a red barn", True), ("div2k/0002", "a blue house", True)]
    assert len(load_pairs(tmp_path, passed_only=True)) == 2
