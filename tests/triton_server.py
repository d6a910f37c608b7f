"""A real Triton Inference Server on this machine: the `tritonserver` binary (and its Python backend) that the
`nvidia-pytriton` wheel ships, in a virtual environment of its own, started on 127.0.0.1.

The wheel pins numpy below 2, so it never enters the test environment: `server_env` builds a venv with the wheel
and this checkout's runtime (editable: the server runs the code under test), cached under
$XDG_CACHE_HOME/xlora-export (default ~/.cache) by the wheel's version, the Python version and the checkout's
path; a build takes about a minute (pip, from PyPI) and happens once.

`TritonServer` prepares the backend folder Triton expects (the wheel's `libtriton_python.so` and
`triton_python_backend_utils.py` beside the stub built for the venv's Python), sets `LD_LIBRARY_PATH` to the
wheel's libraries and the venv's `bin` first on `PATH` (the stub runs the venv's Python), binds every listener to
127.0.0.1 on free ports, and stops the server by its PID (its stubs with it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTRITON = "nvidia-pytriton==0.7.0"  # tritonserver 2.51 with its Python backend
SHM_PREFIX = "triton_python_backend_shm_region"


def server_env() -> str:
    """The Python of the server's venv (built on first use).

    Raises:
        RuntimeError: pip could not install the wheel (its message's last line).
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    key = hashlib.sha256(f"{PYTRITON} {version} {ROOT}".encode()).hexdigest()[:12]
    home_cache = os.path.join(os.environ.get("HOME", tempfile.gettempdir()), ".cache")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or home_cache, "xlora-export")
    venv = os.path.join(cache, f"triton-venv-{key}")
    python = os.path.join(venv, "bin", "python")
    if os.path.isfile(os.path.join(venv, "ready")):
        return python
    os.makedirs(cache, exist_ok=True)
    building = tempfile.mkdtemp(prefix="triton-venv-building-", dir=cache)
    try:
        subprocess.run([sys.executable, "-m", "venv", building], check=True, capture_output=True)
        try:
            result = subprocess.run([os.path.join(building, "bin", "python"), "-m", "pip", "install", "-q",
                                     "--disable-pip-version-check", PYTRITON, "-e", os.path.join(ROOT, "runtime")],
                                    capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pip install {PYTRITON}: no answer in 900 s") from None
        if result.returncode != 0:
            raise RuntimeError(f"pip install {PYTRITON}: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if os.path.isdir(venv):  # another run built it meanwhile
        shutil.rmtree(building, ignore_errors=True)
    else:
        # a venv's scripts name their own folder: build in place of the final one by renaming, then fix the paths
        os.rename(building, venv)
        for script in os.listdir(os.path.join(venv, "bin")):
            path = os.path.join(venv, "bin", script)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    text = f.read()
                if building.encode() in text:
                    with open(path, "wb") as f:
                        f.write(text.replace(building.encode(), venv.encode()))
        open(os.path.join(venv, "ready"), "w").close()
    return python


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def shm_regions() -> set[str]:
    """The Python backend's shared-memory regions now in /dev/shm."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(SHM_PREFIX)}


class TritonServer:
    """`tritonserver` serving `repo` from the venv of `python` (see the module docstring).

    Attributes:
        http, grpc: "127.0.0.1:PORT" of the HTTP and gRPC endpoints.
        log: the server's output (a file).
    """

    def __init__(self, repo: str, python: str, *options: str, ready: bool = True, timeout: float = 120) -> None:
        site = subprocess.run([python, "-c", "import os, pytriton; print(os.path.dirname(pytriton.__file__))"],
                              check=True, capture_output=True, text=True).stdout.strip()
        server = os.path.join(site, "tritonserver")
        version = subprocess.run([python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        self.folder = tempfile.mkdtemp(prefix="xlora-triton-")
        backend = os.path.join(self.folder, "backends", "python")
        os.makedirs(backend)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy(os.path.join(server, "backends", "python", name), backend)
        shutil.copy(os.path.join(server, "python_backend_stubs", version, "triton_python_backend_stub"), backend)
        http, grpc, metrics = _free_ports(3)
        self.http, self.grpc = f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"
        env = {**os.environ, "PATH": os.path.dirname(python) + os.pathsep + os.environ.get("PATH", ""),
               "LD_LIBRARY_PATH": os.path.join(os.path.dirname(site), "nvidia_pytriton.libs")}
        env.pop("PYTHONPATH", None)  # the stub imports the venv's packages, not the test environment's
        self.log = os.path.join(self.folder, "server.log")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [os.path.join(server, "bin", "tritonserver"), "--model-repository", repo,
                 "--backend-directory", os.path.join(self.folder, "backends"),
                 "--http-address", "127.0.0.1", "--http-port", str(http), "--grpc-address", "127.0.0.1",
                 "--grpc-port", str(grpc), "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics),
                 "--exit-timeout-secs", "10", *options],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if ready:
            self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.process.returncode}):\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"http://{self.http}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def wait(self, timeout: float) -> int:
        """The exit code of a server that stops by itself (a repository that does not load)."""
        return self.process.wait(timeout)

    def stop(self) -> int:
        """SIGTERM to the server's PID (it unloads its models and stops their stubs), SIGKILL to its process group
        after 30 s; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(os.path.join(self.folder, "backends"), ignore_errors=True)
        return self.process.returncode
