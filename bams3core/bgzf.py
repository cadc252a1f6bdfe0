"""BGZF compression (SAM spec §4.1): bytes in, BGZF blocks out. Pure: no I/O.

A BGZF stream is a series of gzip members of at most 64 KiB each, every one carrying its own
compressed size in the ``BC`` extra subfield, and ends with a fixed empty block (:data:`EOF`).
Concatenating BGZF streams gives a BGZF stream, which is what an htsget ticket relies on.
"""

from __future__ import annotations

import struct
import zlib

try:  # ISA-L deflates several times faster than zlib (and releases the GIL the same way)
    from isal import isal_zlib as _deflate_lib

    _LEVEL = 1
except ImportError:  # pragma: no cover - isal has wheels for the usual platforms
    _deflate_lib = zlib
    _LEVEL = 6

#: the empty block that ends a BGZF file
EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
#: input bytes per block (htslib's BGZF_BLOCK_SIZE): leaves room for deflate's overhead
BLOCK_INPUT = 0xFF00
_MAX_BLOCK = 1 << 16
_HEADER = struct.Struct("<4BI2BH2BHH")  # gzip header with the BC extra subfield; last field BSIZE


def compress_block(data: bytes | memoryview) -> bytes:
    """One BGZF block holding ``data`` (at most :data:`BLOCK_INPUT` bytes)."""
    if len(data) > BLOCK_INPUT:
        raise ValueError(f"a BGZF block holds at most {BLOCK_INPUT} bytes, not {len(data)}")
    cdata = _deflate_lib.compress(data, _LEVEL, -15)
    if len(cdata) + 26 > _MAX_BLOCK:  # incompressible: deflate's stored blocks always fit
        cdata = zlib.compress(data, 0, -15)
    head = _HEADER.pack(0x1F, 0x8B, 8, 4, 0, 0, 0xFF, 6, 66, 67, 2, len(cdata) + 25)
    return b"".join((head, cdata, struct.pack("<II", zlib.crc32(data), len(data))))


class BgzfEncoder:
    """Buffers bytes and returns whole BGZF blocks as they fill up.

    ``encode(data)`` returns the blocks completed so far (possibly ``b""``); ``flush()`` the
    block holding whatever is left (``b""`` if nothing is). Neither adds :data:`EOF`."""

    def __init__(self):
        self._buf = bytearray()

    def encode(self, data: bytes | memoryview) -> bytes:
        self._buf += data
        if len(self._buf) < BLOCK_INPUT:
            return b""
        mv = memoryview(self._buf)
        n = len(self._buf) // BLOCK_INPUT * BLOCK_INPUT
        out = b"".join(compress_block(mv[i:i + BLOCK_INPUT]) for i in range(0, n, BLOCK_INPUT))
        mv.release()
        del self._buf[:n]
        return out

    def flush(self) -> bytes:
        if not self._buf:
            return b""
        out = compress_block(bytes(self._buf))
        self._buf.clear()
        return out
