"""Prompt files: resolved by name from the shipped defaults, or by path.

A prompt is identified in provenance by its file name and the sha256 of its
text, so editing a prompt changes every content key that depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dataprep.errors import ConfigError
from dataprep.store import sha256_text


@dataclass(frozen=True)
class Prompt:
    prompt_id: str  # file name, e.g. "caption.txt"
    text: str
    sha256: str


def default_prompt_path(name: str) -> Path:
    """The shipped prompt file: inside the wheel, else the repo's prompts/."""
    try:
        p = resources.files("dataprep.prompts") / name
        if p.is_file():
            return Path(str(p))
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "prompts" / name


def load_prompt(path_or_name: str | Path, flag: str = "--prompt-file") -> Prompt:
    """Read a prompt; a bare name like ``caption.txt`` means the shipped one."""
    p = Path(path_or_name)
    if not p.exists() and p.parent == Path("."):
        p = default_prompt_path(p.name)
    if not p.is_file():
        raise ConfigError(f"prompt file not found: {path_or_name}", flag, "pass an existing text file")
    try:
        text = p.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"prompt file {p} is not UTF-8 text (byte {exc.start}: {exc.reason})", flag, f"convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 {p.name}") from None
    if not text:
        raise ConfigError(f"prompt file is empty: {p}", flag, "write the prompt into the file")
    return Prompt(prompt_id=p.name, text=text, sha256=sha256_text(text))
