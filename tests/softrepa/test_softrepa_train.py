"""The trainer on tiny random pipelines loaded by path: frozen base, learning, resume, CLI."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from softrepa.tokens import SoftTokens, TokenConfig, load_tokens, wrap_model
from softrepa.backbone import PromptCache, encode_images, load_parts
from dataprep.errors import ConfigError
from softrepa.train import TrainConfig, assert_only_tokens_train, make_optimizer, train, train_step
from tests.softrepa_fixtures import PROMPTS, tiny_pipelines, write_batch_shards, write_pngs

torch.set_num_threads(1)


def _fixed_batch(parts, n_images: int, prompts: list[str]):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(n_images, 3, parts.resolution, parts.resolution, generator=g) * 2 - 1
    latents = encode_images(parts, pixels, g)
    noise = torch.randn((1, *latents.shape[1:]), generator=g)
    return latents, PromptCache(parts)(prompts), torch.arange(n_images), noise


def _state(parts) -> dict[str, torch.Tensor]:
    out = {}
    for name, comp in parts.pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            out.update({f"{name}.{k}": v.clone() for k, v in comp.state_dict().items()})
    return out


def test_a_training_step_changes_only_the_tokens():
    parts = load_parts(str(tiny_pipelines()["sd3"]), "sd3")
    torch.manual_seed(0)
    tokens = SoftTokens(TokenConfig.preset("sd3", parts.denoiser))
    model = wrap_model(parts.denoiser, tokens)
    assert_only_tokens_train(parts, tokens)
    latents, prompts, pos, noise = _fixed_batch(parts, 2, PROMPTS[:2])
    before, tok_before = _state(parts), {k: v.clone() for k, v in tokens.state_dict().items()}
    opt, _ = make_optimizer(tokens, TrainConfig("sd3", ".", "m", "o", lr=0.1))
    # a temperature where the tiny model's errors (~5) do not underflow the logits
    out = train_step(parts, model, opt, latents, prompts, pos, 500, noise, temperature=5.0, scale=1e4)
    assert torch.isfinite(out.loss)
    after = _state(parts)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen weight changed"
    assert not torch.equal(tok_before["tokens"], tokens.tokens)
    assert not torch.equal(tok_before["t_embedding.weight"], tokens.t_embedding.weight)
    model.remove()


def test_an_unfrozen_base_weight_is_caught():
    parts = load_parts(str(tiny_pipelines()["sd1.5"]), "sd1.5")
    tokens = SoftTokens(TokenConfig.preset("sd1.5", parts.denoiser))
    parts.denoiser.conv_in.weight.requires_grad_(True)
    with pytest.raises(AssertionError, match="only the soft tokens"):
        assert_only_tokens_train(parts, tokens)


def test_thirty_steps_on_a_fixed_batch_lower_the_contrastive_loss():
    """Fixed images, prompts, timestep (500) and noise; 30 AdamW steps on SD1.5 tokens.

    A random tiny UNet barely listens to its text (prompt-to-prompt error
    differences ~1e-3 of E ~ 1.07), so at the paper's scale 4 / temperature
    0.07 the logits underflow to 0 and no gradient flows; scale 1000 and
    temperature 1 put the same loss in its working range. Margin: the loss
    must fall by at least 0.1 nats (log 4 = 1.386 is chance; ~0.25 observed).
    """
    parts = load_parts(str(tiny_pipelines()["sd1.5"]), "sd1.5")
    torch.manual_seed(0)
    tokens = SoftTokens(TokenConfig.preset("sd1.5", parts.denoiser))
    model = wrap_model(parts.denoiser, tokens)
    latents, prompts, pos, noise = _fixed_batch(parts, 4, PROMPTS[:4])
    opt, _ = make_optimizer(tokens, TrainConfig("sd1.5", ".", "m", "o", lr=0.2))
    kw = dict(scale=1000.0, temperature=1.0)
    losses = [train_step(parts, model, opt, latents, prompts, pos, 500, noise, **kw).loss.item() for _ in range(30)]
    from softrepa.loss import softrepa_loss
    from softrepa.backbone import grid_errors

    with torch.no_grad():
        final = softrepa_loss(grid_errors(parts, model, latents, prompts, 500, noise), pos, **kw).loss.item()
    assert final <= losses[0] - 0.1, (losses[0], final)
    model.remove()


@pytest.fixture()
def shards(tmp_path, samples_dir) -> dict[str, Path]:
    """Batch shards for sd3 (4 x 4) and sd1.5 (2 x 4): PNG paths, a zip:// URL and one missing file."""
    pngs = [str(p) for p in write_pngs(tmp_path / "img", 3)]
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        zf.write(pngs[0], "inside/zipped.png")
    uris = pngs + [f"zip://inside/zipped.png::{tmp_path / 'imgs.zip'}"]
    # and one DIV2K-sized frame (2040x1356), which the trainer resizes like any other
    uris.append(str(samples_dir / "0001.png"))
    write_batch_shards(tmp_path / "sd3", "sd3", uris, PROMPTS, n_rows=3, n_images=4, n_prompts=4, bad_uri_rows=(1,))
    write_batch_shards(tmp_path / "sd15", "sd1.5", uris, PROMPTS, n_rows=3, n_images=2, n_prompts=4, bad_uri_rows=(1,))
    return {"sd3": tmp_path / "sd3", "sd1.5": tmp_path / "sd15", "root": tmp_path}


