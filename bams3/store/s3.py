"""A dataset under ``s3://bucket/prefix`` (boto3).

- Credentials: boto3's standard chain only (env, AWS_PROFILE/config files, SSO, instance/task
  roles), or a ``boto3.Session`` passed in (e.g. from a prefect-aws ``AwsCredentials`` block).
- Endpoint: AWS by default; ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (honoured by boto3
  itself) for MinIO, moto, Ceph...; path-style addressing is used for non-AWS endpoints.
- Region: ``region=`` if given, else the session's default (us-east-1 if none); a bucket in
  another region is followed by botocore's region redirector, no extra request up front.
- Retries: botocore's ``standard`` (or ``adaptive``) retry mode with exponential backoff and
  jitter for throttling (503 SlowDown), 5xx and connection errors; this module adds retries of
  failures while *reading a response body*, which botocore does not retry.
- Writes: one PutObject up to ``multipart_threshold`` (default twice ``part_size``: a chunk of
  the default 16 MiB is one request), multipart (s3transfer, parts of ``part_size`` in
  parallel) above it; every request carries a CRC32 checksum S3 verifies; failed multipart
  uploads are aborted.
- Metadata objects are cached on disk (see :mod:`bams3.store.cache`) via :meth:`S3Store.get_small`.
- Every failure becomes a one-line :class:`~bams3.errors.StoreError` from :func:`translate_error`.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import random
import threading
import time
from email.utils import parsedate_to_datetime
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import botocore.exceptions as bce
from botocore.config import Config

from bams3core.cost import OBJECT_TAG, TAG_CHUNK, TAG_TMP, check_storage_class

from ..errors import Archived, InputError, NoSuchBucket, NotFound, PreconditionFailed, StoreError
from .base import ObjectInfo, Store, Upload
from .cache import MetadataCache, default_cache_dir

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * 1024 * GiB
DEFAULT_PART_SIZE = 10 * MiB
DEFAULT_CACHE_MAX_BYTES = 512 * MiB

try:  # urllib3 errors can escape StreamingBody.read on some botocore versions
    from urllib3.exceptions import ProtocolError as _U3ProtocolError
    from urllib3.exceptions import ReadTimeoutError as _U3ReadTimeout
except ImportError:  # pragma: no cover
    _U3ProtocolError = _U3ReadTimeout = OSError

# errors while reading a response body: not retried by botocore, retried here
BODY_READ_ERRORS = (bce.IncompleteReadError, bce.ResponseStreamingError, bce.ReadTimeoutError,
                    bce.ConnectionClosedError, _U3ProtocolError, _U3ReadTimeout,
                    http.client.IncompleteRead, ConnectionError, TimeoutError)

_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                   "TooManyRequestsException", "ServiceUnavailable", "503",
                   "RequestThrottled", "ProvisionedThroughputExceededException",
                   "BandwidthLimitExceeded"}
_SERVER_CODES = {"InternalError", "500", "502", "504", "BadGateway", "GatewayTimeout"}
_REGION_CODES = {"PermanentRedirect", "301", "AuthorizationHeaderMalformed",
                 "IllegalLocationConstraintException", "TemporaryRedirect", "307",
                 "IncorrectEndpoint"}
_PERMISSION = {
    "GetObject": "s3:GetObject", "HeadObject": "s3:GetObject",
    "PutObject": "s3:PutObject", "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject", "CompleteMultipartUpload": "s3:PutObject",
    "ListObjectsV2": "s3:ListBucket", "HeadBucket": "s3:ListBucket",
    "DeleteObjects": "s3:DeleteObject", "DeleteObject": "s3:DeleteObject",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
}


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def range_header(start: int, end: int) -> str:
    """HTTP Range for the half-open byte range [start, end): ``bytes=start-(end-1)``."""
    if start < 0 or end <= start:
        raise ValueError(f"bad byte range ({start}, {end})")
    return f"bytes={start}-{end - 1}"


def _strip_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


def _quote_etag(etag: str) -> str:
    return etag if etag.startswith('"') or etag == "*" else f'"{etag}"'


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _ts(dt) -> float | None:
    return dt.timestamp() if dt is not None else None


def _is_aws_endpoint(url: str | None) -> bool:
    if not url:
        return True
    host = (urlsplit(url).hostname or "").lower()
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


def _configured_endpoint(explicit: str | None) -> str | None:
    return (explicit or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def check_part_size(part_size: int) -> int:
    """Validate a user-supplied part size against S3's multipart limits (InputError if not)."""
    try:
        part_size = int(part_size)
    except (TypeError, ValueError):
        raise InputError(f"S3 part size {part_size!r} is not a number of bytes") from None
    if part_size < MIN_PART_SIZE or part_size > MAX_PART_SIZE:
        raise InputError(f"S3 part size {part_size} bytes is out of range: S3 needs between "
                         f"5 MiB ({MIN_PART_SIZE}) and 5 GiB ({MAX_PART_SIZE}) per part")
    return part_size


