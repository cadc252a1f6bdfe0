"""A local S3 for tests and benchmarks: a moto server plus a counting, fault-injecting proxy.

Both listen on 127.0.0.1 only::

    from bams3.testing import start_moto_server, S3Proxy

    moto = start_moto_server()                    # moto.endpoint -> "http://127.0.0.1:PORT"
    with S3Proxy(moto.endpoint) as proxy:         # proxy.endpoint -> another 127.0.0.1 port
        ...point AWS_ENDPOINT_URL (or samtools/htslib) at proxy.endpoint...
        proxy.stats    # {"requests", "bytes_out", "bytes_in", "by_method", "by_op",
                       #  "by_status", "injected"}
        proxy.records  # one RequestRecord per request (method, path, range, status, bytes)
        proxy.reset()  # zero the counters
        proxy.fail_next(2, status=503, code="SlowDown")     # the next 2 requests get 503 SlowDown
        proxy.fail_every(3, op="UploadPart")                 # every 3rd UploadPart fails
        proxy.fail_always(op="UploadPart", status=500, code="InternalError")
        proxy.fail_next(1, op="GetObject", mode="truncate")  # body cut short mid-stream
        proxy.fail_next(1, mode="drop")                      # connection closed, no response
        proxy.clear_faults()
    moto.stop()

``bytes_out`` counts response *body* bytes sent to the client (what S3 bills as transfer out);
``bytes_in`` counts request body bytes. Bodies are streamed, never buffered whole.

An out-of-process harness can read/zero the counters over HTTP: ``GET /__proxy__/stats`` and
``POST /__proxy__/reset`` on the proxy's endpoint (these requests are not counted).

``python -m bams3.testing.s3server`` starts both and prints their endpoints (Ctrl-C stops).
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

__all__ = ["MotoServer", "start_moto_server", "S3Proxy", "RequestRecord", "FaultRule",
           "classify_s3_op"]

_CHUNK = 256 * 1024
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailer", "trailers", "transfer-encoding", "upgrade", "expect"}


# ---------------------------------------------------------------------------------------------
# moto
# ---------------------------------------------------------------------------------------------
class MotoServer:
    """A moto S3 server in a background thread on 127.0.0.1 (an ephemeral port by default)."""

    def __init__(self, port: int = 0):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no per-request access log
        self.endpoint: str | None = None

    def start(self) -> "MotoServer":
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    @property
    def port(self) -> int:
        return self._server.get_host_and_port()[1]

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", "/moto-api/reset")
            conn.getresponse().read()
        finally:
            conn.close()

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self):
        return self.start() if self.endpoint is None else self

    def __exit__(self, *exc):
        self.stop()


def start_moto_server(port: int = 0) -> MotoServer:
    return MotoServer(port).start()


# ---------------------------------------------------------------------------------------------
# request classification
# ---------------------------------------------------------------------------------------------
def classify_s3_op(method: str, path: str, query: str, headers=None) -> str:
    """Best-effort S3 operation name for a path-style request (e.g. "GetObject", "UploadPart")."""
    q = parse_qs(query, keep_blank_values=True)
    parts = path.lstrip("/").split("/", 1)
    bucket = parts[0]
    key = parts[1] if len(parts) > 1 else ""
    method = method.upper()
    if not bucket:
        return "ListBuckets" if method == "GET" else f"{method}Service"
    if not key:
        if method == "GET":
            if "uploads" in q:
                return "ListMultipartUploads"
            if "location" in q:
                return "GetBucketLocation"
            if "versions" in q:
                return "ListObjectVersions"
            return "ListObjectsV2" if q.get("list-type") == ["2"] else "ListObjects"
        if method == "HEAD":
            return "HeadBucket"
        if method == "POST" and "delete" in q:
            return "DeleteObjects"
        if method == "PUT":
            return "PutBucket" + next((k.capitalize() for k in q), "") if q else "CreateBucket"
        if method == "DELETE":
            return "DeleteBucket"
        return f"{method}Bucket"
    if method == "GET":
        if "uploadId" in q:
            return "ListParts"
        if "tagging" in q:
            return "GetObjectTagging"
        return "GetObject"
    if method == "HEAD":
        return "HeadObject"
    if method == "PUT":
        if "partNumber" in q and "uploadId" in q:
            copy = headers is not None and headers.get("x-amz-copy-source")
            return "UploadPartCopy" if copy else "UploadPart"
        if headers is not None and headers.get("x-amz-copy-source"):
            return "CopyObject"
        return "PutObject"
    if method == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "uploadId" in q:
            return "CompleteMultipartUpload"
        if "restore" in q:
            return "RestoreObject"
        return "PostObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
    return f"{method}Object"


# ---------------------------------------------------------------------------------------------
# faults and records
# ---------------------------------------------------------------------------------------------
@dataclass
class FaultRule:
    """Which requests to fail and how.

    A request matches if ``op``/``method``/``path`` (substring) all match (None = any).
    Of the matching requests, the first ``skip`` pass, then every ``every``-th fails, at most
    ``count`` times (None = forever). ``mode``: "status" (reply ``status`` with an S3 XML error
    ``code``), "drop" (close the connection without a reply), "truncate" (forward, but cut the
    response body in half and close), "delay" (sleep ``delay`` seconds, then forward).
    """

    op: str | None = None
    method: str | None = None
    path: str | None = None
    count: int | None = 1
    every: int = 1
    skip: int = 0
    mode: str = "status"
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    delay: float = 0.0
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str, op: str) -> bool:
        return ((self.op is None or self.op == op)
                and (self.method is None or self.method.upper() == method)
                and (self.path is None or self.path in path))

    def should_fire(self) -> bool:
        """Called (under the proxy lock) for a matching request; advances the rule's counters."""
        if self.count is not None and self.fired >= self.count:
            return False
        self.seen += 1
        n = self.seen - self.skip
        if n <= 0 or n % max(1, self.every):
            return False
        self.fired += 1
        return True

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.fired >= self.count