def _log_steps(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "step" in r]


def test_resume_continues_the_same_trajectory(shards):
    root, model = shards["root"], str(tiny_pipelines()["sd1.5"])
    common = dict(preset="sd1.5", batches=str(shards["sd1.5"]), model=model, checkpoint_every=2, lr=0.05, progress=False,
                  resolution="native", best_by="none")
    full = train(TrainConfig(out=str(root / "full"), steps=5, **common))
    train(TrainConfig(out=str(root / "part"), steps=3, **common))  # checkpoints at 2 and 3
    # as if killed after step 3's log line but before its checkpoint
    import shutil

    shutil.rmtree(root / "part" / "checkpoints" / "step-0000003")
    shutil.rmtree(root / "part" / "tokens")
    resumed = train(TrainConfig(out=str(root / "part"), steps=5, resume=True, **common))
    assert full.steps == resumed.steps == 5
    a, b = load_tokens(full.tokens_dir), load_tokens(resumed.tokens_dir)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.t_embedding.weight, b.t_embedding.weight)
    la, lb = _log_steps(full.log_path), _log_steps(resumed.log_path)
    assert [(r["step"], r["batch_id"], r["t"], r["loss"]) for r in la] == [(r["step"], r["batch_id"], r["t"], r["loss"]) for r in lb]
    # a run that never resumed would differ (the RNG and optimizer state matter)
    fresh = train(TrainConfig(out=str(root / "fresh"), steps=3, **{**common, "seed": 1}))
    assert not torch.equal(load_tokens(fresh.tokens_dir).tokens, a.tokens)


def test_resume_refuses_a_changed_resolution(shards):
    """The checkpoint's steps ran at one size; resuming at another would mix two trainings under one config."""
    root, model = shards["root"], str(tiny_pipelines()["sd1.5"])
    common = dict(preset="sd1.5", batches=str(shards["sd1.5"]), model=model, checkpoint_every=2, lr=0.05, progress=False, best_by="none")
    train(TrainConfig(out=str(root / "native"), steps=2, resolution="native", **common))  # the tiny model's own 32 px
    with pytest.raises(ConfigError) as err:  # a number: refused before the model loads
        train(TrainConfig(out=str(root / "native"), steps=3, resume=True, resolution=64, **common))
    assert err.value.flag == "--resolution" and "32" in str(err.value)
    train(TrainConfig(out=str(root / "px64"), steps=2, resolution=64, **common))
    with pytest.raises(ConfigError) as err:  # native is known once the model is loaded
        train(TrainConfig(out=str(root / "px64"), steps=3, resume=True, resolution="native", **common))
    assert err.value.flag == "--resolution" and "64" in str(err.value)
    assert _log_steps(root / "px64" / "train_log.jsonl")[-1]["step"] == 2  # nothing was trained or rewritten
    done = train(TrainConfig(out=str(root / "px64"), steps=3, resume=True, resolution=64, **common))
    assert done.steps == 3


