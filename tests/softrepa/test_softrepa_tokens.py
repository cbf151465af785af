"""Soft tokens on tiny random SD3 / SD1.5 / SDXL denoisers loaded by path."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from softrepa.tokens import SoftTokens, TokenConfig, load_tokens, save_tokens, timestep_index, wrap_model
from tests.softrepa_fixtures import tiny_pipelines

torch.set_num_threads(1)


def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(tiny_pipelines()["sd3"] / "transformer").eval()


def _unet(backbone: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_pipelines()[backbone] / "unet").eval()


def _sd3_inputs(batch=2, seq=7):
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, 4, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, seq, 32, generator=g),
        pooled_projections=torch.randn(batch, 64, generator=g),
        timestep=torch.tensor([500.0, 999.0])[:batch],
    )


def _distinct_tokens(cfg: TokenConfig) -> SoftTokens:
    """Layer k's tokens are all k + 10 (+ t-embedding): easy to recognise."""
    tok = SoftTokens(cfg)
    with torch.no_grad():
        for k in range(cfg.n_layers):
            tok.tokens[k].fill_(10.0 + k)
    return tok


def test_presets_follow_the_paper():
    sd3 = TokenConfig.preset("sd3", SimpleNamespace(num_layers=24, caption_projection_dim=1536))
    assert (sd3.n_tokens, sd3.n_layers, sd3.dim, sd3.t_dependent) == (4, 5, 1536, True)
    unet15 = TokenConfig.preset("sd1.5", SimpleNamespace(cross_attention_dim=768))
    assert (unet15.n_tokens, unet15.apply, unet15.t_dependent, unet15.dim) == (4, ("down",), True, 768)
    xl = TokenConfig.preset("sdxl", SimpleNamespace(cross_attention_dim=2048))
    assert (xl.n_tokens, xl.apply, xl.t_dependent, xl.dim) == (8, ("down", "mid"), False, 2048)
    # a smaller SD3 (the tiny test model has 4 blocks) gets at most its own block count
    assert TokenConfig.preset("sd3", SimpleNamespace(num_layers=4, caption_projection_dim=32)).n_layers == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(backbone="sd4", n_tokens=4, n_layers=1, dim=8, t_dependent=False),
        dict(backbone="sd3", n_tokens=4, n_layers=2, dim=8, t_dependent=False, apply=("down",)),
        dict(backbone="sd1.5", n_tokens=4, n_layers=2, dim=8, t_dependent=False, apply=("down",)),
        dict(backbone="sdxl", n_tokens=4, n_layers=1, dim=8, t_dependent=False, apply=("left",)),
        dict(backbone="sdxl", n_tokens=0, n_layers=1, dim=8, t_dependent=False, apply=("down",)),
    ],
)
def test_bad_token_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        TokenConfig(**kwargs)


def test_timestep_buckets():
    assert timestep_index(torch.tensor([0.0, 9.9, 10.0, 999.0, 1000.0])).tolist() == [0, 0, 1, 99, 99]
    assert timestep_index(523).tolist() == [52]


def test_sd3_tokens_enter_each_layer_and_leave_after_it():
    model = _sd3()
    n, layers = 3, 2
    tok = _distinct_tokens(TokenConfig("sd3", n_tokens=n, n_layers=layers, dim=32, t_dependent=True))
    wrapped = wrap_model(model, tok)
    inputs = _sd3_inputs()
    seq = inputs["encoder_hidden_states"].shape[1]

    seen_in, seen_out = [], []
    for block in model.transformer_blocks:
        # runs after the wrapper's prepend hook: sees what the block sees
        block.register_forward_pre_hook(lambda m, a, k: seen_in.append(k["encoder_hidden_states"].clone()), with_kwargs=True)
        # prepended so it runs before the wrapper's drop hook: the block's raw text output
        block.register_forward_hook(lambda m, a, o: seen_out.append(None if o[0] is None else o[0].clone()), prepend=True)
    with torch.no_grad():
        out = wrapped(**inputs).sample
    assert out.shape == inputs["hidden_states"].shape

    expected = tok.layer_tokens(inputs["timestep"], batch=2)  # per layer [B, N, D]
    for k in range(len(model.transformer_blocks)):
        text_in = seen_in[k]
        if k < layers:
            assert text_in.shape == (2, n + seq, 32)
            assert torch.equal(text_in[:, :n], expected[k])
        else:
            assert text_in.shape == (2, seq, 32)
        if k > 0:
            # block k's text input is block k-1's text output minus k-1's tokens (if it had any)
            prev = seen_out[k - 1][:, n:] if k - 1 < layers else seen_out[k - 1]
            assert torch.equal(text_in[:, -seq:], prev)
            # and none of layer k-1's tokens survive into block k
            if k - 1 < layers:
                for row in expected[k - 1].reshape(-1, 32):
                    assert not (text_in.reshape(-1, 32) == row).all(dim=1).any()


def test_sd3_time_dependent_tokens_change_with_the_bucket():
    tok = SoftTokens(TokenConfig("sd3", n_tokens=2, n_layers=2, dim=32, t_dependent=True))
    a = tok.layer_tokens(torch.tensor([5.0]), 1)
    b = tok.layer_tokens(torch.tensor([9.0]), 1)
    c = tok.layer_tokens(torch.tensor([15.0]), 1)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # the embedding row is split per layer: layer 1 uses columns dim..2*dim
    row = tok.t_embedding.weight[1]
    assert torch.allclose(c[1][0, 0], tok.tokens[1, 0] + row[32:64])


