"""samtools region syntax: ``chr``, ``chr:beg``, ``chr:beg-end``, ``chr:-end``, commas in
numbers, ``*`` for unplaced unmapped reads, ``{name}:beg-end`` for names containing ``:``.

Coordinates in the text are 1-based inclusive; a :class:`Region` is 0-based half-open.
Resolution follows htslib's ``hts_parse_region``: a whole string that is a contig name wins
over reading it as ``name:range``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_END = (((1 << 31) - 1) << 32) | ((1 << 31) - 1)  # htslib's HTS_POS_MAX: "to the end", 64-bit positions


class RegionError(ValueError):
    pass


@dataclass(frozen=True)
class Region:
    ref_id: int      # -1 for '*' (unplaced unmapped reads)
    beg: int         # 0-based inclusive
    end: int         # 0-based exclusive
    text: str = ""


_NUM = re.compile(r"^[0-9,]+$")


def _num(s: str, text: str) -> int:
    s = s.strip()
    if not _NUM.match(s) or not s.replace(",", ""):
        raise RegionError(f"invalid region {text!r}: bad coordinate {s!r}")
    return int(s.replace(",", ""))


def _range(spec: str, text: str) -> tuple[int, int]:
    if spec == "":
        return 0, MAX_END
    if "-" in spec:
        a, b = spec.split("-", 1)
        beg = _num(a, text) if a.strip() else 1
        end = _num(b, text) if b.strip() else MAX_END
    else:
        beg = _num(spec, text)
        end = MAX_END
    if beg < 1:
        beg = 1
    if end < beg:
        raise RegionError(f"invalid region {text!r}: end is before start")
    return beg - 1, end


def parse_region(text: str, ref_ids: dict[str, int]) -> Region:
    """Resolve ``text`` against the dataset's contig names (name -> ref_id)."""
    if text == "*":
        return Region(-1, 0, MAX_END, text)
    if text.startswith("{"):
        close = text.find("}")
        if close < 0:
            raise RegionError(f"invalid region {text!r}: unbalanced braces")
        name = text[1:close]
        rest = text[close + 1:]
        if name not in ref_ids:
            raise RegionError(f"unknown reference {name!r} in region {text!r}")
        if rest and not rest.startswith(":"):
            raise RegionError(f"invalid region {text!r}: expected ':' after '}}'")
        beg, end = _range(rest[1:], text)
        return Region(ref_ids[name], beg, end, text)
    if text in ref_ids:
        colon = text.rfind(":")
        if colon > 0 and text[:colon] in ref_ids and _looks_like_range(text[colon + 1:]):
            raise RegionError(f"region {text!r} is ambiguous: write {{{text[:colon]}}}:{text[colon+1:]} or {{{text}}}")
        return Region(ref_ids[text], 0, MAX_END, text)
    colon = text.rfind(":")
    if colon > 0:
        name, spec = text[:colon], text[colon + 1:]
        if name in ref_ids:
            beg, end = _range(spec, text)
            return Region(ref_ids[name], beg, end, text)
        if _looks_like_range(spec):
            raise RegionError(f"unknown reference {name!r} in region {text!r}")
    raise RegionError(f"unknown reference {text!r}")


def _looks_like_range(spec: str) -> bool:
    return bool(spec) and bool(re.match(r"^[0-9,]*(-[0-9,]*)?$", spec))
