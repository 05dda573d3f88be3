"""A fork server: service processes forked from one that imported torch, diffusers and transformers once.

Starting a service spends most of its time importing those libraries (about 10 s of CPU each here), and a suite
starts four to eight at once. With ``LATENTWIRE_FORK_SERVER`` naming the socket of a running fork server
(``python -m services.suite.forkserver SOCKET``; the test session starts one: tests/conftest.py), the launcher asks it
for each service instead of executing a new interpreter: the server forks, the child becomes the service
(``python -m MODULE ARGS``: its own session, its standard output and error, working directory and environment, then
``runpy``), and the launcher gets a ``ForkedProcess`` that behaves as ``subprocess.Popen`` does (pid, poll, wait,
signals, return code; the server reports the exit status). The service is an ordinary process of its own, on its
own port; only the imports are shared (copy-on-write).

What only takes effect when a process starts cannot be changed per child: a request whose environment differs from
the server's in such a variable (``STARTUP_SENSITIVE``: OpenMP and allocator settings, PYTHON*, CUDA, ...) is started
the usual way (``spawn`` answers None), as is one run through a prefix command (a network namespace). The server
imports libraries only, never latentwire's services, and initializes no CUDA, Python thread, OpenMP team or gRPC
channel before it forks.
"""
from __future__ import annotations

import collections
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

#: Environment variable naming the fork server's socket; unset: services are started as new interpreters.
ENV_VAR = "LATENTWIRE_FORK_SERVER"
#: Variables read when a process or library starts: a child whose value differs from the server's is not forked.
#: TOKENIZERS_PARALLELISM is not one: the tokenizers library reads it when it tokenizes, not at start-up (and sets
#: it in a process that forks after using threads, as the test process does).
STARTUP_SENSITIVE = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "MALLOC_", "LD_", "PYTHON", "CUDA", "TORCH",
                     "NVIDIA", "HF_", "TRANSFORMERS", "DIFFUSERS", "GRPC_", "PYTORCH")
#: What the server imports before it forks (what every model service imports first). cv2 (the ControlNet
#: preprocessors, the VAE's upscaler, the gateway) sets LD_LIBRARY_PATH when imported: preloading it here makes that
#: variable one "set by imports", so a caller that imported cv2 itself (a test) still gets forked children.
PRELOAD = ("torch", "numpy", "PIL.Image", "grpc", "grpc_health.v1.health_pb2", "google.protobuf", "safetensors.torch",
           "transformers", "diffusers", "cv2")


#: Start-up variables whose difference from the server's made ``spawn`` start a new interpreter, with counts (the
#: test session prints them: tests/conftest.py).
FALLBACKS: collections.Counter = collections.Counter()


def _sensitive(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith(STARTUP_SENSITIVE)}


def _send(conn: socket.socket, payload: dict, fds: list[int] = ()) -> None:
    data = json.dumps(payload).encode()
    message = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(conn, [message], list(fds))
    else:
        conn.sendall(message)


