"""Continuous batching over the runtime's cache groups: requests join and leave the running batch between
decode steps.

    submit -> waiting queue (bounded: `QueueFullError` beyond it)
    each engine iteration:
        admit waiting requests while the batch has room -> prefill them (left-padded, one group per top_k;
            a session's stored caches are extended instead when the prompt continues its history)
        -> the first token of each -> survivors merge into the running group of their kind (granular or
           frozen, per top_k), the shorter group left-padded (`CacheGroup.pad_left`)
        decode step: every running group runs its rows' last tokens -> pick, emit, stop checks
        -> finished and cancelled rows leave at once (their caches freed, or kept for their session);
           rows reaching `freeze_after` move to the frozen group; leading columns that are padding for every
           row are dropped (`CacheGroup.slice_positions`)

Every row of a group holds its real positions right-aligned (padding on the left only), so its attention mask
is `[0] * (length - real) + [1] * real` and the graph's positions (`cumsum(mask) - 1`) are the row's own: a
request gives the tokens it would get alone. One engine thread runs the graph; callers (the HTTP app's event
loop) submit from other threads and receive `TokenOut`s on an asyncio queue of their own loop.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..errors import XLoraError
from ..generation import pick_tokens
from ..kv_cache import CacheGroup, StepOutput
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
        stop: strings that end the sequence; the text stops before them (OpenAI semantics).
        ignore_eos: do not stop at the export's eos token ids.
        top_k: experts kept per token (0 = dense, None = the model's default).
        freeze_after: after this many decode steps the scalings freeze (frozen graph), None = never.
        scalings: include each token's (L, n) scalings in its `TokenOut`.
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
    session_id: str | None = None


@dataclass
class TokenOut:
    """One new token of one request."""

    token: int
    text: str  # text released with this token ('' while it may begin a stop string)
    scalings: np.ndarray | None  # (L, n) of the position that chose the token, with RequestSpec.scalings
    finish_reason: str | None  # None, or on the last token "stop" (eos or a stop string) / "length"


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


@dataclass
class _Seq:
    """Engine-side state of one request."""

    id: int
    spec: RequestSpec
    handle: RequestHandle
    budget: int  # new tokens at most (max_tokens capped by the model's positions)
    top_k: int
    stop_ids: frozenset[int]
    rng: np.random.Generator
    decoder: Any  # tokenizers DecodeStream, or None without a tokenizer
    submitted: float
    tokens: list[int] = field(default_factory=list)
    real: int = 0  # positions this row holds in its group's caches (prompt + fed tokens)
    pending: str = ""  # decoded text held back while it may begin a stop string
    last_time: float = 0.0

    @property
    def finished(self) -> bool:
        return self.handle.finish_reason is not None


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
        self._running: dict[int, _Seq] = {}
        self._groups: dict[tuple[bool, int], CacheGroup] = {}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._outbox: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)  # this step's tokens

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

    def submit(self, specs: list[RequestSpec], loop: asyncio.AbstractEventLoop | None = None) -> list[RequestHandle]:
        """Queue requests (all or none); their tokens arrive on the handles, in `loop`.

        Raises:
            XLoraError: a bad request (nothing queued).
            QueueFullError: the waiting queue has no room for them all.
        """
        for spec in specs:
            self.check(spec)
        tokenizer = self.session.tokenizer
        if tokenizer is not None:
            from tokenizers.decoders import DecodeStream
        now = time.perf_counter()
        with self._cond:
            if self._stopping:
                raise QueueFullError(1)
            if len(self._running) + len(self._waiting) + len(specs) > self.max_batch + self.max_queue:
                raise QueueFullError(self._retry_after())
            handles = []
            for spec in specs:
                handle = RequestHandle(loop, self._wake)
                handle.prompt_tokens = len(spec.prompt_ids)
                limit = self.info.max_positions - len(spec.prompt_ids) + 1
                budget = limit if spec.max_tokens is None else min(spec.max_tokens, limit)
                stops = frozenset() if spec.ignore_eos else frozenset(self.info.eos_token_ids)
                seq = _Seq(next(self._ids), spec, handle, budget,
                           self.info.default_top_k if spec.top_k is None else spec.top_k, stops,
                           np.random.default_rng(spec.seed),
                           DecodeStream(skip_special_tokens=True) if tokenizer is not None else None, now)
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
                    while not self._stopping and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._stopping:
                        return
                    admitted = []
                    while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                        seq = self._waiting.popleft()
                        if seq.handle.cancelled:
                            self._on_cancel()
                        else:
                            admitted.append(seq)
                    for seq in admitted:
                        self._running[seq.id] = seq
                try:
                    if admitted:
                        self._prefill(admitted)
                        self._flush()  # first tokens out before the next decode step
                    if self._groups:
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
        for group in self._groups.values():
            group.release()
        self._groups.clear()
        for seq in self._running.values():
            seq.handle._push(error)
        self._running.clear()

    def _on_cancel(self) -> None:
        if self.hooks is not None:
            self.hooks.on_cancel()

    def _prefill(self, seqs: list[_Seq]) -> None:
        """Run the new requests' prompts, emit their first tokens, merge the survivors into the batch."""
        fresh: dict[int, list[_Seq]] = collections.defaultdict(list)
        for seq in seqs:
            group = self._resume(seq)
            if group is None:
                fresh[seq.top_k].append(seq)
                continue
            suffix = np.array([seq.spec.prompt_ids[seq.real:]], np.int64)
            total = seq.real + suffix.shape[1]
            positions = np.arange(seq.real, total, dtype=np.int64)[None]
            out = group.run(suffix, np.ones((1, total), np.int64), positions, seq.top_k)
            seq.real = total
            self._advance(group, out)
        for top_k, batch in fresh.items():
            lengths = np.array([len(s.spec.prompt_ids) for s in batch])
            width = int(lengths.max())
            ids = np.full((len(batch), width), self.info.pad_token_id, np.int64)
            for i, s in enumerate(batch):
                ids[i, width - lengths[i]:] = s.spec.prompt_ids
                s.real = int(lengths[i])
            mask = self._mask(width, lengths)
            positions = np.clip(mask.cumsum(-1) - 1, 0, None)
            group = CacheGroup(self.session, np.array([s.id for s in batch]))
            self._advance(group, group.run(ids, mask, positions, top_k))
            for s in batch:
                if self.hooks is not None:
                    self.hooks.on_prompt(len(s.spec.prompt_ids), 0)

    def _resume(self, seq: _Seq) -> CacheGroup | None:
        """The session's stored caches cut to the longest prefix they share with this prompt (at least one
        prompt token left to run), as a single-row group; None when there is nothing to reuse."""
        if seq.spec.session_id is None:
            return None
        entry = self.sessions.take(seq.spec.session_id)
        if entry is None:
            return None
        ids, top_k, group = entry
        prompt = seq.spec.prompt_ids
        common = 0
        for a, b in zip(ids, prompt[:-1]):
            if a != b:
                break
            common += 1
        if top_k != seq.top_k or common == 0:
            group.release()
            return None
        group.slice_positions(0, common)
        group.rows = np.array([seq.id], np.int64)
        seq.real = seq.handle.cached_tokens = common
        if self.hooks is not None:
            self.hooks.on_prompt(len(prompt), common)
        return group

    @staticmethod
    def _mask(length: int, real: np.ndarray) -> np.ndarray:
        """(rows, length) int64: each row's `real` positions right-aligned."""
        return (np.arange(length)[None] >= length - np.asarray(real)[:, None]).astype(np.int64)

    def _decode(self) -> None:
        """One decode step of every running group, then each group's rows advance."""
        groups, self._groups = self._groups, {}
        outputs = []
        for (_, top_k), group in groups.items():
            seqs = [self._running[r] for r in group.rows]
            real = np.array([s.real for s in seqs])
            tokens = np.array([[s.tokens[-1]] for s in seqs], np.int64)
            out = group.run(tokens, self._mask(group.length + 1, real + 1), real[:, None], top_k)
            for s in seqs:
                s.real += 1
            outputs.append((group, out))
        if self.hooks is not None:
            self.hooks.on_step(len(self._running))
        for group, out in outputs:
            self._advance(group, out)
        for group in self._groups.values():  # leading columns that are padding for every row go
            lead = group.length - max(self._running[r].real for r in group.rows)
            if lead > 0:
                group.slice_positions(lead)

    def _advance(self, group: CacheGroup, out: StepOutput) -> None:
        """Pick and emit each row's token; finished or cancelled rows leave (to their session's store or freed),
        rows due to freeze move to the frozen group, the rest join the running group of their kind."""
        seqs = [self._running[r] for r in group.rows]
        top_k = seqs[0].top_k  # one per group
        tokens = out.last_logits.argmax(-1)
        row_scalings = group.fixed_scalings if group.frozen else out.scalings[:, -1]
        leave = np.zeros(len(seqs), bool)
        freeze = np.zeros(len(seqs), bool)
        now = time.perf_counter()
        for j, s in enumerate(seqs):
            if s.spec.temperature > 0:
                tokens[j] = pick_tokens(out.last_logits[j:j + 1], True, s.spec.temperature, s.spec.top_p, s.rng)[0]
            if not s.handle.cancelled:
                self._emit(s, int(tokens[j]), row_scalings[j], now)
            leave[j] = s.finished or s.handle.cancelled
            freeze[j] = not leave[j] and not group.frozen and s.spec.freeze_after == len(s.tokens) - 1
        for j in np.flatnonzero(leave):
            s = self._running.pop(int(group.rows[j]))
            if s.handle.cancelled and not s.finished:
                self._on_cancel()
            elif s.spec.session_id is not None and not group.frozen:
                kept = group.take(np.arange(len(seqs)) == j)
                kept.slice_positions(kept.length - s.real)
                self.sessions.put(s.spec.session_id, (s.spec.prompt_ids + s.tokens)[:s.real], s.top_k, kept)
        if freeze.any():
            self._join(True, group.take(freeze, frozen=True, fixed_scalings=row_scalings[freeze].copy()), top_k)
        stay = ~leave & ~freeze
        if stay.all():
            self._join(group.frozen, group, top_k)
            return
        if stay.any():
            self._join(group.frozen, group.take(stay), top_k)
        group.release()

    def _join(self, frozen: bool, group: CacheGroup, top_k: int) -> None:
        """Merge a group into the running group of its kind, the shorter one left-padded."""
        key = (frozen, top_k)
        running = self._groups.get(key)
        if running is None:
            self._groups[key] = group
            return
        running.pad_left(group.length - running.length)
        group.pad_left(running.length - group.length)
        self._groups[key] = running.merge(group)

    def _emit(self, s: _Seq, token: int, scalings: np.ndarray, now: float) -> None:
        """Record a token, decide whether the request finishes, and hand the released text to the caller."""
        s.tokens.append(token)
        if self.hooks is not None:
            if len(s.tokens) == 1:
                self.hooks.on_first_token(now - s.submitted)
            else:
                self.hooks.on_token(now - s.last_time)
        s.last_time = now
        reason, text = None, ""
        if token in s.stop_ids:
            reason, text = "stop", s.pending
        else:
            piece = (s.decoder.step(self.session.tokenizer, token) or "") if s.decoder is not None else ""
            s.pending += piece
            hits = [i for i in (s.pending.find(stop) for stop in s.spec.stop) if i >= 0]
            if hits:
                reason, text = "stop", s.pending[:min(hits)]
            elif len(s.tokens) >= s.budget:
                reason, text = "length", s.pending
            else:
                hold = max((len(stop) for stop in s.spec.stop), default=1) - 1  # may begin a stop string
                text = s.pending[:max(0, len(s.pending) - hold)]
                s.pending = s.pending[len(text):]
        s.handle.completion_tokens = len(s.tokens)
        s.handle.finish_reason = reason
        if s.handle._loop is not None:
            self._outbox[s.handle._loop].append((s.handle, TokenOut(token, text, scalings.copy() if s.spec.scalings
                                                                    else None, reason)))

