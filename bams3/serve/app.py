"""The web application behind ``bams3 serve`` (Starlette, run by uvicorn).

Routes:
    GET /reads/service-info      GA4GH service-info (htsget 1.3)
    GET /reads/{id}              an htsget ticket (JSON)
    POST /reads/{id}             the same for a JSON body, with several regions
    GET /data/{id}?run&part&r    the ticket's data: BGZF-compressed BAM header or records
    GET /                        the datasets under the root (HTML)
    GET /view/{id}?locus=...     igv.js on the dataset, through /reads (HTML)
    GET /sizes/{id}              the dataset's references as a chrom.sizes text (for igv.js)
    GET /fasta/{name}            the --fasta reference and its .fai (byte ranges), if given
    GET /static/...              igv.js and the page's script, shipped with the package

Every htsget error is the spec's JSON with its status; anything unexpected is a JSON 500 with
one line of message (and one line in the server's log), never a traceback. Data responses
stream: a request holds one decoded block and one BGZF block at a time, besides the reader's
bounded read-ahead.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Iterator
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import (FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response,
                                 StreamingResponse)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bams3core.bgzf import BgzfEncoder

from .. import __version__
from ..errors import Bams3Error, InputError, NotFound
from . import page
from .catalog import Catalog, UnknownDataset
from .htsget import (CONTENT_TYPE, MAX_POST_BYTES, HtsgetError, decode_parts, parse_reads_body, parse_reads_query,
                     service_info, ticket)

log = logging.getLogger("bams3.serve")
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
BAM_MEDIA_TYPE = "application/vnd.ga4gh.bam"
DAY = 86400


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _as_htsget(e: Exception) -> HtsgetError:
    """The spec's error for an exception raised while answering."""
    if isinstance(e, HtsgetError):
        return e
    if isinstance(e, (UnknownDataset, NotFound)):
        return HtsgetError("NotFound", _one_line(e))
    if isinstance(e, InputError):
        return HtsgetError("InvalidInput", _one_line(e))
    if isinstance(e, Bams3Error):  # the store failed, or the dataset is damaged: the server's side
        return HtsgetError("ServerError", _one_line(e))
    return HtsgetError("InternalError", f"internal error: {type(e).__name__}: {_one_line(e)}")


def _error_response(e: Exception, request: Request) -> JSONResponse:
    err = _as_htsget(e)
    if err.status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, err.message)
    return JSONResponse(err.body(), status_code=err.status, media_type=CONTENT_TYPE)


def htsget_endpoint(fn):
    """Answer any exception of ``fn`` with the spec's error JSON (never a traceback)."""
    @functools.wraps(fn)
    async def wrapper(request: Request):
        try:
            return await fn(request)
        except Exception as e:  # noqa: BLE001 - every error becomes one JSON answer
            return _error_response(e, request)
    return wrapper


def page_endpoint(fn):
    """An HTML page: anything unexpected is an error page and one line in the log."""
    @functools.wraps(fn)
    async def wrapper(request: Request):
        try:
            return await fn(request)
        except Exception as e:  # noqa: BLE001 - a page never shows a traceback
            log.error("%s %s: %s: %s", request.method, request.url.path, type(e).__name__, _one_line(e))
            return HTMLResponse(page.error_page("bams3 serve: error", _one_line(e)), status_code=500)
    return wrapper


class BgzfStream(StreamingResponse):
    """Streams BGZF blocks from a generator run on the thread pool. A failure after the
    status line was sent cannot become an error status any more: the response is then cut
    short (no final chunk, the connection is closed), so the client sees a truncated
    transfer, as the htsget spec asks clients to detect — and the log gets one line."""

    def __init__(self, first: bytes | None, blocks: Iterator[bytes], path: str):
        super().__init__(iter(()), media_type=BAM_MEDIA_TYPE)
        self.first = first
        self.blocks = blocks
        self.path = path

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            chunk, chunks = self.first, iterate_in_threadpool(self.blocks)
            while chunk is not None:
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except OSError:  # the client went away: nothing to report
                    return
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    chunk = None
                except Exception as e:  # noqa: BLE001 - see the class docstring
                    log.error("GET %s: response cut short: %s", self.path, _one_line(e))
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._close()

    def _close(self) -> None:
        try:
            self.blocks.close()
        except (ValueError, AttributeError):  # still running on a worker thread: it ends with its read
            pass


def header_blocks(ds) -> Iterator[bytes]:
    enc = BgzfEncoder()
    yield enc.encode(ds.bam_header().to_bytes()) + enc.flush()


