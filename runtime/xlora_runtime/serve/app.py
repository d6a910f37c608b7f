"""The OpenAI-compatible HTTP app (FastAPI) over a `Scheduler`.

    POST /v1/completions        prompt (text, token ids, or a list of either), OpenAI sampling fields, `xlora`
    POST /v1/chat/completions   messages rendered with the model's chat template (400 when it has none)
    GET  /v1/models             the one model served; GET /v1/models/{id} that model (404 for another id)
    GET  /health                200 while the engine runs
    GET  /metrics               Prometheus text format (metrics.py)

Both generation endpoints stream server-sent events with `"stream": true` (one chunk per token that releases
text, `data: [DONE]` last). Errors are OpenAI's JSON error objects: 400 for a bad request (one line naming the
field; also a request holding more sequences than the batch and queue can ever hold), 404 for another model or
path, 413 for a body over the limit (refused before it is parsed), 429 with `Retry-After` when the waiting queue
is full, 500 when the graph fails. A client that disconnects cancels its request: its rows leave the batch and
their caches are freed (one log line).

No request stalls the others: a body is counted as it arrives (413 past `max_body_bytes`), parsed, rendered and
tokenized on a small thread pool (the tokenizer releases the interpreter lock), and a prompt whose characters
alone prove it longer than the model's positions (more than positions x the longest token's characters) is
refused before it is tokenized.
A conversation may carry an `x-session-id` header: the server keeps its caches after each turn and extends them
when the next turn's prompt continues the same tokens (best effort; correctness never depends on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..chat import ChatTemplate, check_messages
from ..errors import XLoraError
from ..session import XLoraSession
from .metrics import Metrics
from .protocol import ParsedRequest, parse_chat, parse_completion
from .responses import completion_body, error_body, model_body, models_body, sse, stream_chunks
from .scheduler import QueueFullError, RequestHandle, Scheduler, TokenOut

__all__ = ["Server", "ServerConfig", "create_app"]

SESSION_HEADER = "x-session-id"  # the header Ray Serve's consistent-hash router keys on by default
MAX_SESSION_ID = 256
MIN_BODY_BYTES = 4 << 20  # the default body limit's floor
BODY_BYTES_PER_POSITION = 64  # the default body limit per model position: a long token, JSON-escaped
PARSE_THREADS = 2  # requests parsed, rendered and tokenized at once (more wait for a thread)
DRAIN_SECONDS = 10.0  # a refused body is read (and dropped) this long at most so the client sees the 413
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: its level and format


@dataclass
class ServerConfig:
    """What `xlora-serve` (or a Ray Serve replica) serves, and how.

    Attributes:
        graph: OUT.onnx written by xlora-export.
        model_name: the model id clients send (default: the graph's file name without .onnx).
        provider, threads, device: where the graph runs (as `XLoraSession`'s; None: cpu, or trt-engine for an
            .engine file) and the intra-op threads.
        max_batch: rows decoded together at most. max_queue: requests waiting beyond it (then 429).
        session_cache_mb: memory for conversations' caches kept between turns (0: none).
        low_memory: ONNX Runtime without pre-packed weight copies (`XLoraSession`'s).
        max_body_mb: request bodies larger than this are refused with 413 (None: the model's positions x
            `BODY_BYTES_PER_POSITION`, at least `MIN_BODY_BYTES`).
    """

    graph: str
    model_name: str | None = None
    provider: str | None = None
    threads: int | None = None
    max_batch: int = 16
    max_queue: int = 64
    session_cache_mb: float = 256.0
    device: str | int | None = None
    low_memory: bool = False
    max_body_mb: float | None = None


class _NotFoundError(Exception):
    pass


class _DisconnectedError(Exception):
    pass


class _TooLargeError(Exception):
    pass


class Server:
    """The serving state of one process (or replica): the graph, its scheduler, chat template and metrics.

    Raises:
        XLoraError: the graph cannot be served (missing file, not an export, bad chat template, bad options).
    """

    def __init__(self, config: ServerConfig) -> None:
        if not config.session_cache_mb >= 0:  # also nan
            raise XLoraError(f"session cache {config.session_cache_mb} MB: expected a number >= 0")
        if config.max_body_mb is not None and not config.max_body_mb > 0:
            raise XLoraError(f"max body {config.max_body_mb} MB: expected a number > 0")
        _one_heap()  # before the session's and the parse threads start
        self.config = config
        self.session = XLoraSession(config.graph, provider=config.provider, threads=config.threads,
                                    device=config.device, low_memory=config.low_memory)
        self.info = self.session.info
        self.name = config.model_name or os.path.splitext(os.path.basename(config.graph))[0]
        self.chat_template = ChatTemplate.of_session(self.session)
        self.instance = uuid.uuid4().hex[:12]
        self.created = int(time.time())  # the model's `created`: when this server started serving it
        self.max_body_bytes = max(MIN_BODY_BYTES, self.info.max_positions * BODY_BYTES_PER_POSITION) \
            if config.max_body_mb is None else int(config.max_body_mb * (1 << 20))
        tokenizer = self.session.tokenizer
        longest = 1 if tokenizer is None else max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)
        # every token of a text covers at most `longest` of its characters: more characters than this are more
        # tokens than the model has positions
        self.max_prompt_chars = self.info.max_positions * longest
        self.parser = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="xlora-parse")
        self.metrics = Metrics(lambda: self.scheduler.queue_depth, lambda: self.scheduler.batch_size,
                               lambda: self.session.cache_bytes, lambda: self.scheduler.sessions.nbytes)
        self.scheduler = Scheduler(self.session, config.max_batch, config.max_queue,
                                   int(config.session_cache_mb * (1 << 20)), hooks=self.metrics)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of a text (`special`: with the tokenizer's post-processing, as `Generator` encodes)."""
        tokenizer = self.session.tokenizer
        if tokenizer is None:
            raise XLoraError(f"model '{self.name}': no tokenizer travelled with this export; send token ids")
        if not text:
            return []
        self._check_length(len(text), "prompt")
        return tokenizer.encode_batch([text], add_special_tokens=special)[0].ids  # encode_batch frees the GIL

    def decode(self, ids: list[int]) -> str:
        """The text of token ids, special tokens included (an echoed prompt, the tokens of `logprobs`)."""
        return self.session.tokenizer.decode(ids, skip_special_tokens=False)

    def render(self, messages: Any) -> str:
        """The chat prompt of `messages` (refused before rendering when their text alone is too long)."""
        if self.chat_template is None:
            raise XLoraError(f"model '{self.name}' has no chat template (its tokenizer config had none when it "
                             f"was exported); use /v1/completions with a prompt")
        messages = check_messages(messages)
        self._check_length(sum(len(m["content"]) for m in messages), "messages")
        return self.chat_template.render(messages)

    def _check_length(self, chars: int, what: str) -> None:
        if chars > self.max_prompt_chars:
            raise XLoraError(f"{what} has {chars} characters: more tokens than the model's "
                             f"{self.info.max_positions} positions (at most {self.max_prompt_chars} characters)")


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code), status_code=status, headers=headers)


