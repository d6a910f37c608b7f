"""Generation over an exported X-LoRA graph: prompts in, tokens, text and per-token scalings out.

    validate the call -> one row per prompt -> the batch core (`batch.py`):
        prefill (prompts left padded, main graph, both caches) -> per step:
        pick tokens (greedy or sampling) -> stop checks -> drop finished rows (caches freed)
        -> rows reaching `freeze_scalings_after` move to the frozen graph (scaling cache dropped)
        -> each group runs its new tokens

`Generator.stream` yields one `TokenEvent` per new token; `Generator.generate` collects them. The server's
scheduler drives the same core, so both give the same tokens, texts and finish reasons.

Finish reasons: "stop_token", "stop_string", "length" (max_new_tokens reached) and "max_positions" (the
model's max_position_embeddings ended the sequence before max_new_tokens). Stop text is never released: a
stop id's text is not, and text that may begin a stop string is held back until it cannot (OpenAI's rule),
so the streamed and the final text end before the first stop string.

Threads: a `Generator` (and its `XLoraSession`) may be shared by threads generating at once. Each call's
state is its own; the scalings log receives a call's entries in one block when the call completes.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .batch import Batch, Row, Sampling, StopStrings, pick_tokens
from .errors import XLoraError, brief
from .logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from .scalings_log import save_scalings_arrays
from .session import XLoraSession

__all__ = ["Generation", "Generator", "TokenEvent", "pick_tokens"]

Prompt = str | Sequence[int]


@dataclass
class TokenEvent:
    """One new token of one sequence (what the streaming iterator yields)."""

    sequence: int  # index of the prompt
    step: int  # 0 for the first new token
    token: int
    text: str  # the text released with this token ('' inside a character or while it may begin a stop string)
    scalings: np.ndarray  # (L, n): the scalings of the position that chose this token (frozen ones once frozen)
    logits: np.ndarray | None  # (vocab,) when asked for
    finish_reason: str | None  # None, or on the last token "stop_token" / "stop_string" / "length" / "max_positions"
    logprob: TokenLogprob | None = None  # with `logprobs`
    prompt_logprobs: list[TokenLogprob] | None = None  # with `prompt_logprobs`, on step 0: prompt tokens 1..


@dataclass
class Generation:
    """The result of one prompt."""

    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # None when the export has no tokenizer
    scalings: np.ndarray | None = None  # (new tokens, L, n)
    logits: np.ndarray | None = None  # (new tokens, vocab) with return_logits
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per new token, with `logprobs`
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token after the first, with `prompt_logprobs`


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _is_list(value: Any) -> bool:
    """A sequence of items (a list, a tuple), not a string or bytes."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


@dataclass
class _Request:
    """A validated `stream` call."""

    encoded: list[list[int]]
    max_new_tokens: int  # after the cap by the model's positions
    position_capped: bool  # the cap cut max_new_tokens: the last token's finish reason is "max_positions"
    do_sample: bool
    temperature: float
    top_p: float
    seed: int | None
    stops: frozenset[int]  # stop ids
    stop_strings: list[str]
    top_k: int
    freeze_at: list[int | None]  # per prompt, None = never
    return_logits: bool
    sampling: Sampling = field(default_factory=Sampling)
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclass
class _CallLog:
    """One call's part of the scalings log: its entries and, per prompt, the tokens they chose."""

    entries: list[np.ndarray]
    prompts: list[dict[str, Any]]  # prompt_ids, tokens, pieces, finish_reason
    freeze_scalings_after: list[int | None]

    def add(self, events: list[TokenEvent]) -> None:
        for e in events:
            prompt = self.prompts[e.sequence]
            prompt["tokens"].append(e.token)
            prompt["pieces"].append(e.text)
            prompt["finish_reason"] = e.finish_reason