def effective_part_size(size: int, part_size: int) -> int:
    """``part_size``, grown (to a whole MiB) if ``size`` would need more than 10,000 parts."""
    if size > MAX_OBJECT_SIZE:
        raise InputError(f"object of {size} bytes exceeds S3's 5 TiB object size limit")
    if -(-size // part_size) <= MAX_PARTS:
        return part_size
    need = -(-size // MAX_PARTS)
    return min(MAX_PART_SIZE, -(-need // MiB) * MiB)


def default_multipart_threshold(part_size: int) -> int:
    """Objects up to this size are one PutObject: twice the part size. A multipart upload costs
    two more requests (create, complete) and S3 assembling the parts; below two full parts it
    buys little parallelism for that (a 16 MiB chunk with 10 MiB parts: one 10 MiB and one
    6 MiB part)."""
    return 2 * part_size


def s3_transfer_config(part_size: int = DEFAULT_PART_SIZE, concurrency: int = 8):
    """The s3transfer config for multipart uploads (parts of ``part_size``; the store decides
    what goes multipart, so s3transfer's own threshold is the part size)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                          max_concurrency=max(1, concurrency), use_threads=True,
                          max_io_queue=max(100, 4 * concurrency))


def _backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Full-jitter exponential backoff for retries this module does itself."""
    return random.uniform(0, min(cap, base * (2 ** attempt)))


# ---------------------------------------------------------------------------------------------
# error translation (the one place boto exceptions become user-facing errors)
# ---------------------------------------------------------------------------------------------
def translate_error(exc: BaseException, *, bucket: str, key: str | None = None,
                    op: str | None = None, endpoint: str | None = None,
                    region: str | None = None, max_attempts: int | None = None,
                    writing: bool = False) -> StoreError:
    """Turn a boto3/botocore (or socket) exception into a one-line StoreError.

    ``key`` is the *full* key (``prefix/key``); ``writing`` selects the wording of a failed
    conditional request ("already exists" instead of "changed since it was read").
    """
    if isinstance(exc, StoreError):
        return exc
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    ep = endpoint or "the AWS S3 endpoint"
    tries = f" after {max_attempts} attempts" if max_attempts else ""

    def msg(cls, text):
        return cls(_one_line(f"{where}: {text}"))

    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {}) or {}
        meta = exc.response.get("ResponseMetadata", {}) or {}
        code = str(err.get("Code") or meta.get("HTTPStatusCode") or "Unknown")
        status = meta.get("HTTPStatusCode")
        op = op or getattr(exc, "operation_name", None) or "request"
        text = _one_line(err.get("Message") or "")
        bucket_region = (meta.get("HTTPHeaders") or {}).get("x-amz-bucket-region") \
            or err.get("Region")
        if meta.get("RetryAttempts"):
            tries = f" after {meta['RetryAttempts'] + 1} attempts"

        if code == "NoSuchBucket" or (op == "HeadBucket" and code in ("404", "NotFound")):
            return NoSuchBucket(_one_line(
                f"s3://{bucket}: bucket does not exist; check the bucket name"
                + (f" and the endpoint ({endpoint}; AWS_ENDPOINT_URL)" if endpoint else
                   " (and AWS_ENDPOINT_URL if you use a non-AWS S3)")))
        if code in ("NoSuchKey", "404", "NotFound"):
            return msg(NotFound, "no such object; check the dataset URI (was it fully written?)")
        if code == "NoSuchUpload":
            return msg(StoreError, "the multipart upload was aborted while in progress (by "
                                   "another process or a lifecycle rule); run the command again")
        if (code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
                and op in ("PutObject", "CompleteMultipartUpload")) or (writing and status == 412):
            return msg(PreconditionFailed, "already exists; use --overwrite to replace it")
        if code in ("PreconditionFailed", "412"):
            return msg(PreconditionFailed, "the object changed since the dataset was opened "
                                           "(ETag mismatch); re-open the dataset and retry")
        if code in ("InvalidAccessKeyId",):
            return msg(StoreError, "the AWS access key id is not valid for this endpoint; check "
                                   "AWS_ACCESS_KEY_ID / AWS_PROFILE (and AWS_ENDPOINT_URL)")
        if code == "SignatureDoesNotMatch":
            return msg(StoreError, "the AWS secret key does not match the access key id; check "
                                   "AWS_SECRET_ACCESS_KEY / AWS_PROFILE")
        if code in ("ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired",
                    "InvalidToken"):
            return msg(StoreError, "the AWS session token is expired or invalid; refresh the "
                                   "credentials (e.g. aws sso login, or a new AWS_SESSION_TOKEN)")
        if code == "RequestTimeTooSkewed":
            return msg(StoreError, "the local clock is too far off for S3 to accept requests; "
                                   "fix the system time (NTP)")
        if code in _REGION_CODES:
            if bucket_region and bucket_region != region:
                return msg(StoreError, f"the bucket is in region {bucket_region}"
                                       f"{f', not {region}' if region else ''}; pass "
                                       f"--s3-region {bucket_region} (or set AWS_REGION)")
            return msg(StoreError, f"request went to the wrong region"
                                   f"{f' ({region})' if region else ''}; pass --s3-region with "
                                   f"the bucket's region (aws s3api get-bucket-location "
                                   f"--bucket {bucket})")
        if code == "InvalidObjectState":  # a 403 too: before the access-denied case
            sc = err.get("StorageClass") or "an archive class"
            archived = msg(Archived, f"object is archived (storage class {sc}) and must be restored "
                                     f"before it can be read; restore it with `bams3 restore DATASET`")
            archived.storage_class = err.get("StorageClass")
            return archived
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled",
                    "AccountProblem", "KMS.DisabledException", "KMS.NotFoundException") \
                or code.startswith("KMS.") or status == 403:
            perm = _PERMISSION.get(op, "the S3 permission for " + op)
            kms = "kms" in text.lower() or code.startswith("KMS.")
            extra = (" and kms:Decrypt/kms:GenerateDataKey on the bucket's KMS key" if kms else "")
            hint = (" (a HEAD of a missing object is also 403 without s3:ListBucket)"
                    if op == "HeadObject" else "")
            return msg(StoreError, f"access denied ({op}); the credentials in use need {perm}"
                                   f"{extra}{hint}; check the IAM/bucket policy and AWS_PROFILE")
        if code == "InvalidRange":
            return msg(StoreError, f"byte range is beyond the end of the object ({text}); "
                                   f"the dataset index may be corrupt")
        if code in _THROTTLE_CODES or status == 503:
            return msg(StoreError, f"S3 kept throttling requests ({code}){tries}; lower "
                                   f"--s3-concurrency or retry later")
        if code in _SERVER_CODES or (status or 0) >= 500:
            return msg(StoreError, f"S3 server error ({code}){tries}; retry later")
        if code == "EntityTooSmall":
            return msg(StoreError, "multipart part smaller than 5 MiB was rejected; "
                                   "use a larger --s3-part-size")
        if code in ("InvalidStorageClass",):
            return msg(StoreError, f"storage class rejected by S3 ({text}); "
                                   f"check --s3-storage-class")
        if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch",
                    "InvalidChecksum") or "checksum" in text.lower():
            return msg(StoreError, f"S3 rejected the upload's checksum ({code}): the data was "
                                   f"corrupted in transit; retry")
        return msg(StoreError, f"{op} failed: {code}{f': {text}' if text else ''}")

    if isinstance(exc, bce.PartialCredentialsError):
        return msg(StoreError, f"incomplete AWS credentials ({_one_line(exc)}): set both "
                               f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither and "
                               f"use AWS_PROFILE or an instance role")
    if isinstance(exc, bce.NoCredentialsError):
        return msg(StoreError, "no AWS credentials found: set AWS_ACCESS_KEY_ID/"
                               "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an instance role")
    if isinstance(exc, (bce.CredentialRetrievalError, bce.TokenRetrievalError,
                        bce.NoAuthTokenError)) or type(exc).__name__ in (
            "SSOTokenLoadError", "UnauthorizedSSOTokenError", "SSOError"):
        return msg(StoreError, f"could not load AWS credentials ({_one_line(exc)}); check "
                               f"AWS_PROFILE, or run aws sso login")
    if isinstance(exc, bce.ProfileNotFound):
        return msg(StoreError, f"{_one_line(exc)}; check AWS_PROFILE and ~/.aws/config")
    if isinstance(exc, bce.SSLError):
        return msg(StoreError, f"TLS error talking to {ep}; check the endpoint URL and "
                               f"AWS_CA_BUNDLE")
    if isinstance(exc, bce.ConnectTimeoutError):
        return msg(StoreError, f"timed out connecting to {ep}{tries}; check the network, "
                               f"and AWS_ENDPOINT_URL if you use a non-AWS S3")
    if isinstance(exc, bce.EndpointConnectionError):
        url = getattr(exc, "kwargs", {}).get("endpoint_url") or ep
        return msg(StoreError, f"cannot connect to endpoint {_endpoint_base(url)}{tries}; check "
                               f"the network, and AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 if "
                               f"you use a non-AWS S3")
    if isinstance(exc, (bce.ReadTimeoutError, _U3ReadTimeout, TimeoutError)):
        return msg(StoreError, f"timed out waiting for {ep}{tries}; check the network "
                               f"and retry")
    if isinstance(exc, BODY_READ_ERRORS + (bce.HTTPClientError,)):
        return msg(StoreError, f"connection to {ep} failed during {op or 'a request'}{tries} "
                               f"({_one_line(exc)}); retry")
    if isinstance(exc, bce.ParamValidationError):
        return msg(StoreError, f"invalid S3 request ({_one_line(exc)})")
    if isinstance(exc, bce.BotoCoreError):
        return msg(StoreError, f"{op or 'S3 request'} failed: {_one_line(exc)}")
    if isinstance(exc, OSError):
        return msg(StoreError, f"{op or 'S3 request'} failed: {exc.strerror or _one_line(exc)}")
    return msg(StoreError, f"{op or 'S3 request'} failed: {type(exc).__name__}: {_one_line(exc)}")


def _endpoint_base(url: str) -> str:
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc}" if u.scheme and u.netloc else url


