"""Tiny random diffusers pipelines (SD3, SDXL, SD1.5) for tests and the demo.

``softrepa tiny-models DIR`` writes them (``DIR/sd3``, ``DIR/sdxl``,
``DIR/sd1.5``) with token files pickled like the released ones
(``DIR/official-tokens/<backbone>``); ``dataprep tiny-models DIR`` writes the
captioning/rewriting models and the demo's images into the same folder.

No machine here reaches a model hub, so tests use the real architectures with
tiny configs (``shared/design/OFFLINE_TESTING.md``, values from diffusers' own
tests). Each pipeline is saved with ``save_pretrained`` and must load back with
``DiffusionPipeline.from_pretrained(path)`` -- the same path the real models
take. Tokenizers are built locally (no download): a byte-level CLIP BPE and a
unigram T5 vocabulary over ASCII characters.

Shapes that matter downstream (resolution = ``sample_size * vae_scale_factor``):

- ``sd3``: transformer 4 blocks, inner (caption projection) dim 32, 4 latent
  channels, VAE scale factor 2, 32x32 px images -> 16x16 latents.
- ``sdxl``: UNet cross-attention dim 64 (two CLIPs of 32), text_time
  conditioning, 32x32 px images.
- ``sd1.5``: UNet cross-attention dim 32, 32x32 px images.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

BACKBONES = ("sd3", "sdxl", "sd1.5")

# A few sentences so the tokenizers see real words; the vocabularies cover all
# printable ASCII anyway, so any prompt tokenizes.
_CORPUS = "a photo of a cat on a red sofa. a dog in a green field. the image features a close-up of a brown fox."


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode char table (byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def build_clip_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer over single byte-level symbols (+ a few merges), ~520 ids."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a")]  # enough to exercise the merge path
    for m in merges:
        merged = "".join(m)
        if merged not in vocab:
            vocab[merged] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = model_max_length
    return tok


def build_t5_tokenizer(model_max_length: int = 32):
    """A unigram T5 tokenizer: specials, the word-start marker and ASCII characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(w, -2.0) for w in sorted(set(_CORPUS.replace(".", "").split()))]
    pieces += [("\u2581" + w, -1.5) for w in sorted(set(_CORPUS.replace(".", "").split()))]
    pieces += [(chr(c), -5.0) for c in range(33, 127)]
    tok = T5Tokenizer(vocab=pieces, extra_ids=8)
    tok.model_max_length = model_max_length
    return tok


def _clip_config(hidden: int, projection: int, vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=2,
        layer_norm_eps=1e-5,
        max_position_embeddings=77,
        vocab_size=vocab_size,
        hidden_act="gelu",
    )


def _vae(latent_channels: int, sd3: bool = False):
    from diffusers import AutoencoderKL

    kwargs = dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
    )
    if sd3:  # SD3's VAE normalises latents with a shift as well as a scale
        kwargs.update(shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(**kwargs)


def build_sd3_pipeline():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip_tok = build_clip_tokenizer()
    t5_tok = build_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32,
    )
    # two CLIPs of width 16 concatenate to T5's width 32 (= joint_attention_dim);
    # their projections (32 + 32) make the pooled vector (pooled_projection_dim 64)
    text_encoder = CLIPTextModelWithProjection(_clip_config(16, 32, len(clip_tok)))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(16, 32, len(clip_tok)))
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(4, sd3=True),
        text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5_tok,
    )


def _unet(cross_attention_dim: int, sdxl: bool):
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=(2, 4),
    )
    if sdxl:
        # 6 time ids x 8 + text_encoder_2 projection 32 = 80
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=80, use_linear_projection=True)
    return UNet2DConditionModel(**kwargs)


def build_sd15_pipeline():
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tok = build_clip_tokenizer()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=_vae(4), text_encoder=CLIPTextModel(_clip_config(32, 32, len(tok))), tokenizer=tok,
        unet=_unet(32, sdxl=False), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl_pipeline():
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = build_clip_tokenizer()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=_vae(4), text_encoder=CLIPTextModel(_clip_config(32, 32, len(tok))), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(32, 32, len(tok))), tokenizer_2=build_clip_tokenizer(),
        unet=_unet(64, sdxl=True), scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


_BUILDERS = {"sd3": build_sd3_pipeline, "sdxl": build_sdxl_pipeline, "sd1.5": build_sd15_pipeline}


