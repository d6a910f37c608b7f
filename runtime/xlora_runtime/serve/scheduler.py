"""Continuous batching over the runtime's cache groups: requests join and leave the running batch between
decode steps.

    submit -> waiting queue (bounded: `QueueFullError` beyond it)
    each engine iteration, on the batch core (`batch.py`, the Generator's too):
        admit waiting requests while the batch has room -> prefill them (left-padded, one group per top_k;
            a session's stored caches are extended instead when the prompt continues its history)
        -> the first token of each -> survivors merge into the running group of their kind (granular or
           frozen, per top_k), the shorter group left-padded (`CacheGroup.pad_left`)
        decode step: every running group runs its rows' last tokens -> pick, emit, stop checks
        -> finished and cancelled rows leave at once (their caches freed, or kept for their session);
           rows reaching `freeze_after` move to the frozen group; leading columns that are padding for every
           row are dropped (`CacheGroup.slice_positions`)

Every row of a group holds its real positions right-aligned (padding on the left only), so a request gives the
tokens it would get alone. One engine thread runs the graph; callers (the HTTP app's event loop) submit from
other threads and receive `TokenOut`s on an asyncio queue of their own loop. Finish reasons are the runtime's
("stop_token", "stop_string", "length", "max_positions"); `protocol.py` maps them to OpenAI's.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..batch import Batch, Row, Sampling, StopStrings, Token
from ..errors import XLoraError
from ..kv_cache import CacheGroup
from ..logprobs import TokenLogprob
from ..session import XLoraSession

__all__ = ["QueueFullError", "RequestHandle", "RequestSpec", "Scheduler", "TokenOut"]


class QueueFullError(Exception):
    """The waiting queue is full (the server answers 429 with `Retry-After: retry_after`)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is at capacity; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class RequestSpec:
    """One sequence to generate.

    Attributes:
        prompt_ids: the prompt's token ids.
        max_tokens: new tokens at most (None: until the model's positions end).
        temperature: 0 = greedy; > 0 samples after temperature and `top_p`.
        seed: sampling seed (None: fresh entropy).
        stop: strings that end the sequence; the text stops before them, and no part of them is released.
        ignore_eos: do not stop at the export's eos token ids.
        top_k: experts kept per token (0 = dense, None = the model's default).
        freeze_after: after this many decode steps the scalings freeze (frozen graph), None = never.
        scalings: include each token's (L, n) scalings in its `TokenOut`.
        logprobs: None, or k: each token's log-probability and the k most likely tokens in its `TokenOut`;
            `prompt_logprobs`: the first `TokenOut` also carries the prompt's (each token after the first).
        sampling: vLLM's extensions of the token choice (top_k, min_p, repetition_penalty, min_tokens).
        session_id: keep this conversation's caches after the request, and extend them when the next request
            of the session continues its token history (best effort: evicted caches are recomputed).
    """

    prompt_ids: list[int]
    max_tokens: int | None = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_k: int | None = None
    freeze_after: int | None = None
    scalings: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False
    session_id: str | None = None
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class TokenOut:
    """One new token of one request."""

    token: int
    text: str  # text released with this token ('' inside a character or while it may begin a stop string)
    scalings: np.ndarray | None  # (L, n) of the position that chose the token, with RequestSpec.scalings
    finish_reason: str | None  # None, or on the last token the runtime's reason (`batch.FINISH_REASONS`)
    logprob: TokenLogprob | None = None  # with RequestSpec.logprobs
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first token, with RequestSpec.prompt_logprobs


class Hooks(Protocol):
    """What the scheduler reports (the server's metrics implement it)."""

    def on_first_token(self, seconds: float) -> None: ...
    def on_token(self, seconds: float) -> None: ...
    def on_step(self, rows: int) -> None: ...
    def on_prompt(self, tokens: int, cached: int) -> None: ...
    def on_cancel(self) -> None: ...


