"""Class names: one reader for label maps and one rule for matching names across tools.

mmaction2's data scripts name class folders ``air_drumming`` while its label maps say
``air drumming``; CSV exports quote names or change case. Two names match when they are equal,
or, failing that, when their :func:`class_key` is equal and no other name shares that key, so
that two real classes differing only in case (``Jogging`` / ``jogging``) still match exactly.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from avfuse.io import read_regular_text

__all__ = [
    "ClassNameError",
    "class_key",
    "kinetics_clip_name",
    "match_class_names",
    "nfc",
    "read_label_map",
]


class ClassNameError(ValueError):
    """A label map or class list that cannot be used as it is."""


def nfc(text: str) -> str:
    # macOS writes decomposed Unicode; compare and key names in one normal form.
    return unicodedata.normalize("NFC", text)


def class_key(name: str) -> str:
    """Loose key of a class name: case, underscores, quotes and repeated blanks do not count."""
    s = nfc(str(name)).strip().strip("\"'").casefold().replace("_", " ")
    return " ".join(s.split())


def match_class_names(names: Sequence[str], classes: Sequence[str]) -> list[int]:
    """Index into ``classes`` of each of ``names`` (``-1`` where none matches).

    Exact (NFC) equality wins; otherwise the :func:`class_key` must match exactly one class and
    that class must not already be taken by an exact match, so no two names map to one class
    unless they are the same string.
    """
    exact = {nfc(c): i for i, c in enumerate(classes)}
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(classes):
        by_key[class_key(c)].append(i)
    names_n = [nfc(str(n)) for n in names]
    taken = {exact[n] for n in names_n if n in exact}
    key_count = Counter(class_key(n) for n in names_n if n not in exact)
    out: list[int] = []
    for n in names_n:
        if n in exact:
            out.append(exact[n])
            continue
        k = class_key(n)
        cands = [i for i in by_key.get(k, []) if i not in taken]
        out.append(cands[0] if len(cands) == 1 and key_count[k] == 1 else -1)
    return out


_INDEXED = re.compile(r"^(\d{1,9})[\s,:]+(.+)$")


# A label map of 100,000 classes of 100 characters each is 10 MB; a larger file is not one.
MAX_LABEL_MAP_BYTES = 32 << 20
# Class names are words (the longest Kinetics name has 46 characters); reports and file
# names cannot hold a page-long one.
MAX_CLASS_NAME = 256


def _clipped(names: list[str]) -> list[str]:
    """The first five of ``names``, each cut to 60 characters, for an error message."""
    return [n[:60] + ("..." if len(n) > 60 else "") for n in names[:5]]


def read_label_map(path: str | Path) -> list[str]:
    """Class names in model-index order from a label map.

    One name a line (Kinetics and mmaction2 label maps), blank lines ignored; maps that put the
    index first (``0 abseiling``, ``0,abseiling``, ``0: abseiling``) have it dropped when the
    indices run 0, 1, 2, ... Duplicated names, and names with control characters, are refused.
    """
    path = Path(path)
    try:
        text = read_regular_text(path, "utf-8-sig", MAX_LABEL_MAP_BYTES)
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassNameError(f"{path}: cannot read the label map ({exc})") from exc
    lines = [nfc(ln.strip()) for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ClassNameError(f"{path}: label map is empty")
    split = [_INDEXED.match(ln) for ln in lines]
    if all(split) and [int(m[1]) for m in split if m] == list(range(len(lines))):
        lines = [m[2].strip() for m in split if m]
    long = [n for n in lines if len(n) > MAX_CLASS_NAME]
    if long:
        raise ClassNameError(
            f"{path}: {len(long)} class name(s) over {MAX_CLASS_NAME} characters "
            f"(e.g. {long[0][:60]!r}...)"
        )
    bad = [n for n in lines if any(unicodedata.category(ch)[0] == "C" for ch in n)]
    if bad:
        raise ClassNameError(f"{path}: class names with control characters: {_clipped(bad)!r}")
    dup = [n for n, c in Counter(lines).items() if c > 1]
    if dup:
        raise ClassNameError(f"{path}: duplicated class names: {_clipped(dup)}")
    return lines


def kinetics_clip_name(youtube_id: str, start: str | float, end: str | float) -> str:
    """``YTID_SSSSSS_EEEEEE``: the file stem Kinetics downloaders write for one clip."""
    return f"{youtube_id}_{int(float(start)):06d}_{int(float(end)):06d}"
