"""An ``s3://`` alignment source read the way a local file is: a seekable, read-only file
object over ranged GETs, and what the plan needs of an indexed BAM on S3.

* :class:`S3RangeFile`: ``read``/``seek``/``tell`` over one object version. Each GET fetches
  a large range (``read_ahead``, 8 MiB) and the next one is fetched in the background while
  the current one is consumed: at most two ranges in memory. Every GET carries ``If-Match``
  with the ETag the plan saw, so an object replaced during the conversion fails the shard
  (:class:`~bams3.errors.InputError`) instead of mixing two versions. ``hint_end``: where the
  reader expects to stop (a shard's estimated end); beyond it, reads are fetched in small
  ranges so that a shard reads its byte range plus little more.
* :func:`find_index`: the ``.bai``/``.csi`` next to the object, looked up as for a local file
  (``KEY.bai``, ``KEY.csi``, then ``KEY`` without ``.bam`` + ``.bai``/``.csi``): one GET each
  at most, a missing (404, or 403 without s3:ListBucket) candidate skipped.
* :func:`read_header`: the BAM header and the virtual offset of the first record (what
  htslib's ``bgzf_tell`` gives after reading the header), from the first BGZF blocks.

The stores come from the project's store specs (:func:`bams3.stages.store_spec`: endpoint,
region, retries and credentials as :class:`bams3.store.s3.S3Store` builds them); a worker
opens its own from the plain spec in its :class:`~bams3.stages.ShardJob`.
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

from bams3core.bam import BamFormatError, BamHeader, parse_header

from .errors import InputError, NotFound, NoSuchBucket, PreconditionFailed, StoreError
from .inputs import BgzfReader
from .store import Store, parse_uri

READ_AHEAD = 8 << 20  # bytes per ranged GET
TAIL_READ = 256 << 10  # bytes per GET past the reader's hint_end
#: compressed bytes a BgzfReader asks an S3 file for at a time: one BGZF block at most, so it
#: never reads (and fetches) past the blocks it needs
BGZF_READ = 64 << 10
HEADER_READ = 256 << 10  # bytes per GET while the plan reads the header


def split_uri(source: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    _scheme, bucket, key = parse_uri(source)
    if not key:
        raise InputError(f"{source}: expected s3://bucket/path/to/file.bam")
    return bucket, key


def bucket_spec(source: str, spec: dict | None) -> dict:
    """The store spec of ``source``'s bucket (``spec``'s options, if given)."""
    bucket, _key = split_uri(source)
    return {**(spec or {"options": {}}), "uri": f"s3://{bucket}"}


def changed_error(name: str, etag: str | None) -> InputError:
    return InputError(f"{name}: the object changed while it was being converted (its ETag is no longer "
                      f"{etag}); nothing was committed: convert again")


class S3RangeFile(io.RawIOBase):
    """A seekable, read-only view of ``key`` on ``store`` (one version: ``etag``)."""

    def __init__(self, store: Store, key: str, *, size: int, etag: str | None, name: str | None = None,
                 read_ahead: int | None = None, hint_end: int | None = None, own_store: bool = False,
                 prefetch: bool = True):
        self.store = store
        self.key = key
        self.size = int(size)
        self.etag = etag
        self.name = name or f"{store.uri}/{key}"
        self.read_ahead = max(1 << 14, int(read_ahead or READ_AHEAD))
        self.hint_end = hint_end
        self._own = own_store
        self._pos = 0
        self._buf = b""
        self._buf_at = 0
        self._next = None  # (start, future) of the range fetched ahead
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="s3-read-ahead") if prefetch else None
        self._lock = threading.Lock()
        self.ranges: list[tuple[int, int]] = []  # every range fetched, in order
        self.bytes_fetched = 0

    # io.RawIOBase
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, b) -> int:
        """Fills ``b`` (short only at the end of the object)."""
        view = memoryview(b).cast("B")
        done = 0
        while done < len(view) and self._pos < self.size:
            if not self._buf_at <= self._pos < self._buf_at + len(self._buf):
                self._load(self._pos)
            off = self._pos - self._buf_at
            n = min(len(view) - done, len(self._buf) - off)
            view[done:done + n] = self._buf[off:off + n]
            self._pos += n
            done += n
        return done

    def close(self) -> None:
        if not self.closed:
            nxt, self._next = self._next, None
            if nxt is not None:
                nxt[1].cancel()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._buf = b""
            if self._own:
                self.store.close()
        super().close()

    # ranges
    def _span(self, start: int) -> int:
        """The end of the range fetched from ``start``."""
        n = self.read_ahead
        if self.hint_end is not None:
            tail = min(n, TAIL_READ)
            n = tail if start >= self.hint_end else min(n, max(tail, self.hint_end - start))
        return min(self.size, start + n)

    def _fetch(self, start: int, end: int) -> bytes:
        try:
            data = self.store.get(self.key, (start, end), if_match=self.etag)
        except PreconditionFailed:
            raise changed_error(self.name, self.etag) from None
        if len(data) != end - start:  # shorter than the size the plan saw
            raise changed_error(self.name, self.etag)
        with self._lock:
            self.ranges.append((start, end))
            self.bytes_fetched += len(data)
        return data

    def _load(self, pos: int) -> None:
        nxt, self._next = self._next, None
        if nxt is not None and nxt[0] == pos:
            data = nxt[1].result()
        else:
            if nxt is not None:  # a seek elsewhere: that range is not needed
                nxt[1].cancel()
            data = self._fetch(pos, self._span(pos))
        self._buf, self._buf_at = data, pos
        end = pos + len(data)
        if self._pool is not None and end < self.size and (self.hint_end is None or end < self.hint_end):
            self._next = (end, self._pool.submit(self._fetch, end, self._span(end)))


class S3Source:
    """One S3 object: its bucket's store (opened from a spec), size and ETag (a HEAD)."""

    def __init__(self, source: str, spec: dict | None, opener):
        self.source = source
        self.bucket, self.key = split_uri(source)
        self.spec = bucket_spec(source, spec)
        self.store: Store = opener(self.spec)
        try:
            info = self.store.head(self.key)
        except NoSuchBucket:
            self.store.close()
            raise
        except NotFound:
            self.store.close()
            raise InputError(f"{source}: no such object") from None
        except BaseException:
            self.store.close()
            raise
        self.size = info.size
        self.etag = info.etag

    @property
    def identity(self) -> dict:
        """What identifies the content (resume, migrate): URI, size, ETag (never a time)."""
        return {"uri": self.source, "size": self.size, "etag": self.etag}

    def open(self, *, read_ahead: int | None = None, hint_end: int | None = None, prefetch: bool = True
             ) -> S3RangeFile:
        return S3RangeFile(self.store, self.key, size=self.size, etag=self.etag, name=self.source,
                           read_ahead=read_ahead, hint_end=hint_end, prefetch=prefetch)

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def index_candidates(key: str) -> list[str]:
    """Where an index of ``key`` may be, in the order :func:`bams3.stages.find_index` looks."""
    base = key[:-4] if key.endswith(".bam") else key
    out = [key + ".bai", key + ".csi"]
    if base != key:
        out += [base + ".bai", base + ".csi"]
    return out


