"""Token files both ways: export in the official layout, import 4096-wide SD3 tokens through context_embedder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softrepa.token_files import NeedsContextEmbedder, export_official, read_official
from softrepa.tokens import SoftTokens, TokenConfig, save_tokens, wrap_model


def _released_like(backbone: str) -> SoftTokens:
    """Token modules with the released files' shapes (official tokens/{sd3,sd1.5,sdxl})."""
    torch.manual_seed(0)
    cfg = {
        "sd3": TokenConfig("sd3", n_tokens=4, n_layers=5, dim=1536, t_dependent=True),
        "sd1.5": TokenConfig("sd1.5", n_tokens=4, n_layers=1, dim=768, t_dependent=True, apply=("down",)),
        "sdxl": TokenConfig("sdxl", n_tokens=4, n_layers=1, dim=2048, t_dependent=False, apply=("down", "mid")),
    }[backbone]
    return SoftTokens(cfg)


def _safe_load(path):
    with torch.serialization.safe_globals([nn.Embedding]):
        return torch.load(path, weights_only=True, map_location="cpu")


@pytest.mark.parametrize(
    "backbone, tokens_shape, t_shape",
    [("sd3", (5, 4, 1536), (100, 7680)), ("sd1.5", (4, 768), (100, 768)), ("sdxl", (4, 2048), None)],
)
def test_export_writes_the_released_types_and_shapes_and_imports_back_bit_identical(tmp_path, backbone, tokens_shape, t_shape):
    module = _released_like(backbone)
    save_tokens(module, tmp_path / "ours")
    written = export_official(tmp_path / "ours", tmp_path / "official")
    assert [p.name for p in written] == ["dc_tokens.pth"] + (["dc_t_tokens.pth"] if t_shape else [])

    dc = _safe_load(tmp_path / "official" / "dc_tokens.pth")  # weights_only + the allow-list, as the reader
    assert type(dc) is nn.Parameter and tuple(dc.shape) == tokens_shape and dc.dtype == torch.float32
    if t_shape:
        emb = _safe_load(tmp_path / "official" / "dc_t_tokens.pth")
        assert type(emb) is nn.Embedding and tuple(emb.weight.shape) == t_shape
    else:
        assert not (tmp_path / "official" / "dc_t_tokens.pth").exists()

    back = read_official(tmp_path / "official", backbone)
    assert torch.equal(back.tokens, module.tokens)
    if t_shape:
        assert torch.equal(back.t_embedding.weight, module.t_embedding.weight)
    assert back.config == module.config


def test_cli_export_then_import_round_trip(tmp_path):
    from typer.testing import CliRunner

    from softrepa.cli import app
    from softrepa.tokens import load_tokens

    module = _released_like("sd1.5")
    save_tokens(module, tmp_path / "ours")
    res = CliRunner().invoke(app, ["export-tokens", str(tmp_path / "ours"), str(tmp_path / "off"), "--format", "official"])
    assert res.exit_code == 0, res.output
    assert "--n_dc_tokens 4" in res.output and "--use_dc_t" in res.output
    res = CliRunner().invoke(app, ["import-tokens", str(tmp_path / "off"), str(tmp_path / "again"), "--backbone", "sd1.5"])
    assert res.exit_code == 0, res.output
    again = load_tokens(tmp_path / "again")
    assert torch.equal(again.tokens, module.tokens) and torch.equal(again.t_embedding.weight, module.t_embedding.weight)
    bad = CliRunner().invoke(app, ["export-tokens", str(tmp_path / "ours"), str(tmp_path / "x"), "--format", "onnx"])
    assert bad.exit_code == 2 and "--format" in bad.output


# ------------------------------------------------------------------ 4096-wide SD3 tokens


