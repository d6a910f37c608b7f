"""`xlora-serve GRAPH.onnx`: the OpenAI-compatible server (app.py) under uvicorn.

A user error is one line on stderr and exit code 1 (a usage error 2, Ctrl-C while loading 130), as for the
other commands; once serving, Ctrl-C stops the server gracefully (requests in flight end, caches are freed).
Only the standard library is imported at module level.
"""

from __future__ import annotations

import argparse
import socket

from ..commands import add_session_options, run, session_options
from ..errors import XLoraError

__all__ = ["build_serve_parser", "main"]


def build_serve_parser() -> argparse.ArgumentParser:
    """The options of `xlora-serve`, grouped by concern."""
    parser = argparse.ArgumentParser(
        prog="xlora-serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a graph exported by xlora-export over HTTP with the OpenAI API (/v1/completions,\n"
                    "/v1/chat/completions, /v1/models), /health and Prometheus /metrics. Requests are batched\n"
                    "continuously: new ones join the running batch between decode steps.")
    parser.add_argument("graph", metavar="GRAPH.onnx", help="main graph written by xlora-export")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every "
                     "interface)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed)")
    srv = parser.add_argument_group("serving")
    srv.add_argument("--model-name", metavar="NAME", help="model id of /v1/models and requests' `model` (default: "
                     "the graph's file name without .onnx)")
    srv.add_argument("--max-batch", type=int, default=16, metavar="N", help="rows decoded together at most "
                     "(default 16)")
    srv.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests waiting for a place in the "
                     "batch at most; beyond it: 429 with Retry-After (default 64)")
    srv.add_argument("--session-cache-mb", type=float, default=256.0, metavar="MB", help="memory for the caches of "
                     "conversations (x-session-id header) kept between turns (default 256; 0: none)")
    srv.add_argument("--max-body-mb", type=float, metavar="MB", help="request bodies larger than this are refused "
                     "with 413 before they are parsed (default: the model's positions x 64 bytes, at least 4)")
    rt = add_session_options(parser, "GRAPH")
    rt.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning",
                    help="uvicorn's log level (default warning)")
    return parser


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise XLoraError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def _serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise XLoraError(f"xlora-serve needs the serve extra: pip install \"xlora-runtime[serve]\" (missing "
                         f"{e.name})") from None
    from .app import Server, ServerConfig, create_app

    if not 0 <= args.port <= 65535:
        raise XLoraError(f"--port {args.port}: expected 0 to 65535")
    if args.max_batch < 1:
        raise XLoraError(f"--max-batch {args.max_batch}: expected >= 1")
    if args.max_queue < 0:
        raise XLoraError(f"--max-queue {args.max_queue}: expected >= 0")
    if not args.session_cache_mb >= 0:
        raise XLoraError(f"--session-cache-mb {args.session_cache_mb}: expected a number >= 0")
    if args.max_body_mb is not None and not args.max_body_mb > 0:
        raise XLoraError(f"--max-body-mb {args.max_body_mb}: expected a number > 0")
    server = Server(ServerConfig(args.graph, args.model_name, max_batch=args.max_batch, max_queue=args.max_queue,
                                 session_cache_mb=args.session_cache_mb, max_body_mb=args.max_body_mb,
                                 **session_options(args)))
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(server), log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    print(f"xlora-serve: serving '{server.name}' on http://{host if ':' not in host else f'[{host}]'}:{port} "
          f"(max batch {args.max_batch}, queue {args.max_queue}, {server.session.provider})", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    """`xlora-serve`; returns the exit code (0 after a clean stop, 1 user error, 2 usage error, 130 interrupted)."""
    return run("xlora-serve", build_serve_parser, _serve, argv)


if __name__ == "__main__":
    raise SystemExit(main())
