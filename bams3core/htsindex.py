"""Record counts from a BAM's BAI or CSI index (hts-specs SAMv1 §5.2 and CSIv1), without
reading the BAM: what `samtools idxstats` prints, per reference (mapped, unmapped) plus the
unplaced unmapped reads. Pure: bytes in, numbers out.

Both formats keep, per reference, a pseudo-bin (BAI: 37450; CSI: ((1 << 3(depth+1)) - 1)/7 + 1)
whose second chunk holds ``n_mapped`` and ``n_unmapped``; ``n_no_coor`` (optional) ends the file.
"""

from __future__ import annotations

import struct
import zlib

BAI_PSEUDO_BIN = 37450


class HtsIndexError(ValueError):
    """Not a BAI/CSI index, or a truncated one."""


def _inflate_bgzf(data: bytes) -> bytes:
    out = []
    while data:
        d = zlib.decompressobj(31)
        out.append(d.decompress(data))
        if not d.eof:
            raise HtsIndexError("truncated BGZF/gzip data in the CSI index")
        data = d.unused_data
    return b"".join(out)


def index_counts(data: bytes) -> dict:
    """``{"format": "BAI"|"CSI", "mapped": [...], "unmapped": [...], "no_coor": n|None,
    "records": total}`` from the bytes of a .bai or .csi file. References without a pseudo-bin
    (no reads) count 0."""
    if data[:2] == b"\x1f\x8b":
        data = _inflate_bgzf(data)
    magic = data[:4]
    try:
        if magic == b"BAI\x01":
            fmt, pos, pseudo, loffset = "BAI", 4, BAI_PSEUDO_BIN, False
        elif magic == b"CSI\x01":
            fmt = "CSI"
            _min_shift, depth, l_aux = struct.unpack_from("<iii", data, 4)
            pos, pseudo, loffset = 16 + l_aux, ((1 << 3 * (depth + 1)) - 1) // 7 + 1, True
        else:
            raise HtsIndexError("not a BAI or CSI index (bad magic)")
        (n_ref,) = struct.unpack_from("<i", data, pos)
        pos += 4
        mapped, unmapped = [], []
        for _ in range(n_ref):
            (n_bin,) = struct.unpack_from("<i", data, pos)
            pos += 4
            m = u = 0
            for _b in range(n_bin):
                (bin_,) = struct.unpack_from("<I", data, pos)
                pos += 4 + (8 if loffset else 0)
                (n_chunk,) = struct.unpack_from("<i", data, pos)
                pos += 4
                if bin_ == pseudo and n_chunk >= 2:
                    m, u = struct.unpack_from("<QQ", data, pos + 16)
                pos += 16 * n_chunk
            mapped.append(int(m))
            unmapped.append(int(u))
            if not loffset:  # BAI: linear index
                (n_intv,) = struct.unpack_from("<i", data, pos)
                pos += 4 + 8 * n_intv
        no_coor = struct.unpack_from("<Q", data, pos)[0] if len(data) >= pos + 8 else None
    except struct.error:
        raise HtsIndexError("truncated index") from None
    return {"format": fmt, "mapped": mapped, "unmapped": unmapped, "no_coor": no_coor,
            "records": sum(mapped) + sum(unmapped) + (no_coor or 0)}


def _bin_start(bin_: int, min_shift: int, depth: int) -> int | None:
    """First position a bin covers (None for a pseudo-bin)."""
    level, offset = 0, 0
    while level <= depth:
        nxt = offset + (1 << 3 * level)
        if bin_ < nxt:
            return (bin_ - offset) << (min_shift + 3 * (depth - level))
        offset, level = nxt, level + 1
    return None


def index_offsets(data: bytes) -> dict:
    """Where records start in the BAM, from the bytes of its .bai or .csi (a pure parse).

    ``{"format", "refs": [{"beg": voffset | None, "end": voffset | None,
    "points": [(pos, voffset), ...]}], "no_coor": n | None}``: ``beg``/``end`` are the virtual
    offsets of the first record of a reference and just past its last (the pseudo-bin);
    ``points`` say "every record of this reference at or after ``pos`` starts at or after
    ``voffset``" (BAI: the 16 kbp linear index; CSI: each bin's ``loffset``). Zero offsets
    (windows without records) are left out."""
    if data[:2] == b"\x1f\x8b":
        data = _inflate_bgzf(data)
    magic = data[:4]
    try:
        if magic == b"BAI\x01":
            fmt, pos, pseudo, csi = "BAI", 4, BAI_PSEUDO_BIN, False
            min_shift, depth = 14, 5
        elif magic == b"CSI\x01":
            fmt, csi = "CSI", True
            min_shift, depth, l_aux = struct.unpack_from("<iii", data, 4)
            pos, pseudo = 16 + l_aux, ((1 << 3 * (depth + 1)) - 1) // 7 + 1
        else:
            raise HtsIndexError("not a BAI or CSI index (bad magic)")
        (n_ref,) = struct.unpack_from("<i", data, pos)
        pos += 4
        refs = []
        for _ in range(n_ref):
            (n_bin,) = struct.unpack_from("<i", data, pos)
            pos += 4
            beg = end = None
            points = []
            for _b in range(n_bin):
                (bin_,) = struct.unpack_from("<I", data, pos)
                pos += 4
                if csi:
                    (loff,) = struct.unpack_from("<Q", data, pos)
                    pos += 8
                (n_chunk,) = struct.unpack_from("<i", data, pos)
                pos += 4
                if bin_ == pseudo:
                    if n_chunk >= 1:
                        beg, end = struct.unpack_from("<QQ", data, pos)
                elif csi and loff:
                    start = _bin_start(bin_, min_shift, depth)
                    if start is not None:
                        points.append((start, int(loff)))
                pos += 16 * n_chunk
            if not csi:
                (n_intv,) = struct.unpack_from("<i", data, pos)
                pos += 4
                lin = struct.unpack_from(f"<{n_intv}Q", data, pos)
                pos += 8 * n_intv
                points = [(i << 14, int(v)) for i, v in enumerate(lin) if v]
            points.sort()
            refs.append({"beg": beg, "end": end, "points": points})
        no_coor = struct.unpack_from("<Q", data, pos)[0] if len(data) >= pos + 8 else None
    except struct.error:
        raise HtsIndexError("truncated index") from None
    return {"format": fmt, "refs": refs, "no_coor": no_coor}
