"""User-facing errors: every one becomes a single line on stderr and a non-zero exit."""


class Bams3Error(Exception):
    """An error the user can act on. ``str(err)`` is the one line printed by the CLI."""

    exit_code = 1


class InputError(Bams3Error):
    """The input (BAM/SAM/CRAM, region, option) is invalid."""


class DatasetError(Bams3Error):
    """The dataset is missing, incomplete or corrupt."""


class StoreError(Bams3Error):
    """A storage operation failed (local filesystem or S3)."""


class NotFound(StoreError):
    """Object or dataset does not exist."""


class NoSuchBucket(NotFound):
    """The bucket itself does not exist: say so, not "no object here"."""


class PreconditionFailed(StoreError):
    """A conditional read/write did not hold (object changed, or already exists)."""


class Archived(StoreError):
    """The object is in an archive storage class (GLACIER, DEEP_ARCHIVE) and not restored."""

    storage_class: str | None = None
