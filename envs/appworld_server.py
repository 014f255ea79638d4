"""AppWorld's separate virtual environment and its ``appworld serve environment`` processes.

AppWorld (``appworld==0.1.3.post1``) pins pydantic 1, fastapi 0.110 and httpx<0.28, so it cannot share verl's
environment. This module, importable from verl's venv with the standard library only:

- creates and installs the AppWorld venv (:func:`setup`): ``python -m venv``, ``pip install appworld==0.1.3.post1``,
  ``appworld install`` (decrypts the bundled apps offline), then builds the offline tasks of
  :mod:`verl_hindsight.envs.appworld_tasks`. Idempotent: a marker file makes a second call return at once.
  Location: ``venv=`` argument, else ``$VERL_HINDSIGHT_APPWORLD_VENV``, else ``~/.cache/verl-hindsight/appworld-venv``;
- finds the AppWorld data (:func:`resolve_data_root`): the user's AppWorld root (``data_root=`` argument, else
  ``$VERL_HINDSIGHT_APPWORLD_ROOT``, else ``$APPWORLD_ROOT``) when it holds ``data/datasets/train.txt`` and
  ``data/tasks``, otherwise the generated tasks under ``<venv>/generated-root``;
- runs one AppWorld environment server per concurrent episode (:class:`AppWorldServer`): AppWorld's own FastAPI app
  (``appworld.serve.environment``, what ``appworld serve environment`` runs), served by uvicorn on a Unix socket in
  the server's private working directory, under OS limits (``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_NOFILE``,
  ``RLIMIT_FSIZE``, ``RLIMIT_CORE=0``), killed with its parent (``PR_SET_PDEATHSIG``), and when the kernel allows
  unprivileged user namespaces, inside a fresh network namespace (no network at all; ``unshare --user --net``) with
  the trainer's directories hidden under empty tmpfs mounts (``--mount``). Health checks, restarts and cleanup
  (``close()``, ``atexit``) are here; the HTTP client is :class:`ServerClient` (``http.client`` over the socket).

CLI (``python -m verl_hindsight.envs.appworld_server``)::

    setup [--venv DIR] [--python PY] [--force]          # venv + appworld install + generated tasks
    generate-tasks [--venv DIR] [--root DIR] [--force]  # (re)build the offline tasks
    serve [--venv DIR] [--data-root DIR]                # one sandboxed server in the foreground (debugging)
    info                                                # paths, versions, sandbox support
"""

from __future__ import annotations

import atexit
import ctypes
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

APPWORLD_VERSION = "0.1.3.post1"
APPWORLD_REQUIREMENT = f"appworld=={APPWORLD_VERSION}"
VENV_ENV_VAR = "VERL_HINDSIGHT_APPWORLD_VENV"
ROOT_ENV_VAR = "VERL_HINDSIGHT_APPWORLD_ROOT"
DEFAULT_VENV = os.path.join("~", ".cache", "verl-hindsight", "appworld-venv")
SETUP_MARKER = ".verl_hindsight_setup.json"
SETUP_VERSION = 1
GENERATED_ROOT = "generated-root"
APPWORLD_CACHE = "appworld-cache"  # APPWORLD_CACHE: where `appworld install` unpacks the package tests


class AppWorldSetupError(RuntimeError):
    """The AppWorld venv or data is missing or broken; the message says which command fixes it."""


