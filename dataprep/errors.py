"""The project's one error type, and how the command lines end.

:class:`ConfigError` is the only exception the project defines for bad
configuration; ``dataprep``, ``softrepa`` and ``flows`` all raise it. Both
command lines run their typer app through :func:`run_cli`. The contract:

- 0: the run completed (per-row errors are recorded in the rows, not fatal);
- 2: bad configuration or environment, found before any model loads; the
  message names the flag and the fix (``ConfigError``);
- 1: anything else (disk full, a server gone, a bug): one readable line on
  stderr, no traceback; ``--debug`` (anywhere on the command line) or
  ``DATAPREP_DEBUG=1`` shows the full traceback instead;
- 130: interrupted with Ctrl-C.

Only the standard library is imported here, so ``--help`` stays fast.
"""

from __future__ import annotations

import errno
import os
import sys
from enum import Enum
from typing import Any, Callable


class ConfigError(ValueError):
    """Bad configuration: stops the run before any work, naming the flag and the fix.

    A ValueError, because that is what it is: a value the run cannot use.
    The message reads ``MESSAGE (flag --x) Fix: FIX`` everywhere.
    """

    def __init__(self, message: str, flag: str | None = None, fix: str | None = None):
        self.message, self.flag, self.fix = message, flag, fix
        parts = [message] + ([f"(flag {flag})"] if flag else []) + ([f"Fix: {fix}"] if fix else [])
        super().__init__(" ".join(parts))


class Reason(str, Enum):
    """Every reason the code records for a row it could not make or chose not to use.

    One vocabulary for rows (``error`` = ``"reason: detail"``, see
    :func:`failure`), manifests (``failures``), summaries, stats and flow
    artifacts, so a count in one place means the same thing in every other.
    A ``str`` enum: its members are the plain strings stored in the rows and
    the JSON records, so old run folders read unchanged. Add a member here
    before writing a new reason anywhere (tests/dataprep/test_failures.py
    checks that the rows the code writes use only these).
    """

    # reading an input (caption, dedup, export, report thumbnails)
    MISSING_FILE = "missing_file"
    READ_ERROR = "read_error"
    TOO_LARGE = "too_large"
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    CORRUPT_IMAGE = "corrupt_image"
    DECODE_ERROR = "decode_error"
    # a row's content
    BAD_TYPE = "bad_type"  # a value that does not fit its column
    BAD_JSON = "bad_json"
    MISSING_CAPTION = "missing_caption"
    MISSING_SOURCE = "missing_source"
    MISSING_TARGET = "missing_target"
    # a model's answer (engines, caption, judge)
    EMPTY_OUTPUT = "empty_output"
    UNPARSABLE_JUDGEMENT = "unparsable_judgement"
    GENERATE_ERROR = "generate_error"
    TEMPLATE_ERROR = "template_error"
    OUT_OF_MEMORY = "out_of_memory"
    INTERNAL = "internal"
    REQUEST_ERROR = "request_error"
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"
    BAD_RESPONSE = "bad_response"
    # a note on a kept row, not an error (rewrite's --max-target-share)
    TARGET_SHARE = "target_share"
    # rows a reader leaves out (batches, export, evaluate, stats: dataprep.store.edit_skip)
    CAPTION_ERROR_ROWS = "caption_error_rows"
    CAPTION_EMPTY_ROWS = "caption_empty_rows"
    EDIT_ERROR_ROWS = "edit_error_rows"
    EDIT_FAILED_ROWS = "edit_failed_rows"
    EDIT_EMPTY_ROWS = "edit_empty_rows"
    SUPERSEDED_ROWS = "superseded_rows"  # export: an image's other, older or failing edit
    # what the batch index leaves out (besides the rows above); an image left
    # out for an image check counts as image_flagged and as image_flag_<check>
    IMAGES_WITHOUT_CAPTION = "images_without_caption"
    ANNOTATION_WITHOUT_IMAGE = "annotation_without_image"
    IMAGE_MISSING = "image_missing"
    IMAGE_FLAGGED = "image_flagged"
    EDIT_WITHOUT_CAPTION = "edit_without_caption"
    EDIT_STALE = "edit_stale"
    EDIT_NOT_JUDGED_GOOD = "edit_not_judged_good"
    DEDUP_DUPLICATE = "dedup_duplicate"
    # export: pairs whose image cannot be copied
    IMAGE_URI_MISSING = "image_uri_missing"
    IMAGE_NOT_DECODABLE = "image_not_decodable"
    # evaluate (softrepa): the step of an edit that failed
    IMAGE = "image"
    ENCODE = "encode"
    EDIT = "edit"
    # train (softrepa): a batch row it cannot train on
    EMPTY_BATCH = "empty_batch"
    POSITIVE_INDEX_LENGTH = "positive_index_length"
    POSITIVE_INDEX_RANGE = "positive_index_range"
    NULL_PROMPT = "null_prompt"
    IMAGE_UNREADABLE = "image_unreadable"  # and export's image that cannot be read

    def __str__(self) -> str:  # f"{Reason.X}" is the stored text on every Python version
        return self.value


