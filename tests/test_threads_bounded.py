"""Thread counts are bounded where they are accepted, and no call leaves threads behind.

`XLoraSession(threads=)`, `open_graph(threads=)`, `xlora-generate --threads` and `xlora-serve --threads` take
1 to twice the CPUs this process may run on; beyond that a one-line error, before any session starts its
threads. Sessions that a failed call opened are released with it: the process's OS threads (not only Python's)
are counted before and after calls of the kind the fuzz tests make.
"""

from __future__ import annotations

import os
import shutil

import pytest

from helpers import exported
from xlora_runtime import Generator, XLoraError, XLoraSession
from xlora_runtime import threads as thread_bounds
from xlora_runtime.backends.onnxruntime import open_graph
from xlora_runtime.cli import generate_main
from xlora_runtime.serve.cli import main as serve_main

TASKS = "/proc/self/task"
needs_proc = pytest.mark.skipif(not os.path.isdir(TASKS), reason="OS threads are counted in /proc/self/task (Linux)")


def os_threads() -> int:
    """The threads of this process as the OS counts them (ONNX Runtime's pools included)."""
    return len(os.listdir(TASKS))


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, repr(message)
    return message


# ------------------------------------------------------------------------------------------------- the limit
def test_the_limit_is_twice_the_cpus_this_process_may_run_on(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
        assert thread_bounds.available_cpus() == 3 and thread_bounds.thread_limit() == 6
        monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert thread_bounds.available_cpus() == 5 and thread_bounds.thread_limit() == 10
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert thread_bounds.thread_limit() == 2


@pytest.mark.parametrize("value, expected", [
    (0, "threads=0: expected >= 1"),
    (-3, "threads=-3: expected >= 1"),
    (True, "threads=True: expected None or an int >= 1"),
    ("2", "threads='2': expected None or an int >= 1"),
    (2.0, "threads=2.0: expected None or an int >= 1"),
    ("limit+1", "threads={value}: expected at most {limit} (twice the {cpus} CPUs this process may run on)"),
    (99999, "threads=99999: expected at most {limit} (twice the {cpus} CPUs this process may run on)"),
])
def test_session_refuses_thread_counts_outside_the_bounds(value, expected):
    limit, cpus = thread_bounds.thread_limit(), thread_bounds.available_cpus()
    value = limit + 1 if value == "limit+1" else value
    for opener in (lambda: XLoraSession(exported("tiny-llama"), threads=value),
                   lambda: open_graph(exported("tiny-llama"), threads=value)):
        with pytest.raises(XLoraError) as excinfo:
            opener()
        assert _one_line(excinfo) == expected.format(value=value, limit=limit, cpus=cpus)


def test_session_takes_the_limit_and_numpy_ints():
    import numpy as np

    limit = thread_bounds.thread_limit()
    assert XLoraSession(exported("tiny-llama"), threads=limit).threads == limit
    assert type(XLoraSession(exported("tiny-llama"), threads=np.int64(1)).threads) is int


@pytest.mark.parametrize("main, prog", [(generate_main, "xlora-generate"), (serve_main, "xlora-serve")])
def test_commands_refuse_threads_beyond_the_limit(capsys, main, prog):
    limit, cpus = thread_bounds.thread_limit(), thread_bounds.available_cpus()
    argv = [exported("tiny-llama"), "5,17", "--ids"] if main is generate_main else [exported("tiny-llama")]
    assert main([*argv, "--threads", str(limit + 1)]) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"{prog}: error: --threads {limit + 1}: expected at most {limit} (twice the {cpus} CPUs "
                            f"this process may run on)\n")
    assert captured.out == ""
    assert f"(here {limit};" in " ".join(_help(main, capsys).split())


def _help(main, capsys) -> str:
    assert main(["--help"]) == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------------------------------ nothing left behind
@pytest.fixture(scope="module")
def broken_frozen(tmp_path_factory) -> str:
    """A copy of the export whose frozen graph cannot be loaded: the main graph opens, then the frozen one fails."""
    source = exported("tiny-llama")
    folder = tmp_path_factory.mktemp("broken-frozen")
    stem = os.path.splitext(os.path.basename(source))[0]
    for name in os.listdir(os.path.dirname(source)):
        if name.startswith(stem + "."):
            shutil.copy(os.path.join(os.path.dirname(source), name), folder / name)
    (folder / f"{stem}.frozen.onnx").write_bytes(b"not an onnx graph")
    return str(folder / f"{stem}.onnx")


def _calls(graph: str, broken: str) -> list[list[str]]:
    """argv of the kind the fuzz tests draw: thread counts far beyond the limit, at it, and failures before,
    while and after the graphs open."""
    limit = str(thread_bounds.thread_limit())
    common = ["5,17", "--ids", "--max-new-tokens", "2"]
    return [
        [graph, *common, "--threads", "99999"],
        [graph, *common, "--threads", "400"],
        [graph, *common, "--threads", limit],
        [graph, *common, "--threads", limit, "--freeze-scalings-after", "1"],
        [graph, *common, "--threads", limit, "--system", "x"],  # refused after the main graph opened
        [graph, *common, "--threads", limit, "--temperature", "0.5"],
        [graph, *common, "--threads", limit, "--stop-id", "99999"],
        [graph, *common, "--threads", limit, "--expert-top-k", "9"],
        [broken, *common, "--threads", limit, "--freeze-scalings-after", "1"],  # the frozen graph fails to load
        [graph, *common, "--threads", "0"],
        [graph, *common, "--bogus"],
    ]


@needs_proc
def test_calls_leave_no_threads_behind(broken_frozen, capsys):
    graph = exported("tiny-llama")
    calls = _calls(graph, broken_frozen)
    for argv in calls[:3]:  # once first: threads that live as long as the process (ONNX Runtime's environment)
        generate_main(argv)
    before = os_threads()
    codes = [generate_main(argv) for argv in calls]
    refusals = []
    for path, value in ((graph, thread_bounds.thread_limit()), (graph, 99999), (broken_frozen, 2)):
        try:
            Generator(XLoraSession(path, threads=value)).generate([[5, 17]], max_new_tokens=2,
                                                                  freeze_scalings_after=1)
        except XLoraError as e:
            refusals.append(str(e))
    after = os_threads()
    capsys.readouterr()
    limit = thread_bounds.thread_limit()
    assert codes == [1, 1 if 400 > limit else 0, 0, 0, 1, 1, 1, 1, 1, 1, 2]
    assert len(refusals) == 2 and refusals[0].startswith(f"threads=99999: expected at most {limit} ")
    assert refusals[1].startswith(f"{broken_frozen[:-len('.onnx')]}.frozen.onnx: ONNX Runtime cannot load it")
    assert after <= before + 2, f"{after - before} threads more than before the calls"
