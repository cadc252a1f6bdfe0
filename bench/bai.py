"""What htslib must read, at least, to answer a region query on BAM + BAI.

Over loopback an aborted open-ended GET (htslib reads ``Range: bytes=N-`` and drops the
connection once it has what it needs) still pushes megabytes into socket buffers, and the proxy
counts them as sent. That is real transfer, but inflated compared with a WAN, so the report
also shows this lower bound: the whole BAI, the BGZF blocks holding the header, and the BGZF
blocks spanned by the index chunks that overlap the region (after htslib's linear-index filter
and chunk merging), up to the record where htslib's iterator stops (the first one starting past
the region).
"""

from __future__ import annotations

import struct
from pathlib import Path


def _reg2bins(beg: int, end: int) -> list[int]:
    """Bins overlapping [beg, end) (0-based), as in the SAM spec."""
    end -= 1
    bins = [0]
    for shift, offset in ((26, 1), (23, 9), (20, 73), (17, 585), (14, 4681)):
        bins.extend(range(offset + (beg >> shift), offset + (end >> shift) + 1))
    return bins


def _read_bai(path: Path) -> list[tuple[dict, list[int]]]:
    buf = path.read_bytes()
    if buf[:4] != b"BAI\x01":
        raise ValueError(f"{path} is not a BAI")
    (n_ref,) = struct.unpack_from("<i", buf, 4)
    pos = 8
    refs = []
    for _ in range(n_ref):
        (n_bin,) = struct.unpack_from("<i", buf, pos)
        pos += 4
        bins = {}
        for _ in range(n_bin):
            b, n_chunk = struct.unpack_from("<Ii", buf, pos)
            pos += 8
            chunks = list(struct.iter_unpack("<QQ", buf[pos:pos + 16 * n_chunk]))
            pos += 16 * n_chunk
            bins[b] = chunks
        (n_intv,) = struct.unpack_from("<i", buf, pos)
        pos += 4
        intv = list(struct.unpack_from(f"<{n_intv}Q", buf, pos))
        pos += 8 * n_intv
        refs.append((bins, intv))
    return refs


def _block_size(f, coffset: int) -> int:
    f.seek(coffset)
    head = f.read(18)
    return struct.unpack_from("<H", head, 16)[0] + 1


def needed_bytes(bam: Path, region: str) -> dict:
    """Lower bound of the bytes htslib reads for ``samtools view BAM REGION`` (BAM + BAI)."""
    import pysam

    bai = Path(str(bam) + ".bai")
    with pysam.AlignmentFile(str(bam)) as af:
        first_voff = af.tell()
        names = list(af.references)
        lengths = list(af.lengths)
        # htslib stops at the first record starting past the region: where it stopped reading
        for _ in af.fetch(region=region):
            pass
        stop_voff = af.tell()
    contig, _, span = region.partition(":")
    tid = names.index(contig)
    if span:
        a, _, b = span.replace(",", "").partition("-")
        beg, end = int(a) - 1, int(b) if b else lengths[tid]
    else:
        beg, end = 0, lengths[tid]
    bins, intv = _read_bai(bai)[tid]
    min_off = intv[min(beg >> 14, len(intv) - 1)] if intv else 0
    chunks = sorted(c for b in _reg2bins(beg, end) if b in bins and b != 37450
                    for c in bins[b] if c[1] > min_off)
    merged: list[list[int]] = []
    for b, e in chunks:
        if merged and (b >> 16) <= (merged[-1][1] >> 16):
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([b, e])
    data = 0
    with open(bam, "rb") as f:
        for b, e in merged:
            if b >= stop_voff:
                break
            e = min(e, stop_voff)
            c0, c1 = b >> 16, e >> 16
            data += (c1 - c0) + (_block_size(f, c1) if (e & 0xFFFF) else 0)
        hc = first_voff >> 16
        header = hc + (_block_size(f, hc) if (first_voff & 0xFFFF) else 0)
    return {"bai": bai.stat().st_size, "header": header, "records": data,
            "total": bai.stat().st_size + header + data, "chunks": len(merged)}
