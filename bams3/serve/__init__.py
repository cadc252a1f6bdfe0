"""``bams3 serve``: GA4GH htsget 1.3 (reads, BAM) and an igv.js view over the datasets under a root.

:func:`create_app` builds the Starlette application; :func:`serve` runs it with uvicorn.
"""

from __future__ import annotations

import os
import socket

from ..errors import InputError
from .app import create_app
from .catalog import Catalog
from .page import MAX_LOCUS

__all__ = ["Catalog", "create_app", "serve", "MAX_LOCUS"]


def check_fasta(fasta: str | None) -> None:
    """A --fasta must be a readable file with its samtools faidx index next to it."""
    if fasta is None:
        return
    if not os.path.isfile(fasta):
        raise InputError(f"{fasta}: no such FASTA file")
    if not os.path.isfile(fasta + ".fai"):
        raise InputError(f"{fasta}: not indexed (no {fasta}.fai); index it with: samtools faidx {fasta}")


def check_listen(host: str, port: int) -> None:
    """Fail in one line now if ``host:port`` cannot be listened on (uvicorn would log several)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(root: str, *, host: str = "127.0.0.1", port: int = 8080, fasta: str | None = None,
          max_locus: int = MAX_LOCUS, store_options: dict | None = None, refresh: bool = False,
          log_level: str = "info") -> None:
    """Serve the datasets under ``root`` until interrupted."""
    import uvicorn

    check_fasta(fasta)
    if not root.startswith("s3://") and not os.path.isdir(root):
        raise InputError(f"{root}: no such directory (DATASET_ROOT is a directory or s3://bucket/prefix)")
    if max_locus < 1:
        raise InputError(f"--max-locus {max_locus}: must be at least 1 bp")
    check_listen(host, port)
    catalog = Catalog(root, store_options=store_options, refresh=refresh)
    app = create_app(catalog, fasta=fasta, max_locus=max_locus)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug")
    finally:
        catalog.close()