class RequestHandle:
    """The caller's side of a submitted request: `async for out in handle` until the last token.

    `cancel()` (a client that went away) removes the request at the next step boundary and frees its caches.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None, wake: Callable[[], None]) -> None:
        self._loop = loop
        self._queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._wake = wake
        self.cancelled = False
        self.prompt_tokens = 0
        self.cached_tokens = 0  # prompt tokens whose caches came from the session store
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def _push(self, item: TokenOut | BaseException) -> None:
        if self._loop is not None and not self.cancelled:
            _deliver(self._loop, [(self, item)])

    def cancel(self) -> None:
        """Stop generating for this request (idempotent); the engine frees its caches at the next step."""
        if not self.cancelled:
            self.cancelled = True
            self._wake()

    async def __aiter__(self) -> AsyncIterator[TokenOut]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[RequestHandle, TokenOut | BaseException]]) -> None:
    """Hand items to their handles' queues in their event loop: one wake-up of the loop for all of them."""
    def put() -> None:
        for handle, item in items:
            handle._queue.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:  # the caller's loop has closed: nobody is listening
        for handle, _ in items:
            handle.cancelled = True


@dataclass(eq=False, kw_only=True)
class _Seq(Row):
    """Engine-side state of one request: its row in the batch, and the caller's side."""

    spec: RequestSpec
    handle: RequestHandle
    submitted: float
    last_time: float = 0.0

    def is_cancelled(self) -> bool:
        return self.handle.cancelled