class Generator:
    """Generation with an `XLoraSession`; keeps an optional scalings log across calls.

    Several threads may share one Generator (and one session) and generate at once: each call's state is its
    own, `peak_cache_bytes` is that of the last call to end, and the log takes a call's entries in one block
    when the call completes (a call closed early or failed is not logged).
    """

    def __init__(self, session: XLoraSession) -> None:
        self.session = session
        self.log_scalings = False  # when True, every completed call appends its entries to the scalings log
        self.peak_cache_bytes = 0  # largest cache memory held during the last call to end
        self._log: list[np.ndarray] = []
        self._log_calls: list[_CallLog] = []
        self._log_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- scalings log
    @property
    def scalings_log(self) -> list[np.ndarray]:
        """The log (a new list), laid out as the eager model logs: per logged call its prefill (b, p, L, n),
        then one (b, 1, L, n) per decode step, every row in prompt order (NaN for a row that has finished)."""
        with self._log_lock:
            return list(self._log)

    def clear_scalings_log(self) -> None:
        """Empty the log."""
        with self._log_lock:
            self._log, self._log_calls = [], []

    def flush_log_scalings(self, path: str) -> list[str]:
        """Write the log in the eager model's file format (`load_scalings_log` reads it), with the calls'
        tokens and their texts in `PATH-tokens.json` (what `xlora-plot-scalings` labels its plots with).

        Returns:
            The files written.
        Raises:
            XLoraError: an empty log, a path with an extension.
        """
        with self._log_lock:
            log, calls = list(self._log), list(self._log_calls)
        tokenizer = self.session.tokenizer
        info = self.session.info
        records, first = [], 0
        for call in calls:
            if tokenizer is None:
                prompts = [dict(p, pieces=None, prompt_pieces=None) for p in call.prompts]
            else:
                prompts = [dict(p, prompt_pieces=[tokenizer.decode([t]) for t in p["prompt_ids"]])
                           for p in call.prompts]
            records.append(dict(first_entry=first, entries=len(call.entries),
                                freeze_scalings_after=call.freeze_scalings_after, prompts=prompts))
            first += len(call.entries)
        record = dict(graph=os.path.abspath(info.path), expert_names=info.expert_names,
                      module_names=info.module_names, calls=records)
        return save_scalings_arrays(log, path, tokens_record=record)

    # ------------------------------------------------------------------------------------------- inputs
    def encode(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        """Prompts (a text, a list of ids, or a list of either) as validated id lists.

        Raises:
            XLoraError: anything else, an empty prompt, ids outside the vocabulary, too many tokens.
        """
        if isinstance(prompts, str) or (_is_list(prompts) and prompts and _is_int(prompts[0])):
            prompts = [prompts]
        if not _is_list(prompts) or len(prompts) == 0:
            raise XLoraError(f"prompts={brief(prompts)}: expected a string, a list of token ids, or a non-empty list "
                             f"of either")
        encoded = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids = self._encode_text(prompt, i)
            elif _is_list(prompt):
                ids = list(prompt)
            else:
                raise XLoraError(f"prompt {i}: expected a string or a list of token ids, got {brief(prompt)}")
            encoded.append(self.session.check_ids(ids, f"prompt {i}"))
        return encoded

    def _encode_text(self, text: str, i: int) -> list[int]:
        tokenizer = self.session.tokenizer
        if tokenizer is None:
            raise XLoraError(f"{self.session.info.path}: no tokenizer travelled with this export; give token ids")
        if not text:
            return []
        try:
            return tokenizer.encode(text).ids
        except Exception as e:  # the tokenizers library raises TypeError (lone surrogates) and its own errors
            reason = (str(e).splitlines() or [""])[0][:120]
            raise XLoraError(f"prompt {i}: the tokenizer cannot encode it ({type(e).__name__}: {reason})") from None

    def _stop_ids(self, stop_token_ids: int | Sequence[int] | None) -> frozenset[int]:
        info = self.session.info
        if stop_token_ids is None:
            return frozenset(int(i) for i in info.eos_token_ids)
        ids = [stop_token_ids] if _is_int(stop_token_ids) else stop_token_ids
        if not _is_list(ids):
            raise XLoraError(f"stop_token_ids={brief(stop_token_ids)}: expected None, a token id or a list of them")
        bad = [i for i in ids if not _is_int(i) or not 0 <= i < info.vocab_size]
        if bad:
            raise XLoraError(f"stop_token_ids: {brief(bad[0])} is not a token id in 0..{info.vocab_size - 1}")
        return frozenset(int(i) for i in ids)

    def _stop_strings(self, stop_strings: str | Sequence[str] | None) -> list[str]:
        strings = [stop_strings] if isinstance(stop_strings, str) else [] if stop_strings is None else stop_strings
        if not _is_list(strings):
            raise XLoraError(f"stop_strings={brief(stop_strings)}: expected a string or a list of strings")
        for s in strings:
            if not isinstance(s, str) or not s:
                raise XLoraError(f"stop_strings: {brief(s)} is not a non-empty string")
        if strings and self.session.tokenizer is None:
            raise XLoraError("stop_strings need the tokenizer, and none travelled with this export")
        return list(strings)

    def _freeze_steps(self, freeze_scalings_after: int | Sequence[int | None] | None, b: int) -> list[int | None]:
        if freeze_scalings_after is None or _is_int(freeze_scalings_after):
            values = [freeze_scalings_after] * b
        elif _is_list(freeze_scalings_after):
            values = list(freeze_scalings_after)
        else:
            raise XLoraError(f"freeze_scalings_after={brief(freeze_scalings_after)}: expected None, an int >= 0, "
                             f"or one such value per prompt")
        if len(values) != b:
            raise XLoraError(f"freeze_scalings_after: {len(values)} values for {b} prompts")
        for v in values:
            if v is not None and (not _is_int(v) or v < 0):
                raise XLoraError(f"freeze_scalings_after={brief(v)}: expected None or an int >= 0")
        if any(v is not None for v in values):
            self.session.frozen  # noqa: B018 - opens OUT.frozen.onnx, or raises the clear error now
        return [None if v is None else int(v) for v in values]

    def _request(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int, do_sample: bool, temperature: float,
                 top_p: float, seed: int | None, stop_token_ids: int | Sequence[int] | None,
                 stop_strings: str | Sequence[str] | None, expert_top_k: int | None,
                 freeze_scalings_after: int | Sequence[int | None] | None, return_logits: bool) -> _Request:
        """Validate a `stream` call; every mistake is an XLoraError raised here, before anything runs."""
        info = self.session.info
        encoded = self.encode(prompts)
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise XLoraError(f"max_new_tokens={brief(max_new_tokens)}: expected an int >= 1")
        if not isinstance(do_sample, (bool, np.bool_)):
            raise XLoraError(f"do_sample={brief(do_sample)}: expected True or False")
        if not _is_number(temperature) or (do_sample and not (math.isfinite(temperature) and temperature > 0)):
            raise XLoraError(f"temperature={brief(temperature)}: expected a finite number > 0 when sampling")
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise XLoraError(f"top_p={brief(top_p)}: expected 0 < top_p <= 1")
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise XLoraError(f"seed={brief(seed)}: expected None or an int >= 0")
        if not isinstance(return_logits, (bool, np.bool_)):
            raise XLoraError(f"return_logits={brief(return_logits)}: expected True or False")
        stops, strings = self._stop_ids(stop_token_ids), self._stop_strings(stop_strings)
        top_k = self.session.check_top_k(info.default_top_k if expert_top_k is None else expert_top_k)
        freeze_at = self._freeze_steps(freeze_scalings_after, len(encoded))
        width = max(len(p) for p in encoded)
        # the last chosen token is never fed back: width + max_new_tokens - 1 positions are processed
        capped = min(int(max_new_tokens), info.max_positions - width + 1)
        return _Request(encoded, capped, capped < max_new_tokens, bool(do_sample), float(temperature), float(top_p),
                        None if seed is None else int(seed), stops, strings, top_k, freeze_at, bool(return_logits))

    # ------------------------------------------------------------------------------------------- generation
    def stream(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 32, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
               stop_token_ids: int | Sequence[int] | None = None, stop_strings: str | Sequence[str] | None = (),
               expert_top_k: int | None = None, freeze_scalings_after: int | Sequence[int | None] | None = None,
               return_logits: bool = False, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               min_tokens: int = 0, logprobs: int | None = None,
               prompt_logprobs: bool = False) -> Iterator[TokenEvent]:
        """Generate, yielding each new token as soon as it is chosen (a step's tokens in prompt order).

        Args:
            prompts: a text, a list of ids, or a list of either (a batch; left padded internally).
            max_new_tokens: per sequence. The model's positions also bound it: a sequence cut by them ends
                with finish reason "max_positions".
            do_sample, temperature, top_p, seed: sampling (greedy by default); `seed` makes it reproducible.
            stop_token_ids: default the export's eos ids; [] never stops on a token.
            stop_strings: stop once the generated text contains one of them (needs the tokenizer); the text
                ends before it, and no part of it is ever yielded.
            expert_top_k: experts kept per token and module, 0 = dense (default: the model's top_k_lora).
            freeze_scalings_after: None, or k (or one value per prompt): after k decode steps the
                sequence's scalings are frozen at its latest token and it continues on OUT.frozen.onnx.
            return_logits: include each step's logits in the events.
            top_k, min_p: when sampling, only the k most likely tokens (0: all), and only tokens at least min_p
                times as likely as the most likely one (0: all).
            repetition_penalty: logits of tokens already in the sequence (prompt included) divided by it when
                positive, multiplied when negative (1: none; greedy too).
            min_tokens: the stop ids cannot be chosen before this many new tokens.
            logprobs: None, or k in 0..20: each event carries its token's log-probability under the model's
                distribution (the raw logits' log-softmax, before temperature and the sampling options) and the
                k most likely tokens (`TokenLogprob`).
            prompt_logprobs: the first event of each sequence also carries its prompt tokens' log-probabilities
                (every token after the first; top `logprobs` or 0). Without a graph exported with --all-logits,
                the prompts then run one position per graph run.
        Returns:
            An iterator of `TokenEvent`s. Closing it early (`close()`, or dropping it) frees the caches at once.
        Raises:
            XLoraError: bad prompts or options, raised by this call (before the iterator runs anything).
        """
        request = self._request(prompts, max_new_tokens, do_sample, temperature, top_p, seed, stop_token_ids,
                                stop_strings, expert_top_k, freeze_scalings_after, return_logits)
        request.sampling = Sampling(top_k, min_p, repetition_penalty, min_tokens).check()
        if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise XLoraError(f"logprobs={brief(logprobs)}: expected None or an int in 0..{MAX_TOP_LOGPROBS}")
        if not isinstance(prompt_logprobs, (bool, np.bool_)):
            raise XLoraError(f"prompt_logprobs={brief(prompt_logprobs)}: expected True or False")
        request.logprobs = None if logprobs is None else int(logprobs)
        request.prompt_logprobs = bool(prompt_logprobs)
        return self._run(request)

    def _run(self, r: _Request) -> Iterator[TokenEvent]:
        """The generation loop of `stream`, on a validated request. Its caches are released however it ends."""
        info = self.session.info
        b = len(r.encoded)
        rng = np.random.default_rng(r.seed)  # one stream of draws for the call, taken in row order each step
        rows = [Row(id=i, prompt_ids=prompt, budget=r.max_new_tokens, capped=r.position_capped, top_k=r.top_k,
                    temperature=r.temperature if r.do_sample else 0.0, top_p=r.top_p, rng=rng, sampling=r.sampling,
                    stop_ids=r.stops,
                    stop=StopStrings(r.stop_strings), freeze_after=r.freeze_at[i], logprobs=r.logprobs,
                    prompt_logprobs=r.prompt_logprobs)
                for i, prompt in enumerate(r.encoded)]
        log = None
        if self.log_scalings:
            log = _CallLog([], [dict(prompt_ids=p, tokens=[], pieces=[], finish_reason=None) for p in r.encoded],
                           list(r.freeze_at))
        batch = Batch(self.session)
        try:
            # every position the graph will see (the last token's is not), allocated once by in-place graphs
            tokens = batch.prefill(rows, reserve=max(len(p) for p in r.encoded) + r.max_new_tokens - 1)
            if log is not None:  # the prefill's entry: every prompt position (b, width, L, n)
                log.entries.append(np.stack([t.run_scalings for t in sorted(tokens, key=lambda t: t.row.id)]))
            while True:
                events = [TokenEvent(t.row.id, t.step, t.token, t.text, t.scalings.copy(),
                                     t.logits.copy() if r.return_logits else None, t.finish_reason, t.logprob,
                                     t.prompt_logprobs)
                          for t in sorted(tokens, key=lambda t: t.row.id)]
                if log is not None:
                    log.add(events)
                if not batch.rows:  # complete: logged before the last events, which a consumer may not outlive
                    self._end_call(log, batch.peak_bytes)
                    yield from events
                    return
                yield from events
                tokens = batch.decode()
                if log is not None:  # a finished row is NaN; a frozen one logs its fixed scalings, as the eager model
                    entry = np.full((b, 1, info.n_modules, info.n_experts), np.nan, np.float32)
                    for t in tokens:
                        entry[t.row.id, 0] = t.scalings
                    log.entries.append(entry)
        finally:
            batch.release()
            self.peak_cache_bytes = batch.peak_bytes

    def _end_call(self, log: _CallLog | None, peak: int) -> None:
        """A call completed: its peak cache memory, and its part of the log appended in one block."""
        self.peak_cache_bytes = peak
        if log is not None:
            with self._log_lock:
                self._log.extend(log.entries)
                self._log_calls.append(log)

    def generate(self, prompts: Prompt | Sequence[Prompt], on_token: Callable[[TokenEvent], None] | None = None,
                 **options: Any) -> list[Generation]:
        """Generate to completion; one `Generation` per prompt (options as in `stream`).

        Args:
            on_token: called with each `TokenEvent` as it comes (e.g. to print a stream while collecting).
        Raises:
            XLoraError: bad prompts or options. Whatever `on_token` raises propagates, the caches freed.
        """
        encoded = self.encode(prompts)
        results = [Generation(prompt_ids=p) for p in encoded]
        steps: list[list[TokenEvent]] = [[] for _ in encoded]
        with contextlib.closing(self.stream(encoded, **options)) as stream:  # an exception frees the caches now
            for event in stream:
                steps[event.sequence].append(event)
                if on_token is not None:
                    on_token(event)
        has_text = self.session.tokenizer is not None
        for result, events in zip(results, steps):
            result.tokens = [e.token for e in events]
            result.text = "".join(e.text for e in events) if has_text else None
            result.scalings = np.stack([e.scalings for e in events])
            if options.get("return_logits"):
                result.logits = np.stack([e.logits for e in events])
            result.finish_reason = events[-1].finish_reason
            if options.get("logprobs") is not None:
                result.logprobs = [e.logprob for e in events]
            if options.get("prompt_logprobs"):
                result.prompt_logprobs = events[0].prompt_logprobs
        return results
