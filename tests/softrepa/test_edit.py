"""FlowEdit: the pure core against hand-made velocity fields, then on the tiny SD3 pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dataprep.errors import ConfigError
from softrepa.edit import EditConfig, SD3FlowEditor, flowedit, guide, load_sd3


def _sigmas(steps: int = 6) -> torch.Tensor:
    s = torch.linspace(1.0, 1.0 / steps, steps)
    return torch.cat([s, torch.zeros(1)])


# ------------------------------------------------------------------ pure core


def test_n_max_zero_returns_source_and_never_calls_the_model():
    x = torch.randn(1, 4, 8, 8)
    calls = []

    def velocity(z_src, z_tgt, sigma):
        calls.append(sigma)
        return torch.ones_like(z_tgt), -torch.ones_like(z_tgt)

    out = flowedit(x, velocity, _sigmas(), n_max=0)
    assert torch.equal(out, x)
    assert calls == []


def test_equal_velocities_leave_the_source_exactly():
    x = torch.randn(2, 4, 8, 8)

    def velocity(z_src, z_tgt, sigma):  # same field for both branches
        v = torch.sin(3 * z_tgt) + sigma
        return (torch.sin(3 * z_src) + sigma if z_src is not None else None), v

    out = flowedit(x, velocity, _sigmas(), n_max=6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, x)


def test_constant_velocity_difference_integrates_over_the_last_n_max_steps():
    steps, n_max = 6, 4
    sig = _sigmas(steps)
    x = torch.zeros(1, 2, 4, 4)
    c = 0.5

    def velocity(z_src, z_tgt, sigma):
        return torch.zeros_like(z_tgt), torch.full_like(z_tgt, c)

    out = flowedit(x, velocity, sig, n_max=n_max)
    # sum of dt over the edited steps = sigma_end - sigma_first_edited = 0 - sig[steps - n_max]
    expected = -float(sig[steps - n_max]) * c
    assert torch.allclose(out, torch.full_like(x, expected), atol=1e-6)


def test_sampling_phase_below_n_min_reaches_the_target_of_an_exact_field():
    # v(x, t) = (x - y) / t is the exact flow-matching velocity towards y; Euler lands on y
    y = torch.randn(1, 4, 8, 8)
    x = torch.randn(1, 4, 8, 8)

    def velocity(z_src, z_tgt, sigma):
        assert z_src is None  # only the target branch runs in the sampling phase
        return None, (z_tgt - y) / sigma

    out = flowedit(x, velocity, _sigmas(5), n_max=5, n_min=5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, y, atol=1e-5)


def test_noise_is_reproducible_by_seed():
    x = torch.randn(1, 4, 8, 8)

    def velocity(z_src, z_tgt, sigma):
        return z_src, z_tgt * 2  # depends on the noise through z_src/z_tgt

    a = flowedit(x, velocity, _sigmas(), n_max=3, generator=torch.Generator().manual_seed(7))
    b = flowedit(x, velocity, _sigmas(), n_max=3, generator=torch.Generator().manual_seed(7))
    c = flowedit(x, velocity, _sigmas(), n_max=3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_guidance_rules():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert guide(u, c, 2.0).item() == 5.0  # u + 2 (c - u)
    assert guide(u, c, 2.0, "softrepa-official").item() == 7.0  # c + 2 (c - u)
    assert guide(u, c, 1.0).item() == 3.0


@pytest.mark.parametrize(
    "kwargs, flag",
    [({"n_max": 60}, "--n-max"), ({"n_min": 40}, "--n-min"), ({"steps": 0}, "--steps"), ({"cfg_rule": "x"}, "--guidance-rule")],
)
def test_bad_edit_config_names_the_flag(kwargs, flag):
    with pytest.raises(ConfigError) as err:
        EditConfig(**kwargs).validate()
    assert err.value.flag == flag


# ------------------------------------------------------------------ tiny SD3


@pytest.fixture(scope="module")
def editor(tiny_pipelines):
    torch.set_num_threads(1)
    pipe = load_sd3(str(tiny_pipelines["sd3"]), device="cpu")
    from softrepa.tokens import SoftTokens, TokenConfig

    torch.manual_seed(0)
    tokens = SoftTokens(TokenConfig.preset("sd3", pipe.transformer))
    return SD3FlowEditor(pipe, tokens)


@pytest.fixture(scope="module")
def source_image():
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(40, 48, 3) * 255).astype("uint8"))


FAST = dict(steps=4, n_max=3, size=32)


def test_tiny_n_max_zero_returns_the_source_latent(editor, source_image):
    x = editor.encode_image(source_image, 32)
    assert x.shape == (1, 4, 16, 16)
    out = editor.edit_latent(x, "a cat", "a dog", EditConfig(**{**FAST, "n_max": 0}))
    assert torch.equal(out, x)


@pytest.mark.parametrize("use_tokens", [False, True])
def test_tiny_same_prompt_and_guidance_leaves_the_latent_unchanged(editor, source_image, use_tokens):
    x = editor.encode_image(source_image, 32)
    # one rule on both branches (FlowEdit's u + w(c - u)): identical velocities
    cfg = EditConfig(**FAST, src_cfg=4.0, tgt_cfg=4.0, cfg_rule="flowedit")
    out = editor.edit_latent(x, "a cat on a sofa", "a cat on a sofa", cfg, use_tokens=use_tokens)
    assert torch.equal(out, x)
    # and the same call with a different target prompt does move it
    moved = editor.edit_latent(x, "a cat on a sofa", "a dog on a sofa", cfg, use_tokens=use_tokens)
    assert not torch.equal(moved, x)
    # the default (official) rule guides the target at w + 1, so even the same prompt moves
    official = editor.edit_latent(x, "a cat on a sofa", "a cat on a sofa", EditConfig(**FAST, src_cfg=4.0, tgt_cfg=4.0), use_tokens=use_tokens)
    assert not torch.equal(official, x)
    # ... exactly as FlowEdit's rule at source scale w + 1 does (same algebra, float rounding aside)
    same = editor.edit_latent(x, "a cat on a sofa", "a cat on a sofa", EditConfig(**FAST, src_cfg=5.0, tgt_cfg=4.0), use_tokens=use_tokens)
    assert torch.allclose(same, x, atol=1e-4)


def test_tiny_tokens_on_and_off_differ_and_off_is_vanilla(editor, source_image):
    x = editor.encode_image(source_image, 32)
    cfg = EditConfig(**FAST)
    on = editor.edit_latent(x, "a cat", "a dog", cfg, use_tokens=True)
    off = editor.edit_latent(x, "a cat", "a dog", cfg, use_tokens=False)
    assert not torch.allclose(on, off)
    # tokens loaded but off == an editor on a fresh pipeline that never saw tokens
    vanilla = SD3FlowEditor(load_sd3(editor.pipe.name_or_path, device="cpu"), None)
    assert torch.equal(vanilla.edit_latent(x, "a cat", "a dog", cfg), off)


def test_tiny_edit_returns_an_image_of_the_requested_size_and_is_seeded(editor, source_image):
    a = editor.edit(source_image, "a cat", "a dog", EditConfig(**FAST, seed=1))
    b = editor.edit(source_image, "a cat", "a dog", EditConfig(**FAST, seed=1))
    c = editor.edit(source_image, "a cat", "a dog", EditConfig(**FAST, seed=2))
    assert a.size == (32, 32)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # size 0 keeps the source's own size (a multiple of the VAE x patch factor)
    assert editor.edit(source_image, "a cat", "a dog", EditConfig(**{**FAST, "size": 0})).size == (48, 40)


def test_tiny_tokens_requested_without_tokens_is_a_config_error(editor, source_image):
    vanilla = SD3FlowEditor(load_sd3(editor.pipe.name_or_path, device="cpu"), None)
    with pytest.raises(ConfigError):
        vanilla.edit_latent(editor.encode_image(source_image, 32), "a", "b", EditConfig(**FAST), use_tokens=True)


@pytest.mark.parametrize("field,value", [("tgt_cfg", float("nan")), ("tgt_cfg", -5.0), ("src_cfg", float("inf"))])
def test_guidance_must_be_finite_and_not_negative(field, value):
    """--tgt-cfg nan parsed as a float and every edited image came out black, scored as a good row."""
    from dataprep.errors import ConfigError
    from softrepa.edit import EditConfig

    with pytest.raises(ConfigError, match="--tgt-cfg" if field == "tgt_cfg" else "--src-cfg"):
        EditConfig(**{field: value}).validate()
