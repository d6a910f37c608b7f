"""Prometheus metrics of one server (its own registry, so that several servers may share a process):

    xlora_requests_total{endpoint, status}    HTTP requests answered, by endpoint and status code
    xlora_requests_rejected_total             429s: the waiting queue was full
    xlora_requests_cancelled_total            requests whose client went away before the end
    xlora_prompt_tokens_total                 prompt tokens admitted; xlora_prompt_tokens_cached_total of them
                                              came from a session's kept caches
    xlora_generation_tokens_total             tokens generated
    xlora_queue_depth                         requests waiting for a place in the batch
    xlora_batch_size                          rows in the running batch
    xlora_decode_batch_rows                   histogram: rows per decode step
    xlora_time_to_first_token_seconds         histogram: from submission to the first token
    xlora_time_per_output_token_seconds       histogram: between two tokens of a request
    xlora_kv_cache_bytes                      KV cache memory held (running batch and kept sessions)
    xlora_session_cache_bytes                 of which the sessions' kept caches
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Metrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The server's metrics; implements the scheduler's hooks.

    Args:
        queue_depth, batch_size, cache_bytes, session_cache_bytes: read when the metrics are scraped.
    """

    def __init__(self, queue_depth: Callable[[], float], batch_size: Callable[[], float],
                 cache_bytes: Callable[[], float], session_cache_bytes: Callable[[], float]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no `_created` series beside every counter (process-wide)
        r = self.registry = CollectorRegistry()
        self.requests = Counter("xlora_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.rejected = Counter("xlora_requests_rejected", "Requests refused with 429 (queue full)", registry=r)
        self.cancelled = Counter("xlora_requests_cancelled", "Requests whose client went away", registry=r)
        self.prompt_tokens = Counter("xlora_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.cached_tokens = Counter("xlora_prompt_tokens_cached", "Prompt tokens whose caches a session kept",
                                     registry=r)
        self.generation_tokens = Counter("xlora_generation_tokens", "Tokens generated", registry=r)
        Gauge("xlora_queue_depth", "Requests waiting for a place in the batch", registry=r).set_function(queue_depth)
        Gauge("xlora_batch_size", "Rows in the running batch", registry=r).set_function(batch_size)
        Gauge("xlora_kv_cache_bytes", "KV cache bytes held (batch and sessions)", registry=r).set_function(cache_bytes)
        Gauge("xlora_session_cache_bytes", "KV cache bytes kept for sessions", registry=r).set_function(
            session_cache_bytes)
        self.step_rows = Histogram("xlora_decode_batch_rows", "Rows per decode step", registry=r,
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.ttft = Histogram("xlora_time_to_first_token_seconds", "Submission to first token", registry=r,
                              buckets=_LATENCY)
        self.tpot = Histogram("xlora_time_per_output_token_seconds", "Time between two tokens of a request",
                              registry=r, buckets=_LATENCY)

    def render(self) -> bytes:
        """The text exposition format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    # the scheduler's hooks (engine thread)
    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generation_tokens.inc()

    def on_token(self, seconds: float) -> None:
        self.tpot.observe(seconds)
        self.generation_tokens.inc()

    def on_step(self, rows: int) -> None:
        self.step_rows.observe(rows)

    def on_prompt(self, tokens: int, cached: int) -> None:
        self.prompt_tokens.inc(tokens)
        self.cached_tokens.inc(cached)

    def on_cancel(self) -> None:
        self.cancelled.inc()