class ServerError(RuntimeError):
    """A server call failed. ``reason``: ``server_timeout``, ``server_crashed``, ``server_start_failed``, ``http_error``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ------------------------------------------------------------------------------------------------ venv and data


def venv_dir(venv: Optional[str] = None) -> str:
    return os.path.abspath(os.path.expanduser(venv or os.environ.get(VENV_ENV_VAR) or DEFAULT_VENV))


def venv_python(venv: Optional[str] = None) -> str:
    return os.path.join(venv_dir(venv), "bin", "python")


def _marker(venv: Optional[str]) -> dict:
    try:
        with open(os.path.join(venv_dir(venv), SETUP_MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def is_set_up(venv: Optional[str] = None) -> bool:
    m = _marker(venv)
    return (m.get("setup_version") == SETUP_VERSION and m.get("appworld") == APPWORLD_VERSION
            and os.path.exists(venv_python(venv)))


def _find_python(python: Optional[str]) -> str:
    """A python >= 3.11 (AppWorld's requirement) to create the venv with."""
    candidates = [python] if python else [sys.executable, shutil.which("python3.11"), shutil.which("python3.12"),
                                          shutil.which("python3")]
    for cand in candidates:
        if not cand:
            continue
        try:
            out = subprocess.run([cand, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.stdout.strip() == "True":
            return cand
    raise AppWorldSetupError("AppWorld needs python >= 3.11; pass --python PATH to a 3.11+ interpreter")


def _run(cmd: list[str], env: Optional[dict] = None, log=None, timeout: float = 1800) -> None:
    if log:
        log(f"$ {' '.join(cmd)}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise AppWorldSetupError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def _appworld_env(venv: Optional[str], root: Optional[str] = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["APPWORLD_CACHE"] = os.path.join(venv_dir(venv), APPWORLD_CACHE)
    env["PATH"] = os.path.join(venv_dir(venv), "bin") + os.pathsep + env.get("PATH", "")
    if root:
        env["APPWORLD_ROOT"] = root
    return env


def setup(venv: Optional[str] = None, python: Optional[str] = None, force: bool = False, tasks: bool = True,
          log=None) -> str:
    """Create/install the AppWorld venv (idempotent; fast when done) and build the offline tasks. Returns the venv."""
    path = venv_dir(venv)
    if force or not is_set_up(path):
        started = time.monotonic()
        if force and os.path.exists(path):
            shutil.rmtree(path)
        if not os.path.exists(os.path.join(path, "bin", "python")):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _run([_find_python(python), "-m", "venv", path], log=log)
        env = _appworld_env(path)
        _run([venv_python(path), "-m", "pip", "install", "--quiet", APPWORLD_REQUIREMENT], env=env, log=log)
        # `appworld install` decrypts the bundled app sources into the venv's site-packages (offline).
        _run([os.path.join(path, "bin", "appworld"), "install"], env=env, log=log)
        _run([venv_python(path), "-c", "import appworld.apps.simple_note.apis"], env=env, log=log)
        with open(os.path.join(path, SETUP_MARKER), "w") as f:
            json.dump({"setup_version": SETUP_VERSION, "appworld": APPWORLD_VERSION,
                       "seconds": round(time.monotonic() - started, 1)}, f)
    if tasks:
        generate_tasks(venv=path, log=log)
    return path


def generated_root(venv: Optional[str] = None) -> str:
    return os.path.join(venv_dir(venv), GENERATED_ROOT)


def generate_tasks(venv: Optional[str] = None, root: Optional[str] = None, force: bool = False, log=None) -> str:
    """Build the offline tasks with the AppWorld venv's python (idempotent). Returns the AppWorld root."""
    from verl_hindsight.envs import appworld_tasks

    if not is_set_up(venv):
        raise AppWorldSetupError(f"the AppWorld venv at {venv_dir(venv)} is not set up; run "
                                 "`python -m verl_hindsight.envs.appworld_server setup`")
    root = os.path.abspath(root or generated_root(venv))
    try:
        done = appworld_tasks.load_tasks_file(root).get("generator_version") == appworld_tasks.GENERATOR_VERSION
    except (OSError, ValueError):
        done = False
    if done and not force:
        return root
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _run([venv_python(venv), "-P", appworld_tasks.__file__, "--root", tmp], env=_appworld_env(venv, tmp), log=log)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


def is_real_root(root: Optional[str]) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "data", "datasets", "train.txt")) \
        and os.path.isdir(os.path.join(root, "data", "tasks"))


def resolve_data_root(data_root: Optional[str] = None, venv: Optional[str] = None) -> tuple[str, bool]:
    """``(root, is_user_data)``: the user's AppWorld root when present, else the generated tasks' root."""
    for cand in (data_root, os.environ.get(ROOT_ENV_VAR), os.environ.get("APPWORLD_ROOT")):
        if cand and is_real_root(os.path.abspath(os.path.expanduser(cand))):
            return os.path.abspath(os.path.expanduser(cand)), True
        if cand and cand == data_root:
            raise AppWorldSetupError(f"data_root={data_root!r} has no AppWorld data (data/datasets/train.txt)")
    return generated_root(venv), False


# ------------------------------------------------------------------------------------------------ OS sandbox

_PR_SET_PDEATHSIG = 1
_sandbox_support: Optional[bool] = None


def namespaces_supported() -> bool:
    """Whether ``unshare --user --map-root-user --net --mount`` works here (cached)."""
    global _sandbox_support
    if _sandbox_support is None:
        exe = shutil.which("unshare")
        ok = False
        if exe:
            try:
                ok = subprocess.run([exe, "--user", "--map-root-user", "--net", "--mount", "true"],
                                    capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _sandbox_support = ok
    return _sandbox_support


@dataclass
class ServerLimits:
    """OS limits applied to each server process (``setrlimit`` in the child before exec)."""

    cpu_s: int = 900  # RLIMIT_CPU: total CPU seconds of one server process (SIGXCPU, then restart)
    memory_mb: int = 4096  # RLIMIT_AS: address space; a huge allocation raises MemoryError inside the server
    open_files: int = 256  # RLIMIT_NOFILE
    file_size_mb: int = 256  # RLIMIT_FSIZE: largest file the server may write (its DB snapshots and logs)
    isolate: str = "auto"  # "auto": namespaces when supported; "namespaces": required; "none": rlimits only
    hide_paths: tuple = ()  # extra directories to hide (tmpfs) from the server, besides the trainer's checkout


def _child_setup(limits: ServerLimits):
    """preexec_fn: rlimits + die with the parent. Runs in the forked child, before exec."""

    def apply():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except Exception:
            pass
        mb = 1024 * 1024
        for res, value in ((resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_mb * mb),
                           (resource.RLIMIT_NOFILE, limits.open_files),
                           (resource.RLIMIT_FSIZE, limits.file_size_mb * mb), (resource.RLIMIT_CORE, 0)):
            if value:
                resource.setrlimit(res, (value, value))

    return apply


# Runs inside the AppWorld venv: hide directories, then serve AppWorld's environment app on the Unix socket.
_LAUNCHER = r'''
import ctypes, json, os, sys
cfg = json.loads(sys.argv[1])
if cfg["hide"]:
    libc = ctypes.CDLL(None, use_errno=True)
    MS_REC, MS_PRIVATE = 16384, 1 << 18
    libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    for path in cfg["hide"]:
        if libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, b"size=1m,mode=0555") != 0:
            print(f"appworld server: could not hide {path} (errno {ctypes.get_errno()})", file=sys.stderr)
os.chdir(cfg["workdir"])
import uvicorn
from appworld.serve.environment import app  # the app `appworld serve environment` runs
uvicorn.run(app, uds=cfg["socket"], log_level="warning", access_log=False)
'''


def _default_hide_paths(keep: list[str]) -> list[str]:
    """The trainer's checkout and working directory, unless the server needs something inside them."""
    import verl_hindsight

    cands = {os.path.dirname(os.path.dirname(os.path.abspath(verl_hindsight.__file__))), os.getcwd()}
    out = []
    for path in sorted(cands):
        path = os.path.realpath(path)
        if path in ("/", os.path.realpath(os.path.expanduser("~"))) or not os.path.isdir(path):
            continue
        if any(os.path.realpath(k) == path or os.path.realpath(k).startswith(path + os.sep) for k in keep):
            continue
        out.append(path)
    return out


# ------------------------------------------------------------------------------------------------ HTTP client


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class ServerClient:
    """Stdlib HTTP client of one AppWorld environment server (JSON in, ``{"output": ...}`` out)."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path

    def request(self, method: str, path: str, payload: Optional[dict], timeout_s: float) -> Any:
        conn = _UnixHTTPConnection(self.socket_path, timeout_s)
        try:
            body = None if payload is None else json.dumps(payload)
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (socket.timeout, TimeoutError):
            raise ServerError("server_timeout", f"{path} took longer than {timeout_s:.0f}s") from None
        except (ConnectionError, FileNotFoundError, http.client.HTTPException, OSError) as exc:
            raise ServerError("server_crashed", f"{path}: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise ServerError("http_error", f"{path} -> HTTP {resp.status}: {data[:2000].decode(errors='replace')}")
        return json.loads(data)

    def post(self, path: str, timeout_s: float, **payload) -> Any:
        return self.request("POST", path, payload, timeout_s)["output"]


# ------------------------------------------------------------------------------------------------ server process

_LIVE_SERVERS: "weakref.WeakSet[AppWorldServer]" = weakref.WeakSet()


def _close_all_servers() -> None:
    for server in list(_LIVE_SERVERS):
        server.stop()


atexit.register(_close_all_servers)


@dataclass(eq=False)
class AppWorldServer:
    """One ``appworld serve environment`` process, restartable. Not thread-safe: one episode at a time."""

    venv: Optional[str] = None
    data_root: Optional[str] = None  # resolved AppWorld root (real or generated); its data/ is linked read-only
    limits: ServerLimits = field(default_factory=ServerLimits)
    start_timeout_s: float = 60.0
    proc: Optional[subprocess.Popen] = None
    workdir: Optional[str] = None
    restarts: int = 0
    sandbox: str = "none"

    def __post_init__(self):
        if not is_set_up(self.venv):
            raise AppWorldSetupError(f"the AppWorld venv at {venv_dir(self.venv)} is not set up; run "
                                     "`python -m verl_hindsight.envs.appworld_server setup`")
        if self.data_root is None:
            self.data_root, _ = resolve_data_root(None, self.venv)
        if not os.path.isdir(os.path.join(self.data_root, "data")):
            raise AppWorldSetupError(f"no AppWorld data under {self.data_root}; run "
                                     "`python -m verl_hindsight.envs.appworld_server generate-tasks`")
        self._ready = False
        _LIVE_SERVERS.add(self)

    @property
    def socket_path(self) -> str:
        return os.path.join(self.workdir, "s.sock")

    @property
    def client(self) -> ServerClient:
        return ServerClient(self.socket_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Launch the process (returns at once; :meth:`wait_ready` waits for the socket)."""
        self.stop()
        base = os.path.join(tempfile.gettempdir(), "verl-hindsight-appworld")
        os.makedirs(base, exist_ok=True)
        _sweep_stale_workdirs(base)
        self.workdir = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base)
        # The server's own AppWorld root: data/ links to the tasks (read only by AppWorld), experiment outputs
        # (DB snapshots, logs) are written here, so concurrent servers never share files.
        root = os.path.join(self.workdir, "root")
        os.makedirs(os.path.join(root, "experiments", "outputs"))
        os.symlink(os.path.join(self.data_root, "data"), os.path.join(root, "data"))
        with open(os.path.join(self.workdir, "owner.pid"), "w") as f:
            f.write(str(os.getpid()))
        env = {"PATH": os.path.join(venv_dir(self.venv), "bin") + os.pathsep + "/usr/bin:/bin",
               "HOME": self.workdir, "APPWORLD_ROOT": root, "TMPDIR": self.workdir,
               "APPWORLD_CACHE": os.path.join(venv_dir(self.venv), APPWORLD_CACHE),
               "MALLOC_ARENA_MAX": "2", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        hide: list[str] = []
        cmd = [venv_python(self.venv)]
        mode = self.limits.isolate
        if mode not in ("auto", "namespaces", "none"):
            raise ValueError(f"isolate must be auto, namespaces or none, got {mode!r}")
        if mode == "namespaces" and not namespaces_supported():
            raise AppWorldSetupError("isolate='namespaces' but `unshare --user --net --mount` is not permitted here")
        if mode != "none" and namespaces_supported():
            keep = [venv_dir(self.venv), self.data_root, self.workdir, os.path.realpath(self.data_root)]
            hide = _default_hide_paths(keep) + [os.path.realpath(p) for p in self.limits.hide_paths
                                                if os.path.isdir(p)]
            cmd = [shutil.which("unshare"), "--user", "--map-root-user", "--net", "--mount"] + cmd
            self.sandbox = "namespaces"
        else:
            self.sandbox = "rlimits"
        cfg = {"socket": self.socket_path, "workdir": self.workdir, "hide": hide}
        self._log = open(os.path.join(self.workdir, "server.log"), "wb")
        self.proc = subprocess.Popen(cmd + ["-c", _LAUNCHER, json.dumps(cfg)], cwd=self.workdir, env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=_child_setup(self.limits), start_new_session=True)
        self._ready = False

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.workdir, "server.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except (OSError, TypeError):
            return ""

    def wait_ready(self, timeout_s: Optional[float] = None) -> None:
        if self._ready and self.alive():
            return
        if self.proc is None:
            self.start()
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError("server_start_failed",
                                  f"exit code {self.proc.returncode}; log: {self.log_tail()}")
            if os.path.exists(self.socket_path):
                try:
                    self.client.request("GET", "/", None, timeout_s=5)
                    self._ready = True
                    return
                except ServerError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise ServerError("server_start_failed", f"not ready within {timeout_s or self.start_timeout_s:.0f}s")

    def healthy(self, timeout_s: float = 5.0) -> bool:
        if not self.alive() or not self._ready:
            return False
        try:
            self.client.request("GET", "/", None, timeout_s=timeout_s)
            return True
        except ServerError:
            return False

    def cpu_seconds(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError, AttributeError):
            return 0.0

    def restart(self) -> None:
        """Kill and relaunch (non-blocking; the next call waits for readiness)."""
        self.restarts += 1
        self.start()

    def stop(self) -> Optional[int]:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    self.proc.kill()
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        self._ready = False
        return code


def _sweep_stale_workdirs(base: str) -> None:
    """Remove working directories left by owners that died without cleanup (SIGKILLed workers)."""
    for name in os.listdir(base):
        path = os.path.join(base, name)
        try:
            with open(os.path.join(path, "owner.pid")) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError):
            pass


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m verl_hindsight.envs.appworld_server",
                                     description="AppWorld's separate venv, offline tasks and servers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_setup = sub.add_parser("setup", help="create the AppWorld venv, run `appworld install`, build the tasks")
    p_setup.add_argument("--venv", default=None, help=f"venv directory (default ${VENV_ENV_VAR} or {DEFAULT_VENV})")
    p_setup.add_argument("--python", default=None, help="python >= 3.11 to create the venv with")
    p_setup.add_argument("--force", action="store_true", help="recreate the venv")
    p_setup.add_argument("--no-tasks", action="store_true", help="skip building the offline tasks")
    p_gen = sub.add_parser("generate-tasks", help="build the offline tasks with AppWorld's own APIs")
    p_gen.add_argument("--venv", default=None)
    p_gen.add_argument("--root", default=None, help="output AppWorld root (default <venv>/generated-root)")
    p_gen.add_argument("--force", action="store_true")
    p_serve = sub.add_parser("serve", help="run one sandboxed AppWorld environment server in the foreground")
    p_serve.add_argument("--venv", default=None)
    p_serve.add_argument("--data-root", default=None)
    p_serve.add_argument("--isolate", default="auto", choices=("auto", "namespaces", "none"))
    sub.add_parser("info", help="paths, setup state and sandbox support")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.command == "setup":
            started = time.monotonic()
            path = setup(args.venv, python=args.python, force=args.force, tasks=not args.no_tasks, log=log)
            print(json.dumps({"venv": path, "generated_root": None if args.no_tasks else generated_root(path),
                              "seconds": round(time.monotonic() - started, 1)}))
        elif args.command == "generate-tasks":
            root = generate_tasks(args.venv, root=args.root, force=args.force, log=log)
            print(json.dumps({"root": root}))
        elif args.command == "serve":
            root, real = resolve_data_root(args.data_root, args.venv)
            server = AppWorldServer(args.venv, root, ServerLimits(isolate=args.isolate))
            server.start()
            server.wait_ready()
            print(json.dumps({"socket": server.socket_path, "pid": server.proc.pid, "root": root,
                              "user_data": real, "sandbox": server.sandbox}), flush=True)
            print(f"try: curl --unix-socket {server.socket_path} http://localhost/", file=sys.stderr, flush=True)
            try:
                server.proc.wait()
            except KeyboardInterrupt:
                pass
            finally:
                server.stop()
        elif args.command == "info":
            root, real = resolve_data_root(None, None)
            print(json.dumps({"venv": venv_dir(), "set_up": is_set_up(), "appworld": APPWORLD_REQUIREMENT,
                              "data_root": root, "user_data": real, "namespaces": namespaces_supported()},
                             indent=1))
    except AppWorldSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
