"""The models of the python-backend repository (`xlora-triton --backend python`), run by Triton's Python backend
(its stub process imports them; `triton_python_backend_utils` exists only there).

`EngineModel` (model `<name>`, decoupled, no sequence batcher): the runtime's continuous-batching `Scheduler`
inside Triton, as Triton's own LLM backends do. Each request is a task of the stub's event loop (`async def
execute`), so concurrent requests share the batch; its tokens go out one response each (`stream` true) or as one
response at the end, answered through Triton's `generate`, `generate_stream` and gRPC streaming endpoints.

    inputs   text_input [1] | input_ids [n]; max_tokens, temperature, top_p, seed, stop [k], ignore_eos, stream,
             expert_top_k, freeze_scalings_after, return_scalings; session_id [1] (keep the conversation's caches
             and token history in the model), session_start, session_end (forget it)
    outputs  text_output [1], output_ids [t], finish_reason [1] (on the last response), scalings [t, L, n]
             (return_scalings), prompt_tokens and cached_tokens [1] (on the last response)

A session's turn is its text (or ids) after the conversation so far: the prompt is the history plus the turn,
and the scheduler extends the stored caches instead of running the history again. Sessions idle for the
config's `session_idle_seconds` are forgotten.

`ConversationModel` (model `<name>_sequence`, sequence batcher, decoupled): conversations by sequence id over
gRPC. It relays each request to the engine model (BLS) with the correlation id as session_id, START as
session_start and END as session_end, so one engine holds every cache and one batch serves both models.

Config `parameters` (string values): graph, provider, threads, max_batch, max_queue, session_cache_mb,
session_idle_seconds (engine); engine (the relay's target model).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import numpy as np

from ...errors import XLoraError
from ..scheduler import QueueFullError, RequestSpec, Scheduler, TokenOut

__all__ = ["ENGINE_INPUTS", "ENGINE_OUTPUTS", "ConversationModel", "EngineModel"]

# name -> (Triton type, dims) of the engine model's inputs (all optional) and outputs; the relay's inputs are
# these less the session ones
ENGINE_INPUTS = {"text_input": ("TYPE_STRING", [1]), "input_ids": ("TYPE_INT64", [-1]),
                 "max_tokens": ("TYPE_INT32", [1]), "temperature": ("TYPE_FP32", [1]), "top_p": ("TYPE_FP32", [1]),
                 "seed": ("TYPE_INT64", [1]), "stop": ("TYPE_STRING", [-1]), "ignore_eos": ("TYPE_BOOL", [1]),
                 "stream": ("TYPE_BOOL", [1]), "expert_top_k": ("TYPE_INT32", [1]),
                 "freeze_scalings_after": ("TYPE_INT32", [1]), "return_scalings": ("TYPE_BOOL", [1]),
                 "session_id": ("TYPE_STRING", [1]), "session_start": ("TYPE_BOOL", [1]),
                 "session_end": ("TYPE_BOOL", [1])}
SESSION_INPUTS = ("session_id", "session_start", "session_end")
ENGINE_OUTPUTS = {"text_output": ("TYPE_STRING", [1]), "output_ids": ("TYPE_INT64", [-1]),
                  "finish_reason": ("TYPE_STRING", [1]), "scalings": ("TYPE_FP32", [-1, -1, -1]),
                  "prompt_tokens": ("TYPE_INT32", [1]), "cached_tokens": ("TYPE_INT32", [1])}


def _pb() -> Any:
    """Triton's `triton_python_backend_utils` (only inside the Python backend's stub)."""
    import triton_python_backend_utils

    return triton_python_backend_utils


def _parameters(args: dict[str, str]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def _scalar(request: Any, name: str, kind: type, default: Any) -> Any:
    """One optional scalar input as `kind` (the default when absent).

    Raises:
        XLoraError: more or less than one value.
    """
    tensor = _pb().get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise XLoraError(f"{name}: expected one value, got {values.size}")
    value = values[0]
    if kind is str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return kind(value)


class EngineModel:
    """Triton Python-backend model: generation on the runtime's scheduler (see the module docstring)."""

    def initialize(self, args: dict[str, str]) -> None:
        from ...session import XLoraSession

        params = _parameters(args)
        folder = os.path.join(args["model_repository"], args["model_version"])
        threads = int(params["threads"]) if params.get("threads") else None
        self.session = XLoraSession(os.path.join(folder, params["graph"]), provider=params.get("provider", "cpu"),
                                    threads=threads)
        self.scheduler = Scheduler(self.session, int(params.get("max_batch", 16)), int(params.get("max_queue", 64)),
                                   int(float(params.get("session_cache_mb", 256)) * (1 << 20)))
        self.scheduler.start()
        self.idle_seconds = float(params.get("session_idle_seconds", 600))
        self.histories: dict[str, tuple[list[int], float]] = {}  # session id -> (token ids so far, last use)

    def finalize(self) -> None:
        self.scheduler.stop()

    async def execute(self, requests: list[Any]) -> None:
        self._forget_idle()
        for request in requests:
            asyncio.get_running_loop().create_task(self._serve(request))
        return None

    def _forget_idle(self) -> None:
        now = time.monotonic()
        for session_id, (_, used) in list(self.histories.items()):
            if now - used > self.idle_seconds:
                del self.histories[session_id]
                self.scheduler.forget(session_id)

    def _spec(self, request: Any) -> tuple[RequestSpec, bool, bool]:
        """(the request's spec, stream, session_end).

        Raises:
            XLoraError: a bad input, named.
        """
        pb = _pb()
        text = _scalar(request, "text_input", str, None)
        ids = pb.get_input_tensor_by_name(request, "input_ids")
        if (text is None) == (ids is None):
            raise XLoraError("give one of text_input or input_ids")
        session_id = _scalar(request, "session_id", str, None)
        if _scalar(request, "session_start", bool, False) and session_id in self.histories:
            del self.histories[session_id]
            self.scheduler.forget(session_id)
        history = self.histories.get(session_id, ([], 0.0))[0] if session_id else []
        if text is not None:
            tokenizer = self.session.tokenizer
            if tokenizer is None:
                raise XLoraError("text_input: no tokenizer travelled with this export; send input_ids")
            turn = tokenizer.encode_batch([text], add_special_tokens=not history)[0].ids
        else:
            turn = [int(i) for i in ids.as_numpy().reshape(-1)]
        stop = pb.get_input_tensor_by_name(request, "stop")
        stops = () if stop is None else tuple(s.decode("utf-8") if isinstance(s, bytes) else str(s)
                                              for s in stop.as_numpy().reshape(-1))
        top_k = _scalar(request, "expert_top_k", int, None)
        freeze = _scalar(request, "freeze_scalings_after", int, None)
        spec = RequestSpec(prompt_ids=history + turn, max_tokens=_scalar(request, "max_tokens", int, 16),
                           temperature=_scalar(request, "temperature", float, 0.0),
                           top_p=_scalar(request, "top_p", float, 1.0), seed=_scalar(request, "seed", int, None),
                           stop=stops, ignore_eos=_scalar(request, "ignore_eos", bool, False),
                           top_k=top_k, freeze_after=None if freeze is None or freeze < 0 else freeze,
                           scalings=_scalar(request, "return_scalings", bool, False), session_id=session_id)
        if spec.max_tokens is not None and spec.max_tokens < 1:
            raise XLoraError(f"max_tokens={spec.max_tokens}: expected an int >= 1")
        if not spec.temperature >= 0:
            raise XLoraError(f"temperature={spec.temperature}: expected a number >= 0")
        if not 0 < spec.top_p <= 1:
            raise XLoraError(f"top_p={spec.top_p}: expected 0 < top_p <= 1")
        return spec, _scalar(request, "stream", bool, False), _scalar(request, "session_end", bool, False)

    async def _serve(self, request: Any) -> None:
        """Answer one request; whatever goes wrong before its last response becomes an error response (a request
        never stays without its final flag)."""
        pb = _pb()
        sender = request.get_response_sender()
        try:
            spec, stream, end = self._spec(request)
            [handle] = self.scheduler.submit([spec], asyncio.get_running_loop())
            outs: list[TokenOut] = []
            async for out in handle:
                outs.append(out)
                if stream and out.finish_reason is None:
                    sender.send(self._response([out], None))
            last = self._response(outs[-1:] if stream else outs, handle)
        except (XLoraError, QueueFullError) as e:
            sender.send(pb.InferenceResponse(error=pb.TritonError(str(e))),
                        flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        except Exception as e:  # a bug: said in one line to the client, and the server goes on
            sender.send(pb.InferenceResponse(error=pb.TritonError(f"{type(e).__name__}: {e}")),
                        flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        sender.send(last, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if spec.session_id is not None:
            if end:
                self.histories.pop(spec.session_id, None)
                self.scheduler.forget(spec.session_id)
            else:
                self.histories[spec.session_id] = (spec.prompt_ids + [o.token for o in outs], time.monotonic())

    def _response(self, outs: list[TokenOut], last: Any) -> Any:
        """One response holding these tokens; `last`: the request's handle, on its last response."""
        pb = _pb()
        tensors = [pb.Tensor("text_output", np.array(["".join(o.text for o in outs)], dtype=object)),
                   pb.Tensor("output_ids", np.array([o.token for o in outs], np.int64))]
        if outs and outs[0].scalings is not None:
            tensors.append(pb.Tensor("scalings", np.stack([o.scalings for o in outs]).astype(np.float32)))
        if last is not None:
            tensors += [pb.Tensor("finish_reason", np.array([outs[-1].finish_reason], dtype=object)),
                        pb.Tensor("prompt_tokens", np.array([last.prompt_tokens], np.int32)),
                        pb.Tensor("cached_tokens", np.array([last.cached_tokens], np.int32))]
        return pb.InferenceResponse(output_tensors=tensors)


class ConversationModel:
    """Triton Python-backend model: conversations by sequence id, relayed to the engine model (see the module
    docstring)."""

    def initialize(self, args: dict[str, str]) -> None:
        self.engine = _parameters(args)["engine"]

    async def execute(self, requests: list[Any]) -> None:
        for request in requests:
            asyncio.get_running_loop().create_task(self._relay(request))
        return None

    async def _relay(self, request: Any) -> None:
        pb = _pb()
        sender = request.get_response_sender()
        inputs = [t for t in request.inputs() if t.name() in ENGINE_INPUTS]
        flags = {name: bool(pb.get_input_tensor_by_name(request, control).as_numpy().reshape(-1)[0])
                 for name, control in (("session_start", "START"), ("session_end", "END"))}
        inputs += [pb.Tensor("session_id", np.array([str(request.correlation_id())], dtype=object)),
                   *(pb.Tensor(name, np.array([value])) for name, value in flags.items())]
        call = pb.InferenceRequest(model_name=self.engine, inputs=inputs,
                                   requested_output_names=list(ENGINE_OUTPUTS))
        responses = await call.async_exec(decoupled=True)
        loop = asyncio.get_running_loop()
        while True:  # a blocking iterator: each wait in a worker thread, so other sequences go on meanwhile
            response = await loop.run_in_executor(None, next, responses, None)
            if response is None:
                break
            if response.has_error():
                sender.send(pb.InferenceResponse(error=response.error()),
                            flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            if response.output_tensors():
                sender.send(pb.InferenceResponse(output_tensors=response.output_tensors()))
        sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
