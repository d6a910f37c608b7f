"""The README's runnable blocks run as written, in order, and print what the README shows.

Markers (HTML comments, invisible on GitHub), each on the line right before a fenced block:
- `<!-- runnable -->`: the block runs. bash blocks run with `bash -e`, Python blocks with this interpreter, all in
  one temporary folder where `models/` is the repository's, as a user who follows the README top to bottom would.
  The one edit made to a block: a line that starts with `pip install` is left out, and so is a leading
  `pip install ... &&` (the test environment already has the packages; the README's install lines say how to get
  them).
- `<!-- runnable: background -->`: a server. It is started with `--port 0` instead of the port the README shows,
  and the next runnable block (its client) runs with the port the server printed; the server is then stopped.
- `<!-- output -->`: what the runnable block just before prints (stdout and stderr together). Each of its lines
  must appear in that output, in order: a number stands for any number, `...` inside a line for any text, and a
  line that is only `...` for any lines.

Stand-ins for what a user brings, built from the recipes of `models/recipes.py` before the blocks run (the
README's names, realistic for a user, are given to small models):
- a Hugging Face Hub cache laid out as huggingface_hub lays it out (`models--ORG--NAME/blobs`, `snapshots/REV`,
  `refs/main`) holding a small Mistral under the Hub id the README names, with `HF_HUB_CACHE` pointing at it and
  `HF_HUB_OFFLINE=1` for every block (no test reaches the network);
- `my-peft-xlora/`: PEFT's `save_pretrained` of an X-LoRA model over that base, naming it by its Hub id;
- `my-base/`, `adapters/math/`, `adapters/code/`: a small Llama and two of its PEFT LoRA adapters;
- `train.txt`: text to train the classifier on.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import pytest
from safetensors.torch import save_file

from helpers import built, make_xlora, peft_oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BASE_ID = "HuggingFaceH4/zephyr-7b-beta"  # the Hub id the README's PEFT example fetches; a small Mistral here
PEFT_PREFIX = "base_model.internal_xlora_classifier."  # where PEFT keeps the classifier's tensors
BLOCK_TIMEOUT = 300  # seconds per block; the whole file takes about a minute

_BLOCK = re.compile(r"^<!-- (runnable|runnable: background|output) -->\n```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"


@dataclass
class Block:
    kind: str  # "runnable", "runnable: background" or "output"
    lang: str  # the fence's info string: bash, python, text
    code: str
    line: int  # of the fence, 1-based
    heading: str  # the section it is in


@dataclass
class Step:
    """What one test runs: a runnable block (with a server started before it for a background block), and the
    output it must print."""

    id: str
    block: Block
    server: Block | None = None
    expected: list[str] = field(default_factory=list)


def readme_blocks(text: str) -> list[Block]:
    headings, fenced = [], False  # (line, title) of the headings outside fenced blocks
    for number, line in enumerate(text.splitlines(), 1):
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"##? ", line):
            headings.append((number, line.lstrip("#").strip()))
    blocks = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 2
        heading = [title for number, title in headings if number < line][-1]
        blocks.append(Block(m.group(1), m.group(2), m.group(3), line, heading))
    return blocks


def readme_steps(text: str) -> list[Step]:
    steps: list[Step] = []
    server = None
    for block in readme_blocks(text):
        if block.kind == "output":
            assert steps and not steps[-1].expected, f"README.md:{block.line}: an output block after no runnable one"
            steps[-1].expected = block.code.splitlines()
        elif block.kind == "runnable: background":
            server = block
        else:
            slug = re.sub(r"[^a-z0-9]+", "-", block.heading.lower()).strip("-")
            n = sum(1 for s in steps if s.id.startswith(slug))
            steps.append(Step(f"{slug}-{n + 1}", block, server))
            server = None
    assert server is None, f"README.md:{server.line}: a background block with no runnable block after it"
    return steps


def without_pip(code: str) -> str:
    """The block minus its `pip install` lines (a leading `pip install ... && ` goes, the command after it stays)."""
    lines = []
    for line in code.splitlines():
        if line.lstrip().startswith("pip install"):
            _, sep, rest = line.partition(" && ")
            if not sep:
                continue
            line = rest
        lines.append(line)
    return "\n".join(lines) + "\n"


def line_pattern(expected: str) -> re.Pattern:
    pieces = []
    for piece in expected.rstrip().split("..."):
        parts = re.split(f"({_NUMBER})", piece)
        pieces.append("".join(_NUMBER if i % 2 else re.escape(p) for i, p in enumerate(parts)))
    return re.compile(".*".join(pieces))


def check_output(expected: list[str], output: str) -> None:
    """Each expected line matches a line of `output`, in order (see the module docstring)."""
    lines = [line.rstrip() for line in output.splitlines()]
    at = 0
    for want in expected:
        if want.strip() == "...":
            continue
        pattern = line_pattern(want)
        while at < len(lines) and not pattern.fullmatch(lines[at]):
            at += 1
        assert at < len(lines), f"the README shows {want!r}; the output (after the lines matched before) was:\n{output}"
        at += 1


# ----------------------------------------------------------------------------- what a user brings
def _hub_snapshot(cache: str, repo: str, source: str) -> None:
    """`source`'s files as huggingface_hub caches `repo` at main: blobs named by content, the snapshot's files
    relative links to them, `refs/main` naming the snapshot."""
    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    revision = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = os.path.join(folder, "snapshots", revision)
    os.makedirs(os.path.join(folder, "blobs"))
    os.makedirs(os.path.join(folder, "refs"))
    for name in sorted(os.listdir(source)):
        with open(os.path.join(source, name), "rb") as f:
            data = f.read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(folder, "blobs", blob), "wb") as f:
            f.write(data)
        os.makedirs(snapshot, exist_ok=True)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(revision)


def _peft_xlora_checkpoint(out: str) -> None:
    """PEFT's own save of an X-LoRA model over the tiny Mistral, its base then named by BASE_ID as a real one's is.
    The classifier is written whole, whatever the installed PEFT's save keeps (some versions drop tensors, which
    the loader refuses; the checkpoint tests cover that)."""
    peft_model = peft_oracle(make_xlora("tiny-mistral"), "tiny-mistral")
    peft_model.save_pretrained(out)
    classifier = peft_model.base_model.internal_xlora_classifier.state_dict()
    save_file({PEFT_PREFIX + k: v.detach().contiguous() for k, v in classifier.items()},
              os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    path = os.path.join(out, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = BASE_ID
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def _own_adapters(work: str) -> None:
    """`my-base/` and two PEFT LoRA adapters of it (the tiny Llama's), and `train.txt`."""
    shutil.copytree(os.path.join(built("tiny-llama"), "base"), os.path.join(work, "my-base"))
    recipe = built("tiny-llama")
    for mine, theirs in (("math", "alpha"), ("code", "beta")):
        shutil.copytree(os.path.join(recipe, theirs), os.path.join(work, "adapters", mine))
    words = ["the model mixes experts", "a small classifier routes each token", "two passes share one graph",
             "the runtime keeps both caches"]
    with open(os.path.join(work, "train.txt"), "w") as f:
        f.write("\n".join(f"{w} {i}." for i in range(8) for w in words) + "\n")


class ReadmeRun:
    """Runs the README's steps in order, each once; a step's result is kept for its test."""

    def __init__(self, work: str, env: dict[str, str], steps: list[Step]) -> None:
        self.work, self.env, self.steps = work, env, steps
        self.results: dict[str, tuple[int, str]] = {}

    def result(self, step: Step) -> tuple[int, str]:
        for earlier in self.steps[: self.steps.index(step) + 1]:
            if earlier.id not in self.results:
                self.results[earlier.id] = self._run(earlier)
        return self.results[step.id]

    def _execute(self, block: Block, code: str) -> tuple[int, str]:
        if block.lang == "python":
            argv, stdin = [sys.executable, "-"], code
        else:
            argv, stdin = ["bash", "-e", "-c", code], None
        proc = subprocess.run(argv, input=stdin, cwd=self.work, env=self.env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT)
        return proc.returncode, proc.stdout + proc.stderr

    def _run(self, step: Step) -> tuple[int, str]:
        code = without_pip(step.block.code)
        if step.server is None:
            return self._execute(step.block, code)
        server_code = without_pip(step.server.code)
        shown = re.search(r"--port (\d+)", server_code)
        assert shown, f"README.md:{step.server.line}: the server block shows no --port"
        proc = subprocess.Popen(["bash", "-e", "-c", server_code.replace(shown.group(0), "--port 0")], cwd=self.work,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
        try:
            seen = []
            while True:
                try:
                    line = lines.get(timeout=BLOCK_TIMEOUT)
                except queue.Empty:
                    return 1, "the server printed no address in time:\n" + "".join(seen)
                seen.append(line)
                port = re.search(r"http://127\.0\.0\.1:(\d+)", line)
                if port:
                    break
                if proc.poll() is not None and lines.empty():
                    return 1, "the server stopped:\n" + "".join(seen)
            return self._execute(step.block, code.replace(f":{shown.group(1)}", f":{port.group(1)}"))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


with open(README, encoding="utf-8") as _f:
    STEPS = readme_steps(_f.read())


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> ReadmeRun:
    top = tmp_path_factory.mktemp("readme")
    work, cache = str(top / "work"), str(top / "hub")
    os.makedirs(work)
    os.symlink(os.path.join(ROOT, "models"), os.path.join(work, "models"))
    _hub_snapshot(cache, BASE_ID, os.path.join(built("tiny-mistral"), "base"))
    _peft_xlora_checkpoint(os.path.join(work, "my-peft-xlora"))
    _own_adapters(work)
    env = dict(os.environ, HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # this environment's commands
    return ReadmeRun(work, env, STEPS)


@pytest.mark.parametrize("step", STEPS, ids=[s.id for s in STEPS])
def test_readme_block_runs_as_written(readme_run, step):
    code, output = readme_run.result(step)
    assert code == 0, f"README.md:{step.block.line} ({step.id}) exited {code}:\n{output}"
    check_output(step.expected, output)


def test_the_runnable_blocks_cover_what_a_new_user_does():
    """Removing a marker must not silently drop what the README promises a user can do."""
    runnable = "\n".join(s.block.code + (s.server.code if s.server else "") for s in STEPS)
    for needed in ("xlora-export models/xlora-demo", "xlora-generate", f"hf download {BASE_ID}",
                   "HF_HUB_OFFLINE=1 xlora-export", "add_xlora_to_model", "Trainer(", "save_pretrained",
                   "xlora-serve", "curl"):
        assert needed in runnable, f"no runnable README block runs {needed!r}"
    with open(README, encoding="utf-8") as f:
        text = f.read()
    markers = len(re.findall(r"^<!-- (?:runnable|runnable: background|output) -->", text, re.M))
    assert markers == len(readme_blocks(text)), "a marker is not on the line right before a fenced block"
    assert all(s.block.lang in ("bash", "python") for s in STEPS)


def test_output_check_tells_text_apart():
    output = "[   0.3s] loading\n[0]  three zero five\n18 tokens in 0.03 s: 601.3 tokens/s\n"
    check_output(["...", "[0]  three zero five", "18 tokens in 9.99 s: 1.0 tokens/s"], output)
    check_output(["[0]  three ... five"], output)
    for wrong in (["[0]  three zero six"], ["18 tokens in 0.03 s: 601.3 tokens/s", "[0]  three zero five"],
                  ["tokens in s"]):
        with pytest.raises(AssertionError, match="the README shows"):
            check_output(wrong, output)


def test_pip_lines_are_the_only_edit():
    assert without_pip('pip install "./runtime[serve]"\nxlora-serve x.onnx --port 8000\n') == \
        "xlora-serve x.onnx --port 8000\n"
    assert without_pip("pip install torch==2.13.0 -e . && xlora-export a b --force\n") == "xlora-export a b --force\n"
    assert without_pip("echo 'pip install'\n") == "echo 'pip install'\n"
