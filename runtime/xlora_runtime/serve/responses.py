"""The OpenAI API's response objects, shaped from what the scheduler returned (no HTTP here: app.py sends them).

    error_body        {"error": {message, type, param, code}}: every refusal, and a stream's failure
    models_body       /v1/models: the one model served, with its experts; model_body: /v1/models/{id}
    completion_body   a whole answer: `n` choices per prompt (`text`, or a chat `message`), finish reasons in
                      OpenAI's words, `usage`; with `xlora.return_scalings` the experts and modules named once
    stream_chunks     one chunk per token that releases text or carries `xlora` extras (a chat's first chunk of
                      each choice names the role), then `usage` if asked (in every chunk too with vLLM's
                      `continuous_usage_stats`); `sse` frames each as a server-sent event
    choice_extras     the `xlora` object of a choice or chunk: token ids, scalings, or the top experts
    with_logprobs     a choice's (or chunk's) `logprobs` in OpenAI's format (completion_logprobs,
                      chat_logprobs), and a completion's echoed prompt

Each function takes the checked request (`protocol.ParsedRequest`), the model's name and the graph's record;
the handles and tokens are the scheduler's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .protocol import ParsedRequest, openai_finish_reason

if TYPE_CHECKING:
    from ..format.record import GraphInfo
    from .scheduler import RequestHandle, TokenOut

__all__ = ["chat_logprobs", "choice_extras", "completion_logprobs", "completion_body", "error_body", "model_body",
           "models_body", "sse", "stream_chunks", "with_logprobs"]


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; `kind` its `type` (invalid_request_error, rate_limit_error, server_error)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def model_body(model: str, info: GraphInfo, chat_template: bool, created: int) -> dict[str, Any]:
    """/v1/models/{id}: the model, when it started serving (`created`, Unix seconds), its context length and its
    X-LoRA facts."""
    return {"id": model, "object": "model", "created": created, "owned_by": "xlora-serve",
            "max_model_len": info.max_positions,
            "xlora": {"experts": info.expert_names, "default_top_k": info.default_top_k, "chat_template": chat_template,
                      "frozen_graph": info.frozen_path is not None}}


def models_body(model: str, info: GraphInfo, chat_template: bool, created: int) -> dict[str, Any]:
    """The /v1/models list: the one model served (`model_body`)."""
    return {"object": "list", "data": [model_body(model, info, chat_template, created)]}


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: a JSON object, or a literal such as `[DONE]`."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def choice_extras(outs: list[TokenOut], request: ParsedRequest, experts: list[str], top_k: int) -> dict[str, Any]:
    """The `xlora` object of a choice (or a streamed chunk) for these tokens: token ids and scalings as asked.

    Args:
        outs: the tokens, each with its scalings (L modules, n experts).
        experts: expert names in graph order; top_k: the request's experts per token (0 = all, for "top").
    """
    extras: dict[str, Any] = {}
    if request.return_token_ids:
        extras["token_ids"] = [o.token for o in outs]
    if request.return_scalings is True:
        extras["scalings"] = [o.scalings.tolist() for o in outs]
    elif request.return_scalings == "top":
        keep = top_k or len(experts)
        per_token = []
        for o in outs:
            weights = o.scalings.mean(0)
            order = np.argsort(-weights, kind="stable")[:keep]
            per_token.append([{"expert": experts[i], "weight": float(weights[i])} for i in order])
        extras["top_experts"] = per_token
    return extras


def _top_k(request: ParsedRequest, i: int, info: GraphInfo) -> int:
    """Prompt i's experts per token: its `expert_top_k`, else the model's default."""
    top_k = request.specs[i].top_k
    return info.default_top_k if top_k is None else top_k


def _usage(handles: list[RequestHandle], n: int, completion: int | None = None) -> dict[str, Any]:
    """Each prompt counted once (its `n` choices share it); `completion`: the tokens so far (default: all)."""
    prompt = sum(h.prompt_tokens for h in handles[::n])
    completion = sum(h.completion_tokens for h in handles) if completion is None else completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(h.cached_tokens for h in handles[::n])}}


def _head(request: ParsedRequest, model: str, chunk: bool) -> dict[str, Any]:
    if request.kind == "chat":
        return {"id": f"chatcmpl-{request.id}", "object": "chat.completion.chunk" if chunk else "chat.completion",
                "created": request.created, "model": model}
    return {"id": f"cmpl-{request.id}", "object": "text_completion", "created": request.created, "model": model}


def _choice(request: ParsedRequest, i: int, text: str, finish_reason: str | None, chunk: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": i}
    if request.kind == "chat" and chunk:
        choice["delta"] = {"content": text}
    elif request.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice.update(logprobs=None, finish_reason=openai_finish_reason(finish_reason))
    return choice


def completion_body(request: ParsedRequest, model: str, info: GraphInfo, handles: list[RequestHandle],
                    results: list[list[TokenOut]]) -> dict[str, Any]:
    """The whole answer to a request that does not stream: `results[i]` are prompt i's tokens, in order."""
    choices = []
    for i, outs in enumerate(results):
        choice = _choice(request, i, "".join(o.text for o in outs), outs[-1].finish_reason, chunk=False)
        with_logprobs(request, i, choice, outs, echo=request.echo, offset=0)
        extras = choice_extras(outs, request, info.expert_names, _top_k(request, i, info))
        if extras:
            choice["xlora"] = extras
        choices.append(choice)
    response = _head(request, model, chunk=False) | {"choices": choices, "usage": _usage(handles, request.n)}
    if request.return_scalings:
        response["xlora"] = {"experts": info.expert_names, "modules": info.module_names}
    return response