def _tiny_sd3(joint: int = 48, inner: int = 32):
    """A tiny SD3 transformer whose text width before context_embedder (``joint``)
    differs from the stream width (``inner``), as 4096 vs 1536 on SD3-medium."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
                                 caption_projection_dim=inner, joint_attention_dim=joint, pooled_projection_dim=16, out_channels=4,
                                 pos_embed_max_size=16).eval()


def _official_forward(base, dc_tokens, dc_t_tokens, n_dc_layers, hidden_states, encoder_hidden_states, pooled, timestep):
    """The official ``SD3Transformer2DModel_DC.forward`` (transformer.py) with ``dc_tokens=True``,
    written out step by step from its logic: tokens projected by ``context_embedder``
    when 4096 (here: ``joint``) wide, the t-embedding chunked per layer and added after
    the projection, tokens prepended before block k < n_dc_layers and dropped after."""
    height, width = hidden_states.shape[-2:]
    hs = base.pos_embed(hidden_states)
    temb = base.time_text_embed(timestep, pooled)
    ehs = base.context_embedder(encoder_hidden_states)
    int_t = timestep.type(torch.int32)
    if torch.sum(int_t >= 1000) > 0:
        int_t -= 1
    dctemb = dc_t_tokens(int_t // 10).chunk(n_dc_layers, dim=-1)
    n = ehs.size(-2)
    n_tok = dc_tokens.shape[1]
    for k, block in enumerate(base.transformer_blocks):
        ehs = ehs[:, -n:, :]
        if k < n_dc_layers:
            dc1 = dc_tokens[k].expand(ehs.shape[0], -1, -1)
            if dc1.shape[-1] == base.config.joint_attention_dim:
                dc1 = base.context_embedder(dc1)
            dc2 = dctemb[k].unsqueeze(1).expand(-1, n_tok, -1)
            ehs = torch.cat([(dc1 + dc2).type(ehs.dtype), ehs], dim=1)
        ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb=temb)
    hs = base.proj_out(base.norm_out(hs, temb))
    p = base.config.patch_size
    c = base.out_channels
    hs = hs.reshape(hs.shape[0], height // p, width // p, p, p, c)
    hs = torch.einsum("nhwpqc->nchpwq", hs)
    return hs.reshape(hs.shape[0], c, height, width)


def test_4096_wide_sd3_tokens_import_through_context_embedder_equals_the_official_forward(tmp_path):
    base = _tiny_sd3()
    joint, inner, n_layers, n_tok = 48, 32, 3, 2
    torch.manual_seed(1)
    dc_tokens = nn.Parameter(torch.randn(n_layers, n_tok, joint))  # the official trainer's layout: before context_embedder
    dc_t_tokens = nn.Embedding(100, inner * n_layers)
    nn.init.normal_(dc_t_tokens.weight, std=0.5)
    (tmp_path / "off").mkdir()
    torch.save(dc_tokens, tmp_path / "off" / "dc_tokens.pth")
    torch.save(dc_t_tokens, tmp_path / "off" / "dc_t_tokens.pth")

    tokens = read_official(tmp_path / "off", "sd3", base.context_embedder)
    assert tuple(tokens.tokens.shape) == (n_layers, n_tok, inner)

    x = torch.randn(2, 4, 8, 8)
    ehs = torch.randn(2, 7, joint)
    pooled = torch.randn(2, 16)
    t = torch.tensor([503.7, 120.2])
    with torch.no_grad():
        ref = _official_forward(base, dc_tokens, dc_t_tokens, n_layers, x, ehs, pooled, t)
        wrapped = wrap_model(base, tokens)
        ours = wrapped(hidden_states=x, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=t, return_dict=False)[0]
        wrapped.remove()
        plain = base(hidden_states=x, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=t, return_dict=False)[0]
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()
    assert not torch.allclose(plain, ref, atol=1e-3)  # the tokens matter: the comparison is not vacuous


def test_4096_wide_tokens_without_a_model_say_to_pass_model(tmp_path):
    (tmp_path / "off").mkdir()
    torch.save(nn.Parameter(torch.zeros(5, 4, 4096)), tmp_path / "off" / "dc_tokens.pth")
    with pytest.raises(NeedsContextEmbedder) as err:
        read_official(tmp_path / "off", "sd3")
    assert "--model" in str(err.value)

    from typer.testing import CliRunner

    from softrepa.cli import app

    res = CliRunner().invoke(app, ["import-tokens", str(tmp_path / "off"), str(tmp_path / "ours"), "--backbone", "sd3"])
    assert res.exit_code == 2 and "--model" in res.output


def test_cli_import_projects_with_the_model_folder(tmp_path):
    from typer.testing import CliRunner

    from softrepa.cli import app
    from softrepa.tokens import load_tokens

    base = _tiny_sd3()
    base.save_pretrained(tmp_path / "model" / "transformer")
    (tmp_path / "off").mkdir()
    torch.manual_seed(2)
    dc = nn.Parameter(torch.randn(2, 3, 48))
    torch.save(dc, tmp_path / "off" / "dc_tokens.pth")
    res = CliRunner().invoke(app, ["import-tokens", str(tmp_path / "off"), str(tmp_path / "ours"), "--backbone", "sd3", "--model", str(tmp_path / "model")])
    assert res.exit_code == 0, res.output
    got = load_tokens(tmp_path / "ours").tokens
    with torch.no_grad():
        want = base.context_embedder(dc)
    assert got.shape == (2, 3, 32) and torch.allclose(got, want, atol=1e-6)