def body_blocks(ds, regions, whole) -> Iterator[bytes]:
    """BGZF blocks of the records: overlapping ``regions`` (as samtools view), or every record
    of the references ``whole`` (their whole index: a whole-dataset request)."""
    if whole:
        batches = (b for r in whole for b in ds.iter_blocks(ds.index(r), max_gap=1 << 20))
    elif len(regions) == 1:
        batches = ds.query(regions)
    else:
        batches = ds.query_union(regions)
    enc = BgzfEncoder()
    try:
        for b in batches:
            out = enc.encode(b.raw())
            if out:
                yield out
        out = enc.flush()
        if out:
            yield out
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def create_app(catalog: Catalog, *, fasta: str | None = None, max_locus: int = page.MAX_LOCUS) -> Starlette:
    """The application serving ``catalog``'s datasets."""

    @htsget_endpoint
    async def reads_service_info(request: Request):
        return JSONResponse(service_info(__version__, str(request.base_url)), media_type=CONTENT_TYPE)

    def _ticket(request: Request, ds_id: str) -> dict:
        ds = catalog.open(ds_id)
        if ds.wide:
            raise HtsgetError("UnsupportedFormat", "this dataset has positions beyond 2^31-1 (format v1.1), which BAM "
                                                   "cannot hold")
        sl = parse_reads_query(request.query_params, ds.manifest, ds.header_text)
        return ticket(sl, ds.manifest, data_url(request, ds_id))

    @htsget_endpoint
    async def reads(request: Request):
        ds_id = request.path_params["id"]
        body = await run_in_threadpool(_ticket, request, ds_id)
        return JSONResponse(body, media_type=CONTENT_TYPE)

    def _post_ticket(request: Request, ds_id: str, payload: bytes) -> dict:
        if request.query_params:
            raise HtsgetError("InvalidInput", "a POST request takes its parameters in the JSON body, not the URL")
        ds = catalog.open(ds_id)
        if ds.wide:
            raise HtsgetError("UnsupportedFormat", "this dataset has positions beyond 2^31-1 (format v1.1), which BAM "
                                                   "cannot hold")
        sl = parse_reads_body(payload, ds.manifest, ds.header_text)
        return ticket(sl, ds.manifest, data_url(request, ds_id))

    @htsget_endpoint
    async def reads_post(request: Request):
        payload = b""
        async for piece in request.stream():  # bounded: a body over the limit is refused unread
            payload += piece
            if len(payload) > MAX_POST_BYTES:
                raise HtsgetError("PayloadTooLarge", f"the request body is over {MAX_POST_BYTES:,} bytes")
        body = await run_in_threadpool(_post_ticket, request, request.path_params["id"], payload)
        return JSONResponse(body, media_type=CONTENT_TYPE)

    def _open_data(request: Request, ds_id: str):
        q = request.query_params
        run, part = q.get("run"), q.get("part")
        if not run or part not in ("header", "body"):
            raise HtsgetError("InvalidInput", "a data URL needs run= and part=header|body (use the URLs of a ticket)")
        ds = catalog.open(ds_id, run=run)
        if ds.wide:
            raise HtsgetError("UnsupportedFormat", "this dataset cannot be written as BAM (format v1.1)")
        if part == "header":
            blocks = header_blocks(ds)
        else:
            regions, whole = decode_parts(q.getlist("r"), ds.manifest)
            if not regions and not whole:
                raise HtsgetError("InvalidInput", "a body data URL needs r= (use the URLs of a ticket)")
            blocks = body_blocks(ds, regions, whole)
        # the first block is read before answering: a missing or damaged object is an error status
        return next(blocks, None), blocks

    @htsget_endpoint
    async def data(request: Request):
        first, blocks = await run_in_threadpool(_open_data, request, request.path_params["id"])
        return BgzfStream(first, blocks, request.url.path)

    @htsget_endpoint
    async def sizes(request: Request):
        ds = await run_in_threadpool(catalog.open, request.path_params["id"])
        text = "".join(f"{r['name']}\t{r['length']}\n" for r in ds.manifest.references)
        return PlainTextResponse(text)

    @page_endpoint
    async def index(request: Request):
        try:
            entries = await run_in_threadpool(catalog.listing)
        except Bams3Error as e:
            return HTMLResponse(page.error_page("Cannot list the datasets", _one_line(e)), status_code=502)
        return HTMLResponse(page.index_page(catalog.root, entries))

    @page_endpoint
    async def view(request: Request):
        ds_id = request.path_params["id"]
        html, status = await run_in_threadpool(page.view_page, catalog, ds_id, request.query_params.get("locus"),
                                               fasta_name=os.path.basename(fasta) if fasta else None,
                                               max_locus=max_locus)
        return HTMLResponse(html, status_code=status)

    routes = [
        Route("/", index, name="index"),
        Route("/reads/service-info", reads_service_info),
        Route("/reads/{id:path}", reads, name="reads", methods=["GET"]),
        Route("/reads/{id:path}", reads_post, methods=["POST"]),
        Route("/data/{id:path}", data, name="data"),
        Route("/sizes/{id:path}", sizes, name="sizes"),
        Route("/view/{id:path}", view, name="view"),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
    ]
    if fasta:
        files = {os.path.basename(fasta): fasta, os.path.basename(fasta) + ".fai": fasta + ".fai"}

        async def fasta_file(request: Request):
            path = files.get(request.path_params["name"])
            if path is None:
                return PlainTextResponse("not found", status_code=404)
            return FileResponse(path, media_type="text/plain")

        routes.append(Route("/fasta/{name}", fasta_file))

    middleware = [Middleware(CORSMiddleware, allow_origin_regex=".*", allow_methods=["GET", "POST"], allow_headers=["*"],
                             expose_headers=["Content-Length", "Content-Type", "Content-Range", "Accept-Ranges"],
                             max_age=30 * DAY)]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.catalog = catalog
    return app


def data_url(request: Request, ds_id: str) -> str:
    """The absolute URL of a dataset's data, percent-encoded, on the host the client used."""
    return f"{str(request.base_url).rstrip('/')}/data/{quote(ds_id, safe='/')}"