def test_train_reports_like_the_data_stages(shards):
    """The same manifest shape (dataprep.store.Manifest) and summary (StageSummary) as every stage."""
    from dataprep.runtime import StageSummary
    from dataprep.store import read_manifest

    out = shards["root"] / "reported"
    res = train(TrainConfig(preset="sd1.5", batches=str(shards["sd1.5"]), model=str(tiny_pipelines()["sd1.5"]), out=str(out), steps=3,
                            checkpoint_every=2, resolution="native", best_by="none", progress=False))
    man = read_manifest(out)
    assert man["stage"] == "train" and man["run_id"] and man["finished_at"] and man["config"]["dtype"] == "auto"
    assert man["counts"]["steps"] == 3 and man["counts"]["rows_skipped"] == sum(res.skipped.values()) > 0
    assert man["counts"]["done"] == 3 and man["counts"]["failed"] == man["counts"]["rows_skipped"]  # the counts every manifest has
    assert man["failures"] == res.skipped and res.manifest_path == out / "_manifest.json"
    assert isinstance(res.summary, StageSummary) and res.summary.stage == "train" and res.summary.done == 3
    assert res.summary.failed["image_unreadable"] == res.skipped["image_unreadable"]


def test_dtype_is_the_dataprep_vocabulary_and_precision_still_reads(tmp_path):
    """--precision bf16 became --dtype bfloat16; configs and run folders written with precision still load."""
    from softrepa.checkpoints import read_train_config

    assert TrainConfig("sd3", ".", "m", "o").dtype == "auto"
    assert TrainConfig("sd3", ".", "m", "o", precision="bf16").dtype == "bfloat16"
    assert TrainConfig("sd3", ".", "m", "o", precision="fp32").dtype == "float32"
    with pytest.raises(ConfigError) as err:
        TrainConfig("sd3", ".", "m", "o", dtype="bf16")
    assert err.value.flag == "--dtype" and "bfloat16" in str(err.value)
    (tmp_path / "train_config.json").write_text(json.dumps({"preset": "sd3", "precision": "fp16", "resolution": 512}))
    assert read_train_config(tmp_path)["dtype"] == "float16"
    with pytest.raises(ConfigError, match="--dtype"):  # autocast in half precision is CUDA only
        from softrepa.train import training_precision

        training_precision("bfloat16", "cpu")


def test_device_and_dtype_are_refused_alike_by_every_config(tmp_path):
    """One --device/--dtype vocabulary, one check. Before: softrepa train and evaluate-edit built a
    config with --device nope (exit 1 after the pipeline loaded), and the three dtype messages differed."""
    from dataprep.engines import EngineConfig
    from softrepa.evaluate import EvalConfig

    makers = (lambda **kw: EngineConfig(**kw), lambda **kw: TrainConfig("sd3", ".", "m", "o", **kw),
              lambda **kw: EvalConfig(pairs=str(tmp_path), model="m", out=str(tmp_path / "out"), **kw))
    for field, bad in (("device", "nope"), ("device", "cuda:x"), ("dtype", "bf16")):
        messages = set()
        for make in makers:
            with pytest.raises(ConfigError) as err:
                make(**{field: bad})
            assert err.value.flag == f"--{field}"
            messages.add(str(err.value))
        assert len(messages) == 1, messages
    for make in makers:
        make(device="cuda:1", dtype="bfloat16")  # building checks the words; whether CUDA is there is checked at run time
        make(device="mps")


def test_invalid_values_cannot_be_built():
    """TrainConfig checks its values when built (files are checked when the run starts)."""
    for kwargs, flag in (({"steps": 0}, "--steps"), ({"resolution": "huge"}, "--resolution"), ({"resolution": 30}, "--resolution"),
                         ({"preset": "sd4"}, "--preset"), ({"best_by": "lpips"}, "--best-by"), ({"accumulate": 0}, "--accumulate")):
        with pytest.raises(ConfigError) as err:
            TrainConfig(**{"preset": "sd3", "batches": "/missing", "model": "m", "out": "o", **kwargs})
        assert err.value.flag == flag and "Fix:" in str(err.value)
    TrainConfig("sd3", "/not/yet/built", "m", "o")  # a recipe builds its config before the batches exist


