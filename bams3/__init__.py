"""bams3: I/O layer (stores, input readers, dataset reader/writer) and the `bams3` CLI.

The pure format lives in :mod:`bams3core`; this package does the I/O around it.
"""

__version__ = "0.1.0"