def failure(reason: Reason, detail: object = None) -> str:
    """A row's ``error`` text: ``"reason: detail"`` (or the bare reason).

    The one constructor of that text, so :func:`reason_of` always finds a
    member of :class:`Reason` in it.
    """
    reason = Reason(reason)
    return reason.value if detail is None or detail == "" else f"{reason.value}: {detail}"


def read_failure(exc: BaseException) -> str:
    """The row error for an input that could not be read: a missing file (or
    zip member) is ``missing_file``, anything else (bad CRC, encrypted member,
    permissions) ``read_error``."""
    return failure(Reason.MISSING_FILE if isinstance(exc, (FileNotFoundError, KeyError)) else Reason.READ_ERROR, exc)


def reason_of(error: str) -> str:
    """The reason of a row's ``error`` (``"reason: detail"``): what summaries, manifests and stats count by."""
    return error.split(":", 1)[0].strip()


DEBUG_FLAG = "--debug"
INTERRUPTED = "interrupted: finished shards are kept; rerun the same command to continue"
DEBUG_ENV = ("DATAPREP_DEBUG", "SOFTREPA_DEBUG")

# errno -> what to do about it, for the one-line message
_HINTS = {
    errno.ENOSPC: "free disk space (or pass another --out), then rerun: finished shards are kept and skipped",
    errno.EDQUOT: "free space in your quota, then rerun: finished shards are kept and skipped",
    errno.EACCES: "check the permissions of that path",
    errno.EROFS: "write to a writable file system (--out)",
    errno.EMFILE: "raise the open-file limit (ulimit -n) or lower --workers",
}


def debug_requested(argv: list[str], environ: dict[str, str] | os._Environ = os.environ) -> tuple[bool, list[str]]:
    """(debug on?, argv without ``--debug``). Only flags before a ``--`` separator count."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = DEBUG_FLAG in argv[:end] or any(environ.get(k, "").strip().lower() not in ("", "0", "false", "no") for k in DEBUG_ENV)
    return debug, [a for i, a in enumerate(argv) if not (a == DEBUG_FLAG and i < end)]


def one_line(exc: BaseException, limit: int = 600) -> str:
    """The failure as one readable line: type, message, and a fix when one is known."""
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    hint = _HINTS.get(getattr(exc, "errno", None))
    if hint is None and isinstance(exc, (ConnectionError, TimeoutError)):
        hint = "check that the server is up and reachable (--base-url), then rerun: finished rows are kept"
    line = f"{type(exc).__name__}: {text}"
    return f"{line}. Fix: {hint}" if hint else line


def print_error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def run_cli(app: Callable[..., Any], prog_name: str, argv: list[str] | None = None) -> None:
    """Run a typer ``app`` and turn every failure into the exit code of the contract above."""
    debug, args = debug_requested(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, prog_name=prog_name)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C inside a command into a bare exit 130
            print_error(INTERRUPTED)
        raise
    except KeyboardInterrupt:  # Ctrl-C outside a command (while typer starts)
        print_error(INTERRUPTED)
        raise SystemExit(130) from None
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, ConfigError):
            print_error(str(exc))
            raise SystemExit(2) from None
        print_error(f"{one_line(exc)} (rerun with {DEBUG_FLAG} or {DEBUG_ENV[0]}=1 for the traceback)")
        raise SystemExit(1) from None