def test_optimizer_and_token_values_cannot_be_built_either():
    """Before: --lr -1, --weight-decay -1, --n-tokens 0, --n-layers 0, --restart-every 0 and --min-lr -1
    built a TrainConfig and failed with exit 1 (a torch ValueError) after the pipeline loaded."""
    for kwargs, flag in (({"lr": -1.0}, "--lr"), ({"lr": 0.0}, "--lr"), ({"weight_decay": -1.0}, "--weight-decay"),
                         ({"n_tokens": 0}, "--n-tokens"), ({"n_layers": 0}, "--n-layers"), ({"restart_every": 0}, "--restart-every"),
                         ({"min_lr": -1e-5}, "--min-lr")):
        with pytest.raises(ConfigError) as err:
            TrainConfig(**{"preset": "sd3", "batches": "/missing", "model": "m", "out": "o", **kwargs})
        assert err.value.flag == flag and "Fix:" in str(err.value)
    TrainConfig("sd3", "/missing", "m", "o", weight_decay=0.0, min_lr=0.0, n_tokens=1, n_layers=1)


def test_softrepa_train_cli_three_steps_writes_tokens(shards):
    from typer.testing import CliRunner

    from softrepa.cli import app

    out = shards["root"] / "run"
    args = ["train", "--preset", "sd3", "--batches", str(shards["sd3"]), "--model", str(tiny_pipelines()["sd3"]),
            "--out", str(out), "--steps", "3", "--checkpoint-every", "2", "--resolution", "native", "--best-by", "none"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    tokens = load_tokens(out / "tokens")
    assert tokens.config.backbone == "sd3" and tuple(tokens.tokens.shape) == (4, 4, 32)
    steps = _log_steps(out / "train_log.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in steps)
    assert "image_unreadable" in res.output  # the row with a missing file was skipped and counted
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    # rerunning into the same folder without --resume is a configuration error
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--resume" in res.output


def test_configuration_errors_stop_before_any_work(shards, tmp_path):
    model = str(tiny_pipelines()["sd1.5"])
    with pytest.raises(ConfigError, match="--preset"):  # shards were built for sd3
        train(TrainConfig(preset="sd1.5", batches=str(shards["sd3"]), model=model, out=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="--batches"):
        train(TrainConfig(preset="sd1.5", batches=str(tmp_path / "none"), model=model, out=str(tmp_path / "b")))
    with pytest.raises(ConfigError, match="--model"):
        train(TrainConfig(preset="sd1.5", batches=str(shards["sd1.5"]), model=str(tmp_path), out=str(tmp_path / "c")))
    with pytest.raises(ConfigError, match="--apply"):
        train(TrainConfig(preset="sdxl", batches=str(shards["sd1.5"]), model=model, out=str(tmp_path / "d"), apply=("left",)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_sample_makes_the_same_seed_with_and_without_tokens(tmp_path):
    import numpy as np
    from PIL import Image

    from softrepa.sample import sample_pair
    from softrepa.tokens import save_tokens

    model = str(tiny_pipelines()["sd1.5"])
    tokens = SoftTokens(TokenConfig("sd1.5", n_tokens=4, n_layers=1, dim=32, t_dependent=False, apply=("down", "mid", "up")))
    with torch.no_grad():
        tokens.tokens.fill_(3.0)  # strong enough to change a 32 px tiny-model image
    save_tokens(tokens, tmp_path / "tok")
    kw = dict(seed=3, steps=2, device="cpu")
    a = sample_pair(model, tmp_path / "tok", "a red cat", tmp_path / "a", **kw)
    b = sample_pair(model, tmp_path / "tok", "a red cat", tmp_path / "b", **kw)
    load = lambda p: np.asarray(Image.open(p), dtype=np.int16)  # noqa: E731
    assert np.array_equal(load(a.base), load(b.base))  # same seed, same baseline
    assert not np.array_equal(load(a.base), load(a.with_tokens))
    sbs = load(a.side_by_side)
    assert sbs.shape[1] == 2 * load(a.base).shape[1]
    assert np.array_equal(sbs[:, : load(a.base).shape[1]], load(a.base))


def test_each_distinct_prompt_is_encoded_once():
    parts = load_parts(str(tiny_pipelines()["sdxl"]), "sdxl")
    cache = PromptCache(parts)
    first = cache(["a red cat", "a tall tree", "a red cat"])
    assert cache.encoded == 2
    again = cache(["a tall tree", "a red cat"])
    assert cache.encoded == 2  # prompts repeat across batches: no second encoding
    assert torch.equal(again.embeds[1], first.embeds[0]) and torch.equal(again.pooled[0], first.pooled[1])
    emb, _, pooled, _ = parts.pipe.encode_prompt(prompt=["a tall tree"], device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(again.embeds[0], emb[0]) and torch.allclose(again.pooled[0], pooled[0])
    assert first.embeds.shape[-1] == 64  # SDXL: both CLIPs concatenated (cross_attention_dim)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_unet_noising_is_ddpm_whatever_the_pipelines_scheduler(kind):
    """SDXL ships an EulerDiscreteScheduler whose add_noise gives x + sigma n
    (k-diffusion, unscaled); the UNet at timestep t expects
    sqrt(abar) x + sqrt(1 - abar) n. Euler and DDIM with the same betas must
    give the same (z_t, target)."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from softrepa.backbone import noisy_and_target

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = 700
    abar = DDIMScheduler(**betas).alphas_cumprod[t]
    want_zt = abar.sqrt() * x + (1 - abar).sqrt() * n
    want_target = n.expand_as(x) if kind == "epsilon" else abar.sqrt() * n - (1 - abar).sqrt() * x
    for sched in (DDIMScheduler(**betas), EulerDiscreteScheduler(**betas)):
        zt, target = noisy_and_target(SimpleNamespace(backbone="sdxl", scheduler=sched), x, n, t)
        torch.testing.assert_close(zt, want_zt)
        torch.testing.assert_close(target, want_target)


def test_a_folder_with_several_batch_runs_needs_batch_run(tmp_path):
    """Rebuilt batches land beside the old ones; training on both would mix them silently."""
    from dataprep.store import BATCHES_SCHEMA, ShardWriter, write_run_record
    from softrepa.train import read_batch_rows
    from dataprep.errors import ConfigError

    for run, n in (("sd3-s0-aaaa", 2), ("sd3-s1-bbbb", 3)):
        with ShardWriter(tmp_path, BATCHES_SCHEMA, run_id=run, rows_per_shard=2) as w:
            for r in range(n):
                w.add({"batch_id": f"{run}-{r}", "preset": "sd3", "image_ids": ["i"], "image_uris": ["u"], "prompts": ["p"], "positive_index": [0]})
        write_run_record(tmp_path, run, w.written)
    with pytest.raises(ConfigError) as exc:
        read_batch_rows(tmp_path)
    assert exc.value.flag == "--batch-run" and "sd3-s0-aaaa" in str(exc.value) and "sd3-s1-bbbb" in str(exc.value)
    rows = read_batch_rows(tmp_path, "sd3-s1-bbbb")
    assert [r["batch_id"] for r in rows] == ["sd3-s1-bbbb-0", "sd3-s1-bbbb-1", "sd3-s1-bbbb-2"]
    with pytest.raises(ConfigError):
        read_batch_rows(tmp_path, "nope")


# ---------------------------------------------------------------- paper defaults, reshuffle, best-by-CLIP, trained images, curves


def test_defaults_are_the_official_trainers(monkeypatch, tmp_path):
    """512 px for every backbone, reshuffled passes, best-by-CLIP on 50 held-out captions (official train.py)."""
    from typer.testing import CliRunner

    import softrepa.train as tr
    from softrepa.cli import app

    cfg = TrainConfig("sd3", ".", "m", "o")
    assert (cfg.resolution, cfg.model_resolution, cfg.shuffle, cfg.best_by, cfg.eval_holdout, cfg.eval_every) == (512, 512, True, "clip", 50, 2500)
    seen = []

    def fake_train(c):  # record the config the CLI built, validate it, stop before any model loads
        seen.append(c)
        c.validate()
        raise tr.ConfigError("stopped by the test", "--x")

    monkeypatch.setattr(tr, "train", fake_train)
    base = ["train", "--batches", str(tmp_path), "--model", "m", "--out", str(tmp_path / "o")]
    for preset in ("sd3", "sdxl", "sd1.5"):
        assert CliRunner().invoke(app, base + ["--preset", preset]).exit_code == 2
    assert [c.model_resolution for c in seen] == [512, 512, 512]
    assert all(c.shuffle and c.best_by == "clip" and c.eval_holdout == 50 and c.accumulate == 1 for c in seen)
    CliRunner().invoke(app, base + ["--preset", "sd3", "--resolution", "native", "--no-shuffle", "--best-by", "none"])
    assert (seen[-1].model_resolution, seen[-1].shuffle, seen[-1].best_by) == (None, False, "none")
    res = CliRunner().invoke(app, base + ["--preset", "sd3", "--resolution", "huge"])
    assert res.exit_code == 2 and "--resolution" in res.output
    # the native size is the model's own: 32 px for the tiny pipelines, 512 when asked (the default)
    parts = load_parts(str(tiny_pipelines()["sd1.5"]), "sd1.5", resolution=TrainConfig("sd1.5", ".", "m", "o").model_resolution)
    assert parts.resolution == 512


def test_batch_order_is_a_new_seeded_permutation_every_pass():
    from softrepa.train import RowStream, batch_order

    first, second = batch_order(20, 0, 0), batch_order(20, 0, 1)
    assert sorted(first) == sorted(second) == list(range(20))
    assert first != second  # reshuffled between passes
    assert batch_order(20, 0, 1) == second  # deterministic by (seed, pass)
    assert batch_order(20, 1, 0) != first  # another seed, another order
    assert batch_order(20, 0, 3, shuffle=False) == list(range(20))
    stream = RowStream(20, 0, True)
    assert [stream[i] for i in range(40)] == first + second
    # a fresh stream positioned mid-pass (a resume) continues the same permutation
    assert [RowStream(20, 0, True)[i] for i in range(27, 33)] == (first + second)[27:33]


def test_training_visits_every_row_once_per_pass_in_a_new_order(tmp_path):
    from softrepa.train import batch_order

    pngs = [str(p) for p in write_pngs(tmp_path / "img", 8)]
    write_batch_shards(tmp_path / "b", "sd1.5", pngs, PROMPTS, n_rows=4, n_images=2, n_prompts=4)
    kw = dict(preset="sd1.5", batches=str(tmp_path / "b"), model=str(tiny_pipelines()["sd1.5"]), steps=8, checkpoint_every=8,
              progress=False, resolution="native", best_by="none", seed=3)
    got = [r["batch_id"] for r in _log_steps(train(TrainConfig(out=str(tmp_path / "r"), **kw)).log_path)]
    want = [f"b{i:03d}" for i in batch_order(4, 3, 0) + batch_order(4, 3, 1)]
    assert got == want and got[:4] != got[4:] and sorted(got[:4]) == sorted(got[4:])
    plain = train(TrainConfig(out=str(tmp_path / "p"), **{**kw, "shuffle": False, "steps": 4}))
    assert [r["batch_id"] for r in _log_steps(plain.log_path)] == ["b000", "b001", "b002", "b003"]


def test_best_checkpoint_trained_images_and_curves(tmp_path, metric_models):
    """Held-out captions are sampled and CLIP-scored at each checkpoint; best/ holds the best tokens;
    every token folder records the images it was trained on; the curves PNG follows the log."""
    import hashlib

    from PIL import Image

    from softrepa.curves import read_curves

    pngs = [str(p) for p in write_pngs(tmp_path / "img", 6)]
    write_batch_shards(tmp_path / "b", "sd1.5", pngs, PROMPTS[:6], n_rows=6, n_images=2, n_prompts=4)
    clip = metric_models["clip"]
    seen_png: dict[str, object] = {}

    def on_step(rec):
        if rec["step"] == 3:  # after the checkpoint at step 2
            png = tmp_path / "r" / "curves.png"
            seen_png["bytes"], seen_png["size"] = png.read_bytes(), Image.open(png).size
            seen_png["steps"] = read_curves(tmp_path / "r" / "train_log.jsonl").step

    cfg = TrainConfig(preset="sd1.5", batches=str(tmp_path / "b"), model=str(tiny_pipelines()["sd1.5"]), out=str(tmp_path / "r"),
                      steps=4, checkpoint_every=4, eval_every=2, lr=0.05, progress=False, resolution="native", eval_holdout=2, eval_steps=2,
                      eval_clip_model=str(clip), eval_batch_size=1)
    res = train(cfg, on_step=on_step)
    out = tmp_path / "r"
    conf = json.loads((out / "train_config.json").read_text())
    held = conf["heldout"]["image_ids"]
    assert len(held) == 2 and conf["eval_prompt_count"] == 2 and conf["resolution_used"] == 32
    # held-out captions are the held-out images' own (prompt k is image k's caption in these shards)
    assert conf["heldout"]["prompts"] == [PROMPTS[int(i.split("/")[1])] for i in held]
    evals = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if "eval_step" in line]
    assert [e["eval_step"] for e in evals] == [2, 4] and all(isinstance(e["clip"], float) for e in evals)
    best = max(evals, key=lambda e: e["clip"])
    assert evals[0]["best"] and res.best_clip == best["clip"] and res.best_step == best["eval_step"]
    best_tok = load_tokens(out / "best")
    assert torch.equal(best_tok.tokens, load_tokens(out / "checkpoints" / f"step-{best['eval_step']:07d}").tokens)
    assert json.loads((out / "best" / "tokens.json").read_text())["clip"] == best["clip"]
    # trained images: the rows the steps trained on, minus the held-out images; sha256 of the file bytes
    from softrepa.train import read_batch_rows

    rows = {r["batch_id"]: r for r in read_batch_rows(tmp_path / "b")}
    trained_ids = sorted({i for r in _log_steps(res.log_path) for i in rows[r["batch_id"]]["image_ids"]} - set(held))
    rec = json.loads((out / "tokens" / "trained_images.json").read_text())
    assert rec["image_ids"] == trained_ids and not set(held) & set(rec["image_ids"])
    uri = {i: u for r in rows.values() for i, u in zip(r["image_ids"], r["image_uris"])}
    assert rec["sha256"] == [hashlib.sha256(Path(uri[i]).read_bytes()).hexdigest() for i in trained_ids]
    assert (out / "best" / "trained_images.json").exists()
    # curves: written at the checkpoint (2 steps), redrawn at the end (4 steps + the CLIP panel)
    assert seen_png["steps"] == [1, 2]
    png = Image.open(res.curves)
    png.load()
    assert png.size == seen_png["size"] and res.curves.read_bytes() != seen_png["bytes"]
    assert read_curves(res.log_path).step == [1, 2, 3, 4] and read_curves(res.log_path).eval_step == [2, 4]


def test_best_by_clip_configuration_errors(shards, tmp_path):
    model = str(tiny_pipelines()["sd1.5"])
    kw = dict(preset="sd1.5", batches=str(shards["sd1.5"]), model=model, resolution="native", progress=False)
    with pytest.raises(ConfigError, match="--eval-holdout"):  # 50 of a handful of images
        train(TrainConfig(out=str(tmp_path / "a"), **kw))
    with pytest.raises(ConfigError, match="--eval-prompts"):
        train(TrainConfig(out=str(tmp_path / "b"), eval_prompts=str(tmp_path / "none.txt"), **kw))
    (tmp_path / "p.txt").write_text("a red cat\n\n a tall tree \n")
    with pytest.raises(ConfigError, match="--eval-clip-model"):
        train(TrainConfig(out=str(tmp_path / "c"), eval_prompts=str(tmp_path / "p.txt"), eval_clip_model=str(tmp_path / "noclip"), **kw))
    with pytest.raises(ConfigError, match="--best-by"):
        train(TrainConfig(out=str(tmp_path / "d"), best_by="lpips", **kw))
    from softrepa.heldout import read_prompt_file

    assert read_prompt_file(tmp_path / "p.txt") == ["a red cat", "a tall tree"]


def test_curves_png_reflects_the_log_and_skips_without_matplotlib(tmp_path, monkeypatch):
    from PIL import Image

    from softrepa.curves import write_curves

    log = tmp_path / "train_log.jsonl"
    recs = [{"step": i, "batch_id": "b", "loss": 1.0 / i, "accuracy": 0.5, "lr": 1e-3, "t": 3} for i in range(1, 121)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"skipped": "b", "reason": "x"}\n{"step": 121, "lo')
    curves, note = write_curves(log, tmp_path / "a.png")
    assert note is None and curves.step == list(range(1, 121))  # the cut last line is ignored
    three = Image.open(tmp_path / "a.png").size
    log.write_text(log.read_text().rsplit("\n", 1)[0] + '\n{"eval_step": 60, "clip": 0.2, "best": true}\n')
    curves, note = write_curves(log, tmp_path / "b.png")
    assert curves.eval_step == [60] and Image.open(tmp_path / "b.png").size[1] > three[1]  # a fourth panel
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    curves, note = write_curves(log, tmp_path / "c.png")
    assert "pip install matplotlib" in note and not (tmp_path / "c.png").exists()
