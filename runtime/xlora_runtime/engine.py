"""`xlora-engine OUT.onnx OUT.engine`: TensorRT engines from an exported graph, built with polygraphy.

An engine is specific to the GPU model and the TensorRT version that built it, so it is built where it runs:
this command is part of the torch-free deployment package (`pip install "xlora-runtime[tensorrt]"`).

    OUT.onnx (+ OUT.frozen.onnx)                     xlora-export's graphs, fp32/fp16/bf16
      -> profiles.engine_profiles(metadata, limits)  [prefill, decode], one spec for every input
      -> NetworkFromOnnxPath(strongly_typed=True)    precision from the graph: TensorRT 11 has no FP16/BF16
                                                     builder flags, 10.x builds strongly typed as well
      -> CreateConfig(profiles, load_timing_cache)   the timing cache makes rebuilds (and fp16 after fp32) fast
      -> EngineFromNetwork(save_timing_cache) -> SaveEngine
    OUT.engine, OUT.engine.json                      the sidecar (`format.sidecar`): the graph's record + profiles
    OUT.frozen.engine(.json), OUT.tokenizer.json     when the export has them

`XLoraSession("OUT.engine")` (provider "trt-engine") runs the result with the same calls as the ONNX graph.
Errors are one line: no TensorRT, no GPU, not an X-LoRA export, limits that do not fit the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from .commands import positive_int, run
from .errors import XLoraError
from .format import contract as C
from .format.record import Files, GraphInfo
from .format.sidecar import Shapes, engine_companions, sidecar, write_sidecar
from .profiles import PHASES, engine_profiles, limits_for

__all__ = ["build_engines", "build_parser", "main", "polygraphy_loaders", "tensorrt_version"]

_NEEDS_TENSORRT = 'needs TensorRT 10 or 11 and polygraphy: pip install "xlora-runtime[tensorrt]"'


# ---------------------------------------------------------------------------------------------------- building
def polygraphy_loaders(onnx_path: str, engine_path: str, profiles: list[Shapes], timing_cache: str) -> Any:
    """The polygraphy loader chain that builds and saves one engine (nothing runs until it is called):
    SaveEngine(EngineFromNetwork(NetworkFromOnnxPath(strongly typed), CreateConfig(profiles, timing cache)))."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    network = NetworkFromOnnxPath(onnx_path, strongly_typed=True)
    trt_profiles = []
    for shapes in profiles:
        profile = Profile()
        for name, (low, opt, high) in shapes.items():
            profile.add(name, min=low, opt=opt, max=high)
        trt_profiles.append(profile)
    config = CreateConfig(profiles=trt_profiles, load_timing_cache=timing_cache)
    return SaveEngine(EngineFromNetwork(network, config, save_timing_cache=timing_cache), engine_path)


def tensorrt_version() -> str:
    """The installed TensorRT's version, checked to be a GPU machine's.

    Raises:
        XLoraError: tensorrt or polygraphy does not import, or no NVIDIA GPU is visible.
    """
    try:
        import polygraphy  # noqa: F401 - the builder's API
        import tensorrt
    except ImportError as e:
        raise XLoraError(f"xlora-engine {_NEEDS_TENSORRT} ({e.name} does not import)") from None
    from .backends.cuda import gpu_count

    if gpu_count() == 0:
        raise XLoraError("xlora-engine needs an NVIDIA GPU: the CUDA runtime sees none (an engine is built on the "
                         "GPU model it will run on)")
    return tensorrt.__version__


