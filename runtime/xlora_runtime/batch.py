"""The batch core: rows of generation over the runtime's cache groups, shared by the `Generator` (one call's
prompts) and the server's `Scheduler` (requests that join and leave between steps).

    Batch.prefill(rows)     prompts left padded to one width, one new group per top_k, run
    Batch.extend(row, grp)  a row's stored caches (a conversation's earlier turns) run the rest of its prompt
    Batch.decode()          every group runs its rows' last tokens
    after each run, per row: pick the token (greedy or sampling) -> stop id, stop strings (held-back text),
        max new tokens -> a `Token` out; then finished rows leave (caches freed, or handed to `retire`), rows
        due to freeze move to the frozen group, the rest join the running group of their kind (key
        (frozen, top_k); the shorter group left padded, `CacheGroup.pad_left`)
    Batch.release()         every cache freed, however the caller's loop ends

Every row holds its real positions right-aligned in its group (padding on the left only): its attention mask is
`[0] * (length - real) + [1] * real` and the graph's positions (`cumsum(mask) - 1`) are the row's own, so a row
gets the tokens it gets alone, whatever joins or leaves its group.

Finish reasons, the runtime's one vocabulary (the server maps them to OpenAI's at its edge):
    "stop_token"     the row chose one of its stop ids (the token's text is not released)
    "stop_string"    the text completed one of its stop strings (the released text ends before it)
    "length"         the row's max new tokens
    "max_positions"  the model's max_position_embeddings ended the row before its max new tokens
    "cancelled"      the caller gave up on the row (`Row.is_cancelled`); it leaves with no token
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .kv_cache import CacheGroup, StepOutput
from .session import XLoraSession

__all__ = ["FINISH_REASONS", "Batch", "Row", "StopStrings", "Token", "left_padded", "pick_tokens",
           "right_aligned_mask"]

FINISH_REASONS = ("stop_token", "stop_string", "length", "max_positions", "cancelled")


def pick_tokens(logits: np.ndarray, do_sample: bool, temperature: float, top_p: float,
                rng: np.random.Generator) -> np.ndarray:
    """Next token of each row: argmax, or a sample after temperature and top-p (nucleus) filtering.

    Args:
        logits: (g, vocab) float32.
    Returns:
        (g,) int64.
    """
    if not do_sample:
        return logits.argmax(-1)
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # <= 0 before dividing: a tiny temperature gives -inf (probability 0), no NaN
        z = (z - z.max(-1, keepdims=True)) / temperature
    probs = np.exp(z)
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        drop_sorted = np.cumsum(sorted_probs, -1) - sorted_probs >= top_p  # keep the smallest set reaching top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=p) for p in probs], dtype=np.int64)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompts as one prefill step: ids, attention mask and positions, each (b, width) int64, padding on the left
    (mask 0, position 0 there; the real positions count from 0)."""
    lengths = np.array([len(p) for p in prompts])
    width = int(lengths.max())
    ids = np.full((len(prompts), width), pad_id, np.int64)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = prompt
    mask = right_aligned_mask(width, lengths)
    return ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None)


def right_aligned_mask(length: int, real: np.ndarray) -> np.ndarray:
    """(rows, length) int64: each row's `real` positions right-aligned (1), padding before them (0)."""
    return (np.arange(length)[None] >= length - np.asarray(real)[:, None]).astype(np.int64)