def write_tiny_pipeline(backbone: str, out_dir: Path | str) -> Path:
    """Build one tiny random pipeline and ``save_pretrained`` it to ``out_dir``."""
    if backbone not in _BUILDERS:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
    out_dir = Path(out_dir)
    _BUILDERS[backbone]().save_pretrained(out_dir)
    return out_dir


def write_tiny_pipelines(root: Path | str, backbones: tuple[str, ...] = BACKBONES) -> dict[str, Path]:
    """Write ``root/sd3``, ``root/sdxl``, ``root/sd1.5``; returns backbone -> directory.

    A directory that already holds a ``model_index.json`` is reused, so calling
    this twice (tests, ``softrepa tiny-models``) costs nothing the second time.
    """
    root = Path(root)
    out: dict[str, Path] = {}
    for name in backbones:
        d = root / name
        if not (d / "model_index.json").exists():
            write_tiny_pipeline(name, d)
        out[name] = d
    return out


# ------------------------------------------------------- official token files

# The token files released with the paper's code: ``torch.save`` of an
# ``nn.Parameter`` (dc_tokens) and of a whole ``nn.Embedding`` module
# (dc_t_tokens, 100 time buckets), saved from a CUDA device under the names
# ``dc_prompts_<epoch>.pth`` / ``dc_t_prompts_<epoch>.pth`` and renamed.
OFFICIAL_SHAPES = {
    "sd3": ((5, 4, 1536), (100, 7680)),
    "sd1.5": ((4, 768), (100, 768)),
    "sdxl": ((4, 2048), None),
}


def _save_as_official(obj, path: Path, archive_name: str, device: str) -> None:
    """``torch.save(obj)`` as the official trainer did, storages tagged ``device``.

    torch records each storage's device in the pickle (``'cuda:1'`` in the
    released files); a CPU-only machine cannot save from CUDA, so the location
    string is rewritten in the pickle stream (protocol 2 has no frame offsets,
    so a length-prefixed string can change length in place). Loading such a
    file needs ``map_location`` -- which is what this fixture is for.
    """
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            name = archive_name + info.filename[info.filename.index("/"):]
            if name.endswith("/data.pkl") and device != "cpu":
                old = b"X" + len(b"cpu").to_bytes(4, "little") + b"cpu"
                new = b"X" + len(device.encode()).to_bytes(4, "little") + device.encode()
                if old not in data:
                    raise RuntimeError("unexpected pickle layout: no 'cpu' storage location to retag")
                data = data.replace(old, new)
            dst.writestr(name, data)


def write_official_tokens(out_dir: Path | str, backbone: str, seed: int = 0, device: str = "cuda:1", epoch: int = 12) -> Path:
    """Write ``dc_tokens.pth`` (+ ``dc_t_tokens.pth``) with the released files' types and shapes.

    Random values (seeded); same pickle structure as the published files: an
    ``nn.Parameter`` and a whole ``nn.Embedding``, storages on ``device``.
    """
    import torch

    if backbone not in OFFICIAL_SHAPES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {tuple(OFFICIAL_SHAPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_shape, t_shape = OFFICIAL_SHAPES[backbone]
    g = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(*tok_shape, generator=g) * 0.02)
    _save_as_official(param, out_dir / "dc_tokens.pth", f"dc_prompts_{epoch}", device)
    if t_shape is not None:
        emb = torch.nn.Embedding(*t_shape)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(*t_shape, generator=g) * 0.02)
        _save_as_official(emb, out_dir / "dc_t_tokens.pth", f"dc_t_prompts_{epoch}", device)
    return out_dir


def write_official_token_sets(root: Path | str, backbones: tuple[str, ...] = BACKBONES) -> dict[str, Path]:
    """``root/<backbone>/dc_tokens.pth`` (+ ``dc_t_tokens.pth``) for each backbone."""
    root = Path(root)
    return {b: write_official_tokens(root / b, b) for b in backbones}


def write_all(root: Path | str) -> dict[str, Path]:
    """The tiny pipelines and ``official-tokens/``: what ``softrepa tiny-models DIR`` writes."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = write_tiny_pipelines(root)
    write_official_token_sets(root / "official-tokens")
    written["official-tokens"] = root / "official-tokens"
    return written