def build_engines(onnx_path: str, engine_path: str, limits: dict[str, int | None], timing_cache: str | None = None,
                  force: bool = False, progress: Callable[[str], None] | None = None) -> list[str]:
    """Build `OUT.engine` (and `OUT.frozen.engine` when the export has a frozen graph) with their sidecars, and
    copy the tokenizer beside them.

    Args:
        limits: keyword arguments of `profiles.limits_for` (max_batch, max_sequence, max_total, opt_*).
        timing_cache: default `xlora-timing.cache` in the engine's folder (shared by the builds there).
    Returns:
        The files written.
    Raises:
        XLoraError: see `GraphInfo.read`, `limits_for`, `tensorrt_version`; an existing OUT.engine without `force`.
    """
    say = progress or (lambda message: None)
    info = GraphInfo.read(onnx_path)
    if info.attention != C.ATTENTION_ONNX:
        raise XLoraError(f"{onnx_path}: exported with --attention {info.attention} (ONNX Runtime's "
                         f"GroupQueryAttention), which TensorRT's parser does not read; export with --attention onnx "
                         f"for TensorRT")
    if info.graph != C.GRAPH_TWO_PASS:
        raise XLoraError(f"{onnx_path}: this is the frozen-scalings graph; give the main graph (OUT.onnx)")
    spec = limits_for(info, **limits)
    companions = engine_companions(engine_path)
    if os.path.exists(engine_path) and not force:
        raise XLoraError(f"{engine_path} already exists (use --force to overwrite)")
    folder = os.path.dirname(os.path.abspath(engine_path))
    if not os.path.isdir(folder):
        raise XLoraError(f"{engine_path}: the folder {folder} does not exist")
    version = tensorrt_version()
    cache = timing_cache or companions["timing_cache"]
    graphs = [(onnx_path, engine_path, info)]
    frozen_onnx = C.frozen_path(onnx_path)
    if info.files.frozen and os.path.isfile(frozen_onnx):
        graphs.append((frozen_onnx, companions["frozen"], GraphInfo.read(frozen_onnx)))
    tokenizer = C.tokenizer_path(onnx_path)
    files = Files(frozen=os.path.basename(companions["frozen"]) if len(graphs) > 1 else None,
                  tokenizer=os.path.basename(companions["tokenizer"]) if os.path.isfile(tokenizer) else None)
    written = []
    for source, target, graph_info in graphs:
        profiles = engine_profiles(graph_info, spec)
        start = time.perf_counter()
        say(f"building {os.path.basename(target)} from {os.path.basename(source)} ({graph_info.dtype}, "
            f"TensorRT {version}, profiles: {', '.join(PHASES)})")
        try:
            polygraphy_loaders(source, target, profiles, cache)()
        except Exception as e:  # polygraphy reports TensorRT's failures as its own exception, after logging them
            raise XLoraError(f"{source}: TensorRT could not build an engine ({str(e).strip().splitlines()[-1]})"
                             ) from None
        say(f"built {os.path.basename(target)} in {time.perf_counter() - start:.1f} s")
        content = sidecar(dataclasses.replace(graph_info, files=files), spec.as_dict(), dict(zip(PHASES, profiles)),
                          os.path.abspath(source), version)
        written += [target, write_sidecar(target, content)]
    if files["tokenizer"]:
        shutil.copyfile(tokenizer, companions["tokenizer"])
        written.append(companions["tokenizer"])
    return written


# ----------------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    """The options of `xlora-engine`, grouped by concern."""
    parser = argparse.ArgumentParser(
        prog="xlora-engine", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build TensorRT engines from a graph exported by xlora-export, on the GPU they will run on.\n"
                    "Writes OUT.engine (+ OUT.frozen.engine) with a JSON sidecar each; run them with\n"
                    "xlora-generate OUT.engine (or XLoraSession('OUT.engine')). Precision comes from the graph:\n"
                    "export with --dtype fp16 or bf16 for a reduced-precision engine.")
    parser.add_argument("graph", metavar="OUT.onnx", help="main graph written by xlora-export")
    parser.add_argument("engine", metavar="OUT.engine", help="engine to write")
    lim = parser.add_argument_group("profiles (defaults: the export's --max-batch, prompts up to 1024 tokens, "
                                    "4096 positions, never more than the model's)")
    lim.add_argument("--max-batch", type=positive_int, metavar="N", help="rows per call")
    lim.add_argument("--max-sequence", type=positive_int, metavar="N", help="longest prompt, in tokens")
    lim.add_argument("--max-total", type=positive_int, metavar="N", help="longest sequence, prompt + new tokens")
    lim.add_argument("--opt-batch", type=positive_int, metavar="N", help="batch to tune for (default 1)")
    lim.add_argument("--opt-sequence", type=positive_int, metavar="N", help="prompt length to tune the prefill "
                     "profile for (default half of --max-sequence)")
    lim.add_argument("--opt-total", type=positive_int, metavar="N", help="sequence length to tune the decode "
                     "profile for (default half of --max-total)")
    out = parser.add_argument_group("output")
    out.add_argument("--timing-cache", metavar="PATH", help="TensorRT timing cache, read and updated (default "
                     "xlora-timing.cache beside OUT.engine)")
    out.add_argument("--force", action="store_true", help="overwrite an existing OUT.engine")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress, only the written files")
    return parser


def _command(args: argparse.Namespace) -> int:
    limits = {key: getattr(args, key) for key in ("max_batch", "max_sequence", "max_total", "opt_batch",
                                                  "opt_sequence", "opt_total")}
    progress = None if args.quiet else (lambda message: print(message, flush=True))
    for path in build_engines(args.graph, args.engine, limits, args.timing_cache, args.force, progress):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`xlora-engine`; returns the exit code (0 ok, 1 user error, 2 usage error, 130 interrupted)."""
    return run("xlora-engine", build_parser, _command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
