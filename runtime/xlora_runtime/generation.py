"""Generation over an exported X-LoRA graph: prompts in, tokens, text and per-token scalings out.

    encode + left-pad prompts -> prefill (main graph, both caches) -> per step:
        pick tokens (greedy or sampling) -> stop checks -> drop finished rows (caches freed)
        -> rows reaching `freeze_scalings_after` move to the frozen graph (scaling cache dropped)
        -> each group runs its new tokens

`Generator.stream` yields one `TokenEvent` per new token; `Generator.generate` collects them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import XLoraError
from .kv_cache import CacheGroup
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
    text: str  # the text this token completes ('' when it ends inside a character)
    scalings: np.ndarray  # (L, n): the scalings of the position that chose this token (frozen ones once frozen)
    logits: np.ndarray | None  # (vocab,) when asked for
    finish_reason: str | None  # None, or "stop_token" / "stop_string" / "length" on the last token


@dataclass
class Generation:
    """The result of one prompt."""

    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # None when the export has no tokenizer
    scalings: np.ndarray | None = None  # (new tokens, L, n)
    logits: np.ndarray | None = None  # (new tokens, vocab) with return_logits
    finish_reason: str | None = None


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
    z = logits.astype(np.float64) / temperature
    z -= z.max(-1, keepdims=True)
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


class Generator:
    """Generation with an `XLoraSession`; keeps an optional scalings log across calls."""

    def __init__(self, session: XLoraSession) -> None:
        self.session = session
        self.log_scalings = False  # when True, every graph run appends its (g, s, L, n) scalings
        self.scalings_log: list[np.ndarray] = []
        self.peak_cache_bytes = 0  # largest cache memory held during the last call

    def flush_log_scalings(self, path: str) -> list[str]:
        """Write the log in the eager model's file format (`load_scalings_log` reads it)."""
        return save_scalings_arrays(self.scalings_log, path)

    # ------------------------------------------------------------------------------------------- inputs
    def encode(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        """Prompts (a text, a list of ids, or a list of either) as validated id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                        and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise XLoraError("prompts: expected a string, a list of token ids, or a non-empty list of either")
        encoded = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                tokenizer = self.session.tokenizer
                if tokenizer is None:
                    raise XLoraError(f"{self.session.info.path}: no tokenizer travelled with this export; "
                                     f"give token ids")
                ids = tokenizer.encode(prompt).ids if prompt else []
            else:
                ids = list(prompt)
            encoded.append(self.session.check_ids(ids, f"prompt {i}"))
        return encoded

    def _freeze_steps(self, freeze_scalings_after: int | Sequence[int | None] | None, b: int) -> np.ndarray:
        values = freeze_scalings_after if isinstance(freeze_scalings_after, Sequence) else [freeze_scalings_after] * b
        if len(values) != b:
            raise XLoraError(f"freeze_scalings_after: {len(values)} values for {b} prompts")
        for v in values:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
                raise XLoraError(f"freeze_scalings_after={v!r}: expected None or an int >= 0")
        if any(v is not None for v in values):
            self.session.frozen  # noqa: B018 - opens OUT.frozen.onnx, or raises the clear error now
        return np.array([-1 if v is None else v for v in values], dtype=np.int64)

    # ------------------------------------------------------------------------------------------- generation
    def stream(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 32, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
               stop_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
               expert_top_k: int | None = None, freeze_scalings_after: int | Sequence[int | None] | None = None,
               return_logits: bool = False) -> Iterator[TokenEvent]:
        """Generate, yielding each new token as soon as it is chosen.

        Args:
            prompts: a text, a list of ids, or a list of either (a batch; left padded internally).
            max_new_tokens: per sequence (also bounded by the model's positions).
            do_sample, temperature, top_p, seed: sampling (greedy by default); `seed` makes it reproducible.
            stop_token_ids: default the export's eos ids; [] never stops on a token.
            stop_strings: stop once the generated text contains one of them (needs the tokenizer).
            expert_top_k: experts kept per token and module, 0 = dense (default: the model's top_k_lora).
            freeze_scalings_after: None, or k (or one value per prompt): after k decode steps the
                sequence's scalings are frozen at its latest token and it continues on OUT.frozen.onnx.
            return_logits: include each step's logits in the events.
        Raises:
            XLoraError: bad prompts or options, raised by this call (before the iterator runs anything).
        """
        info = self.session.info
        encoded = self.encode(prompts)
        if max_new_tokens < 1:
            raise XLoraError(f"max_new_tokens={max_new_tokens}: expected >= 1")
        if do_sample and not temperature > 0:
            raise XLoraError(f"temperature={temperature}: expected > 0 when sampling")
        if not 0 < top_p <= 1:
            raise XLoraError(f"top_p={top_p}: expected 0 < top_p <= 1")
        if stop_strings and self.session.tokenizer is None:
            raise XLoraError("stop_strings need the tokenizer, and none travelled with this export")
        top_k = self.session.check_top_k(info.default_top_k if expert_top_k is None else expert_top_k)
        freeze_at = self._freeze_steps(freeze_scalings_after, len(encoded))
        stops = np.array(info.eos_token_ids if stop_token_ids is None else list(stop_token_ids), dtype=np.int64)
        width = max(len(p) for p in encoded)
        # the last chosen token is never fed back: width + max_new_tokens - 1 positions are processed
        max_new_tokens = min(max_new_tokens, info.max_positions - width + 1)
        return self._run(encoded, max_new_tokens, do_sample, temperature, top_p, seed, stops, stop_strings, top_k,
                         freeze_at, return_logits)

    def _run(self, encoded: list[list[int]], max_new_tokens: int, do_sample: bool, temperature: float,
             top_p: float, seed: int | None, stops: np.ndarray, stop_strings: Sequence[str], top_k: int,
             freeze_at: np.ndarray, return_logits: bool) -> Iterator[TokenEvent]:
        """The generation loop of `stream`, on validated inputs."""
        info = self.session.info
        b = len(encoded)
        lengths = np.array([len(p) for p in encoded])
        width = int(lengths.max())
        rng = np.random.default_rng(seed)
        mask = np.zeros((b, width + max_new_tokens), np.int64)  # preallocated; column t = position t
        ids = np.full((b, width), info.pad_token_id, np.int64)
        for i, prompt in enumerate(encoded):
            mask[i, width - len(prompt):width] = 1
            ids[i, width - len(prompt):] = prompt
        positions = np.clip(mask[:, :width].cumsum(-1) - 1, 0, None)
        next_position = lengths.copy()  # position of each sequence's next token
        finished = np.zeros(b, bool)
        last_token = np.zeros(b, np.int64)
        latest_scalings = np.zeros((b, info.n_modules, info.n_experts), np.float32)
        decoders, tails = self._text_state(b)  # tails: the last generated characters, for stop strings
        max_stop = max((len(s) for s in stop_strings), default=0)

        group = CacheGroup(self.session, np.arange(b))
        out = group.run(ids, mask[:, :width], positions, top_k)
        if self.log_scalings:
            self.scalings_log.append(out.scalings)
        runs, total, self.peak_cache_bytes = [(group, out)], width, group.nbytes()
        for step in range(max_new_tokens):
            for group, out in runs:
                tokens = pick_tokens(out.last_logits, do_sample, temperature, top_p, rng)
                row_scalings = group.fixed_scalings if group.frozen else out.scalings[:, -1]
                for j, row in enumerate(group.rows):
                    token = int(tokens[j])
                    last_token[row], latest_scalings[row] = token, row_scalings[j]
                    piece = self._decode(decoders, row, token)
                    if max_stop:  # bounded: no per-step work that grows with the sequence
                        tails[row] = (tails[row] + piece)[-(max_stop + len(piece)):]
                    reason = None
                    if token in stops:
                        reason = "stop_token"
                    elif max_stop and any(s in tails[row] for s in stop_strings):
                        reason = "stop_string"
                    elif step == max_new_tokens - 1:
                        reason = "length"
                    finished[row] = reason is not None
                    yield TokenEvent(int(row), step, token, piece, row_scalings[j].copy(),
                                     out.last_logits[j].copy() if return_logits else None, reason)
            if finished.all():
                break
            runs = self._advance(runs, finished, freeze_at, step, latest_scalings)
            total += 1
            mask[:, total - 1] = 1
            new_runs = []
            for group in runs:
                rows = group.rows
                out = group.run(last_token[rows, None], mask[rows, :total], next_position[rows, None], top_k)
                if self.log_scalings:  # a frozen group logs its fixed scalings, as the eager model does
                    self.scalings_log.append(group.fixed_scalings[:, None] if group.frozen else out.scalings)
                new_runs.append((group, out))
            runs = new_runs
            next_position += 1
            self.peak_cache_bytes = max(self.peak_cache_bytes, sum(g.nbytes() for g, _ in runs))

    def _advance(self, runs: list, finished: np.ndarray, freeze_at: np.ndarray, step: int,
                 latest_scalings: np.ndarray) -> list[CacheGroup]:
        """The groups of the next step: finished rows dropped, rows due to freeze moved to the frozen group."""
        granular, frozen = [], []
        for group, _ in runs:
            alive = ~finished[group.rows]
            if group.frozen:
                if alive.any():
                    frozen.append(group if alive.all() else group.take(alive))
                continue
            freeze = alive & (freeze_at[group.rows] == step)  # `step` decode steps ran since the prefill
            stay = alive & ~freeze
            if freeze.any():
                frozen.append(group.take(freeze, frozen=True, fixed_scalings=latest_scalings[group.rows[freeze]]))
            if stay.any():
                granular.append(group if stay.all() else group.take(stay))
        if len(frozen) > 1:
            frozen = [frozen[0].merge(frozen[1])]
        return granular + frozen

    def _text_state(self, b: int) -> tuple[list, list[str]]:
        if self.session.tokenizer is None:
            return [None] * b, [""] * b
        from tokenizers.decoders import DecodeStream

        return [DecodeStream(skip_special_tokens=True) for _ in range(b)], [""] * b

    def _decode(self, decoders: list, row: int, token: int) -> str:
        if decoders[row] is None:
            return ""
        return decoders[row].step(self.session.tokenizer, token) or ""

    def generate(self, prompts: Prompt | Sequence[Prompt], **options) -> list[Generation]:
        """Generate to completion; one `Generation` per prompt (options as in `stream`)."""
        encoded = self.encode(prompts)
        results = [Generation(prompt_ids=p) for p in encoded]
        steps: list[list[TokenEvent]] = [[] for _ in encoded]
        for event in self.stream(encoded, **options):
            steps[event.sequence].append(event)
        has_text = self.session.tokenizer is not None
        for result, events in zip(results, steps):
            result.tokens = [e.token for e in events]
            result.text = "".join(e.text for e in events) if has_text else None
            result.scalings = np.stack([e.scalings for e in events])
            if options.get("return_logits"):
                result.logits = np.stack([e.logits for e in events])
            result.finish_reason = events[-1].finish_reason
        return results