# ---------------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------------
class S3Store(Store):
    """The objects of one dataset under ``s3://bucket/prefix``. Thread-safe."""

    supports_if_match = True  # ETags are stable: readers send If-Match with data reads

    def __init__(self, bucket: str, prefix: str = "", *, region: str | None = None,
                 part_size: int = DEFAULT_PART_SIZE, concurrency: int | None = None,
                 storage_class: str | None = None, sse: str | None = None,
                 sse_kms_key_id: str | None = None, cache_dir: str | None = None,
                 use_cache: bool = True, cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
                 cache_ttl: float = 300.0, session=None, max_attempts: int = 8,
                 retry_mode: str | None = None, endpoint_url: str | None = None,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 checksum_algorithm: str | None = "CRC32", range_coalesce_gap: int = 0,
                 multipart_threshold: int | None = None):
        if not bucket:
            raise InputError("S3 bucket name is empty: expected s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = (prefix or "").strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.part_size = check_part_size(part_size)
        # objects up to this size are one PutObject, larger ones multipart in part_size parts
        self.multipart_threshold = max(self.part_size, int(
            multipart_threshold if multipart_threshold is not None
            else default_multipart_threshold(self.part_size)))
        if concurrency is None:
            concurrency = min(32, 2 * (os.cpu_count() or 4))
        try:
            self.concurrency = max(1, int(concurrency))
        except (TypeError, ValueError):
            raise InputError(f"S3 concurrency {concurrency!r} is not a whole number") from None
        if sse not in (None, "AES256", "aws:kms", "aws:kms:dsse"):
            raise InputError(f"unknown S3 server-side encryption {sse!r}: use AES256 or aws:kms")
        if sse_kms_key_id and sse is None:
            sse = "aws:kms"
        if storage_class is not None:
            try:
                storage_class = check_storage_class(storage_class)
            except ValueError as e:
                raise InputError(str(e)) from None
        self.storage_class = storage_class  # for chunk objects only: metadata stays STANDARD
        self.sse = sse
        self.sse_kms_key_id = sse_kms_key_id
        self.checksum_algorithm = checksum_algorithm
        self.max_attempts = max(1, int(max_attempts))
        mode = retry_mode or os.environ.get("AWS_RETRY_MODE") or "standard"
        if mode not in ("standard", "adaptive"):
            mode = "standard"  # "legacy" retries too little for bulk transfers
        self.retry_mode = mode
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.range_coalesce_gap = max(0, int(range_coalesce_gap))
        self.cache_ttl = float(cache_ttl)
        self.use_cache = bool(use_cache)
        self.cache_dir = cache_dir or default_cache_dir()
        self._cache = MetadataCache(self.cache_dir, cache_max_bytes)
        self._explicit_endpoint = endpoint_url
        self.endpoint_url = _configured_endpoint(endpoint_url)
        self._custom_endpoint = not _is_aws_endpoint(self.endpoint_url)
        self._requested_region = region
        self.region: str | None = region
        self._own_session = session is None
        self._session = session
        self._lock = threading.RLock()
        self._client = None
        self._pool: ThreadPoolExecutor | None = None
        # ranged reads (chunk data) in flight, from any thread: at most `concurrency`
        self._read_slots = threading.BoundedSemaphore(self.concurrency)
        self._transfer = None
        self._completed: dict[tuple[str, str], dict] = {}
        self._clock_offset = 0.0  # S3's clock minus ours, from the Date of the last response
        if self._session is None:
            try:
                self._session = _Session()
            except Exception as e:  # ProfileNotFound, bad config file
                raise translate_error(e, bucket=bucket) from None

    # -- plumbing ---------------------------------------------------------------------------
    def __repr__(self):
        return f"S3Store({self.uri!r})"

    def _full(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full_key: str) -> str:
        if self.prefix and full_key.startswith(self.prefix + "/"):
            return full_key[len(self.prefix) + 1:]
        return full_key

    @property
    def _ns(self) -> str:
        """Cache namespace: the endpoint (AWS is one namespace: bucket names are global)."""
        return self.endpoint_url if self._custom_endpoint else "aws"

    def _err(self, exc: BaseException, key: str | None = None, op: str | None = None, *,
             full: bool = False, writing: bool = False) -> StoreError:
        k = None if key is None else (key if full else self._full(key))
        return translate_error(exc, bucket=self.bucket, key=k, op=op,
                               endpoint=self.endpoint_url, region=self.region,
                               max_attempts=self.max_attempts, writing=writing)

    def _config(self, region: str) -> Config:
        kw = {}
        if self._custom_endpoint:
            kw["s3"] = {"addressing_style": "path"}
        return Config(region_name=region,
                      retries={"mode": self.retry_mode,
                               "total_max_attempts": self.max_attempts},
                      max_pool_connections=2 * self.concurrency + 4,
                      connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                      tcp_keepalive=True, **kw)

    def _make_client(self, region: str):
        client = self._session.client("s3", region_name=region,
                                      endpoint_url=self._explicit_endpoint,
                                      config=self._config(region))
        actual = client.meta.endpoint_url
        if not self._custom_endpoint and not _is_aws_endpoint(actual):
            # endpoint came from a config file (services section): rebuild with path-style
            self._custom_endpoint = True
            self.endpoint_url = actual
            client = self._session.client("s3", region_name=region,
                                          endpoint_url=self._explicit_endpoint,
                                          config=self._config(region))
        client.meta.events.register("after-call.s3.CompleteMultipartUpload",
                                    self._on_complete_multipart)
        client.meta.events.register("after-call.s3", self._on_response)
        return client

    @property
    def client(self):
        """The boto3 S3 client (created on first use, after region discovery)."""
        c = self._client
        if c is not None:
            return c
        with self._lock:
            if self._client is None:
                self._client = self._create_client()
            return self._client

    def _create_client(self):
        # No up-front region discovery (it would cost a HeadBucket per cold process): use the
        # requested/configured region; botocore's S3 region redirector follows a bucket that
        # lives elsewhere (301/400 with x-amz-bucket-region) and remembers it for the client.
        if not self.region:
            self.region = self._session.region_name or "us-east-1"
        try:
            return self._make_client(self.region)
        except Exception as e:  # credentials are loaded here (PartialCredentialsError...)
            raise self._err(e) from None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.concurrency,
                                                    thread_name_prefix="bams3-s3")
        return self._pool

    def _transfer_manager(self):
        if self._transfer is None:
            with self._lock:
                if self._transfer is None:
                    from s3transfer.manager import TransferManager

                    self._transfer = TransferManager(
                        self.client, s3_transfer_config(self.part_size, self.concurrency))
        return self._transfer

    def _on_complete_multipart(self, parsed=None, **_kw):
        if parsed and parsed.get("Key"):
            with self._lock:
                self._completed[(parsed.get("Bucket") or self.bucket, parsed["Key"])] = parsed

    def _on_response(self, http_response=None, **_kw):
        date = getattr(http_response, "headers", {}).get("Date") if http_response is not None else None
        if date:
            try:
                self._clock_offset = parsedate_to_datetime(date).timestamp() - time.time()
            except (TypeError, ValueError):
                pass

    def now(self) -> float:
        """S3's clock (that of LastModified), from the Date header of the latest response;
        lease ages are measured with it, so a skewed local clock does not matter."""
        return time.time() + self._clock_offset

    def _info_from(self, key: str, resp: dict, size: int | None = None) -> ObjectInfo:
        return ObjectInfo(key=key,
                          size=int(size if size is not None else resp.get("ContentLength") or 0),
                          etag=_strip_etag(resp.get("ETag")), version_id=resp.get("VersionId"),
                          storage_class=resp.get("StorageClass") or "STANDARD",
                          last_modified=_ts(resp.get("LastModified")))

    # -- reads ------------------------------------------------------------------------------
    def _get_object(self, key: str, op: str = "GetObject", *, byte_range=None, if_match=None,
                    if_none_match=None) -> tuple[bytes | None, dict]:
        """GetObject + body read, retrying body-read failures. Returns (data, response);
        data is None for a 304 (``if_none_match`` held)."""
        full = self._full(key)
        params = {"Bucket": self.bucket, "Key": full}
        if byte_range is not None:
            params["Range"] = range_header(*byte_range)
        if if_match:
            params["IfMatch"] = _quote_etag(if_match)
        if if_none_match:
            params["IfNoneMatch"] = _quote_etag(if_none_match)
        client = self.client
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = client.get_object(**params)
            except bce.ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if if_none_match and status == 304:
                    return None, e.response
                if byte_range is not None and e.response.get("Error", {}).get("Code") == \
                        "InvalidRange":
                    return b"", e.response  # past the end: short read, like a local file
                raise self._err(e, full, op, full=True) from None
            except Exception as e:
                raise self._err(e, full, op, full=True) from None
            body = resp["Body"]
            try:
                data = body.read()
                return data, resp
            except BODY_READ_ERRORS as e:
                if attempt >= self.max_attempts:
                    raise self._err(e, full, op, full=True) from None
                log.debug("retrying %s s3://%s/%s after body read error: %s", op, self.bucket,
                          full, e)
                if not if_match and resp.get("ETag"):
                    params["IfMatch"] = resp["ETag"]  # resume the same version
                time.sleep(_backoff(attempt))
            except Exception as e:
                raise self._err(e, full, op, full=True) from None
            finally:
                body.close()

    def get(self, key, byte_range=None, *, if_match=None):
        if byte_range is not None:
            start, end = byte_range
            if start < 0 or end < start:
                raise StoreError(f"s3://{self.bucket}/{self._full(key)}: invalid byte range "
                                 f"({start}, {end})")
            if end == start:
                return b""
            with self._read_slots:  # --s3-concurrency bounds the reader's ranged GETs in flight
                data, _ = self._get_object(key, byte_range=byte_range, if_match=if_match)
            return data
        data, _ = self._get_object(key, byte_range=byte_range, if_match=if_match)
        return data

    def get_with_info(self, key):
        data, resp = self._get_object(key)
        return data, self._info_from(key, resp, size=len(data))

    def get_ranges(self, key, ranges: Sequence[tuple[int, int]], *, if_match=None):
        ranges = [tuple(r) for r in ranges]
        if not ranges:
            return []
        groups = _coalesce(ranges, self.range_coalesce_gap, max(self.part_size, 8 * MiB))
        if len(groups) == 1:
            fetched = [self.get(key, groups[0][0], if_match=if_match)]
        else:
            pool = self._executor()
            futs = [pool.submit(self.get, key, g[0], if_match=if_match) for g in groups]
            fetched = [f.result() for f in futs]
        out: list[bytes] = [b""] * len(ranges)
        for ((gs, _ge), members), blob in zip(groups, fetched):
            for i in members:
                s, e = ranges[i]
                out[i] = blob[s - gs:e - gs]
        return out

    def get_small(self, key: str, *, max_age: float | None = None) -> tuple[bytes, ObjectInfo]:
        """A small metadata object through the disk cache.

        Cached and validated less than ``max_age`` (default ``cache_ttl``) seconds ago: no
        request. Older: a conditional GET (304 -> cached bytes, 200 -> new version cached).
        """
        if not self.use_cache or not self._cache.enabled:
            return self.get_with_info(key)
        full = self._full(key)
        _ = self.client  # creating the client may refine the endpoint, hence the namespace
        ns = self._ns
        max_age = self.cache_ttl if max_age is None else max_age
        entry = self._cache.load(ns, self.bucket, full)
        if entry is not None and max_age > 0 and 0 <= time.time() - entry.validated_at < max_age:
            return entry.data, self._entry_info(key, entry)
        data, resp = self._get_object(key, if_none_match=entry.etag if entry else None)
        if data is None:  # 304
            self._cache.mark_validated(ns, self.bucket, full, entry)
            return entry.data, self._entry_info(key, entry)
        info = self._info_from(key, resp, size=len(data))
        self._cache.store(ns, self.bucket, full, data, etag=info.etag,
                          version_id=info.version_id, size=info.size,
                          storage_class=info.storage_class, last_modified=info.last_modified)
        return data, info

    def get_small_range(self, key: str, byte_range: tuple[int, int]) -> bytes:
        """A range of an immutable object through the disk cache (cached under key + range:
        index objects live under a run's own prefix and are never rewritten)."""
        if not self.use_cache or not self._cache.enabled:
            return self.get(key, byte_range)
        full = self._full(key)
        _ = self.client
        ckey = f"{full}#bytes={byte_range[0]}-{byte_range[1]}"
        entry = self._cache.load(self._ns, self.bucket, ckey)
        if entry is not None:
            return entry.data
        data, resp = self._get_object(key, byte_range=byte_range)
        info = self._info_from(key, resp, size=len(data))
        self._cache.store(self._ns, self.bucket, ckey, data, etag=info.etag, version_id=info.version_id,
                          size=len(data), storage_class=info.storage_class, last_modified=info.last_modified)
        return data

    def invalidate_range(self, key: str, byte_range: tuple[int, int]) -> None:
        self._cache.invalidate(self._ns, self.bucket, f"{self._full(key)}#bytes={byte_range[0]}-{byte_range[1]}")

    @staticmethod
    def _entry_info(key, entry) -> ObjectInfo:
        return ObjectInfo(key=key, size=entry.size, etag=entry.etag, version_id=entry.version_id,
                          storage_class=entry.storage_class, last_modified=entry.last_modified)

    def invalidate(self, key: str) -> None:
        """Drop the cached copy of ``key`` (e.g. after PreconditionFailed/NotFound on data)."""
        self._cache.invalidate(self._ns, self.bucket, self._full(key))

    def head(self, key):
        info = self._head(key)
        if info is None:
            # 404 on HEAD cannot tell a missing key from a missing bucket: ask once
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except bce.ClientError as e:
                code = str(e.response.get("Error", {}).get("Code"))
                if code in ("404", "NoSuchBucket", "NotFound"):
                    raise self._err(e, op="HeadBucket") from None
            except Exception:
                pass
            raise NotFound(f"s3://{self.bucket}/{self._full(key)}: no such object; check the "
                           f"dataset URI (was it fully written?)")
        return info

    def exists(self, key):
        return self._head(key) is not None

    def _head(self, key) -> ObjectInfo | None:
        full = self._full(key)
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=full)
        except bce.ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._err(e, full, "HeadObject", full=True) from None
        except Exception as e:
            raise self._err(e, full, "HeadObject", full=True) from None
        return self._info_from(key, resp)

    def list_prefix(self, prefix=""):
        return self._list(prefix)

    def _list(self, prefix) -> Iterator[ObjectInfo]:
        full = self._full(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full)
            for page in pages:
                for o in page.get("Contents", ()):
                    yield ObjectInfo(key=self._rel(o["Key"]), size=int(o.get("Size", 0)),
                                     etag=_strip_etag(o.get("ETag")),
                                     storage_class=o.get("StorageClass") or "STANDARD",
                                     last_modified=_ts(o.get("LastModified")))
        except StoreError:
            raise
        except Exception as e:
            raise self._err(e, full or None, "ListObjectsV2", full=True) from None

    def open_read(self, key):
        """A buffered streaming reader over the whole object; resumes (same ETag) on errors."""
        return io.BufferedReader(_S3RawReader(self, key), buffer_size=1 * MiB)

    # -- writes -----------------------------------------------------------------------------
    def _extra_args(self, content_type: str | None, kind: str | None = None) -> dict:
        extra = {}
        if content_type:
            extra["ContentType"] = content_type
        if self.storage_class and kind == TAG_CHUNK:
            extra["StorageClass"] = self.storage_class
        if kind in (TAG_CHUNK, TAG_TMP):
            extra["Tagging"] = f"{OBJECT_TAG}={kind}"
        if self.sse:
            extra["ServerSideEncryption"] = self.sse
        if self.sse_kms_key_id:
            extra["SSEKMSKeyId"] = self.sse_kms_key_id
        if self.checksum_algorithm:
            extra["ChecksumAlgorithm"] = self.checksum_algorithm
        return extra

    def set(self, key, data, *, if_none_match=False, if_match=None, content_type=None, kind=None):
        if isinstance(data, memoryview):
            data = data.tobytes()
        elif not isinstance(data, (bytes, bytearray)):
            raise StoreError(f"s3://{self.bucket}/{self._full(key)}: expected bytes to write, "
                             f"got {type(data).__name__}")
        if content_type is None:
            content_type = "application/json" if key.endswith(".json") else \
                "application/octet-stream"
        full = self._full(key)
        extra = self._extra_args(content_type, kind)
        if len(data) <= self.multipart_threshold or if_none_match or if_match is not None:
            # conditional writes are one PutObject (atomic; s3transfer cannot send conditions)
            info = self._put(key, full, bytes(data), extra, if_none_match, if_match)
        else:
            info = self._multipart(key, full, data, extra)
        self._refresh_cached(full, data, info)
        return info

    def _put(self, key, full, data: bytes, extra: dict, if_none_match: bool,
             if_match: str | None = None) -> ObjectInfo:
        params = dict(Bucket=self.bucket, Key=full, Body=data, **extra)
        if if_none_match:
            params["IfNoneMatch"] = "*"
        if if_match is not None:
            params["IfMatch"] = _quote_etag(if_match)
        try:
            resp = self.client.put_object(**params)
        except bce.ClientError as e:
            meta = e.response.get("ResponseMetadata", {})
            conditional = if_none_match or if_match is not None
            if conditional and meta.get("HTTPStatusCode") == 412 and meta.get("RetryAttempts"):
                # an earlier attempt may have written it before its reply was lost: if the
                # object is byte-identical (single-part MD5 ETag), the write succeeded
                info = self._head(key) if self.sse != "aws:kms" else None
                if info is not None and info.etag == hashlib.md5(data).hexdigest():
                    return info
            code = str(e.response.get("Error", {}).get("Code"))
            if if_match is not None and (meta.get("HTTPStatusCode") in (404, 409, 412)
                                         or code in ("NoSuchKey", "PreconditionFailed")):
                raise PreconditionFailed(f"s3://{self.bucket}/{full}: replaced or removed since it "
                                         f"was read (If-Match {if_match} failed)") from None
            raise self._err(e, full, "PutObject", full=True, writing=if_none_match) from None
        except Exception as e:
            raise self._err(e, full, "PutObject", full=True) from None
        return ObjectInfo(key=key, size=len(data), etag=_strip_etag(resp.get("ETag")),
                          version_id=resp.get("VersionId"),
                          storage_class=extra.get("StorageClass", "STANDARD"),
                          last_modified=time.time())

    def _multipart(self, key, full, data, extra: dict) -> ObjectInfo:
        part = effective_part_size(len(data), self.part_size)
        try:
            if part != self.part_size:
                from s3transfer.manager import TransferManager

                with TransferManager(self.client, s3_transfer_config(part, self.concurrency)) \
                        as tm:
                    tm.upload(io.BytesIO(data), self.bucket, full, extra_args=extra).result()
            else:
                self._transfer_manager().upload(io.BytesIO(data), self.bucket, full,
                                                extra_args=extra).result()
        except StoreError:
            raise
        except Exception as e:
            raise self._err(e, full, getattr(e, "operation_name", None) or "multipart upload",
                            full=True) from None
        with self._lock:
            done = self._completed.pop((self.bucket, full), None)
        if done and done.get("ETag"):
            return ObjectInfo(key=key, size=len(data), etag=_strip_etag(done["ETag"]),
                              version_id=done.get("VersionId"),
                              storage_class=extra.get("StorageClass", "STANDARD"),
                              last_modified=time.time())
        return self.head(key)

    def _refresh_cached(self, full: str, data, info: ObjectInfo) -> None:
        """Keep a cached copy of an overwritten key current (write-through, same machine)."""
        if self.use_cache and self._cache.load(self._ns, self.bucket, full) is not None:
            self._cache.store(self._ns, self.bucket, full, bytes(data), etag=info.etag,
                              version_id=info.version_id, size=info.size,
                              storage_class=info.storage_class,
                              last_modified=info.last_modified)

    def delete(self, keys: Iterable[str]):
        batch: list[str] = []
        for key in keys:
            batch.append(self._full(key))
            if len(batch) == 1000:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, full_keys: list[str]) -> None:
        for k in full_keys:
            self._cache.invalidate(self._ns, self.bucket, k)
        try:
            resp = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in full_keys], "Quiet": True})
        except Exception as e:
            raise self._err(e, full_keys[0], "DeleteObjects", full=True) from None
        errors = [e for e in resp.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            fake = bce.ClientError({"Error": {"Code": first.get("Code"),
                                              "Message": first.get("Message")}}, "DeleteObjects")
            err = self._err(fake, first.get("Key"), "DeleteObjects", full=True)
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise type(err)(f"{err}{more}")

    def delete_prefix(self, prefix):
        n = 0
        batch: list[str] = []
        for info in self.list_prefix(prefix):
            batch.append(info.key)
            n += 1
            if len(batch) == 1000:
                self.delete(batch)
                batch = []
        if batch:
            self.delete(batch)
        return n

    def cleanup_incomplete(self, prefix: str = "", older_than: float | None = None):
        base = self.prefix + "/" if self.prefix else ""
        full = base + prefix
        n = 0
        cutoff = None if older_than is None else time.time() - older_than
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=full)
            uploads = [(u["Key"], u["UploadId"]) for page in pages
                       for u in page.get("Uploads", ())
                       if cutoff is None or u.get("Initiated") is None
                       or u["Initiated"].timestamp() < cutoff]
        except Exception as e:
            raise self._err(e, full or None, "ListMultipartUploads", full=True) from None
        for k, upload_id in uploads:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=upload_id)
                n += 1
            except bce.ClientError as e:
                if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise self._err(e, k, "AbortMultipartUpload", full=True) from None
            except Exception as e:
                raise self._err(e, k, "AbortMultipartUpload", full=True) from None
        return n

    def incomplete_uploads(self, prefix: str = "") -> Iterator[Upload]:
        base = self.prefix + "/" if self.prefix else ""
        full = base + prefix
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=full)
            for page in pages:
                for u in page.get("Uploads", ()):
                    if u["Key"].startswith(full):
                        yield Upload(self._rel(u["Key"]), u["UploadId"], _ts(u.get("Initiated")))
        except StoreError:
            raise
        except Exception as e:
            raise self._err(e, full or None, "ListMultipartUploads", full=True) from None

    def abort_uploads(self, uploads: Iterable[Upload]) -> None:
        for u in uploads:
            k = self._full(u.key)
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=u.upload_id)
            except bce.ClientError as e:
                if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise self._err(e, k, "AbortMultipartUpload", full=True) from None
            except Exception as e:
                raise self._err(e, k, "AbortMultipartUpload", full=True) from None

    def close(self):
        with self._lock:
            pool, self._pool = self._pool, None
            tm, self._transfer = self._transfer, None
            client, self._client = self._client, None
        if tm is not None:
            tm.shutdown()
        if pool is not None:
            pool.shutdown(wait=True)
        if client is not None and hasattr(client, "close"):
            client.close()

    # pickling (e.g. passed to a worker process): drop connections, keep configuration
    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_client", "_pool", "_transfer", "_lock", "_read_slots"):
            state[k] = None
        state["_completed"] = {}
        if self._own_session:
            state["_session"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._read_slots = threading.BoundedSemaphore(self.concurrency)
        if self._session is None:
            self._session = _Session()


class _Session:
    """What S3Store uses of a ``boto3.Session`` (``client``, ``region_name``), on botocore's own
    session: the same credential chain, configuration and endpoint resolution, without
    importing boto3 (its resources and s3transfer: ~0.2 s more per process, which a 1 kb query
    pays; a boto3.Session passed in is used as it is)."""

    def __init__(self):
        import botocore.session

        self._s = botocore.session.Session()
        self._s.get_scoped_config()  # a missing AWS_PROFILE fails here, as boto3.Session() does

    @property
    def region_name(self):
        return self._s.get_config_variable("region")

    def client(self, service: str, **kw):
        return self._s.create_client(service, **kw)


def _coalesce(ranges: list[tuple[int, int]], gap: int, max_len: int):
    """Group ranges into fetches: overlapping/adjacent (or within ``gap``) ranges share one GET.

    Returns [((start, end), [indices into ranges]), ...].
    """
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    groups: list[list] = []
    for i in order:
        s, e = ranges[i]
        if e <= s:
            if groups:
                groups[-1][2].append(i)
            else:
                groups.append([s, s, [i]])
            continue
        if groups and s <= groups[-1][1] + gap and max(e, groups[-1][1]) - groups[-1][0] <= max_len:
            groups[-1][1] = max(groups[-1][1], e)
            groups[-1][2].append(i)
        else:
            groups.append([s, e, [i]])
    return [((g[0], g[1]), g[2]) for g in groups]


class _S3RawReader(io.RawIOBase):
    """Streams one object; on a mid-body failure re-requests the rest (same ETag)."""

    def __init__(self, store: S3Store, key: str):
        self._store = store
        self._key = key
        self._full = store._full(key)
        self._pos = 0
        self._body = None
        self._etag: str | None = None
        self._size: int | None = None
        self._open(first=True)

    def _open(self, first: bool = False):
        st = self._store
        params = {"Bucket": st.bucket, "Key": self._full}
        if not first:
            params["Range"] = f"bytes={self._pos}-"
            if self._etag:
                params["IfMatch"] = _quote_etag(self._etag)
        try:
            resp = st.client.get_object(**params)
        except Exception as e:
            raise st._err(e, self._full, "GetObject", full=True) from None
        self._body = resp["Body"]
        if first:
            self._etag = _strip_etag(resp.get("ETag"))
            self._size = int(resp.get("ContentLength") or 0)

    def readable(self):
        return True

    def readinto(self, b) -> int:
        attempt = 0
        while True:
            if self._size is not None and self._pos >= self._size:
                return 0
            try:
                if self._body is None:
                    self._open()
                chunk = self._body.read(len(b))
                if chunk or len(b) == 0:
                    break
                err: BaseException = http.client.IncompleteRead(b"", self._size - self._pos)
            except BODY_READ_ERRORS as e:
                err = e
            attempt += 1
            self._close_body()  # reopen from self._pos
            if attempt >= self._store.max_attempts:
                raise self._store._err(err, self._full, "GetObject", full=True) from None
            time.sleep(_backoff(attempt))
        n = len(chunk)
        b[:n] = chunk
        self._pos += n
        return n

    def _close_body(self):
        if self._body is not None:
            try:
                self._body.close()
            except Exception:
                pass
            self._body = None

    def close(self):
        self._close_body()
        super().close()
