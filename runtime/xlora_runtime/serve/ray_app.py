"""xlora-serve as a Ray Serve deployment: the same FastAPI app (app.py), one scheduler per replica.

    serve run deploy/ray/serve_config.yaml                      # a config file (replicas, resources, autoscaling)
    serve run xlora_runtime.serve.ray_app:build graph=/models/m.onnx max_batch=16

Each replica loads the graph (the path must exist on every node) and batches its own requests continuously.
Replica affinity: with Ray's consistent-hash request router (`ray.serve.experimental.consistent_hash_router.
ConsistentHashRouter`, keyed on the `x-session-id` header), the turns of a conversation reach the replica that
kept its caches; affinity is best effort (replicas come and go), and a replica without a session's caches
re-prefills from the request's token history, so the tokens never depend on where a request lands.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import serve
from ray.serve import Application

from ..commands import device_arg
from ..errors import XLoraError
from .app import Server, ServerConfig, create_app

__all__ = ["XLoraDeployment", "build"]


@serve.deployment(max_ongoing_requests=64)
@serve.ingress()
class XLoraDeployment:
    """One replica: a `Server` (graph, scheduler, chat template, metrics) behind the OpenAI app.

    Args:
        graph: OUT.onnx, at this path on every node; the other arguments as `ServerConfig`'s.
    """

    def __init__(self, graph: str, **options: Any) -> None:
        self.config = ServerConfig(graph, **options)

    def __serve_build_asgi_app__(self) -> Any:
        self.server = Server(self.config)
        return create_app(self.server)


def build(args: dict[str, Any]) -> Application:
    """The application builder of `serve run xlora_runtime.serve.ray_app:build graph=... [max_batch=...]` and of a
    config file's `import_path` (its `args`): the `ServerConfig` fields; strings from the command line are
    converted to the fields' types.

    Raises:
        XLoraError: no graph, or an unknown field.
    """
    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise XLoraError(f"xlora_runtime.serve.ray_app:build: unknown argument {unknown[0]!r} (known: "
                         f"{', '.join(fields)})")
    if "graph" not in args:
        raise XLoraError("xlora_runtime.serve.ray_app:build: missing the argument graph=PATH/TO/OUT.onnx")
    options = {}
    for name, value in args.items():
        if name == "device":
            options[name] = device_arg(None if value is None else str(value))
            continue
        kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(str(fields[name].type))
        try:
            options[name] = kind(value) if kind is not None and value is not None else value
        except ValueError:
            raise XLoraError(f"xlora_runtime.serve.ray_app:build: {name}={value!r}: expected {kind.__name__}") from None
    return XLoraDeployment.bind(**options)