def find_index(store: Store, key: str) -> tuple[str, bytes] | None:
    """(key, bytes) of the first index found next to ``key``, or None. One GET per candidate;
    a missing one (404, or 403 where the caller may not list the bucket) is skipped."""
    for cand in index_candidates(key):
        try:
            return cand, store.get(cand)
        except NoSuchBucket:
            raise
        except NotFound:
            continue
        except StoreError as e:
            if "access denied" in str(e):
                continue
            raise
    return None


def read_header(f, name: str) -> tuple[BamHeader, int] | None:
    """The BAM header at the start of the BGZF file ``f`` and the virtual offset of the first
    record (htslib's: the next block's start when the header ends a block); None if ``f`` is
    not BGZF-compressed BAM."""
    bg = BgzfReader(f, threads=1, group=1, name=name, read_bytes=BGZF_READ)
    try:
        buf = b""
        addr = 0
        while True:
            blocks = bg._next_blocks()
            if not blocks:
                if not buf:
                    raise InputError(f"{name}: empty input")
                raise InputError(f"{name}: truncated BAM header")
            block = blocks[0]
            try:
                data = BgzfReader._inflate(block)
            except ValueError as e:
                raise InputError(f"{name}: corrupt BGZF block ({e})") from None
            before = len(buf)
            buf += data
            if buf[:4] != b"BAM\x01"[:len(buf)]:
                return None
            try:
                res = parse_header(buf)
            except BamFormatError as e:
                raise InputError(f"{name}: {e}") from None
            if res is not None:
                header, used = res
                within = used - before
                if within >= len(data):
                    return header, (addr + len(block)) << 16
                return header, (addr << 16) | within
            addr += len(block)
    finally:
        bg.pool.shutdown(wait=False)