def test_disabled_or_absent_tokens_give_the_base_output_exactly():
    model = _sd3()
    inputs = _sd3_inputs()
    with torch.no_grad():
        base = model(**inputs).sample
        assert torch.equal(wrap_model(model, None)(**inputs).sample, base)
        wrapped = wrap_model(model, SoftTokens(TokenConfig.preset("sd3", model)))
        with_tokens = wrapped(**inputs).sample
        assert not torch.equal(with_tokens, base)
        wrapped.enabled = False
        assert torch.equal(wrapped(**inputs).sample, base)
        assert torch.equal(model(**inputs).sample, base)  # hooks are inert on the base too
        wrapped.enabled = True
        wrapped.remove()
        assert torch.equal(model(**inputs).sample, base)


def test_wrapper_exposes_the_base_attributes_and_one_token_set_at_a_time():
    model = _sd3()
    wrapped = wrap_model(model, SoftTokens(TokenConfig.preset("sd3", model)))
    assert wrapped.config is model.config and wrapped.dtype == model.dtype
    assert inspect.signature(wrapped.forward) == inspect.signature(model.forward)
    with pytest.raises(ValueError, match="remove"):
        wrap_model(model, SoftTokens(TokenConfig.preset("sd3", model)))
    wrapped.remove()
    wrap_model(model, SoftTokens(TokenConfig.preset("sd3", model))).remove()


def _unet_inputs(backbone: str, ctx_dim: int):
    g = torch.Generator().manual_seed(2)
    kw = dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor(300),
              encoder_hidden_states=torch.randn(2, 7, ctx_dim, generator=g))
    if backbone == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    return kw


@pytest.mark.parametrize("backbone,ctx_dim", [("sd1.5", 32), ("sdxl", 64)])
def test_unet_tokens_go_after_bos_in_the_chosen_groups_only(backbone, ctx_dim):
    unet = _unet(backbone)
    cfg = TokenConfig.preset(backbone, unet)
    tok = _distinct_tokens(cfg)
    inputs = _unet_inputs(backbone, ctx_dim)
    with torch.no_grad():
        base = unet(**inputs).sample  # before wrapping: while enabled, the hooks act on the base too
    wrapped = wrap_model(unet, tok)
    ctx = inputs["encoder_hidden_states"]
    seen = {}

    def record(group):
        def hook(m, a, k):
            seen.setdefault(group, []).append(k["encoder_hidden_states"].clone())
        return hook

    blocks = {"down": unet.down_blocks, "mid": [unet.mid_block], "up": unet.up_blocks}
    for group, bl in blocks.items():
        for b in bl:
            if getattr(b, "has_cross_attention", False):
                b.register_forward_pre_hook(record(group), with_kwargs=True)
    with torch.no_grad():
        out = wrapped(**inputs).sample
    assert out.shape == base.shape and not torch.equal(out, base)
    n = cfg.n_tokens
    expected = tok.layer_tokens(inputs["timestep"], 2)[0]
    for group, contexts in seen.items():
        for c in contexts:
            if group in cfg.apply:
                assert c.shape == (2, ctx.shape[1] + n, ctx_dim)
                assert torch.equal(c[:, :1], ctx[:, :1])  # BOS stays first
                assert torch.equal(c[:, 1 : 1 + n], expected)
                assert torch.equal(c[:, 1 + n :], ctx[:, 1:])
            else:
                assert torch.equal(c, ctx)
    wrapped.enabled = False
    with torch.no_grad():
        assert torch.equal(wrapped(**inputs).sample, base)


def test_mismatched_tokens_are_refused():
    unet = _unet("sd1.5")
    with pytest.raises(ValueError):
        wrap_model(unet, SoftTokens(TokenConfig("sd3", n_tokens=2, n_layers=1, dim=32, t_dependent=False)))
    with pytest.raises(ValueError):
        wrap_model(unet, SoftTokens(TokenConfig("sd1.5", n_tokens=2, n_layers=1, dim=768, t_dependent=False, apply=("down",))))
    with pytest.raises(TypeError):
        wrap_model(torch.nn.Linear(2, 2), None)


def test_save_and_load_round_trip(tmp_path):
    model = _sd3()
    tok = SoftTokens(TokenConfig("sd3", n_tokens=2, n_layers=3, dim=32, t_dependent=True))
    save_tokens(tok, tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {"tokens.json", "tokens.safetensors"}
    back = load_tokens(tmp_path / "tok")
    assert back.config == tok.config
    assert torch.equal(back.tokens, tok.tokens) and torch.equal(back.t_embedding.weight, tok.t_embedding.weight)
    inputs = _sd3_inputs()
    with torch.no_grad():
        first = wrap_model(model, tok)
        a = first(**inputs).sample
        first.remove()
        b = wrap_model(model, back)(**inputs).sample
    assert torch.equal(a, b)


@pytest.mark.parametrize("backbone", ["sd3", "sd1.5"])
def test_gradient_checkpointing_gives_the_same_token_gradients(backbone):
    model = _sd3() if backbone == "sd3" else _unet("sd1.5")
    model.requires_grad_(False)
    if backbone == "sd3":
        inputs = _sd3_inputs()
    else:
        inputs = _unet_inputs("sd1.5", 32)
    tok = SoftTokens(TokenConfig.preset(backbone, model))
    wrapped = wrap_model(model, tok)
    grads = []
    for ckpt in (False, True):
        if ckpt:
            model.enable_gradient_checkpointing()  # blocks are re-run (hooks included) in backward
        tok.zero_grad()
        wrapped(**inputs).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in tok.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[0])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*grads))
