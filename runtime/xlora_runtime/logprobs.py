"""Log-probabilities of tokens under the model's distribution: the graph's raw logits, log-softmaxed in float32.

They are the model's own distribution, before temperature, top-p or any other sampling option (vLLM's default,
`--logprobs-mode raw_logprobs`): the same prompt gives the same log-probabilities whatever the sampling, and a
greedy row's chosen token is always the top one. The batch core (`batch.py`) computes them for the rows that ask
(`Row.logprobs`: each new token; `Row.echo`: each prompt token after the first), so the `Generator` and the server
report the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_TOP_LOGPROBS", "TokenLogprob", "log_softmax", "token_logprobs"]

MAX_TOP_LOGPROBS = 20  # the most alternatives per token (OpenAI's limit for chat's top_logprobs)


@dataclass
class TokenLogprob:
    """One token's log-probability, and the most likely tokens at its position.

    Attributes:
        token: the token id.
        logprob: its log-probability (natural log).
        top: the k most likely (token id, log-probability) pairs at its position, most likely first (ties: the
            lower id first).
    """

    token: int
    logprob: float
    top: list[tuple[int, float]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, computed in float32.

    Args:
        logits: (..., vocab) any float dtype.
    Returns:
        (..., vocab) float32.
    """
    z = np.asarray(logits, np.float32)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def token_logprobs(logits: np.ndarray, tokens: np.ndarray | list[int], k: int) -> list[TokenLogprob]:
    """Each position's token's log-probability and its top `k`.

    Args:
        logits: (s, vocab): the logits that predict each of the s tokens.
        tokens: (s,) token ids.
        k: alternatives per position, 0..vocab.
    Returns:
        s `TokenLogprob`s.
    """
    lp = log_softmax(logits)
    tokens = np.asarray(tokens, np.int64)
    chosen = lp[np.arange(len(tokens)), tokens]
    out = []
    vocab = lp.shape[-1]
    for i, token in enumerate(tokens):
        top = np.argpartition(-lp[i], k - 1)[:k] if 0 < k < vocab else np.arange(k)
        top = top[np.lexsort((top, -lp[i, top]))]  # most likely first, the lower id first among equals
        out.append(TokenLogprob(int(token), float(chosen[i]), [(int(t), float(lp[i, t])) for t in top]))
    return out
