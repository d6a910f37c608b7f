"""The OpenAI API's request bodies, checked (the response objects are shaped in responses.py).

`parse_completion` and `parse_chat` turn a JSON body into a `ParsedRequest` (`n` `RequestSpec`s per prompt, plus
what the response needs), raising a one-line `XLoraError` that names the field for anything wrong. OpenAI's
bookkeeping fields (`user`, `store`, `metadata`, `service_tier`) are ignored; its features this server does not
have (`UNSUPPORTED`, `response_format` other than text, image parts) are refused by name; fields that it does not
implement are accepted at their neutral value only (`best_of: 1`, penalties 0...); vLLM's sampling extensions
(`top_k`, `min_p`, `repetition_penalty`, `min_tokens`) become the spec's `batch.Sampling`; `logprobs`,
`top_logprobs` and `echo` are checked here and answered in responses.py. X-LoRA options ride in the body under
`xlora`:

    "xlora": {"expert_top_k": 2,            experts kept per token and module, 0 = dense (default: the model's)
              "freeze_scalings_after": 4,   after 4 decode steps the scalings freeze (the frozen graph)
              "return_scalings": true,      per token the (modules x experts) scalings; "top": the top experts
              "return_token_ids": true}     the generated token ids
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..batch import Sampling
from ..errors import XLoraError, brief
from ..logprobs import MAX_TOP_LOGPROBS
from .scheduler import RequestSpec

__all__ = ["ParsedRequest", "openai_finish_reason", "parse_chat", "parse_completion"]

_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n",
           "logprobs", "frequency_penalty", "presence_penalty", "logit_bias", "user", "ignore_eos", "xlora",
           "top_k", "min_p", "repetition_penalty", "min_tokens", "store", "metadata", "service_tier"}
# OpenAI's bookkeeping fields ("user", "store", "metadata", "service_tier"): accepted and ignored
# OpenAI's features this server does not have: a 400 naming the field, whatever its value
UNSUPPORTED = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "audio", "modalities",
               "prediction", "web_search_options", "reasoning_effort")
MAX_N = 16  # choices per prompt at most
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
# accepted only at these values (OpenAI's defaults): the features are not implemented
_NEUTRAL = {"best_of": (None, 1), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
            "logit_bias": (None, {}), "suffix": (None,)}
XLORA_FIELDS = ("expert_top_k", "freeze_scalings_after", "return_scalings", "return_token_ids")
MAX_STOPS = 4
MAX_LOGPROBS = 5  # completions' `logprobs` (OpenAI's limit); chat's `top_logprobs` goes to MAX_TOP_LOGPROBS
# the runtime's finish reasons (a stop id or a stop string; max_tokens or the model's positions) as OpenAI's
_FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "length": "length", "max_positions": "length"}


@dataclass
class ParsedRequest:
    """A checked request: its sequences and how to answer."""

    kind: str  # "completion" or "chat"
    specs: list[RequestSpec]
    stream: bool
    include_usage: bool
    model: str | None
    n: int = 1  # choices per prompt: specs[i * n + j] is prompt i's choice j (OpenAI's choice index)
    continuous_usage: bool = False  # usage in every streamed chunk (vLLM's continuous_usage_stats)
    return_scalings: bool | str = False  # False, True (full) or "top"
    return_token_ids: bool = False
    logprobs: int | None = None  # None, or k: each token's log-probability and its k most likely tokens
    echo: bool = False  # a completion's choices begin with the prompt (and its log-probabilities, with logprobs)
    decode: Callable[[list[int]], str] | None = None  # token ids -> text, set by the app (echo, logprobs' tokens)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fields(body: Any, known: set[str], kind: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise XLoraError(f"request body: expected a JSON object, got {type(body).__name__}")
    unsupported = [name for name in UNSUPPORTED if name in body]
    if unsupported:
        raise XLoraError(f"{unsupported[0]}: not supported by this server")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise XLoraError(f"response_format={brief(response_format)}: not supported by this server (only "
                         f"{{\"type\": \"text\"}})")
    known = known | {"response_format"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise XLoraError(f"unknown field {unknown[0]!r} for {kind} (known: {', '.join(sorted(known))})")
    for name, allowed in _NEUTRAL.items():
        if name in body and body[name] not in allowed:
            raise XLoraError(f"{name}={brief(body[name])}: not supported by this server (only "
                             f"{' or '.join('null' if a is None else str(a).lower() for a in allowed)})")
    return body


def _options(body: dict[str, Any], max_tokens_default: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sampling options shared by both endpoints (RequestSpec fields) and the response options."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = max_tokens_default if max_tokens is None else max_tokens
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise XLoraError(f"max_tokens={brief(max_tokens)}: expected an int >= 1")
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or temperature < 0:
        raise XLoraError(f"temperature={brief(temperature)}: expected a number >= 0 (0 = greedy)")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise XLoraError(f"top_p={brief(top_p)}: expected 0 < top_p <= 1")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise XLoraError(f"seed={brief(seed)}: expected null or an int >= 0")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise XLoraError(f"stop={brief(stop)}: expected a string or a list of up to {MAX_STOPS} non-empty strings")
    for name in ("stream", "ignore_eos"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise XLoraError(f"{name}={brief(body[name])}: expected true or false")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not body.get("stream"):
            raise XLoraError("stream_options: only allowed with stream: true")
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage", "continuous_usage_stats"} \
                or not all(isinstance(v, bool) for v in stream_options.values()):
            raise XLoraError(f"stream_options={brief(stream_options)}: expected {{\"include_usage\": true or false, "
                             f"\"continuous_usage_stats\": true or false}}")
        include_usage = stream_options.get("include_usage", False)
    n = body.get("n")
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise XLoraError(f"n={brief(n)}: expected an int in 1..{MAX_N}")
    sampling = Sampling(**{name: body[name] for name in ("top_k", "min_p", "repetition_penalty", "min_tokens")
                           if body.get(name) is not None}).check()
    xlora = body.get("xlora")
    xlora = {} if xlora is None else xlora
    if not isinstance(xlora, dict):
        raise XLoraError(f"xlora={brief(xlora)}: expected an object with some of {', '.join(XLORA_FIELDS)}")
    unknown = sorted(set(xlora) - set(XLORA_FIELDS))
    if unknown:
        raise XLoraError(f"unknown field 'xlora.{unknown[0]}' (known: {', '.join(XLORA_FIELDS)})")
    top_k = xlora.get("expert_top_k")
    if top_k is not None and not _is_int(top_k):
        raise XLoraError(f"xlora.expert_top_k={brief(top_k)}: expected an int (0 = dense)")
    freeze = xlora.get("freeze_scalings_after")
    if freeze is not None and (not _is_int(freeze) or freeze < 0):
        raise XLoraError(f"xlora.freeze_scalings_after={brief(freeze)}: expected null or an int >= 0")
    scalings = xlora.get("return_scalings", False)
    if scalings not in (False, True, "top") or isinstance(scalings, (int, float)) and not isinstance(scalings, bool):
        raise XLoraError(f"xlora.return_scalings={brief(scalings)}: expected false, true (every expert) or \"top\"")
    token_ids = xlora.get("return_token_ids", False)
    if not isinstance(token_ids, bool):
        raise XLoraError(f"xlora.return_token_ids={brief(token_ids)}: expected true or false")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise XLoraError(f"model={brief(model)}: expected a string")
    spec = dict(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed,
                stop=tuple(stops), ignore_eos=bool(body.get("ignore_eos")), top_k=top_k, freeze_after=freeze,
                scalings=scalings is not False, sampling=sampling)
    answer = dict(stream=bool(body.get("stream")), include_usage=include_usage, model=model, n=n,
                  continuous_usage=include_usage and bool((stream_options or {}).get("continuous_usage_stats")),
                  return_scalings=scalings, return_token_ids=token_ids)
    return spec, answer


def _prompts(prompt: Any, encode: Any) -> list[list[int]]:
    """`prompt`: a string, a list of token ids, or a list of either -> token id lists."""
    if isinstance(prompt, str):
        return [encode(prompt)]
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [encode(p) for p in prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(_is_int(t) for t in p)
                                                   for p in prompt):
        return [list(p) for p in prompt]
    raise XLoraError(f"prompt={brief(prompt)}: expected a string, a list of token ids, or a non-empty list of either")


def parse_completion(body: Any, encode: Any) -> ParsedRequest:
    """A `/v1/completions` body.

    Args:
        encode: text -> token ids (raises XLoraError without a tokenizer).
    Raises:
        XLoraError: what is wrong with the body.
    """
    body = _fields(body, COMPLETION_FIELDS, "/v1/completions")
    if "prompt" not in body:
        raise XLoraError("prompt: missing (expected a string, a list of token ids, or a list of either)")
    spec, answer = _options(body, 16)  # OpenAI's default max_tokens for completions
    _logprobs(body, "completion", spec, answer)
    return ParsedRequest("completion", _choices(_prompts(body["prompt"], encode), spec, answer["n"]), **answer)


def parse_chat(body: Any, render: Any, encode: Any) -> ParsedRequest:
    """A `/v1/chat/completions` body.

    Args:
        render: messages -> prompt text (the chat template; raises XLoraError when there is none).
        encode: text -> token ids, special tokens in the text recognised, none added.
    Raises:
        XLoraError: what is wrong with the body.
    """
    body = _fields(body, CHAT_FIELDS, "/v1/chat/completions")
    if "messages" not in body:
        raise XLoraError("messages: missing (expected a non-empty list of {role, content} objects)")
    spec, answer = _options(body, None)  # OpenAI's default: until the model's positions end
    _logprobs(body, "chat", spec, answer)
    _check_chat_messages(body["messages"])
    return ParsedRequest("chat", _choices([encode(render(body["messages"]))], spec, answer["n"]), **answer)


def _choices(prompts: list[list[int]], spec: dict[str, Any], n: int) -> list[RequestSpec]:
    """n sequences per prompt, prompt by prompt; with a seed, choice j samples with seed + j (as vLLM does)."""
    seed = spec["seed"]
    return [RequestSpec(ids, **(spec | {"seed": None if seed is None else seed + j}))
            for ids in prompts for j in range(n)]


def _check_chat_messages(messages: Any) -> None:
    """What the chat template is not asked about: image or audio parts, and a chat with nothing to answer."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return  # the template's checks name the mistake
    for i, message in enumerate(messages):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise XLoraError(f"messages[{i}].content[{j}].type={brief(kind)}: not supported by this server (text "
                                 f"parts only)")
    roles = [m.get("role") for m in messages]
    if roles and all(isinstance(r, str) and r for r in roles) and not {"user", "assistant"} & set(roles):
        raise XLoraError("messages: no user or assistant message (expected at least one)")