@dataclass
class RequestRecord:
    method: str
    path: str
    query: str
    op: str
    range: str | None
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    injected: str | None = None  # fault mode if the proxy failed this request
    started: float = field(default_factory=time.time)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# the proxy
# ---------------------------------------------------------------------------------------------
class _ProxyHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    proxy: "S3Proxy"


class S3Proxy:
    """HTTP proxy on 127.0.0.1 in front of an S3 endpoint that counts and can fail requests."""

    def __init__(self, upstream: str, *, port: int = 0, upstream_timeout: float = 120.0):
        u = urlsplit(upstream)
        if u.scheme != "http" or u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"S3Proxy forwards only to a local http endpoint, got {upstream!r}")
        self.upstream = upstream
        self._up_host, self._up_port = u.hostname, u.port or 80
        self._upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._faults: list[FaultRule] = []
        self._records: list[RequestRecord] = []
        self.keep_records = True
        self._server = _ProxyHTTPServer(("127.0.0.1", port), _ProxyHandler)
        self._server.proxy = self
        self._thread: threading.Thread | None = None
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "S3Proxy":
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name="s3proxy", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    # -- counters -------------------------------------------------------------------------
    def reset(self, *, faults: bool = False) -> None:
        """Zero the counters (and drop fault rules if ``faults``)."""
        with self._lock:
            self._records = []
            if faults:
                self._faults = []

    @property
    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    @property
    def stats(self) -> dict:
        recs = self.records
        return {
            "requests": len(recs),
            "bytes_out": sum(r.bytes_out for r in recs),
            "bytes_in": sum(r.bytes_in for r in recs),
            "by_method": dict(Counter(r.method for r in recs)),
            "by_op": dict(Counter(r.op for r in recs)),
            "by_status": dict(Counter(r.status for r in recs)),
            "injected": sum(1 for r in recs if r.injected),
        }

    def count(self, op: str | None = None, method: str | None = None) -> int:
        return sum(1 for r in self.records
                   if (op is None or r.op == op) and (method is None or r.method == method))

    # -- faults ---------------------------------------------------------------------------
    def add_fault(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self._faults.append(rule)
        return rule

    def fail_next(self, n: int = 1, **kw) -> FaultRule:
        """Fail the next ``n`` requests matching ``op``/``method``/``path`` (see FaultRule)."""
        return self.add_fault(FaultRule(count=n, **kw))

    def fail_every(self, nth: int, *, count: int | None = None, **kw) -> FaultRule:
        """Fail every ``nth`` matching request (the nth, 2nth, ...), ``count`` times at most."""
        return self.add_fault(FaultRule(every=nth, count=count, **kw))

    def fail_always(self, **kw) -> FaultRule:
        return self.add_fault(FaultRule(count=None, **kw))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults = []

    def _pick_fault(self, method: str, path: str, op: str) -> FaultRule | None:
        with self._lock:
            for rule in self._faults:
                if rule.matches(method, path, op) and rule.should_fire():
                    return rule
            self._faults = [r for r in self._faults if not r.exhausted]
        return None

    def _record(self, rec: RequestRecord) -> None:
        if self.keep_records:
            with self._lock:
                self._records.append(rec)

    # -- upstream connections -------------------------------------------------------------
    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self._up_host, self._up_port,
                                          timeout=self._upstream_timeout)


