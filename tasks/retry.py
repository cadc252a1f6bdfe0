"""When a bams3 task is retried: transient failures only, with exponential backoff and jitter.

* Transient (retried): :class:`~bams3.errors.StoreError` except ``NotFound`` and
  ``PreconditionFailed`` (throttling, 5xx, timeouts, dropped connections, a checksum S3
  rejected in transit... boto3 already retried those a few times inside the store), and
  plain ``ConnectionError``/``TimeoutError``/``OSError`` from the network.
* Permanent (fail fast, no retry): ``InputError`` (bad BAM, bad option), ``DatasetError``
  (corrupt/missing/existing dataset, checksum mismatch on verify), ``NotFound``,
  ``PreconditionFailed``, and any other exception (a bug does not get better by retrying).

Delays: ``exponential_backoff(BACKOFF_SECONDS)`` -> 2 s, 4 s, 8 s... (env
``BAMS3_RETRY_BACKOFF_SECONDS`` sets the base), each scaled by Prefect's jitter
(``retry_jitter_factor``) so that many failed uploads do not come back in lockstep.
"""

from __future__ import annotations

import os

from prefect.tasks import exponential_backoff

from bams3.errors import Bams3Error, NotFound, PreconditionFailed, StoreError

BACKOFF_SECONDS = float(os.environ.get("BAMS3_RETRY_BACKOFF_SECONDS", "2"))
IO_RETRIES = int(os.environ.get("BAMS3_TASK_RETRIES", "4"))
JITTER = 0.5

#: pass as ``retry_delay_seconds=`` (a list of delays, one per retry)
retry_delays = exponential_backoff(backoff_factor=BACKOFF_SECONDS)


def is_transient(exc: BaseException | None) -> bool:
    """True for failures worth retrying (see the module docstring)."""
    if exc is None:
        return False
    if isinstance(exc, (NotFound, PreconditionFailed)):
        return False
    if isinstance(exc, StoreError):
        return True
    if isinstance(exc, Bams3Error):  # InputError, DatasetError, other user-facing errors
        return False
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


def state_exception(state) -> BaseException | None:
    """The exception a Failed state carries (None if it carries none)."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - inspecting, not handling
        return exc
    return None


def retry_on_transient(task, task_run, state) -> bool:
    """``retry_condition_fn`` for bams3 tasks: retry transient errors only."""
    return is_transient(state_exception(state))


def retry_options(retries: int = IO_RETRIES) -> dict:
    """The retry keyword arguments shared by the I/O tasks."""
    return dict(retries=retries, retry_delay_seconds=retry_delays, retry_jitter_factor=JITTER,
                retry_condition_fn=retry_on_transient)
