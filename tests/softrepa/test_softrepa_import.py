"""Official SoftREPA .pth token files: safe import into our format.

The files come from a fixture that pickles them exactly as the released ones
(an ``nn.Parameter``, a whole ``nn.Embedding``, storages tagged ``cuda:1``,
the released shapes). Set ``SOFTREPA_OFFICIAL_TOKENS`` to a folder holding
the real released files (``sd3/``, ``sd1.5/``, ``sdxl/``) to run the same
import tests on them as well.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from softrepa.token_files import import_official, read_official
from softrepa.tokens import load_tokens
from tests.pickles import EvilPickle as _Evil

RELEASED_ENV = "SOFTREPA_OFFICIAL_TOKENS"


@pytest.fixture(scope="module", params=["fixture", "released"])
def official(request, official_tokens) -> Path:
    """The fixture's files, and the real released ones when the environment points at them."""
    if request.param == "fixture":
        return official_tokens
    released = os.environ.get(RELEASED_ENV)
    if not released:
        pytest.skip(f"{RELEASED_ENV} is not set (point it at the released sd3/ sd1.5/ sdxl/ token folders to test them)")
    if not (Path(released) / "sd3" / "dc_tokens.pth").exists():
        pytest.fail(f"{RELEASED_ENV}={released} holds no sd3/dc_tokens.pth")
    return Path(released)


def test_fixture_files_are_pickled_like_the_released_ones(official_tokens):
    import zipfile

    with zipfile.ZipFile(official_tokens / "sd3" / "dc_t_tokens.pth") as zf:
        pkl = zf.read("dc_t_prompts_12/data.pkl")
    assert b"torch.nn.modules.sparse" in pkl and b"Embedding" in pkl and b"cuda:1" in pkl
    with pytest.raises(RuntimeError, match="CUDA"):  # saved on a GPU: loading needs map_location
        torch.load(official_tokens / "sd3" / "dc_tokens.pth", weights_only=True)


@pytest.mark.parametrize(
    "backbone,tokens_shape,t_shape,apply",
    [
        ("sd3", (5, 4, 1536), (100, 7680), ()),
        ("sd1.5", (1, 4, 768), (100, 768), ("down",)),
        ("sdxl", (1, 4, 2048), None, ("down", "mid")),
    ],
)
def test_official_tokens_import_with_their_shapes(official, tmp_path, backbone, tokens_shape, t_shape, apply):
    module = import_official(official / backbone, tmp_path / backbone, backbone)
    assert tuple(module.tokens.shape) == tokens_shape
    assert (None if module.t_embedding is None else tuple(module.t_embedding.weight.shape)) == t_shape
    assert module.config.apply == apply
    back = load_tokens(tmp_path / backbone)
    assert back.config == module.config and torch.equal(back.tokens, module.tokens)
    # the values are the official ones, not a fresh init
    raw = torch.load(official / backbone / "dc_tokens.pth", weights_only=True, map_location="cpu")
    assert torch.equal(back.tokens.reshape(raw.shape), raw.detach())


def test_sd3_time_embedding_is_split_per_layer_like_the_official_forward(official):
    module = read_official(official / "sd3", "sd3")
    with torch.serialization.safe_globals([torch.nn.Embedding]):
        emb = torch.load(official / "sd3" / "dc_t_tokens.pth", weights_only=True, map_location="cpu")
    t = torch.tensor([437.0])
    ours = module.layer_tokens(t, batch=1)
    # official: dc_t_tokens(t // 10).chunk(n_layers, -1)[k] added to dc_tokens[k]
    chunks = emb(torch.tensor([43])).chunk(5, dim=-1)
    dc = torch.load(official / "sd3" / "dc_tokens.pth", weights_only=True, map_location="cpu")
    for k in range(5):
        assert torch.allclose(ours[k][0], dc[k] + chunks[k][0])


def test_a_pickle_with_other_globals_is_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"x": _Evil()}, bad / "dc_tokens.pth")
    with pytest.raises(pickle.UnpicklingError):
        read_official(bad, "sd1.5")


def test_import_tokens_cli(official, tmp_path):
    from typer.testing import CliRunner

    from softrepa.cli import app

    res = CliRunner().invoke(app, ["import-tokens", str(official / "sd1.5"), str(tmp_path / "out"), "--backbone", "sd1.5"])
    assert res.exit_code == 0, res.output
    assert "[1, 4, 768]" in res.output
    assert load_tokens(tmp_path / "out").config.t_dependent
    res = CliRunner().invoke(app, ["import-tokens", str(tmp_path / "nowhere"), str(tmp_path / "o2"), "--backbone", "sd3"])
    assert res.exit_code == 2