class StopStrings:
    """One row's decoded text, released as it grows except for its end while that may begin a stop string
    (OpenAI's rule: no part of a stop string is ever released), and cut where the first stop string it completes
    begins.

    What is held is shorter than the longest stop string, so a token's work depends on the stop strings and the
    token's own text, never on the length of the sequence.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Add one token's text.

        Returns:
            The text released now, and whether a stop string is complete (the released text then ends where the
            first complete stop string begins, and nothing follows it).
        """
        text = self.held + piece
        starts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if starts:
            self.held = ""
            return text[:min(starts)], True
        # every earlier occurrence was caught when it completed: one completed now begins in `held` or `piece`
        keep = self._partial(text)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def _partial(self, text: str) -> int:
        """The length of the longest end of `text` that begins a stop string (0: none does)."""
        for n in range(min(len(text), self.longest - 1), 0, -1):
            end = text[-n:]
            if any(s.startswith(end) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        """The held text, released: the row ended otherwise (stop id, max new tokens)."""
        text, self.held = self.held, ""
        return text


@dataclass(eq=False, kw_only=True)
class Row:
    """One sequence in a batch: what its caller asked for and where it stands.

    Attributes:
        id: the row's key, unique in its batch (a `CacheGroup.rows` entry).
        prompt_ids: the prompt's token ids.
        budget: new tokens at most; `capped`: the budget is what the model's positions allow, less than asked
            (its end is then "max_positions", else "length").
        top_k: experts kept per token and module (0 = dense).
        temperature: 0 = greedy; > 0 samples after temperature and `top_p`, with `rng` (rows may share one).
        stop_ids: token ids that end the row; `stop`: its stop strings and held-back text.
        freeze_after: after this many decode steps the row's scalings freeze (the frozen graph); None = never.
        keep_cache: on finishing (not cancelled, not frozen), hand its caches to the batch's `retire`.
        tokens, real, finish_reason: the new tokens so far, the positions the row holds in its group's caches
            (prompt and fed tokens), and why it ended (None while it runs).
    """

    id: int
    prompt_ids: list[int]
    budget: int
    capped: bool = False
    top_k: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    rng: np.random.Generator | None = None
    stop_ids: frozenset[int] = frozenset()
    stop: StopStrings = field(default_factory=StopStrings)
    freeze_after: int | None = None
    keep_cache: bool = False
    tokens: list[int] = field(default_factory=list)
    real: int = 0
    finish_reason: str | None = None
    decoder: Any = None  # the tokenizer's DecodeStream (set when the row joins a batch), None without a tokenizer

    def is_cancelled(self) -> bool:
        """Whether the caller gave up on the row (read between steps; a `Generator` call's rows never are)."""
        return False


@dataclass
class Token:
    """One new token of one row, as a run of its group chose it."""

    row: Row
    step: int  # 0 for the row's first new token
    token: int
    text: str  # released with this token: '' while it ends inside a character or may begin a stop string
    scalings: np.ndarray  # (L, n), a view: the position that chose the token (a frozen group's fixed ones)
    logits: np.ndarray  # (vocab,), a view: the logits that chose it
    finish_reason: str | None  # None, or the row's end (one of FINISH_REASONS but "cancelled")
    run_scalings: np.ndarray | None  # (s, L, n), a view: every position this run fed for the row; None if frozen


@contextlib.contextmanager
def _released_on_error(groups: list[CacheGroup]) -> Iterator[None]:
    """Groups that are not running groups (yet): freed at once if what they are used for fails."""
    try:
        yield
    except BaseException:
        for group in groups:
            group.release()
        raise


class Batch:
    """Rows and their cache groups (see the module docstring).

    Args:
        session: the loaded graph.
        trim: after each decode step, cut the leading columns that are padding for every row of a group (a
            long-lived batch, whose length must follow its live rows; a `Generator` call's ends anyway).
        retire: called with each row that leaves (finished or cancelled), and with a single-row group of its
            caches (padding cut) when it finished with `keep_cache` in a granular group, else None.
    """

    def __init__(self, session: XLoraSession, trim: bool = False,
                 retire: Callable[[Row, CacheGroup | None], None] | None = None) -> None:
        self.session = session
        self.trim = trim
        self.retire = retire
        self.rows: dict[int, Row] = {}
        self.groups: dict[tuple[bool, int], CacheGroup] = {}
        self.peak_bytes = 0  # the most cache memory the batch held, right after a run

    def prefill(self, rows: list[Row], reserve: int = 0) -> list[Token]:
        """Run new rows' prompts (one left-padded group per top_k) and take their first tokens.

        Args:
            reserve: positions to allocate at once in the buffers of a graph that writes in place (a caller
                that knows the final length); 0: grown when needed.
        """
        by_top_k: dict[int, list[Row]] = collections.defaultdict(list)
        for row in rows:
            by_top_k[row.top_k].append(self._add(row))
        tokens = []
        for top_k, same in by_top_k.items():
            ids, mask, positions = left_padded([r.prompt_ids for r in same], self.session.info.pad_token_id)
            group = CacheGroup(self.session, np.array([r.id for r in same], np.int64))
            with _released_on_error([group]):
                if reserve:
                    group.reserve(reserve)
                out = group.run(ids, mask, positions, top_k)
                for r in same:
                    r.real = len(r.prompt_ids)
                self._peak(group)
                tokens += self._accept(group, out)
        return tokens

    def extend(self, row: Row, group: CacheGroup) -> list[Token]:
        """A new row whose first `row.real` prompt positions are already in `group` (one row, no padding): run the
        rest of its prompt on them and take its first token."""
        self._add(row)
        group.rows = np.array([row.id], np.int64)
        suffix = np.array([row.prompt_ids[row.real:]], np.int64)
        total = row.real + suffix.shape[1]
        positions = np.arange(row.real, total, dtype=np.int64)[None]
        with _released_on_error([group]):
            out = group.run(suffix, np.ones((1, total), np.int64), positions, row.top_k)
            row.real = total
            self._peak(group)
            return self._accept(group, out)

    def decode(self) -> list[Token]:
        """One decode step: every group runs its rows' last tokens; then each row's next token."""
        outputs = []
        for (_, top_k), group in sorted(self.groups.items(), key=lambda item: item[0]):  # granular first
            rows = [self.rows[r] for r in group.rows]
            real = np.array([r.real for r in rows])
            last = np.array([[r.tokens[-1]] for r in rows], np.int64)
            outputs.append((group, group.run(last, right_aligned_mask(group.length + 1, real + 1), real[:, None],
                                             top_k)))
            for r in rows:
                r.real += 1
        self._peak()
        self.groups = {}  # each group joins again as `_accept` sorts its rows
        tokens = []
        with _released_on_error([group for group, _ in outputs]):
            for group, out in outputs:
                tokens += self._accept(group, out)
        if self.trim:
            for group in self.groups.values():
                lead = group.length - max(self.rows[r].real for r in group.rows)
                if lead > 0:
                    group.slice_positions(lead)
        return tokens

    def release(self) -> None:
        """Free every cache and forget every row (the batch can start again)."""
        for group in self.groups.values():
            group.release()
        self.groups.clear()
        self.rows.clear()

    def nbytes(self) -> int:
        """Bytes held by the batch's running groups."""
        return sum(group.nbytes() for group in self.groups.values())

    # ------------------------------------------------------------------------------------------- rows
    def _add(self, row: Row) -> Row:
        tokenizer = self.session.tokenizer
        if tokenizer is not None:
            from tokenizers.decoders import DecodeStream

            row.decoder = DecodeStream(skip_special_tokens=True)
        self.rows[row.id] = row
        return row

    def _peak(self, *ran: CacheGroup) -> None:
        """Groups just run (not among the running groups yet): the memory held now, with the running groups."""
        self.peak_bytes = max(self.peak_bytes, self.nbytes() + sum(group.nbytes() for group in ran))

    def _accept(self, group: CacheGroup, out: StepOutput) -> list[Token]:
        """After `group` ran: each row's token; finished and cancelled rows leave, rows due to freeze move to the
        frozen group, the rest join the running group of their kind."""
        rows = [self.rows[r] for r in group.rows]
        greedy = out.last_logits.argmax(-1)
        row_scalings = group.fixed_scalings if group.frozen else out.scalings[:, -1]
        leave = np.zeros(len(rows), bool)
        freeze = np.zeros(len(rows), bool)
        tokens = []
        for j, row in enumerate(rows):
            if row.is_cancelled():
                row.finish_reason = "cancelled"
            else:
                token = int(greedy[j]) if row.temperature <= 0 else int(
                    pick_tokens(out.last_logits[j:j + 1], True, row.temperature, row.top_p, row.rng)[0])
                tokens.append(self._choose(row, token, row_scalings[j], out.last_logits[j],
                                           None if group.frozen else out.scalings[j]))
            leave[j] = row.finish_reason is not None
            freeze[j] = not leave[j] and not group.frozen and row.freeze_after == len(row.tokens) - 1
        for j in np.flatnonzero(leave):
            row = self.rows.pop(int(group.rows[j]))
            kept = None
            if row.keep_cache and row.finish_reason != "cancelled" and not group.frozen:
                kept = group.take(np.arange(len(rows)) == j)
                kept.slice_positions(kept.length - row.real)
            if self.retire is not None:
                self.retire(row, kept)
            elif kept is not None:
                kept.release()
        top_k = rows[0].top_k  # one per group
        if freeze.any():
            self._join(True, group.take(freeze, frozen=True, fixed_scalings=row_scalings[freeze].copy()), top_k)
        stay = ~leave & ~freeze
        if stay.all():
            self._join(group.frozen, group, top_k)
            return tokens
        if stay.any():
            self._join(group.frozen, group.take(stay), top_k)
        group.release()
        return tokens

    def _choose(self, row: Row, token: int, scalings: np.ndarray, logits: np.ndarray,
                run_scalings: np.ndarray | None) -> Token:
        """Record a row's token, decide whether the row ends, and release its text."""
        row.tokens.append(token)
        reason = None
        if token in row.stop_ids:
            reason, text = "stop_token", row.stop.flush()
        else:
            piece = (row.decoder.step(self.session.tokenizer, token) or "") if row.decoder is not None else ""
            text, stopped = row.stop.push(piece)
            if stopped:
                reason = "stop_string"
            elif len(row.tokens) >= row.budget:
                reason, text = "max_positions" if row.capped else "length", text + row.stop.flush()
        row.finish_reason = reason
        return Token(row, len(row.tokens) - 1, token, text, scalings, logits, reason, run_scalings)

    def _join(self, frozen: bool, group: CacheGroup, top_k: int) -> None:
        """Merge a group into the running group of its kind, the shorter one left padded."""
        key = (frozen, top_k)
        running = self.groups.get(key)
        if running is None:
            self.groups[key] = group
            return
        running.pad_left(group.length - running.length)
        group.pad_left(running.length - group.length)
        self.groups[key] = running.merge(group)
