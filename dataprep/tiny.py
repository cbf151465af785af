"""Tiny random checkpoints of the real architectures, for tests and the offline demo.

``dataprep tiny-models DIR`` writes one ``from_pretrained`` directory per model
dataprep uses (``DIR/llava``, ``DIR/llama``) and the data the demo runs on
(``DIR/images``, ``DIR/div2k``). The diffusers pipelines and official token
files are softrepa's (``softrepa tiny-models DIR``, :mod:`softrepa.tiny`):
dataprep imports nothing of softrepa. They load through exactly the code path
of the real models; only the weights' size differs (see OFFLINE_TESTING.md).
Their outputs are random tokens: good for plumbing, not for content.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from dataprep.store import atomic_file

# A generic chat template: string or list-of-parts content, LLaVA-1.5's
# "USER: <image>\n... ASSISTANT:" layout. The real checkpoints ship their own.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}{% set has_image = false %}"
    "{% else %}{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% set has_image = (m['content'] | selectattr('type', 'equalto', 'image') | list | length) > 0 %}{% endif %}"
    "{% if m['role'] == 'system' %}SYSTEM: {{ text }}\n"
    "{% elif m['role'] == 'user' %}USER: {% if has_image %}<image>\n{% endif %}{{ text }} "
    "{% else %}ASSISTANT: {{ text }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = [
    "The image features a brown dog with a blue nose standing in a grassy field.",
    "Describe the object and background in the image.",
    "A yellow building with a green door and a window with white curtains.",
    "A rocky beach with a large body of water and a dark cloudy sky.",
    "You are an AI assistant for generating paired text prompts for real image editing tasks.",
    "Modify only one object. Preserve all other words exactly as they are.",
]


def build_tokenizer(extra_special: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer (vocab ~300) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", *extra_special]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"} if "<image>" in extra_special else None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama_config(vocab_size: int, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def write_tiny_llama(out: Path | str, seed: int = 0) -> Path:
    """Tiny LlamaForCausalLM + tokenizer (stands in for Llama-3.1-8B-Instruct)."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = LlamaForCausalLM(_llama_config(len(tok), tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_tiny_llava(out: Path | str, seed: int = 0) -> Path:
    """Tiny LlavaForConditionalGeneration + processor (stands in for LLaVA-1.5-13B)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    out = Path(out)
    torch.manual_seed(seed)
    tok = build_tokenizer(extra_special=("<image>",))
    image_token_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        text_config=_llama_config(len(tok), tok),
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6
        ),
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}),
        tokenizer=tok,
        patch_size=6,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ------------------------------------------------------------------ demo images


def encode_image(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(w: int = 40, h: int = 20) -> bytes:
    """A w x h JPEG whose EXIF says 'rotate 90 CW to display' (orientation 6)."""
    img = Image.new("RGB", (w, h), (200, 10, 10))
    img.paste((10, 10, 200), (0, 0, w // 2, h))  # left half blue, so rotation is visible
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode_image(img, "JPEG", exif=exif.tobytes(), quality=95)


def write_demo_images(folder: Path | str) -> list[Path]:
    """Ten small images of awkward sizes, modes and formats that must all caption."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = {
        "rgb_64x48.png": encode_image(Image.new("RGB", (64, 48), (10, 120, 200))),
        "grey_40x80.png": encode_image(Image.new("L", (40, 80), 128)),
        "rgba_50x50.png": encode_image(Image.new("RGBA", (50, 50), (255, 0, 0, 0))),
        "palette_33x17.png": encode_image(Image.new("RGB", (33, 17), (0, 200, 0)).convert("P")),
        "cmyk_20x30.jpg": encode_image(Image.new("CMYK", (20, 30), (0, 255, 255, 0)), "JPEG"),
        "deep_32x32.png": encode_image(Image.new("I;16", (32, 32), 40000)),
        "photo_exif.jpg": exif_rotated_jpeg(),
        "nested/pic.webp": encode_image(Image.new("RGB", (25, 60), (90, 90, 0)), "WEBP"),
        "nested/pic.bmp": encode_image(Image.new("RGB", (16, 16), (1, 2, 3)), "BMP"),
        "nested/pic.tiff": encode_image(Image.new("RGB", (18, 12), (4, 5, 6)), "TIFF"),
    }
    paths = []
    for name, data in made.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        paths.append(p)
    return paths


# DIV2K HR frames are 8-bit RGB PNGs with 2040 px on the long side (landscape
# and portrait, several heights); these are the shapes the demo and the tests
# caption, so decoding, padding and resizing see what the real set holds.
DIV2K_SIZES = ((2040, 1356), (1356, 2040), (2040, 1152), (2040, 1536))