def _receive(conn: socket.socket, *, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One framed JSON message (and the file descriptors sent with its first bytes); None at end of stream."""
    fds: list[int] = []
    if max_fds:
        head, fds, _, _ = socket.recv_fds(conn, 4, max_fds)
    else:
        head = conn.recv(4)
    while head and len(head) < 4:
        more = conn.recv(4 - len(head))
        if not more:
            break
        head += more
    if len(head) < 4:
        return None, fds
    (size,) = struct.unpack("!I", head)
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None, fds
        data += chunk
    return json.loads(data), fds


class ForkedProcess:
    """A service the fork server started, with the part of ``subprocess.Popen``'s interface the launcher and the
    tests use. It is the server's child, not ours: its exit status comes over the connection."""

    def __init__(self, args: list[str], pid: int, conn: socket.socket, stdout):
        self.args = args
        self.pid = pid
        self.stdout = stdout
        self.stderr = None
        self.returncode: int | None = None
        self._conn = conn
        self._lock = threading.Lock()

    def _collect(self, timeout: float) -> None:
        """Take the exit status if it arrives within ``timeout`` seconds (several threads may wait at once)."""
        if self.returncode is not None:
            return
        try:
            ready, _, _ = select.select([self._conn], [], [], timeout)
        except (OSError, ValueError):  # closed by another thread that took the status
            return
        if not ready:
            return
        with self._lock:
            if self.returncode is not None:
                return
            message, _ = _receive(self._conn)
            # The server went away without a status (it was killed): the child was killed with it.
            self.returncode = int(message["returncode"]) if message else -signal.SIGKILL
            self._conn.close()

    def poll(self) -> int | None:
        self._collect(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._collect(1.0 if left is None else min(left, 1.0))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def spawn(module: str, args: list[str], env: dict[str, str], stderr) -> ForkedProcess | None:
    """Have the fork server named by ``LATENTWIRE_FORK_SERVER`` start ``python -m module args`` with ``env`` and
    ``stderr`` (a file, or None for ours); None when there is none, or the child must start as a new interpreter."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        _send(conn, {"hello": True})
        server, _ = _receive(conn)
        ignored = set(server["set_by_imports"]) if server else set()
        mine = {key: value for key, value in _sensitive(env).items() if key not in ignored}
        if server is not None and mine != server["sensitive"]:
            theirs = server["sensitive"]
            FALLBACKS.update(key for key in set(mine) | set(theirs) if mine.get(key) != theirs.get(key))
        if server is None or mine != server["sensitive"]:
            conn.close()
            return None
        read_end, write_end = os.pipe()
        try:
            _send(conn, {"module": module, "args": args, "env": env, "cwd": os.getcwd()},
                  [write_end, stderr.fileno() if stderr is not None else 2])
        finally:
            os.close(write_end)
        answer, _ = _receive(conn)
        if answer is None:
            os.close(read_end)
            conn.close()
            return None
    except OSError:
        conn.close()
        return None
    return ForkedProcess([sys.executable, "-m", module, *args], answer["pid"], conn, os.fdopen(read_end, "rb"))


def _become(request: dict, fds: list[int]) -> None:
    """In the forked child: turn into ``python -m MODULE ARGS`` as ``request`` describes; never returns."""
    import runpy

    os.setsid()  # as Popen(start_new_session=True): a Ctrl-C meant for the launcher does not reach it
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(request["cwd"])
    if sys.path and sys.path[0] == request["server_cwd"]:
        sys.path[0] = request["cwd"]  # as `python -m` puts the working directory first
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    import numpy

    numpy.random.seed()  # the server's global numpy state is not shared (Python's random reseeds itself)
    sys.argv = [request["module"], *request["args"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    sys.exit(0)


def serve(path: str) -> tuple[dict, list[int]] | None:
    """Accept spawn requests on the socket ``path`` until SIGTERM; returns only in a forked child (its request)."""
    before = dict(os.environ)
    server_cwd = os.getcwd()
    sensitive = _sensitive(before)
    from services.runtime.image_processors import choose_pil_image_processors

    choose_pil_image_processors()  # as each model service's package does, before diffusers is imported
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    # No Python thread may run at a fork. Native ones: OpenBLAS (numpy's, scipy's) starts its pool at load and
    # stops it around a fork itself (pthread_atfork); torch's OpenMP pool starts at the first parallel operation,
    # which nothing here runs.
    if threading.active_count() != 1:
        raise SystemExit("fork server: a preloaded library started a Python thread; forking would not be safe")
    # What importing set in the environment (torch: TORCHINDUCTOR_CACHE_DIR) a fresh interpreter would set too; the
    # caller's environment may hold them from its own imports: they do not count as a difference.
    set_by_imports = {key: value for key, value in os.environ.items() if key not in before}
    sensitive = {key: value for key, value in sensitive.items() if key not in set_by_imports}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    listener.bind(path)
    listener.listen(64)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    children: dict[int, socket.socket] = {}
    print(f"fork server ready on {path}", flush=True)
    while not stopping:
        try:
            ready, _, _ = select.select([listener], [], [], 0.05)
        except InterruptedError:
            ready = []
        for _ in ready:
            conn, _ = listener.accept()
            try:
                hello, _ = _receive(conn)
                if hello is None:
                    conn.close()
                    continue
                _send(conn, {"sensitive": sensitive, "set_by_imports": sorted(set_by_imports)})
                request, fds = _receive(conn, max_fds=2)
                if request is None or len(fds) != 2:
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
            except OSError:
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                for other in children.values():
                    other.close()
                request["env"] = {**set_by_imports, **request["env"]}
                request["server_cwd"] = server_cwd
                return request, fds
            for fd in fds:
                os.close(fd)
            children[pid] = conn
            try:
                _send(conn, {"pid": pid})
            except OSError:
                pass
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                conn.close()
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    listener.close()
    os.unlink(path)
    return None


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m services.suite.forkserver SOCKET")
    child = serve(sys.argv[1])
    if child is not None:
        _become(*child)


if __name__ == "__main__":
    main()
