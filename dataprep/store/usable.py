"""Which caption and edit rows a reader uses: one decision, like datatrove's filters.

A row goes in, ``None`` (keep) or the :class:`~dataprep.errors.Reason` it is
left out for comes out. The batch builder, the exports, ``dataprep stats``
and ``softrepa evaluate-edit`` all ask these functions, so "usable" means the
same everywhere and their skip counts use one vocabulary. Pure: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from dataprep.errors import Reason

if TYPE_CHECKING:
    import pyarrow as pa


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def caption_skip(row: Mapping[str, Any]) -> Reason | None:
    """Why a caption row is not used (an error row, no caption text), or None."""
    if row.get("error") is not None:
        return Reason.CAPTION_ERROR_ROWS
    if not _text(row.get("caption")):
        return Reason.CAPTION_EMPTY_ROWS
    return None


def edit_skip(row: Mapping[str, Any], require_passed: bool = True) -> Reason | None:
    """Why an edit row is not used, or None.

    An error row never; one the rule checker did not pass only when
    ``require_passed`` is off (``export --include-failed``, evaluation, which
    keeps the verdict as a column); one without source or target text never.
    """
    if row.get("error") is not None:
        return Reason.EDIT_ERROR_ROWS
    if require_passed and row.get("passed") is not True:
        return Reason.EDIT_FAILED_ROWS
    if not (_text(row.get("source")) and _text(row.get("target"))):
        return Reason.EDIT_EMPTY_ROWS
    return None


def caption_skips(table: "pa.Table | pa.RecordBatch") -> "pa.Array":
    """:func:`caption_skip` column-wise (``error`` and ``caption`` columns): per
    row the reason or null. The batch builder's path at a million rows, where a
    Python string per row would cost more than the rest of the index;
    tests/dataprep/test_store.py checks that both forms agree."""
    import pyarrow as pa
    import pyarrow.compute as pc

    is_error = pc.is_valid(table.column("error"))
    is_empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(pc.fill_null(table.column("caption"), "")), ""), True)
    null = pa.scalar(None, pa.string())
    return pc.if_else(is_error, Reason.CAPTION_ERROR_ROWS.value, pc.if_else(is_empty, Reason.CAPTION_EMPTY_ROWS.value, null))