def _error_xml(code: str, message: str, path: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><Resource>{path}</Resource>"
            f"<RequestId>s3proxy</RequestId></Error>").encode()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyHTTPServer

    def log_message(self, format, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self):
        try:
            super().finish()
        finally:
            if self._upstream is not None:
                self._upstream.close()

    # every method goes through _proxy
    def do_GET(self):
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_GET

    # -- request body ---------------------------------------------------------------------
    def _body_chunks(self):
        """Yield the request body in pieces (de-chunking a chunked body)."""
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                remaining = size
                while remaining:
                    piece = self.rfile.read(min(_CHUNK, remaining))
                    if not piece:
                        raise ConnectionError("client closed mid-body")
                    remaining -= len(piece)
                    yield piece
                self.rfile.readline(65537)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                piece = self.rfile.read(min(_CHUNK, remaining))
                if not piece:
                    raise ConnectionError("client closed mid-body")
                remaining -= len(piece)
                yield piece

    def _drain(self) -> int:
        return sum(len(p) for p in self._body_chunks())

    # -- the proxy ------------------------------------------------------------------------
    def _proxy(self):
        proxy = self.server.proxy
        split = urlsplit(self.path)
        path, query = split.path, split.query
        if path.startswith("/__proxy__/"):
            return self._control(path)
        op = classify_s3_op(self.command, path, query, self.headers)
        rec = RequestRecord(method=self.command, path=path, query=query, op=op,
                            range=self.headers.get("Range"))
        # recorded up front and updated before each write, so a client that has its response
        # always sees final counters (and reset() right after a response cannot race)
        proxy._record(rec)
        t0 = time.monotonic()
        try:
            rule = proxy._pick_fault(self.command, path, op)
            if rule is not None:
                rec.injected = rule.mode
                if rule.mode == "delay":
                    time.sleep(rule.delay)
                elif rule.mode != "truncate":
                    return self._inject(rule, rec)
            self._forward(rec, truncate=rule is not None and rule.mode == "truncate")
        except (ConnectionError, OSError, http.client.HTTPException):
            self.close_connection = True
            if not rec.status:
                rec.status = 502
        finally:
            rec.seconds = time.monotonic() - t0

    def _inject(self, rule: FaultRule, rec: RequestRecord):
        rec.bytes_in = self._drain()
        if rule.mode == "drop":
            rec.status = 0
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        body = b"" if self.command == "HEAD" else _error_xml(rule.code, rule.message, rec.path)
        rec.status = rule.status
        rec.bytes_out = len(body)
        self.send_response_only(rule.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "s3proxy")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _forward(self, rec: RequestRecord, *, truncate: bool = False):
        proxy = self.server.proxy
        has_body = ("chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
                    or int(self.headers.get("Content-Length") or 0) > 0)
        chunked_in = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        resp = None
        for attempt in (0, 1):
            reused = self._upstream is not None
            if self._upstream is None:
                self._upstream = proxy._connect()
            conn = self._upstream
            try:
                conn.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if k.lower() not in _HOP_BY_HOP:
                        conn.putheader(k, v)
                if chunked_in:
                    conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                if has_body:
                    for piece in self._body_chunks():
                        rec.bytes_in += len(piece)
                        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked_in else piece)
                    if chunked_in:
                        conn.send(b"0\r\n\r\n")
                resp = conn.getresponse()
                break
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                conn.close()
                self._upstream = None
                # a reused keep-alive connection may have been closed by the server: retry once
                # on a fresh one, but only if no request body was consumed
                if attempt == 0 and reused and not has_body:
                    continue
                raise

        rec.status = resp.status
        length = resp.getheader("Content-Length")
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        chunked_out = not no_body and length is None
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP_BY_HOP:
                self.send_header(k, v)
        if chunked_out:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()  # upstream closing does not close the client's keep-alive connection
        if no_body:
            resp.read()
        else:
            limit = None
            if truncate:
                limit = (int(length) // 2) if length is not None else _CHUNK
            while True:
                want = _CHUNK if limit is None else min(_CHUNK, limit - rec.bytes_out)
                piece = resp.read(want) if want > 0 else b""
                if not piece:
                    break
                rec.bytes_out += len(piece)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked_out else piece)
            if truncate:
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
                self._upstream = None
                return
            if chunked_out:
                self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        if resp.will_close:
            conn.close()
            self._upstream = None

    def _control(self, path: str):
        proxy = self.server.proxy
        self._drain()
        if path == "/__proxy__/stats":
            body = json.dumps(proxy.stats).encode()
        elif path == "/__proxy__/reset":
            proxy.reset()
            body = b"{}"
        else:
            body = b'{"error": "unknown control path"}'
        self.send_response_only(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:  # pragma: no cover - manual use
    moto = start_moto_server()
    proxy = S3Proxy(moto.endpoint).start()
    print(f"moto:  {moto.endpoint}\nproxy: {proxy.endpoint}  (GET /__proxy__/stats)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
        moto.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
