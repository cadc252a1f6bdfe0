"""bams3: I/O layer (stores, input readers, dataset reader/writer) and the `bams3` CLI.

The pure format lives in :mod:`bams3core`; this package does the I/O around it.
``bams3.open(uri)`` opens a dataset for reading from Python (:mod:`bams3.api`); importing
``bams3`` itself stays cheap: nothing heavy is imported until it is called.
"""

__version__ = "0.1.0"


def open(uri: str, **options):  # noqa: A001 - the API's name, as pysam.AlignmentFile / zarr.open
    """Open a dataset for reading: ``bams3.api.open`` (see its options), imported on first use."""
    from .api import open as _open

    return _open(uri, **options)
