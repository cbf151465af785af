"""Editing metrics on known inputs, with tiny random CLIP and LPIPS-style networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dataprep.errors import ConfigError
from softrepa.metrics import (
    ALL_METRICS,
    ClipScorer,
    LpipsScorer,
    MetricConfig,
    frechet_distance,
    load_scorers,
    lpips_distance,
    missing_metrics,
)


@pytest.fixture(scope="module")
def models(metric_models):
    torch.set_num_threads(1)
    return metric_models


def _images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")) for _ in range(n)]


PROMPTS = ["a red house by the sea", "a dog on green grass", "two cats on a sofa"]


def test_clip_score_is_symmetric_in_batch_order(models):
    clip = ClipScorer(str(models["clip"]), device="cpu")
    ims = _images(3)
    forward = clip(ims, PROMPTS)
    backward = clip(ims[::-1], PROMPTS[::-1])
    assert np.allclose(forward, backward[::-1], atol=1e-6)
    assert all(-1.0 <= v <= 1.0 for v in forward)  # a cosine
    # the score depends on the pairing: another prompt gives another score
    assert not np.allclose(clip(ims, PROMPTS[1:] + PROMPTS[:1]), forward)


def test_pickscore_is_logit_scaled_clip_cosine(models):
    cos = ClipScorer(str(models["clip"]), device="cpu")
    pick = ClipScorer(str(models["clip"]), scaled=True, device="cpu")
    ims = _images(3, seed=1)
    scale = float(pick.model.logit_scale.exp())
    assert np.allclose(pick(ims, PROMPTS), np.array(cos(ims, PROMPTS)) * scale, rtol=1e-5)


def test_long_prompts_are_truncated_not_rejected(models):
    clip = ClipScorer(str(models["clip"]), device="cpu")
    assert len(clip(_images(1), ["a very long caption " * 60])) == 1


def test_lpips_identical_images_is_zero_and_different_is_positive(models):
    lp = LpipsScorer(str(models["lpips"]), device="cpu")
    a, b = _images(2, seed=2), _images(2, seed=3)
    assert lp(a, a) == [0.0, 0.0]
    d = lp(a, b)
    assert all(v > 0 for v in d)
    assert np.allclose(lp(b, a), d, atol=1e-6)  # symmetric


def test_lpips_rejects_different_sizes(models):
    lp = LpipsScorer(str(models["lpips"]), device="cpu")
    with pytest.raises(ValueError):
        lp(_images(1, 32), _images(1, 16))


def test_lpips_distance_form_on_hand_made_features():
    fx = [torch.tensor([[[[3.0]], [[4.0]]]])]  # one position, channel vector (3, 4) -> (0.6, 0.8)
    fy = [torch.tensor([[[[4.0]], [[3.0]]]])]  # -> (0.8, 0.6)
    d = lpips_distance(fx, fy)
    assert torch.allclose(d, torch.tensor([0.08]), atol=1e-6)  # 0.2^2 + 0.2^2
    w = [torch.tensor([1.0, 0.0])]
    assert torch.allclose(lpips_distance(fx, fy, w), torch.tensor([0.04]), atol=1e-6)
    # scale invariance per position: LPIPS compares directions of channel vectors
    assert lpips_distance([fx[0] * 10], fx).item() == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 4, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # a pure shift by m adds |m|^2 (covariances equal)
    assert frechet_distance(a, a + 2.0) == pytest.approx(4 * 4.0, rel=1e-6)
    # scaling by s: tr(S) + s^2 tr(S) - 2 s tr(S) = (1 - s)^2 tr(S), means ~0 apart
    s = 3.0
    centred = a - a.mean(0)
    tr = torch.trace(torch.cov(centred.T)).item()
    assert frechet_distance(centred, centred * s) == pytest.approx((1 - s) ** 2 * tr, rel=1e-6)


def test_frechet_distance_needs_two_samples():
    with pytest.raises(ValueError):
        frechet_distance(torch.randn(1, 3), torch.randn(5, 3))


def test_missing_optional_metrics_are_named_with_install_hints(models):
    cfg = MetricConfig(metrics=ALL_METRICS, clip_model=str(models["clip"]), pickscore_model=str(models["clip"]),
                       pickscore_processor=None, lpips_model=str(models["lpips"]), device="cpu")
    scorers = load_scorers(cfg)
    assert set(scorers.per_image) >= {"clip", "pickscore", "lpips"}
    for name, hint in missing_metrics(ALL_METRICS).items():
        assert "pip install" in scorers.unavailable[name]
        assert hint in scorers.unavailable[name]
    # every requested metric is either loaded or explained
    loaded = set(scorers.per_image) | ({"fid"} if scorers.fid is not None else set())
    assert loaded | set(scorers.unavailable) == set(ALL_METRICS)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"metrics": ("clip", "bleu")}, "--metrics"),
        ({"metrics": ("clip",), "clip_model": "/no/such/clip"}, "--clip-model"),
        ({"metrics": ("lpips",), "lpips_model": "./missing-backbone"}, "--lpips-model"),
    ],
)
def test_bad_metric_config_names_the_flag(kwargs, flag):
    with pytest.raises(ConfigError) as err:
        MetricConfig(**kwargs).validate()
    assert err.value.flag == flag


def test_lpips_defaults_to_vgg_as_the_official_eval_and_is_optional():
    """SoftREPA eval.py scores LPIPS with lpips.LPIPS(net='vgg'). The package is
    optional: without it the default config still validates and LPIPS is named
    unavailable with its install hint (like ImageReward, HPS, FID)."""
    import importlib.util

    from softrepa.metrics import load_scorers

    cfg = MetricConfig()
    assert cfg.lpips_model == "vgg"
    cfg.validate()
    if importlib.util.find_spec("lpips") is not None:
        pytest.skip("lpips is installed here")
    scorers = load_scorers(MetricConfig(metrics=("lpips",), device="cpu"))
    assert "lpips" not in scorers.per_image
    assert "pip install lpips" in scorers.unavailable["lpips"]


def test_lpips_handles_pairs_of_different_sizes_in_one_batch(models):
    lp = LpipsScorer(str(models["lpips"]), device="cpu")
    a, b = _images(1, 32, seed=4) + _images(1, 48, seed=5), _images(1, 32, seed=6) + _images(1, 48, seed=7)
    mixed = lp(a, b)
    assert np.allclose(mixed, [lp([a[0]], [b[0]])[0], lp([a[1]], [b[1]])[0]], atol=1e-6)