class _SessionStore:
    """Caches of finished requests that carried a session id: one single-row granular group each, without
    padding, with the token ids it holds; least recently used first out beyond `budget` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: collections.OrderedDict[str, tuple[list[int], int, CacheGroup]] = collections.OrderedDict()
        self.nbytes = 0

    def take(self, session_id: str) -> tuple[list[int], int, CacheGroup] | None:
        entry = self.entries.pop(session_id, None)
        if entry is not None:
            self.nbytes -= entry[2].nbytes()
        return entry

    def put(self, session_id: str, ids: list[int], top_k: int, group: CacheGroup) -> None:
        old = self.take(session_id)
        if old is not None:
            old[2].release()
        size = group.nbytes()
        if size > self.budget:
            group.release()
            return
        self.entries[session_id] = (ids, top_k, group)
        self.nbytes += size
        while self.nbytes > self.budget:
            _, (_, _, evicted) = self.entries.popitem(last=False)
            self.nbytes -= evicted.nbytes()
            evicted.release()

    def clear(self) -> None:
        for _, _, group in self.entries.values():
            group.release()
        self.entries.clear()
        self.nbytes = 0


class Scheduler:
    """Continuous batching of generation requests on one `XLoraSession` (see the module docstring).

    Args:
        session: the loaded graph.
        max_batch: rows decoded together at most; further requests wait.
        max_queue: waiting requests at most; `submit` raises `QueueFullError` beyond it.
        session_cache_bytes: memory for conversations' caches kept between requests (0: none kept).
        hooks: receives timings and batch sizes (the server's metrics).
    """

    def __init__(self, session: XLoraSession, max_batch: int = 16, max_queue: int = 64,
                 session_cache_bytes: int = 256 << 20, hooks: Hooks | None = None) -> None:
        if max_batch < 1:
            raise XLoraError(f"max_batch={max_batch}: expected an int >= 1")
        if max_queue < 0:
            raise XLoraError(f"max_queue={max_queue}: expected an int >= 0")
        self.session = session
        self.info = session.info
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.hooks = hooks
        self.sessions = _SessionStore(session_cache_bytes)
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: dict[int, _Seq] = {}  # admitted, until they leave the batch
        self._batch = Batch(session, trim=True, retire=self._retire)
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._outbox: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)  # this step's tokens
        self._forgotten: list[str] = []  # sessions whose stored caches the engine frees at its next iteration

    # ------------------------------------------------------------------------------------------- callers' side
    @property
    def queue_depth(self) -> int:
        """Requests waiting for a place in the batch."""
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        """Rows in the running batch."""
        return len(self._running)

    @property
    def alive(self) -> bool:
        """The engine thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def check(self, spec: RequestSpec) -> None:
        """Validate a request against the graph (ids, top_k, frozen graph).

        Raises:
            XLoraError: what is wrong, one line.
        """
        self.session.check_ids(spec.prompt_ids, "prompt")
        self.session.check_top_k(self.info.default_top_k if spec.top_k is None else spec.top_k)
        if spec.freeze_after is not None:
            self.session.frozen  # noqa: B018 - opens OUT.frozen.onnx, or raises the clear error
        if spec.stop and self.session.tokenizer is None:
            raise XLoraError("stop: stop strings need the tokenizer, and none travelled with this export")

    def forget(self, session_id: str) -> None:
        """Free a session's stored caches (its conversation ended); the engine thread does it before its next step
        (a request of the session still running stores its caches again when it finishes)."""
        with self._cond:
            self._forgotten.append(session_id)
            self._cond.notify()

    def submit(self, specs: list[RequestSpec], loop: asyncio.AbstractEventLoop | None = None) -> list[RequestHandle]:
        """Queue requests (all or none); their tokens arrive on the handles, in `loop`.

        Raises:
            XLoraError: a bad request (nothing queued), also one holding more sequences than the batch and the
                queue can ever hold together.
            QueueFullError: the waiting queue has no room for them all now.
        """
        capacity = self.max_batch + self.max_queue
        if len(specs) > capacity:
            raise XLoraError(f"the request holds {len(specs)} sequences (prompts x n); this server holds at most "
                             f"{capacity} at once (max batch {self.max_batch} + max queue {self.max_queue})")
        for spec in specs:
            self.check(spec)
        now = time.perf_counter()
        with self._cond:
            if self._stopping:
                raise QueueFullError(1)
            if len(self._running) + len(self._waiting) + len(specs) > capacity:
                raise QueueFullError(self._retry_after())
            handles = []
            for spec in specs:
                handle = RequestHandle(loop, self._wake)
                handle.prompt_tokens = len(spec.prompt_ids)
                limit = self.info.max_positions - len(spec.prompt_ids) + 1  # the last token is never fed back
                seq = _Seq(id=next(self._ids), prompt_ids=spec.prompt_ids,
                           budget=limit if spec.max_tokens is None else min(spec.max_tokens, limit),
                           capped=spec.max_tokens is None or spec.max_tokens > limit,
                           top_k=self.info.default_top_k if spec.top_k is None else spec.top_k,
                           temperature=spec.temperature, top_p=spec.top_p, rng=np.random.default_rng(spec.seed),
                           sampling=spec.sampling,
                           stop_ids=frozenset() if spec.ignore_eos else frozenset(self.info.eos_token_ids),
                           stop=StopStrings(spec.stop), freeze_after=spec.freeze_after, logprobs=spec.logprobs,
                           prompt_logprobs=spec.prompt_logprobs,
                           keep_cache=spec.session_id is not None, spec=spec, handle=handle, submitted=now)
                self._waiting.append(seq)
                handles.append(handle)
            self._cond.notify()
        return handles

    def _retry_after(self) -> int:
        """Seconds after which a rejected client may try again: the batch should have moved on by then."""
        return max(1, min(30, len(self._waiting) // max(1, self.max_batch)))

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def start(self) -> None:
        """Start the engine thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="xlora-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the engine: requests in flight end with an error, every cache is freed."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------------------------------- engine
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._running and not self._forgotten:
                        self._cond.wait()
                    if self._stopping:
                        return
                    forgotten, self._forgotten = self._forgotten, []
                    admitted = []
                    while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                        seq = self._waiting.popleft()
                        if seq.handle.cancelled:
                            self._on_cancel()
                        else:
                            admitted.append(seq)
                    for seq in admitted:
                        self._running[seq.id] = seq
                for session_id in forgotten:
                    entry = self.sessions.take(session_id)
                    if entry is not None:
                        entry[2].release()
                try:
                    if admitted:
                        self._prefill(admitted)
                        self._flush()  # first tokens out before the next decode step
                    if self._batch.groups:
                        self._decode()
                        self._flush()
                except Exception as e:  # a graph failure: every request in flight fails, nothing leaks
                    self._fail_running(XLoraError(f"generation failed ({type(e).__name__}: {e})"))
        finally:
            self._fail_running(XLoraError("the server is shutting down"))
            with self._cond:
                for seq in self._waiting:
                    seq.handle._push(XLoraError("the server is shutting down"))
                self._waiting.clear()
            self.sessions.clear()

    def _flush(self) -> None:
        for loop, items in self._outbox.items():
            _deliver(loop, items)
        self._outbox.clear()

    def _fail_running(self, error: Exception) -> None:
        self._flush()
        self._batch.release()
        for seq in self._running.values():
            seq.handle._push(error)
        self._running.clear()

    def _on_cancel(self) -> None:
        if self.hooks is not None:
            self.hooks.on_cancel()

    def _prefill(self, seqs: list[_Seq]) -> None:
        """Run the new requests' prompts (or the rest of them, on their session's stored caches), emit their first
        tokens; the survivors join the batch."""
        fresh = []
        for seq in seqs:
            group = self._resume(seq)
            if group is None:
                fresh.append(seq)
            else:
                self._emit(self._batch.extend(seq, group))
        if fresh:
            self._emit(self._batch.prefill(fresh))
        if self.hooks is not None:
            for seq in fresh:
                self.hooks.on_prompt(len(seq.prompt_ids), 0)

    def _resume(self, seq: _Seq) -> CacheGroup | None:
        """The session's stored caches cut to the longest prefix they share with this prompt (at least one
        prompt token left to run), as a single-row group; None when there is nothing to reuse."""
        if seq.spec.session_id is None or seq.prompt_logprobs:  # the stored prompt positions have no logits
            return None
        entry = self.sessions.take(seq.spec.session_id)
        if entry is None:
            return None
        ids, top_k, group = entry
        prompt = seq.prompt_ids
        common = 0
        for a, b in zip(ids, prompt[:-1]):
            if a != b:
                break
            common += 1
        if top_k != seq.top_k or common == 0:
            group.release()
            return None
        group.slice_positions(0, common)
        seq.real = seq.handle.cached_tokens = common
        if self.hooks is not None:
            self.hooks.on_prompt(len(prompt), common)
        return group

    def _decode(self) -> None:
        """One decode step of the batch; its tokens go to their callers."""
        rows = len(self._running)
        tokens = self._batch.decode()
        if self.hooks is not None:
            self.hooks.on_step(rows)
        self._emit(tokens)

    def _retire(self, row: Row, kept: CacheGroup | None) -> None:
        """A row left the batch: a cancelled one is counted, a finished one's caches kept for its session."""
        seq = self._running.pop(row.id)
        if row.finish_reason == "cancelled":
            self._on_cancel()
        elif kept is not None:
            self.sessions.put(seq.spec.session_id, (seq.prompt_ids + seq.tokens)[:seq.real], seq.top_k, kept)

    def _emit(self, tokens: list[Token]) -> None:
        """Hand each token (the text it releases, its finish reason) to its caller; report the timings."""
        now = time.perf_counter()
        for t in tokens:
            seq = t.row
            if self.hooks is not None:
                if t.step == 0:
                    self.hooks.on_first_token(now - seq.submitted)
                else:
                    self.hooks.on_token(now - seq.last_time)
            seq.last_time = now
            seq.handle.completion_tokens = len(seq.tokens)
            seq.handle.finish_reason = t.finish_reason
            if seq.handle._loop is not None:
                out = TokenOut(t.token, t.text, t.scalings.copy() if seq.spec.scalings else None, t.finish_reason,
                               t.logprob, t.prompt_logprobs)
                self._outbox[seq.handle._loop].append((seq.handle, out))
