"""The cache manager: both KV caches of every sequence, kept where the graph runs.

Sequences that advance together (same total length: prompts left padded to one width, then one
token per step) form a `CacheGroup`. Each step hands the group's pasts to the session's backend
(`backends/`: ONNX Runtime binds them with IO binding, OpenVINO and TensorRT as device tensors), and the
`present.*` / `scaling_present.*` tensors it returns become the next step's pasts as they are: no host
round trip, no per-step Python work that grows with the sequence (the concat inside the graph is the
contract's; the attention-mask input is one (g, total) int64 copy per step, which the contract's mask
input implies). Rows leave a group (a finished sequence: its caches are freed) or move to the frozen
group (its scaling cache is dropped) by one gather of rows (`Backend.gather`): rare events, not per
step. Every group registers with its session, so `XLoraSession.cache_bytes` is the memory held by all
live groups (all threads); a group's caches go as soon as it is released (`release`), or when it is
garbage collected.

    granular group: main graph, pasts = past_key_values.* + scaling_past_key_values.*
    frozen group:   frozen graph, pasts = past_key_values.*, plus each row's fixed scalings (L, n)

A graph that writes in place (`Graph.in_place`: a "gqa" graph on ONNX Runtime's CPU provider) gets buffers
of `capacity` >= `length` positions, the first `length` of them held, bound as past and present at once: the
graph writes each step's new positions into them, so no step copies the cache. A caller that knows the final
length reserves it once (`reserve`: the Generator does); otherwise, when a step would overflow, the buffers
are reallocated at twice the capacity (`Backend.resize`): a copy every doubling, not every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends.dtypes import HOST_DTYPES
from .errors import XLoraError
from .format import contract as C
from .session import XLoraSession

__all__ = ["CacheGroup", "StepOutput"]


@dataclass
class StepOutput:
    """What one graph run returns to the generator (host arrays)."""

    last_logits: np.ndarray  # (g, vocab) at each row's last position, float32
    scalings: np.ndarray | None  # (g, s, L, n) of the new tokens; None for the frozen graph
    logits: np.ndarray | None = None  # (g, s, vocab) every new position's, from a graph exported with --all-logits


class CacheGroup:
    """Rows (sequence indices) that run through one graph together, and their caches.

    Args:
        session: the loaded graph.
        rows: sequence indices of the group's rows, in batch order.
        frozen: run the frozen graph (no scaling pass, no scaling cache).
        fixed_scalings: (g, L, n) per-row scalings of a frozen group.
        pasts, length: the caches (the backend's device tensors) and the positions they hold; default empty.
        capacity: the positions the caches have room for (default `length`).
    """

    def __init__(self, session: XLoraSession, rows: np.ndarray, frozen: bool = False,
                 fixed_scalings: np.ndarray | None = None, pasts: dict[str, Any] | None = None,
                 length: int = 0, capacity: int | None = None) -> None:
        info = session.info
        self.session = session
        self.rows = np.asarray(rows, dtype=np.int64)
        self.frozen = frozen
        self.fixed_scalings = fixed_scalings
        self.length = length  # positions held (padding included)
        # positions the cache tensors have room for (> length: buffers of a graph that writes in place)
        self.capacity = length if capacity is None else capacity
        n = info.num_layers
        self.past_names = C.past_names(n) + ([] if frozen else C.past_names(n, scaling=True))
        self.present_names = C.present_names(n) + ([] if frozen else C.present_names(n, scaling=True))
        if pasts is None:
            shape = (len(self.rows), info.kv_heads, 0, info.head_dim)
            pasts = {name: session.backend.empty(shape, info.cache_dtype) for name in self.past_names}
        self.pasts = pasts
        session.track_cache(self)

    def __len__(self) -> int:
        return len(self.rows)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            top_k: int) -> StepOutput:
        """One step: the group's new tokens (g, s) through its graph; the caches advance by s."""
        graph = self.session.frozen if self.frozen else self.session.main
        if (self.session.info.attention == C.ATTENTION_GQA and len(self.rows) > 1 and input_ids.shape[1] > 1
                and self.length > 0):
            raise XLoraError(f"{graph.path}: a step of {input_ids.shape[1]} tokens for {len(self.rows)} rows after "
                             f"{self.length} positions; ONNX Runtime's GroupQueryAttention (--attention gqa) runs "
                             f"steps of several tokens after a past one row at a time")
        if graph.in_place:
            self._reserve(self.length + input_ids.shape[1])
        feeds = {C.INPUT_IDS: input_ids, C.ATTENTION_MASK: attention_mask, C.POSITION_IDS: position_ids,
                 C.TOP_K: np.array(top_k, dtype=np.int64)}
        if self.frozen:
            feeds[C.SCALINGS] = self.fixed_scalings
        host, presents = graph.step(feeds, self.pasts)
        self.pasts = {p: presents[q] for p, q in zip(self.past_names, self.present_names)}
        self.length += input_ids.shape[1]
        self.capacity = max(self.capacity, self.length)
        scalings = None if self.frozen else host[C.SCALINGS]
        logits = host[C.LOGITS]
        return StepOutput(logits[:, -1], scalings, logits if self.session.info.logits == C.LOGITS_ALL else None)

    def take(self, keep: np.ndarray, frozen: bool | None = None,
             fixed_scalings: np.ndarray | None = None) -> CacheGroup:
        """A new group of the rows where `keep` is true (their caches gathered; the others freed).

        With `frozen=True` on a granular group, the rows move to the frozen graph with
        `fixed_scalings` (one (L, n) per kept row) and their scaling caches are dropped.
        """
        frozen = self.frozen if frozen is None else frozen
        if frozen and fixed_scalings is None:
            fixed_scalings = self.fixed_scalings[keep]
        names = C.past_names(self.session.info.num_layers)
        names += [] if frozen else C.past_names(self.session.info.num_layers, scaling=True)
        rows = np.flatnonzero(keep)
        pasts = {name: self.session.backend.gather(self.pasts[name], rows) for name in names}
        return CacheGroup(self.session, self.rows[keep], frozen, fixed_scalings, pasts, self.length, self.capacity)

    def merge(self, other: CacheGroup) -> CacheGroup:
        """This group and `other` (same kind and length) as one group; `other` is released."""
        assert self.frozen == other.frozen and self.length == other.length
        if self.capacity != other.capacity:  # buffers of in-place graphs: one capacity for the joined tensors
            self._reserve(other.capacity, exact=True)
            other._reserve(self.capacity, exact=True)
        self.rows = np.concatenate([self.rows, other.rows])
        backend = self.session.backend
        self.pasts = {name: backend.concat([self.pasts[name], other.pasts[name]]) for name in self.past_names}
        if self.frozen:
            self.fixed_scalings = np.concatenate([self.fixed_scalings, other.fixed_scalings])
        other.release()
        return self

    def pad_left(self, columns: int) -> None:
        """Prepend `columns` empty positions (zeros) to every row's caches: the group then lines up with a
        longer one (`merge` needs equal lengths). The caller gives those positions mask 0: the graph counts
        positions by `cumsum(attention_mask)` and never attends to masked keys, so every row stays exact."""
        if columns > 0:
            backend = self.session.backend
            self.pasts = {name: backend.positions(v, -columns, self.length) for name, v in self.pasts.items()}
            self.length += columns
            self.capacity = self.length

    def slice_positions(self, start: int, stop: int | None = None) -> None:
        """Keep positions [start, stop) of the caches (0 <= start < stop <= length): drops leading columns that
        are padding for every row (mask 0), or a row's positions past a common prefix."""
        stop = self.length if stop is None else stop
        assert 0 <= start < stop <= self.length
        if (start, stop) != (0, self.length):
            backend = self.session.backend
            self.pasts = {name: backend.positions(v, start, stop) for name, v in self.pasts.items()}
            self.length = self.capacity = stop - start

    def reserve(self, positions: int) -> None:
        """Room for `positions` in the caches of a graph that writes in place, allocated once (a caller that knows
        the final length saves the doublings and their copies, and holds no more than it needs); nothing for a
        graph that does not."""
        graph = self.session.frozen if self.frozen else self.session.main
        if graph.in_place:
            self._reserve(positions, exact=True)

    def _reserve(self, positions: int, exact: bool = False) -> None:
        """Room for `positions` in every cache buffer: reallocated (the held positions copied) when short, at
        twice the capacity (at least `positions`, rounded up to 64, at most the model's positions) unless
        `exact`."""
        if positions <= self.capacity:
            return
        capacity = positions if exact else min(max(2 * self.capacity, -(-positions // 64) * 64),
                                                max(positions, self.session.info.max_positions))
        backend = self.session.backend
        self.pasts = {name: backend.resize(v, self.length, capacity) for name, v in self.pasts.items()}
        self.capacity = capacity

    def release(self) -> None:
        """Free the caches now (a finished, cancelled or failed generation); the group cannot run again."""
        self.pasts = {}

    def nbytes(self) -> int:
        """Bytes held by this group's caches (0 once released; buffers count their capacity): arithmetic, not a
        walk of the tensors."""
        info = self.session.info
        per_position = info.kv_heads * info.head_dim * HOST_DTYPES[info.cache_dtype].itemsize
        return len(self.pasts) * len(self.rows) * self.capacity * per_position
