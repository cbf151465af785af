"""Image checks recorded on caption rows: too small, near-uniform (blank), extreme aspect.

A caption of a 40-pixel icon, of a blank frame or of a 10:1 panorama strip is
a poor training pair for SoftREPA (its batches show the image to a 512-1024 px
diffusion backbone). These checks do not reject anything: the caption stage
stores their names in the ``image_flags`` column and ``dataprep batches
--drop-image-flags`` leaves flagged images out when asked.

:func:`image_flags` is pure (Pillow only) and runs in the decode workers
beside :func:`dataprep.images.prepare`. The thresholds live in
:class:`ImageChecks`; they are not part of the row key, so changing them never
recaptions anything (a rerun keeps the flags its rows were written with).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageStat

from dataprep.errors import ConfigError
from dataprep.runtime import at_least

FLAGS: dict[str, str] = {
    "small": "the shorter side is below --min-side pixels",
    "blank": "near-uniform: the grey-level standard deviation is below --blank-std (of 255)",
    "aspect": "the longer side is more than --max-aspect times the shorter one",
}


@dataclass(frozen=True)
class ImageChecks:
    """Thresholds of the image checks (flags of the caption commands map to these).

    ``min_side``: shortest side in pixels under which an image is ``small``
    (LLaVA-1.5 sees 336 px; an image far below it is upscaled noise).
    ``blank_std``: grey-level standard deviation (0-255, over a 64 x 64
    nearest-neighbour sample) under which an image is ``blank``. ``max_aspect``: long side /
    short side above which an image is ``aspect`` (padding to a square then
    leaves most of the model's input empty).
    """

    min_side: int = 128
    blank_std: float = 4.0
    max_aspect: float = 4.0

    def __post_init__(self) -> None:
        at_least(self.min_side, 0, "--min-side", "e.g. 128 (0 turns the check off)")
        at_least(self.blank_std, 0, "--blank-std", "e.g. 4.0 (0 turns the check off)")
        at_least(self.max_aspect, 1, "--max-aspect", "e.g. 4.0 (long side / short side)")


def image_flags(img: Image.Image, checks: ImageChecks = ImageChecks()) -> list[str]:
    """The names (in :data:`FLAGS` order) of the checks ``img`` fails; [] when none.

    ``img`` is the decoded image at full size, before padding or cropping (the
    padding of a square would itself look uniform). Never raises.
    """
    w, h = img.size
    flags = []
    if min(w, h) < checks.min_side:
        flags.append("small")
    try:
        # nearest-neighbour samples, not an averaging thumbnail: averaging
        # would flatten fine texture (sand, foliage) into a uniform grey
        sample = img.resize((min(w, 64), min(h, 64)), Image.Resampling.NEAREST).convert("L")
        std = ImageStat.Stat(sample).stddev[0] if w and h else 0.0
    except Exception:  # a mode Pillow cannot convert: no verdict on blankness
        std = None
    if std is not None and std < checks.blank_std:
        flags.append("blank")
    if min(w, h) == 0 or max(w, h) / min(w, h) > checks.max_aspect:
        flags.append("aspect")
    return flags


def parse_flags(text: str | None, flag: str = "--drop-image-flags") -> frozenset[str]:
    """``"small,blank"`` -> the set of flag names; an unknown name is a ConfigError naming ``flag``."""
    names = frozenset(n.strip() for n in (text or "").split(",") if n.strip())
    unknown = sorted(names - set(FLAGS))
    if unknown:
        raise ConfigError(f"unknown image flag(s) {', '.join(unknown)}", flag, f"use a comma-separated list of {', '.join(FLAGS)}")
    return names
