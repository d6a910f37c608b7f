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

from .errors import XLoraError, brief
from .format import contract as C
from .kv_cache import CacheGroup, StepOutput
from .logprobs import TokenLogprob, token_logprobs
from .session import XLoraSession

__all__ = ["FINISH_REASONS", "Batch", "Row", "Sampling", "StopStrings", "Token", "left_padded", "pick_tokens",
           "right_aligned_mask"]

FINISH_REASONS = ("stop_token", "stop_string", "length", "max_positions", "cancelled")


@dataclass(frozen=True)
class Sampling:
    """The sampling extensions of vLLM that the token choice honours exactly (each neutral by default).

    Attributes:
        top_k: sample among the k most likely tokens only (0: all; ties with the k-th are kept).
        min_p: drop tokens whose probability is below min_p x the most likely one's (0: none dropped).
        repetition_penalty: the logits of tokens already in the row (prompt and new tokens) divided by it when
            positive, multiplied when negative (1: none); applies to greedy choice too.
        min_tokens: the row's stop ids cannot be chosen before this many new tokens (0: from the first).
    """

    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0

    def check(self) -> Sampling:
        """This object, validated.

        Raises:
            XLoraError: a field out of its range, named.
        """
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise XLoraError(f"top_k={brief(self.top_k)}: expected an int >= 0 (0 = every token)")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise XLoraError(f"min_p={brief(self.min_p)}: expected 0 <= min_p <= 1")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise XLoraError(f"repetition_penalty={brief(self.repetition_penalty)}: expected a number > 0 (1 = none)")
        if not isinstance(self.min_tokens, (int, np.integer)) or isinstance(self.min_tokens, bool) or \
                self.min_tokens < 0:
            raise XLoraError(f"min_tokens={brief(self.min_tokens)}: expected an int >= 0")
        return self


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and bool(np.isfinite(value))


def pick_tokens(logits: np.ndarray, do_sample: bool, temperature: float, top_p: float,
                rng: np.random.Generator | None, *, top_k: int = 0, min_p: float = 0.0,
                repetition_penalty: float = 1.0, seen: np.ndarray | None = None,
                banned: Sequence[int] = ()) -> np.ndarray:
    """Next token of each row: argmax, or a sample; vLLM's order: repetition penalty and `banned` ids on the
    logits, then temperature, min-p, top-k and top-p (nucleus) filtering of the probabilities.

    Args:
        logits: (g, vocab) float32.
        seen: (g, vocab) bool, the tokens each row holds (needed when repetition_penalty != 1).
        banned: token ids that cannot be chosen (a row's stop ids before its `min_tokens`).
    Returns:
        (g,) int64.
    """
    if repetition_penalty != 1.0 or len(banned):
        logits = logits.astype(np.float64)
        if repetition_penalty != 1.0:
            penalized = np.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
            logits = np.where(seen, penalized, logits)
        if len(banned):
            logits[:, np.asarray(banned, np.int64)] = -np.inf
    if not do_sample:
        return logits.argmax(-1)
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # <= 0 before dividing: a tiny temperature gives -inf (probability 0), no NaN
        z = (z - z.max(-1, keepdims=True)) / temperature
    probs = np.exp(z)
    probs /= probs.sum(-1, keepdims=True)
    if min_p > 0.0:
        probs = np.where(probs < min_p * probs.max(-1, keepdims=True), 0.0, probs)
    if 0 < top_k < probs.shape[-1]:
        kth = np.partition(probs, -top_k, axis=-1)[:, -top_k:].min(-1, keepdims=True)
        probs = np.where(probs < kth, 0.0, probs)
    if min_p > 0.0 or 0 < top_k < probs.shape[-1]:
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
        sampling: vLLM's extensions of the token choice (`Sampling`); `seen`: (vocab,) bool, the tokens the row
            holds, kept while its repetition penalty is not 1.
        stop_ids: token ids that end the row; `stop`: its stop strings and held-back text.
        freeze_after: after this many decode steps the row's scalings freeze (the frozen graph); None = never.
        keep_cache: on finishing (not cancelled, not frozen), hand its caches to the batch's `retire`.
        logprobs: None, or k: each new token's log-probability and the k most likely tokens (`logprobs.py`).
        prompt_logprobs: also each prompt token's after the first, with the row's first token (its prompt then
            runs one position per graph run, unless the graph was exported with --all-logits).
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
    sampling: Sampling = field(default_factory=Sampling)
    seen: np.ndarray | None = None
    stop_ids: frozenset[int] = frozenset()
    stop: StopStrings = field(default_factory=StopStrings)
    freeze_after: int | None = None
    keep_cache: bool = False
    tokens: list[int] = field(default_factory=list)
    real: int = 0
    finish_reason: str | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False
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
    logprob: TokenLogprob | None = None  # with `Row.logprobs`
    prompt_logprobs: list[TokenLogprob] | None = None  # the first token of a `Row.prompt_logprobs` row: prompt[1:]'s


