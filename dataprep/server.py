"""The embedded Prefect server: start, stop and query a local one.

``dataprep server start`` runs ``prefect server start`` as a detached process
on 127.0.0.1 with its SQLite database under a project directory (the
server's ``PREFECT_HOME``), telemetry off, waits until ``/api/health``
answers, and creates the global concurrency limit ``gpu`` that every GPU
stage holds (``strict=True``: a run never silently ignores a missing limit).
The same flows run against a team server or Prefect Cloud by setting
``PREFECT_API_URL`` instead; nothing here is needed then.

Only the standard library and httpx are used: Prefect itself runs in the
child process, so this module stays importable without the server extras.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dataprep.errors import ConfigError

DEFAULT_HOME = Path(".prefect")
DEFAULT_PORT = 4200
HOST = "127.0.0.1"  # loopback only: the local server has no authentication
GPU_LIMIT = "gpu"
STATE_FILE = "dataprep-server.json"


@dataclass
class ServerState:
    """What ``start`` leaves in ``HOME/dataprep-server.json`` for stop/status."""

    pid: int
    port: int
    home: str

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def server_env(home: Path | str, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server process: its home, SQLite file, loopback, no telemetry."""
    home = Path(home).resolve()
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_SERVER_API_HOST": HOST,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api",
        }
    )
    env.pop("PREFECT_API_URL", None)  # the server must not try to talk to another server
    return env


def client_env(state: ServerState, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for processes that use this server (``dataprep serve``, workers)."""
    env = dict(os.environ if base is None else base)
    env.update({"PREFECT_API_URL": state.api_url, "PREFECT_HOME": state.home, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return env


def free_port() -> int:
    """A port nobody listens on right now (for tests; races are unlikely on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        r = httpx.get(f"{api_url}/health", timeout=timeout)
        return r.status_code == 200 and r.json() is True
    except (httpx.HTTPError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_state(home: Path | str = DEFAULT_HOME) -> ServerState | None:
    path = Path(home) / STATE_FILE
    if not path.exists():
        return None
    try:
        return ServerState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def ensure_gpu_limit(api_url: str, slots: int = 1) -> None:
    """Create the global concurrency limit ``gpu`` (``slots`` cards) unless it exists.

    An existing limit keeps its size: an operator may have resized it.
    """
    import httpx

    if slots < 1:
        raise ConfigError(f"--gpu-slots {slots} must be at least 1", "--gpu-slots", "the number of GPUs the flows may use at once")
    r = httpx.get(f"{api_url}/v2/concurrency_limits/{GPU_LIMIT}", timeout=10)
    if r.status_code == 200:
        return
    r = httpx.post(f"{api_url}/v2/concurrency_limits/", json={"name": GPU_LIMIT, "limit": slots}, timeout=10)
    if r.status_code not in (200, 201, 409):
        raise RuntimeError(f"could not create the {GPU_LIMIT!r} concurrency limit: HTTP {r.status_code} {r.text[:200]}")


def start(home: Path | str = DEFAULT_HOME, port: int = DEFAULT_PORT, gpu_slots: int = 1, timeout_s: float = 90.0, ui: bool = True) -> ServerState:
    """Start the server in the background and wait for ``/api/health``.

    Idempotent: a server this home already runs is returned as is. Raises
    ConfigError when the port is taken by something else, RuntimeError (with
    the end of the server log) when it exits or never becomes healthy.
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    running = read_state(home)
    if running and _alive(running.pid) and healthy(running.api_url):
        ensure_gpu_limit(running.api_url, gpu_slots)
        return running
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if s.connect_ex((HOST, port)) == 0:
            raise ConfigError(f"port {port} on {HOST} is already in use", "--port", "stop the other server or pick another port")
    log = open(home / "server.log", "ab")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"]
    if not ui:
        cmd.append("--no-ui")
    # its own session: Ctrl-C in the shell that started it does not stop it, and
    # stop() can signal the whole group (uvicorn and the services it spawns)
    proc = subprocess.Popen(cmd, env=server_env(home, port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    state = ServerState(pid=proc.pid, port=port, home=str(home))
    deadline = time.monotonic() + timeout_s
    while not healthy(state.api_url):
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with status {proc.returncode}; end of {home / 'server.log'}:\n{_tail(home / 'server.log')}")
        if time.monotonic() > deadline:
            _terminate(proc.pid)
            raise RuntimeError(f"prefect server not healthy after {timeout_s:.0f} s; end of {home / 'server.log'}:\n{_tail(home / 'server.log')}")
        time.sleep(0.5)
    (home / STATE_FILE).write_text(json.dumps(state.__dict__))
    ensure_gpu_limit(state.api_url, gpu_slots)
    return state


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _terminate(pid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our child: reap it
                    return
            except ChildProcessError:  # started by another process: poll instead
                if not _alive(pid):
                    return
            time.sleep(0.2)


def stop(home: Path | str = DEFAULT_HOME) -> ServerState | None:
    """Stop the server this home runs; returns its state, or None if none ran."""
    home = Path(home).resolve()
    state = read_state(home)
    if state is None:
        return None
    if _alive(state.pid):
        _terminate(state.pid)
    (home / STATE_FILE).unlink(missing_ok=True)
    return state


def status(home: Path | str = DEFAULT_HOME) -> tuple[ServerState | None, bool]:
    """(state, healthy): state is None when this home runs no server."""
    state = read_state(home)
    if state is None or not _alive(state.pid):
        return None, False
    return state, healthy(state.api_url)
