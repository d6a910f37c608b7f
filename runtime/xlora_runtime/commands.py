"""What every command of both packages shares: the runner and the argparse types.

    run(prog, build_parser, command, argv)   parse, run, and turn what goes wrong into one line and an exit code:
        0    the command's own success (it returns its code)
        1    a user error (`XLoraError`) or a file-system error (`OSError`: a folder that cannot be written, a
             full disk): `prog: error: <message>` on stderr, no traceback
        2    a usage error or a cross-option `check` (argparse has printed the usage and the message); --help: 0
        130  Ctrl-C at any moment, also while numpy, onnxruntime or torch is imported: `prog: interrupted` (plus
             the note of an `Interrupted` the command raised)

Every entry point is `main(argv=None) -> int` over `run`, so tests call it in-process. Only the standard library
is imported here: a command imports its heavy dependencies inside `command`, where Ctrl-C is still one line.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from .errors import XLoraError
from .threads import check_threads, thread_limit

__all__ = ["Interrupted", "add_session_options", "check_output_folder", "device_arg", "integer", "positive_float",
           "positive_int", "raise_if_interrupted", "run", "session_options"]

_pressed: list[bool] = []  # Ctrl-C seen during the running command (a destructor may have swallowed its exception)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, re-raised by a command with a note for its one line (e.g. `; OUT.onnx was not written`)."""

    def __init__(self, note: str) -> None:
        super().__init__(note)
        self.note = note


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed during this command. Python swallows an exception raised
    while a destructor runs (a released session, a temporary file); a long command calls this at its steps so
    that such a Ctrl-C still stops it."""
    if _pressed:
        raise KeyboardInterrupt


def run(prog: str, build_parser: Callable[[], argparse.ArgumentParser],
        command: Callable[[argparse.Namespace], int], argv: list[str] | None = None,
        check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None) -> int:
    """Build the parser, parse `argv` (None: sys.argv), run `command`; returns the exit code (see the module
    docstring).

    Args:
        check: usage checks across options, after parsing (`parser.error`: exit code 2).
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return _run(prog, build_parser, command, argv, check)

    def on_sigint(signum: int, frame: object) -> None:
        _pressed.append(True)
        signal.default_int_handler(signum, frame)

    _pressed.clear()
    previous = signal.signal(signal.SIGINT, on_sigint) or signal.SIG_DFL
    try:
        return _run(prog, build_parser, command, argv, check)
    finally:
        signal.signal(signal.SIGINT, previous)
        _pressed.clear()


def _run(prog: str, build_parser: Callable[[], argparse.ArgumentParser],
         command: Callable[[argparse.Namespace], int], argv: list[str] | None,
         check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None) -> int:
    try:
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            if check is not None:
                check(parser, args)
        except SystemExit as e:  # --help (0) and usage errors (2): argparse has already printed
            return e.code if isinstance(e.code, int) else 2
        try:
            return command(args)
        except (XLoraError, OSError) as e:
            print(f"{prog}: error: " + " ".join(str(e).split("\n")), file=sys.stderr)
            return 1
    except Interrupted as e:
        print(f"{prog}: interrupted{e.note}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------------ argparse types
def integer(text: str) -> int:
    """An integer option; otherwise a usage error `expected an integer, got 'x'`."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer option of at least 1."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number option above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def device_arg(text: str | None) -> str | int | None:
    """`--device`: a GPU index as an int, an OpenVINO device name as it is."""
    return int(text) if text is not None and text.isdigit() else text


def add_session_options(parser: argparse.ArgumentParser, stem: str) -> argparse._ArgumentGroup:
    """The "runtime" options (where the graph runs) of xlora-generate and xlora-serve; `session_options` reads
    them. `stem`: how the help names the graph (OUT, GRAPH)."""
    from .backends import PROVIDERS

    rt = parser.add_argument_group("runtime")
    rt.add_argument("--provider", choices=list(PROVIDERS), help="where the graph runs: ONNX Runtime's cpu, cuda or "
                    f"tensorrt execution provider, openvino, or trt-engine ({stem}.engine built by xlora-engine); "
                    "default trt-engine for an .engine file, else cpu")
    rt.add_argument("--device", metavar="D", help="OpenVINO device (CPU, GPU, NPU, AUTO; default CPU), or the GPU "
                    "index of cuda, tensorrt and trt-engine (default 0)")
    rt.add_argument("--threads", type=int, metavar="N", help="intra-op threads, 1 to twice the CPUs this process may "
                    f"run on (here {thread_limit()}; default: ONNX Runtime's choice)")
    rt.add_argument("--low-memory", action="store_true", help="ONNX Runtime without pre-packed weight copies: the "
                    "main and frozen graphs read the weights from one memory map of OUT.onnx.data (held once; "
                    "decode about 1.15x slower)")
    return rt


def session_options(args: argparse.Namespace) -> dict[str, Any]:
    """`XLoraSession` keyword arguments from the options of `add_session_options`.

    Raises:
        XLoraError: --threads below 1 or above `threads.thread_limit()`.
    """
    return dict(provider=args.provider, threads=check_threads(args.threads, "--threads"),
                device=device_arg(args.device), low_memory=args.low_memory)


def check_output_folder(option: str, path: str) -> None:
    """Refuse an output path whose folder does not exist, before the command's work rather than after it.

    Raises:
        XLoraError: `<option> <path>: the folder <folder> does not exist`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise XLoraError(f"{option} {path}: the folder {folder} does not exist")