def _logprobs(body: dict[str, Any], kind: str, spec: dict[str, Any], answer: dict[str, Any]) -> None:
    """The log-probability fields into the RequestSpec fields (`spec`) and the response options (`answer`).

    Completions: `logprobs` null or 0..5 (alternatives per token), `echo` true or false (with `logprobs`, the
    prompt's log-probabilities too). Chat: `logprobs` true or false, `top_logprobs` null or 0..20, only with
    `logprobs: true`.
    """
    logprobs = body.get("logprobs")
    if kind == "completion":
        if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
            raise XLoraError(f"logprobs={brief(logprobs)}: expected null or an int in 0..{MAX_LOGPROBS}")
        echo = body.get("echo")
        if echo is not None and not isinstance(echo, bool):
            raise XLoraError(f"echo={brief(echo)}: expected true or false")
        answer.update(logprobs=logprobs, echo=bool(echo))
        spec.update(logprobs=logprobs, prompt_logprobs=bool(echo) and logprobs is not None)
        return
    if logprobs is not None and not isinstance(logprobs, bool):
        raise XLoraError(f"logprobs={brief(logprobs)}: expected true or false")
    top = body.get("top_logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise XLoraError(f"top_logprobs={brief(top)}: expected null or an int in 0..{MAX_TOP_LOGPROBS}")
    if top is not None and not logprobs:
        raise XLoraError("top_logprobs: only allowed with logprobs: true")
    k = (top or 0) if logprobs else None
    answer.update(logprobs=k)
    spec.update(logprobs=k)


def openai_finish_reason(reason: str | None) -> str | None:
    """The OpenAI API's finish reason ("stop", "length") for the runtime's, None for a token that ends nothing."""
    return None if reason is None else _FINISH_REASONS[reason]
