"""The directory meta-format as onion-service descriptors use it (dir-spec §1.2): items and objects.

A document is a sequence of *items*: a line ``Keyword [SP arg]*`` optionally followed by
one *object* ``-----BEGIN LABEL-----`` / base64 lines / ``-----END LABEL-----``. This module
splits a document into items, strictly: printable ASCII only, no empty lines, a BEGIN label
must match its END label, object bodies must be valid base64, and every byte must belong to
an item. It also writes items the way tor does (base64 bodies wrapped at 64 columns).
Each item remembers where it starts in the text, so a signature can cover a prefix.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from onionp2p.errors import HsDescriptorError

__all__ = ["Item", "b64_nopad", "check_counts", "format_object", "need_object", "no_object", "parse_items", "unb64"]

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_BEGIN = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\Z")
MAX_LINE = 8192  # no legitimate descriptor line comes close


@dataclass(frozen=True, slots=True)
class Item:
    """One keyword line and its optional object."""

    keyword: str
    args: tuple[str, ...]
    obj_label: str | None
    obj: bytes | None
    start: int  # offset of the keyword line in the document


def unb64(text: str, what: str, length: int | None = None) -> bytes:
    """Decode base64 with or without ``=`` padding (tor writes both); check the length."""
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise HsDescriptorError(f"{what}: invalid base64") from None
    if length is not None and len(raw) != length:
        raise HsDescriptorError(f"{what}: expected {length} bytes, got {len(raw)}")
    return raw


def b64_nopad(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def format_object(label: str, data: bytes) -> str:
    """``-----BEGIN label-----`` / base64 in 64-column lines / ``-----END label-----`` (no final NL)."""
    b64 = base64.b64encode(data).decode("ascii")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])


def parse_items(text: str, what: str) -> list[Item]:
    """Split ``text`` into items. A final newline is optional (tor omits it in one layer)."""
    if not text.isascii() or any(c < " " and c != "\n" for c in text) or "\x7f" in text:
        raise HsDescriptorError(f"{what}: contains non-printable or non-ASCII characters")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    items: list[Item] = []
    offset = 0
    i = 0
    while i < len(lines):
        line, start = lines[i], offset
        offset += len(line) + 1
        i += 1
        if len(line) > MAX_LINE:
            raise HsDescriptorError(f"{what}: line too long")
        parts = line.split(" ")
        if not parts[0] or not _KEYWORD.match(parts[0]) or "" in parts[1:]:
            raise HsDescriptorError(f"{what}: malformed line {line[:40]!r}")
        label = obj = None
        if i < len(lines) and (m := _BEGIN.match(lines[i])):
            label = m.group(1)
            body: list[str] = []
            offset += len(lines[i]) + 1
            i += 1
            while True:
                if i >= len(lines):
                    raise HsDescriptorError(f"{what}: object {label!r} is not closed")
                offset += len(lines[i]) + 1
                if lines[i] == f"-----END {label}-----":
                    i += 1
                    break
                if lines[i].startswith("-----"):
                    raise HsDescriptorError(f"{what}: object {label!r} ends with the wrong label")
                body.append(lines[i])
                i += 1
            b64 = "".join(body)
            try:
                obj = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise HsDescriptorError(f"{what}: object {label!r} is not valid base64") from None
        items.append(Item(parts[0], tuple(parts[1:]), label, obj, start))
    return items


def check_counts(items: Sequence[Item], what: str, *, exactly_once: Iterable[str] = (),
                 at_most_once: Iterable[str] = (), at_least_once: Iterable[str] = ()) -> None:
    """Enforce how often keywords occur (unknown keywords are not counted: they are ignored)."""
    counts = Counter(it.keyword for it in items)
    for kw in exactly_once:
        if counts[kw] != 1:
            raise HsDescriptorError(f"{what}: {kw!r} must appear exactly once, found {counts[kw]}")
    for kw in at_most_once:
        if counts[kw] > 1:
            raise HsDescriptorError(f"{what}: {kw!r} appears {counts[kw]} times, at most once allowed")
    for kw in at_least_once:
        if counts[kw] < 1:
            raise HsDescriptorError(f"{what}: {kw!r} is missing")


def need_object(item: Item, label: str, what: str) -> bytes:
    """The object of ``item``, which must exist and carry ``label``."""
    if item.obj is None or item.obj_label != label:
        raise HsDescriptorError(f"{what}: {item.keyword!r} needs a {label!r} object")
    return item.obj


def no_object(item: Item, what: str) -> None:
    if item.obj is not None:
        raise HsDescriptorError(f"{what}: {item.keyword!r} must not have an object")