def _run_every_position(group: CacheGroup, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                        top_k: int) -> StepOutput:
    """A new group's prompts (g, s) run with the logits of every position in the output's `logits` (g, s, vocab):
    one run of a graph exported with --all-logits, else one run per position (what a decode step runs)."""
    if group.session.info.logits == C.LOGITS_ALL:
        return group.run(ids, mask, positions, top_k)
    outs = [group.run(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], top_k) for t in range(ids.shape[1])]
    return StepOutput(outs[-1].last_logits, np.concatenate([o.scalings for o in outs], 1),
                      np.stack([o.last_logits for o in outs], 1))


def _prompt_logprobs(row: Row, logits: np.ndarray) -> list[TokenLogprob]:
    """Each prompt token's log-probability after the first (with the row's top k), from the (width, vocab) logits
    of its left-padded prompt."""
    n = len(row.prompt_ids)
    return token_logprobs(logits[logits.shape[0] - n:-1], row.prompt_ids[1:], row.logprobs or 0)


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
        by_kind: dict[tuple[int, bool], list[Row]] = collections.defaultdict(list)
        for row in rows:
            by_kind[row.top_k, row.prompt_logprobs].append(self._add(row))
        tokens = []
        for (top_k, scored), same in by_kind.items():
            ids, mask, positions = left_padded([r.prompt_ids for r in same], self.session.info.pad_token_id)
            group = CacheGroup(self.session, np.array([r.id for r in same], np.int64))
            with _released_on_error([group]):
                if reserve:
                    group.reserve(reserve)
                out = _run_every_position(group, ids, mask, positions, top_k) if scored else \
                    group.run(ids, mask, positions, top_k)
                for r in same:
                    r.real = len(r.prompt_ids)
                self._peak(group)
                prompt = {r.id: _prompt_logprobs(r, out.logits[j]) for j, r in enumerate(same)} if scored else {}
                new = self._accept(group, out)
                for t in new:
                    t.prompt_logprobs = prompt.get(t.row.id)
                tokens += new
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
                token = self._pick(row, out.last_logits[j], int(greedy[j]))
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

    def _pick(self, row: Row, logits: np.ndarray, greedy: int) -> int:
        """A row's token from its (vocab,) logits; `greedy` is their argmax (what plain greedy rows take)."""
        s = row.sampling
        banned = sorted(row.stop_ids) if len(row.tokens) < s.min_tokens else ()
        if row.temperature <= 0 and s.repetition_penalty == 1.0 and not banned:
            return greedy
        if s.repetition_penalty != 1.0 and row.seen is None:
            row.seen = np.zeros(logits.shape[-1], bool)
            row.seen[np.asarray(row.prompt_ids + row.tokens, np.int64)] = True
        return int(pick_tokens(logits[None], row.temperature > 0, row.temperature, row.top_p, row.rng, top_k=s.top_k,
                               min_p=s.min_p, repetition_penalty=s.repetition_penalty,
                               seen=None if row.seen is None else row.seen[None], banned=banned)[0])

    def _choose(self, row: Row, token: int, scalings: np.ndarray, logits: np.ndarray,
                run_scalings: np.ndarray | None) -> Token:
        """Record a row's token, decide whether the row ends, and release its text."""
        row.tokens.append(token)
        if row.seen is not None:
            row.seen[token] = True
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
        logprob = None if row.logprobs is None else token_logprobs(logits[None], [token], row.logprobs)[0]
        return Token(row, len(row.tokens) - 1, token, text, scalings, logits, reason, run_scalings, logprob)

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
