"""Verify a dataset: every checksum, every count, every index bound, by decoding everything."""

from __future__ import annotations

import hashlib
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterator

import numpy as np

from bams3core.codec import CodecError, decode_block
from bams3core.bam import cigar_ref_lengths, end_positions, gather
from bams3core.stats import StatsAccumulator

from .dataset import Dataset, block_is_wide
from .errors import Bams3Error, NotFound


@dataclass
class VerifyReport:
    uri: str
    ok: bool = True
    chunks_checked: int = 0
    blocks_checked: int = 0
    records_checked: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)
    legacy_manifest: bool = False  # a manifest without a checksum (§3.5): nothing protects it

    def fail(self, msg: str) -> None:
        self.ok = False
        self.problems.append(msg)

    def summary(self) -> str:
        state = "OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))"
        note = " (manifest has no checksum: written before bams3 0.2)" if self.legacy_manifest else ""
        return (f"{self.uri}: {state}: {self.chunks_checked} chunks, {self.blocks_checked} blocks, "
                f"{self.records_checked} records, {self.bytes_read} bytes checked{note}")


def _read_chunks(ds: Dataset, selected) -> Iterator[tuple[int, bytes | NotFound]]:
    """(chunk number, its bytes or the NotFound) in order; up to the store's concurrency
    (``--s3-concurrency``; 1 for a store without one) whole-chunk GETs in flight, so at most
    that many chunks wait in memory besides the one being checked."""
    conc = max(1, getattr(ds.store, "concurrency", None) or 1)

    def get(cn: int):
        try:
            return ds.store.get(ds.manifest.chunks[cn].key)
        except NotFound as e:
            return e

    it = iter(selected)
    with ThreadPoolExecutor(conc, thread_name_prefix="bams3-verify") as pool:
        pending = deque((cn, pool.submit(get, cn)) for cn in islice(it, conc))
        while pending:
            cn, fut = pending.popleft()
            data = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(get, nxt)))
            yield cn, data


def verify_dataset(ds: Dataset, *, chunks: list[int] | None = None, decode: bool = True) -> VerifyReport:
    """Check header/index/chunk checksums, block CRCs, decoded counts, index bounds and stats.

    ``chunks`` restricts the data check to some chunk numbers (sampled verification); the
    stats comparison then only runs when every chunk is checked.
    """
    m = ds.manifest
    # the manifest's own checksum (§3.5) was checked when the dataset was opened
    rep = VerifyReport(uri=ds.store.uri, legacy_manifest=m.checksum is None)
    try:
        ds.header_text()
    except Bams3Error as e:
        rep.fail(str(e))
    rows_by_chunk: dict[int, list] = {}
    total_index_records = 0
    for ix in m.index:
        try:
            rows = ds.index(ix.ref_id)
        except Bams3Error as e:
            rep.fail(str(e))
            continue
        if len(rows) != ix.n_blocks or int(rows["n_records"].sum()) != ix.n_records:
            rep.fail(f"{ix.key}: block/record counts disagree with the manifest")
        total_index_records += int(rows["n_records"].sum())
        for r in rows:
            rows_by_chunk.setdefault(int(r["chunk"]), []).append(r)
    if total_index_records != m.n_records:
        rep.fail(f"index holds {total_index_records} records, manifest says {m.n_records}")
    selected = range(len(m.chunks)) if chunks is None else sorted(set(chunks))
    full = chunks is None
    stats = StatsAccumulator(n_refs=len(m.references))
    for cn, data in _read_chunks(ds, selected):
        c = m.chunks[cn]
        if isinstance(data, NotFound):
            rep.fail(f"{c.key}: missing chunk object")
            full = False
            continue
        rep.bytes_read += len(data)
        rep.chunks_checked += 1
        if len(data) != c.size:
            rep.fail(f"{c.key}: size {len(data)} != manifest {c.size}")
        if hashlib.sha256(data).hexdigest() != c.sha256:
            rep.fail(f"{c.key}: SHA-256 mismatch (corrupt chunk)")
        crows = rows_by_chunk.get(cn, [])
        if len(crows) != c.n_blocks or sum(int(r["n_records"]) for r in crows) != c.n_records:
            rep.fail(f"{c.key}: index lists {len(crows)} blocks, manifest {c.n_blocks}")
        for r in crows:
            a, n = int(r["offset"]), int(r["length"])
            blk = data[a:a + n]
            rep.blocks_checked += 1
            if zlib.crc32(blk) != int(r["crc32"]):
                rep.fail(f"{c.key}: CRC-32 mismatch in block at byte {a}")
                continue
            if not decode:
                continue
            try:
                batch = decode_block(blk, r["stream_sizes"].tolist(), int(r["n_records"]), int(r["ref_id"]),
                                     int(r["first_start"]), wide=block_is_wide(r))
            except CodecError as e:
                rep.fail(f"{c.key}: block at byte {a}: {e}")
                continue
            fx = batch.fixed()
            rep.records_checked += len(batch)
            if int(r["raw_size"]) != len(batch.raw()):
                rep.fail(f"{c.key}: block at byte {a}: decoded size differs from the index")
            u8 = np.frombuffer(batch.data, dtype=np.uint8)
            ncig = fx["n_cigar_op"].astype(np.int64)
            cig_off = batch.offsets[:-1] + 4 + batch.fixed_size + fx["l_read_name"].astype(np.int64)
            cig = gather(u8, cig_off, 4 * ncig).view("<u4")
            ends = end_positions(fx["pos"], fx["flag"], cigar_ref_lengths(cig, ncig))
            if (fx["refid"] != int(r["ref_id"])).any() or int(fx["pos"][-1]) != int(r["last_start"]) \
                    or int(ends.max()) != int(r["max_end"]):
                rep.fail(f"{c.key}: block at byte {a}: records disagree with the index bounds")
            stats.add(fx)
    if full:
        st = m.stats
        if (stats.flagstat.tolist() != st["flagstat"] or stats.mapped.tolist() != st["mapped"]
                or stats.unmapped.tolist() != st["unmapped"] or stats.unplaced != st["unplaced"]):
            rep.fail("decoded records do not reproduce the manifest's flagstat/idxstats")
        if rep.records_checked != m.n_records and decode:
            rep.fail(f"decoded {rep.records_checked} records, manifest says {m.n_records}")
    return rep