def div2k_like_image(number: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like RGB frame: a sky/ground gradient, a few shapes, sensor-like noise.

    Deterministic in ``number``; smooth regions plus noise make PNGs of a few
    MB, like DIV2K's, rather than the few KB a flat colour would give.
    """
    import numpy as np

    w, h = size
    rng = np.random.default_rng(number)
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    sky, ground = rng.uniform(60, 230, 3).astype(np.float32), rng.uniform(20, 160, 3).astype(np.float32)
    horizon = rng.uniform(0.35, 0.65)
    img = np.where(y < horizon, sky * (0.6 + 0.4 * y / horizon), ground * (0.7 + 0.3 * x))
    img = np.broadcast_to(img, (h, w, 3)).copy()
    for _ in range(int(rng.integers(3, 7))):  # a few blobs: the "objects" of the scene
        cx, cy, r = rng.uniform(0, w), rng.uniform(horizon * h, h), rng.uniform(0.05, 0.2) * min(w, h)
        yy, xx = np.ogrid[:h, :w]
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, size=(h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_div2k_samples(folder: Path | str, n: int = 4, sizes: tuple[tuple[int, int], ...] = DIV2K_SIZES) -> list[Path]:
    """``folder/0001.png`` .. ``000n.png`` in DIV2K's naming and sizes, plus ``prompts_editing.json``.

    A stand-in for ``DIV2K_train_HR/`` that ``dataprep caption div2k`` reads
    as it reads the real folder. Existing files are kept (rerunning costs
    nothing). The pairs file (see :func:`write_editing_pairs`) refers to the
    first two images.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(1, n + 1):
        p = folder / f"{i:04d}.png"
        if not p.exists():
            with atomic_file(p, fsync=False) as tmp:  # compress_level 1: a few MB per frame in a fraction of a second
                div2k_like_image(i, sizes[(i - 1) % len(sizes)]).save(tmp, format="PNG", compress_level=1)
        paths.append(p)
    write_editing_pairs(folder / "prompts_editing.json")
    return paths


# Caption/target pairs in the official editing script's JSON layout (a list of
# {"prompt", "img_path", "tgt_prompt"}, img_path relative to the file, texts
# ending in a newline as LLaVA's captions do). Like the two pairs published
# with the paper's code, both change a colour and another concept, so the rule
# checker must fail both (color_change + multiple_concepts).
EDITING_PAIRS = [
    {
        "prompt": "The image shows a white lighthouse standing on a grassy cliff. The door of the lighthouse is shut, "
                  "and a narrow path leads up to it. A wooden fence runs along the edge of the cliff, and a few seagulls "
                  "fly across the pale sky above the sea.\n",
        "img_path": "0001.png",
        "tgt_prompt": "The image shows a blue lighthouse standing on a grassy cliff. The door of the lighthouse is open, "
                      "and a narrow path leads up to it. A wooden fence runs along the edge of the cliff, and a few seagulls "
                      "fly across the pale sky above the sea.\n",
    },
    {
        "prompt": "The image features a quiet harbor with several fishing boats tied to a long wooden pier. The water is calm "
                  "and green, reflecting the boats and the hills behind them. The pier is lined with barrels and nets, with "
                  "some of the barrels stacked high and others lying on their side. The nets are spread along the pier, "
                  "with some near the boats and others further back. The overall color palette of the scene is mostly green "
                  "and brown, with the soft morning light giving it a peaceful mood.\n",
        "img_path": "0002.png",
        "tgt_prompt": "The image features a quiet harbor with several fishing boats tied to a long wooden pier. The water is calm "
                      "and blue, reflecting the boats and the hills behind them. The pier is lined with crates and ropes, with "
                      "some of the crates stacked high and others lying on their side. The ropes are spread along the pier, "
                      "with some near the boats and others further back. The overall color palette of the scene is mostly blue "
                      "and brown, with the soft morning light giving it a peaceful mood.\n",
    },
]


def write_editing_pairs(path: Path | str) -> Path:
    """Write :data:`EDITING_PAIRS` to ``path`` in the official ``prompts_editing.json`` layout."""
    path = Path(path)
    path.write_text(json.dumps(EDITING_PAIRS, indent=4) + "\n", encoding="utf-8")
    return path


def write_all(root: Path | str) -> dict[str, Path]:
    """dataprep's tiny models and the demo's data, one subdirectory each.

    ``llava/``, ``llama/``: tiny random checkpoints; ``images/``: ten small
    images of awkward kinds; ``div2k/``: DIV2K-shaped frames and their editing
    pairs. ``softrepa tiny-models`` adds the SD pipelines and official-format
    token files to the same folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = {"llava": write_tiny_llava(root / "llava"), "llama": write_tiny_llama(root / "llama")}
    write_demo_images(root / "images")
    written["images"] = root / "images"
    write_div2k_samples(root / "div2k")
    written["div2k"] = root / "div2k"
    return written