class _Instrument:
    """ASGI middleware: every response carries `x-xlora-instance` (which server or replica answered) and is counted
    by route and status. (Plain ASGI: Starlette's BaseHTTPMiddleware would hide client disconnects.)"""

    def __init__(self, app: Any, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_header(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-xlora-instance", self.server.instance.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            path = getattr(scope.get("route"), "path", "other")
            self.server.metrics.requests.labels(path, str(status)).inc()


def create_app(server: Server) -> FastAPI:
    """The FastAPI app serving `server` (its engine starts and stops with the app's lifespan). The routes only
    translate: parse the body (protocol.py), hand it to the scheduler, shape the answer (responses.py)."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.scheduler.start()
        yield
        await asyncio.to_thread(server.scheduler.stop)
        server.parser.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="xlora-serve", lifespan=lifespan)
    app.add_middleware(_Instrument, server=server)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        return _error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Any:
        return _error(400, str(exc).splitlines()[0])

    @app.get("/health")
    async def health() -> Any:
        if not server.scheduler.alive:
            return _error(503, "the engine is not running", "server_error")
        return {"status": "ok", "model": server.name, "instance": server.instance}

    @app.get("/v1/models")
    async def models() -> Any:
        return models_body(server.name, server.info, server.chat_template is not None, server.created)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        if model_id != server.name:
            return _error(404, f"model '{model_id}' is not served here (this server serves '{server.name}')",
                          code="model_not_found")
        return model_body(server.name, server.info, server.chat_template is not None, server.created)

    @app.get("/metrics")
    async def prometheus() -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _generate(server, request, lambda body: parse_completion(body, server.encode))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        encode = lambda text: server.encode(text, special=False)  # noqa: E731 - the template wrote the specials
        return await _generate(server, request, lambda body: parse_chat(body, server.render, encode))

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, counted as it arrives (a chunked one has no Content-Length).

    Raises:
        _TooLargeError: over `limit` bytes (declared or received); the rest is read and dropped for up to
            `DRAIN_SECONDS`, so that the client, still sending, reads the answer.
        _DisconnectedError: the client went away.
    """
    declared = request.headers.get("content-length", "")
    over = declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    total = 0
    deadline = time.monotonic() + DRAIN_SECONDS
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if over or total > limit:
                over = True
                chunks.clear()
                if time.monotonic() > deadline:
                    break
                continue
            chunks.append(chunk)
    except ClientDisconnect:
        raise _DisconnectedError from None
    if over:
        raise _TooLargeError(f"request body: over this server's limit of {limit} bytes (xlora-serve --max-body-mb)")
    return b"".join(chunks)


def _parse_body(raw: bytes, parse: Callable[[Any], ParsedRequest]) -> ParsedRequest:
    """JSON, checked, rendered and tokenized: on the server's parse threads, never on the event loop."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XLoraError(f"request body: not valid JSON ({e})") from None
    return parse(body)


def _one_heap() -> None:
    """glibc: threads started from now on allocate from the main heap (`mallopt(M_ARENA_MAX, 1)`), whose free top
    `malloc_trim` gives back; a thread's own arena keeps its top (a parse thread kept 20 MB after a refused 10 MB
    prompt). Python threads allocate under the interpreter lock anyway, so one heap adds little contention.
    Blocks of 1 MiB and more are mapped on their own (`M_MMAP_THRESHOLD`, fixed): a request body's buffers go back
    to the system when they are freed, whenever that is (an exception's traceback can keep them until the next
    garbage collection); glibc's default threshold grows with the largest block freed, and so does the free memory
    it keeps (a refused 10 MB prompt left 20 MB in the heap)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 1)  # M_ARENA_MAX
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _trim_memory() -> None:
    """Give freed heap memory back to the system (glibc), after a large body: the process's size stays that of
    its work, not of the largest request it ever refused. Scheduled with `call_soon` by the handler, so that it
    runs once the handler has returned and its body, parsed objects and exception are freed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def _generate(server: Server, request: Request, parse: Callable[[Any], ParsedRequest]) -> Response:
    """A generation endpoint: the body read (bounded), parsed off the event loop and submitted, then the whole
    answer or its stream. A refusal is 400 (the body), 404 (another model), 413 (the body's size) or 429 (the
    queue is full); a graph that fails, 500."""
    try:
        raw = await _read_body(request, server.max_body_bytes)
    except _TooLargeError as e:
        asyncio.get_running_loop().call_soon(_trim_memory)
        return _error(413, str(e), code="body_too_large")
    except _DisconnectedError:
        log.warning("%s: the client disconnected while sending its request", request.url.path)
        return Response(status_code=499)
    large = len(raw) > (1 << 20)
    try:
        try:
            parsed = await asyncio.get_running_loop().run_in_executor(server.parser, _parse_body, raw, parse)
        finally:
            del raw
            if large:
                asyncio.get_running_loop().call_soon(_trim_memory)
        parsed.decode = server.decode if server.session.tokenizer is not None else None
        if parsed.model is not None and parsed.model != server.name:
            raise _NotFoundError(f"model '{parsed.model}' is not served here (this server serves '{server.name}')")
        session_id = request.headers.get(SESSION_HEADER)
        if session_id is not None and not 0 < len(session_id) <= MAX_SESSION_ID:
            raise XLoraError(f"{SESSION_HEADER} header: expected 1 to {MAX_SESSION_ID} characters")
        if session_id is not None and len(parsed.specs) == 1:
            parsed.specs[0].session_id = session_id
        handles = server.scheduler.submit(parsed.specs, asyncio.get_running_loop())
    except XLoraError as e:
        return _error(400, str(e))
    except _NotFoundError as e:
        return _error(404, str(e), code="model_not_found")
    except QueueFullError as e:
        server.metrics.rejected.inc()
        return _error(429, str(e), "rate_limit_error", "queue_full", {"Retry-After": str(e.retry_after)})
    if parsed.stream:
        return StreamingResponse(_stream(server, parsed, handles), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        results = await _collect(request, handles)
    except _DisconnectedError:
        log.warning("%s: the client disconnected; its %d sequence(s) cancelled", request.url.path, len(handles))
        return Response(status_code=499)
    except XLoraError as e:
        return _error(500, str(e), "server_error")
    return JSONResponse(completion_body(parsed, server.name, server.info, handles, results))


async def _collect(request: Request, handles: list[RequestHandle]) -> list[list[TokenOut]]:
    """Every handle's tokens; a client that disconnects meanwhile cancels them (checked every 0.1 s). The first
    failure of a handle is raised; what still runs is cancelled and awaited (nothing left for asyncio to log)."""
    async def drain(handle: RequestHandle) -> list[TokenOut]:
        return [out async for out in handle]

    tasks = [asyncio.ensure_future(drain(h)) for h in handles]
    try:
        while True:
            done, pending = await asyncio.wait(tasks, timeout=0.1, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # raises the handle's failure
            if not pending:
                return [task.result() for task in tasks]
            if await request.is_disconnected():
                raise _DisconnectedError
    finally:
        pending = [task for task in tasks if not task.done()]
        if pending:
            for task in pending:
                task.cancel()
            for h in handles:
                h.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def _stream(server: Server, parsed: ParsedRequest, handles: list[RequestHandle]) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer, `[DONE]` last; a graph that fails ends it with an error
    event. A client gone (the generator closed early) cancels what still runs, with one log line."""
    ended = False
    try:
        async with contextlib.aclosing(stream_chunks(parsed, server.name, server.info, handles)) as chunks:
            async for chunk in chunks:
                yield sse(chunk)
        ended = True
        yield sse("[DONE]")
    except XLoraError as e:
        ended = True
        yield sse(error_body(str(e), "server_error"))
    finally:
        if not ended:
            path = "/v1/completions" if parsed.kind == "completion" else "/v1/chat/completions"
            log.warning("%s: the client disconnected from its stream; its %d sequence(s) cancelled", path,
                        len(handles))
        for h in handles:
            if h.finish_reason is None:
                h.cancel()
