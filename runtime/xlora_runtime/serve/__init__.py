"""`xlora-serve`: an OpenAI-compatible server over the runtime, with continuous batching (the `serve` extra:
fastapi, uvicorn, jinja2, prometheus-client), and its Ray Serve deployment (`ray_app.py`, the `ray` extra).

    scheduler.py   continuous batching on the runtime's CacheGroups (no HTTP)
    protocol.py    OpenAI request bodies checked into RequestSpecs; finish reasons in OpenAI's words
    responses.py   OpenAI response objects (completions, chat, stream chunks, usage, errors), no HTTP
    chat.py        chat templates rendered with jinja2 (no torch, no transformers)
    metrics.py     Prometheus metrics
    app.py         the FastAPI app (Server: session + scheduler + template + metrics)
    cli.py         `xlora-serve GRAPH.onnx`
    ray_app.py     the same app as a Ray Serve deployment (`serve run` / `serve deploy`)
    triton.py      `xlora-triton OUT.onnx REPO_DIR`: a Triton Inference Server model repository (the `triton` extra:
                   onnx, which writes the served copy of the graph)

Importing this package imports nothing: the modules load their dependencies when used.
"""