async def stream_chunks(request: ParsedRequest, model: str, info: GraphInfo,
                        handles: list[RequestHandle]) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed answer as the handles' tokens arrive (the prompts run together; their chunks come
    prompt by prompt). The caller adds `[DONE]` and turns a failure into an `error_body`."""
    head = _head(request, model, chunk=True)
    sent = 0  # completion tokens streamed so far
    usage = (lambda: {"usage": _usage(handles, request.n, sent)}) if request.continuous_usage else dict
    for i, handle in enumerate(handles):
        if request.kind == "chat":
            delta = {"role": "assistant", "content": ""}
            yield head | {"choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]} | usage()
        top_k = _top_k(request, i, info)
        echo, offset = request.echo, 0  # the prompt goes with the first chunk; text_offset counts on
        async for out in handle:
            sent += 1
            extras = choice_extras([out], request, info.expert_names, top_k)
            if not out.text and not extras and out.finish_reason is None and not echo and request.logprobs is None:
                continue
            choice = _choice(request, i, out.text, out.finish_reason, chunk=True)
            offset = with_logprobs(request, i, choice, [out], echo, offset)
            echo = False
            if extras:
                choice["xlora"] = extras
            yield head | {"choices": [choice]} | usage()
    if request.include_usage:
        yield head | {"choices": [], "usage": _usage(handles, request.n)}


# ----------------------------------------------------------------------------------------------- log-probabilities
_Entry = tuple[int, float | None, list[tuple[int, float]] | None]  # token id, log-probability, top alternatives


def _token_text(request: ParsedRequest, token: int) -> str:
    """A token's text (vLLM's `token_id:N` when the export has no tokenizer)."""
    return request.decode([token]) if request.decode is not None else f"token_id:{token}"


def completion_logprobs(request: ParsedRequest, entries: list[_Entry], offset: int) -> dict[str, Any]:
    """A completion choice's `logprobs`: tokens, token_logprobs, top_logprobs ({text: logprob}, most likely first)
    and text_offset (each token's start in the choice's text, counting on from `offset`); an echoed prompt's first
    token has null for both log-probability fields."""
    tokens = [_token_text(request, t) for t, _, _ in entries]
    starts = []
    for text in tokens:
        starts.append(offset)
        offset += len(text)
    top = [None if alts is None else {_token_text(request, t): lp for t, lp in alts} for _, _, alts in entries]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": top,
            "text_offset": starts}


def chat_logprobs(request: ParsedRequest, entries: list[_Entry]) -> dict[str, Any]:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(request, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [item(t, lp) | {"top_logprobs": [item(a, alp) for a, alp in alts or ()]}
                        for t, lp, alts in entries]}


def with_logprobs(request: ParsedRequest, i: int, choice: dict[str, Any], outs: list[TokenOut], echo: bool,
                  offset: int) -> int:
    """Fill `choice` (a whole choice, or a chunk of `outs`) for `logprobs` and `echo`: the echoed prompt's text
    before the choice's, and the `logprobs` object of its tokens (the prompt's first when echoed).

    Args:
        i: the choice's index (its RequestSpec); echo: this choice or chunk begins with the prompt.
        offset: text_offset of the choice's first token here (what earlier chunks held).
    Returns:
        The offset after these tokens.
    """
    if echo and request.kind == "completion":
        prompt = request.specs[i].prompt_ids
        choice["text"] = (request.decode(prompt) if request.decode is not None else "") + choice["text"]
    if request.logprobs is None:
        return offset
    entries: list[_Entry] = []
    if echo and request.kind == "completion":
        entries.append((prompt[0], None, None))
        entries += [(e.token, e.logprob, e.top) for e in outs[0].prompt_logprobs or ()]
    entries += [(o.token, o.logprob.logprob, o.logprob.top) for o in outs if o.logprob is not None]
    if request.kind == "chat":
        choice["logprobs"] = chat_logprobs(request, entries)
        return offset
    choice["logprobs"] = completion_logprobs(request, entries, offset)
    return offset + sum(len(t) for t in choice["logprobs"]["tokens"])
