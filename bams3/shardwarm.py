"""Preloaded by the forkserver of :mod:`bams3.shardpool`: importing this module imports what a
shard needs (numpy, numba, zstandard, the stages) and encodes a few made-up records, so that
the encoders' compiled kernels are loaded (or, on a fresh install, compiled) once, before the
workers fork from this interpreter. Nothing else imports it. It never raises: a worker
would then load whatever is missing itself."""

from __future__ import annotations


def _records(n: int = 64, length: int = 150) -> list[bytes]:
    """``n`` mapped pairs' records on one made-up reference (Illumina-like names, sequence,
    qualities, CIGAR, and the NM/MD/MC/RG tags an aligner writes)."""
    import random
    import struct

    rnd = random.Random(5)
    ref = "".join(rnd.choice("ACGT") for _ in range(n * 8 + length + 1))
    code = {c: i for i, c in enumerate("=ACMGRSVTWYHKDBN")}
    out = []
    for i in range(n):
        pos = i * 8
        seq = ref[pos:pos + length]
        packed = bytes(code[a] << 4 | code[b] for a, b in zip(seq[::2], seq[1::2] + "="))
        qual = bytes(rnd.choice((12, 23, 37)) for _ in range(length))
        name = f"SIM:1:FCX:2:{1101 + i // 16}:{1000 + 37 * i}:{2000 + i // 2}".encode() + b"\0"
        cigar = struct.pack("<I", length << 4)  # 150M
        tags = (b"NMC\x00" + f"MDZ{length}".encode() + b"\0" + f"MCZ{length}M".encode() + b"\0"
                + b"RGZwarm\0" + b"ASC" + bytes([length % 256]))
        flag = 99 if i % 2 == 0 else 147
        fixed = struct.pack("<iiBBHHHiiii", 0, pos, len(name), 60, 4681, 1, flag, length, 0, pos + 200,
                            200 if i % 2 == 0 else -200)
        body = fixed + name + cigar + packed + qual + tags
        out.append(struct.pack("<i", len(body)) + body)
    return out


def warm_up() -> None:
    try:
        import numpy  # noqa: F401

        from bams3 import stages  # noqa: F401
        from bams3.dataset import encode_block
        from bams3core.bam import RecordBatch, sort_keys
        from bams3core.planner import BlockPlanner

        batch = RecordBatch.from_records_view(b"".join(_records()))
        sort_keys(batch.fixed())
        for block in list(BlockPlanner(1 << 20).feed(batch)) + list(BlockPlanner(1 << 20).flush()):
            encode_block(block)
        encode_block(batch)
    except Exception:  # noqa: BLE001 - a warm-up only
        pass


warm_up()
