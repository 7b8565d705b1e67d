"""Cursor pagination for the lists: newest first, ``limit`` rows a page, and ``next_cursor`` (opaque) for the rest.
A cursor names the last row shown, so a page does not shift while new rows are added."""

from __future__ import annotations

import base64
import binascii

from api.errors import ApiError

DEFAULT, MOST = 50, 200


def _decode(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor.encode() + b"=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeError, ValueError):
        text = ""
    kind, _, value = text.partition(":")
    if kind != "before" or not (value.isascii() and value.isdigit()) or not 0 < int(value) < 2 ** 63:
        raise ApiError(400, "cursor: not a cursor this API gave (take next_cursor from the previous page)",
                       field="cursor")
    return int(value)


def _encode(row_id: int) -> str:
    return base64.urlsafe_b64encode(f"before:{row_id}".encode()).decode().rstrip("=")


def page(queryset, cursor: str | None, limit: int) -> dict:
    """``{"results": rows, "next_cursor": ...}`` of ``queryset`` by descending id."""
    if cursor:
        queryset = queryset.filter(pk__lt=_decode(cursor))
    rows = list(queryset.order_by("-pk")[:limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    return {"results": rows, "next_cursor": _encode(rows[-1].pk) if more else None}
