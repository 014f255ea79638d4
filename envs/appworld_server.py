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
  the server's private working directory. Before it opens the socket, the server loads every app once (a
  throw-away world of the first dataset task, ~8 CPU s), so "ready" means ``/initialize`` takes ~0.2 s; start it
  ahead of need (:meth:`AppWorldServer.start` returns at once). Limits from ``benchmarks/appworld_start_time.py``:
  ready within ``READY_TIMEOUT_S`` (240 s; measured on 2 cores with two servers starting at once: ~12 s idle,
  ~21 s with both cores busy, ~50 s with eight busy loops), ``/initialize`` within ``INITIALIZE_TIMEOUT_S``
  (120 s; measured 0.2-1.2 s);
- sandboxes each server (``ServerLimits.isolate``; :func:`choose_sandbox`), always under OS limits
  (``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_NOFILE``, ``RLIMIT_FSIZE``, ``RLIMIT_CORE=0``) and killed with its parent
  (``PR_SET_PDEATHSIG``):

  * ``bwrap`` (bubblewrap, :func:`bwrap_command`): the whole system mounted read-only, fresh ``/dev`` and
    ``/proc``, the working directory the only writable place (besides the sandbox's own ``/dev/shm``); empty
    read-only tmpfs over ``/tmp``, ``/var/tmp``, ``/run``, ``$HOME``, the trainer's checkout and working directory
    and ``hide_paths``, with the AppWorld venv, its python and the data put back read-only; new
    user/pid/net/ipc/uts/cgroup namespaces (no network; loopback is the sandbox's own), no capabilities, no nested
    user namespaces, dies with its parent;
  * ``namespaces`` (``unshare --user --map-root-user --net --mount``): no network, the trainer's checkout, working
    directory and ``hide_paths`` under empty tmpfs mounts; the rest of the filesystem is writable as the trainer's
    user;
  * ``rlimits``: the OS limits only.

  ``isolate="auto"`` (default) takes the first that works here and logs a WARNING saying which and why when it
  is not bwrap; ``"bwrap"`` / ``"namespaces"`` require theirs; ``"none"`` uses rlimits only. Health checks,
  restarts and cleanup (``close()``, ``atexit``) are here; the HTTP client is :class:`ServerClient`
  (``http.client`` over the socket).

CLI (``python -m verl_hindsight.envs.appworld_server``)::

    setup [--venv DIR] [--python PY] [--force]          # venv + appworld install + generated tasks
    generate-tasks [--venv DIR] [--root DIR] [--force]  # (re)build the offline tasks
    serve [--venv DIR] [--data-root DIR] [--isolate M]  # one sandboxed server in the foreground (debugging)
    info                                                # paths, versions, sandbox support and choice
"""

from __future__ import annotations

import atexit
import ctypes
import http.client
import json
import logging
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
    """A server call failed. ``reason``: ``server_timeout``, ``server_crashed``, ``server_start_failed`` (it exited
    while starting), ``server_start_timeout`` (not ready within the start limit), ``http_error``."""

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
ISOLATION_MODES = ("auto", "bwrap", "namespaces", "none")
_LOG = logging.getLogger(__name__)
_namespaces_support: Optional[tuple[bool, str]] = None
_bwrap_support: Optional[tuple[bool, str, tuple]] = None
_warned: set = set()
_TRUE = shutil.which("true") or "/bin/true"


def _probe(cmd: list[str]) -> tuple[bool, str]:
    try:
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    lines = (out.stderr or out.stdout).strip().splitlines()
    return out.returncode == 0, (lines[-1] if lines else f"exit code {out.returncode}")


def namespaces_support() -> tuple[bool, str]:
    """``(works, why not)`` for ``unshare --user --map-root-user --net --mount`` (cached)."""
    global _namespaces_support
    if _namespaces_support is None:
        exe = shutil.which("unshare")
        if not exe:
            _namespaces_support = (False, "`unshare` (util-linux) is not installed")
        else:
            ok, why = _probe([exe, "--user", "--map-root-user", "--net", "--mount", _TRUE])
            _namespaces_support = (ok, "" if ok else f"unprivileged user namespaces are not permitted ({why})")
    return _namespaces_support


def namespaces_supported() -> bool:
    """Whether ``unshare --user --map-root-user --net --mount`` works here (cached)."""
    return namespaces_support()[0]


# Namespaces and process flags of every bwrap sandbox. The first variant also forbids creating user namespaces
# inside (bwrap >= 0.8, needs --unshare-user); the second is for older bwrap or setuid installs.
_BWRAP_VARIANTS = (
    ("--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--cap-drop", "ALL"),
    ("--unshare-all", "--die-with-parent", "--cap-drop", "ALL"),
)


def bwrap_support() -> tuple[bool, str, tuple]:
    """``(works, why not, namespace flags)`` for bubblewrap with the server's mounts (cached)."""
    global _bwrap_support
    if _bwrap_support is None:
        exe = shutil.which("bwrap")
        if not exe:
            _bwrap_support = (False, "`bwrap` is not installed (Debian/Ubuntu: apt-get install bubblewrap)", ())
        else:
            why = ""
            for flags in _BWRAP_VARIANTS:
                ok, why = _probe([exe, *flags, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                                  "--tmpfs", "/tmp", "--remount-ro", "/tmp", _TRUE])
                if ok:
                    _bwrap_support = (True, "", flags)
                    break
            else:
                _bwrap_support = (False, f"bwrap cannot create its sandbox here ({why})", ())
    return _bwrap_support


def bwrap_supported() -> bool:
    return bwrap_support()[0]


def choose_sandbox(isolate: str) -> str:
    """The sandbox a server gets for ``isolate``: ``bwrap``, ``namespaces`` or ``rlimits``.

    ``auto`` takes the strongest that works here and logs a WARNING (once per process and outcome) when it is not
    bwrap, saying why; ``bwrap`` and ``namespaces`` raise :class:`AppWorldSetupError` when unavailable.
    """
    if isolate not in ISOLATION_MODES:
        raise ValueError(f"isolate must be one of {', '.join(ISOLATION_MODES)}, got {isolate!r}")
    if isolate == "none":
        return "rlimits"
    if isolate == "bwrap":
        ok, why, _ = bwrap_support()
        if not ok:
            raise AppWorldSetupError(f"isolate='bwrap' but {why}")
        return "bwrap"
    if isolate == "namespaces":
        ok, why = namespaces_support()
        if not ok:
            raise AppWorldSetupError(f"isolate='namespaces' but {why}")
        return "namespaces"
    ok, bwrap_why, _ = bwrap_support()
    if ok:
        return "bwrap"
    ns_ok, ns_why = namespaces_support()
    mode = "namespaces" if ns_ok else "rlimits"
    if mode not in _warned:
        _warned.add(mode)
        if ns_ok:
            _LOG.warning("AppWorld server sandbox: namespaces (unshare: no network, the trainer's checkout hidden), "
                         "not bwrap, because %s; the server can write wherever the trainer's user can outside the "
                         "hidden directories", bwrap_why)
        else:
            _LOG.warning("AppWorld server sandbox: rlimits only (no filesystem or network isolation), because %s "
                         "and %s", bwrap_why, ns_why)
    return mode


@dataclass
class ServerLimits:
    """OS limits applied to each server process (``setrlimit`` in the child before exec)."""

    cpu_s: int = 900  # RLIMIT_CPU: total CPU seconds of one server process (SIGXCPU, then restart)
    memory_mb: int = 4096  # RLIMIT_AS: address space; a huge allocation raises MemoryError inside the server
    open_files: int = 256  # RLIMIT_NOFILE
    file_size_mb: int = 256  # RLIMIT_FSIZE: largest file the server may write (its DB snapshots and logs)
    # "auto": bwrap if usable, else namespaces, else rlimits only (WARNING logged); "bwrap" / "namespaces": required;
    # "none": rlimits only
    isolate: str = "auto"
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


# Runs inside the AppWorld venv: hide directories (namespaces mode), load every app once (the first AppWorld world
# imports ~500 FastAPI routes, ~8 CPU s; later worlds take ~0.2 s), then serve AppWorld's environment app on the
# Unix socket. The socket appears only once the warm-up is done, so "ready" means "/initialize is fast".
_LAUNCHER = r"""
import ctypes, json, os, sys, time
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
if cfg.get("warm_task"):
    started = time.process_time()
    try:
        from appworld.environment import AppWorld
        AppWorld(task_id=cfg["warm_task"], experiment_name="_warmup").close()
        print(f"appworld server: warm-up done ({time.process_time() - started:.1f} CPU s)", file=sys.stderr)
    except Exception as exc:  # the first /initialize then pays the cost instead
        print(f"appworld server: warm-up failed: {type(exc).__name__}: {exc}", file=sys.stderr)
uvicorn.run(app, uds=cfg["socket"], log_level="warning", access_log=False)
"""


def _checkout_and_cwd() -> list[str]:
    import verl_hindsight

    return [os.path.dirname(os.path.dirname(os.path.abspath(verl_hindsight.__file__))), os.getcwd()]


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _default_hide_paths(keep: list[str]) -> list[str]:
    """Namespaces mode: the trainer's checkout and working directory, unless the server needs something inside."""
    out = []
    for path in sorted(set(_checkout_and_cwd())):
        path = os.path.realpath(path)
        if path in ("/", os.path.realpath(os.path.expanduser("~"))) or not os.path.isdir(path):
            continue
        if any(_under(os.path.realpath(k), path) for k in keep):
            continue
        out.append(path)
    return out


def _python_homes(venv: str) -> list[str]:
    """Where the venv's interpreter really lives (the python install it links to), from ``pyvenv.cfg``."""
    homes = [os.path.dirname(os.path.dirname(os.path.realpath(os.path.join(venv, "bin", "python"))))]
    try:
        with open(os.path.join(venv, "pyvenv.cfg")) as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "home" and value.strip():
                    homes.append(os.path.dirname(os.path.realpath(value.strip())))
    except OSError:
        pass
    return homes


def bwrap_command(workdir: str, keep: list[str], hide_paths=(), flags: Optional[tuple] = None) -> list[str]:
    """The bwrap prefix of a server: the whole system read-only, fresh ``/dev`` and ``/proc``, ``workdir`` the only
    writable directory, empty read-only tmpfs over ``/tmp``, ``/var/tmp``, ``/run``, the trainer's checkout, its
    working directory, ``$HOME`` and ``hide_paths``, with the ``keep`` directories (venv, python, data; read-only)
    put back where they lie under a hidden one; all namespaces new (no network), no capabilities, dies with its
    parent. Mounts are applied parents first, so a directory kept or hidden inside another stays so."""
    if flags is None:
        flags = bwrap_support()[2] or _BWRAP_VARIANTS[-1]
    hides = {"/tmp", "/var/tmp", "/run", os.path.expanduser("~"), *_checkout_and_cwd(), *hide_paths}
    hides = {os.path.realpath(p) for p in hides if p and os.path.isdir(p)}
    hides.discard("/")
    workdir = os.path.realpath(workdir)
    keep = {os.path.realpath(k) for k in keep if k and os.path.exists(k)}

    def needed(k: str) -> bool:  # under a hidden directory, and not already inside another kept one
        return any(_under(k, h) for h in hides) and not _under(k, workdir) and not any(
            k2 != k and _under(k, k2) and not any(_under(k, h) and _under(h, k2) and h != k2 for h in hides)
            for k2 in keep)

    ops = [(p, "hide") for p in hides] + [(k, "keep") for k in keep if needed(k)]
    ops.append((workdir, "work"))
    order = {"hide": 0, "keep": 1, "work": 2}
    ops.sort(key=lambda op: (op[0].rstrip(os.sep).count(os.sep), order[op[1]], op[0]))
    cmd = [shutil.which("bwrap") or "bwrap", *flags, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path, kind in ops:
        cmd += {"hide": ["--tmpfs", path], "keep": ["--ro-bind", path, path], "work": ["--bind", path, path]}[kind]
    for path, kind in ops:  # after every mount point exists: make the hiding tmpfs read-only too
        if kind == "hide":
            cmd += ["--remount-ro", path]
    return cmd


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a bwrap server's python runs two levels below the bwrap we started)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
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


# Time limits, from benchmarks/appworld_start_time.py (2 cores, two servers starting at once; see
# docs/benchmarks/appworld.md): a server is ready (imports + warm-up, ~8 CPU s) in ~12 s idle, ~21 s (max 24) with
# two busy loops, ~50 s (max 52) with eight; /initialize of a warm server takes 0.2-1.2 s. Wide margins: a slow
# start on a busy machine is not a fault.
READY_TIMEOUT_S = 240.0
INITIALIZE_TIMEOUT_S = 120.0


def _warm_task(data_root: str) -> Optional[str]:
    """A task id to warm a new server with: the first line of the first dataset file."""
    folder = os.path.join(data_root, "data", "datasets")
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".txt"))
        names.sort(key=lambda n: n != "train.txt")
        for name in names:
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    if line.strip():
                        return line.strip().split(":")[0]
    except OSError:
        pass
    return None


@dataclass(eq=False)
class AppWorldServer:
    """One ``appworld serve environment`` process, restartable. Not thread-safe: one episode at a time.

    :meth:`start` returns at once; the server imports AppWorld and warms up (``warmup``: one throw-away world of
    the first dataset task, so every app is loaded) before it opens its socket, and :meth:`wait_ready` waits up to
    ``start_timeout_s`` for that. Start it ahead of need; a slow start on a busy machine is not a fault.
    """

    venv: Optional[str] = None
    data_root: Optional[str] = None  # resolved AppWorld root (real or generated); its data/ is linked read-only
    limits: ServerLimits = field(default_factory=ServerLimits)
    start_timeout_s: float = READY_TIMEOUT_S
    warmup: bool = True
    proc: Optional[subprocess.Popen] = None
    workdir: Optional[str] = None
    restarts: int = 0
    sandbox: Optional[str] = None  # "bwrap", "namespaces" or "rlimits" once started
    started_at: Optional[float] = None
    ready_s: Optional[float] = None  # start -> ready of the current process

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

    @property
    def ready(self) -> bool:
        return self._ready and self.alive()

    def start(self) -> None:
        """Launch the process (returns at once; :meth:`wait_ready` waits for the socket)."""
        self.stop()
        sandbox = choose_sandbox(self.limits.isolate)
        base = os.path.join(tempfile.gettempdir(), "verl-hindsight-appworld")
        os.makedirs(base, exist_ok=True)
        _sweep_stale_workdirs(base)
        self.workdir = os.path.realpath(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))
        # The server's own AppWorld root: data/ links to the tasks (read only by AppWorld), experiment outputs
        # (DB snapshots, logs) are written here, so concurrent servers never share files.
        root = os.path.join(self.workdir, "root")
        os.makedirs(os.path.join(root, "experiments", "outputs"))
        data_root = os.path.realpath(self.data_root)
        os.symlink(os.path.join(data_root, "data"), os.path.join(root, "data"))
        with open(os.path.join(self.workdir, "owner.pid"), "w") as f:
            f.write(str(os.getpid()))
        venv = os.path.realpath(venv_dir(self.venv))
        python = os.path.join(venv, "bin", "python")
        env = {"PATH": os.path.join(venv, "bin") + os.pathsep + "/usr/bin:/bin",
               "HOME": self.workdir, "APPWORLD_ROOT": root, "TMPDIR": self.workdir,
               "APPWORLD_CACHE": os.path.join(venv, APPWORLD_CACHE),
               "MALLOC_ARENA_MAX": "2", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        hide: list[str] = []
        cmd = [python]
        if sandbox == "bwrap":
            keep = [venv, data_root, *_python_homes(venv)]
            cmd = bwrap_command(self.workdir, keep, self.limits.hide_paths) + ["--chdir", self.workdir] + cmd
        elif sandbox == "namespaces":
            keep = [venv, self.data_root, self.workdir, data_root]
            hide = _default_hide_paths(keep) + [os.path.realpath(p) for p in self.limits.hide_paths
                                                if os.path.isdir(p)]
            cmd = [shutil.which("unshare"), "--user", "--map-root-user", "--net", "--mount"] + cmd
        self.sandbox = sandbox
        cfg = {"socket": self.socket_path, "workdir": self.workdir, "hide": hide,
               "warm_task": _warm_task(data_root) if self.warmup else None}
        self._log = open(os.path.join(self.workdir, "server.log"), "wb")
        self.started_at, self.ready_s = time.monotonic(), None
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

    def exit_code(self) -> Optional[int]:
        """The server's exit status, ``-N`` when killed by signal N (bwrap reports that as ``128 + N``)."""
        code = None if self.proc is None else self.proc.poll()
        if code is not None and self.sandbox == "bwrap" and code > 128:
            code = 128 - code
        return code

    def wait_ready(self, timeout_s: Optional[float] = None) -> None:
        """Wait until the server answers (started if needed): ``server_start_failed`` if it exits,
        ``server_start_timeout`` past ``timeout_s`` (default ``start_timeout_s``)."""
        if self._ready and self.alive():
            return
        if self.proc is None:
            self.start()
        limit = timeout_s or self.start_timeout_s
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError("server_start_failed", f"exit code {self.exit_code()}; log: {self.log_tail()}")
            if os.path.exists(self.socket_path):
                try:
                    self.client.request("GET", "/", None, timeout_s=max(1.0, min(30.0, deadline - time.monotonic())))
                    self._ready = True
                    self.ready_s = time.monotonic() - self.started_at
                    return
                except ServerError:
                    pass
            time.sleep(0.1)
        waited = time.monotonic() - self.started_at
        self.stop()
        raise ServerError("server_start_timeout", f"not ready within {limit:.0f}s ({waited:.0f}s since start)")

    def healthy(self, timeout_s: float = 5.0) -> bool:
        if not self.alive() or not self._ready:
            return False
        try:
            self.client.request("GET", "/", None, timeout_s=timeout_s)
            return True
        except ServerError:
            return False

    def server_pids(self) -> list[int]:
        """The processes of this server: the one started (python, unshare'd python, or bwrap) and its children."""
        return _process_tree(self.proc.pid) if self.alive() else []

    def cpu_seconds(self) -> float:
        """CPU seconds of the server's busiest process (its python; what ``RLIMIT_CPU`` limits)."""
        total = 0.0
        for pid in self.server_pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total = max(total, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
            except (OSError, IndexError, ValueError):
                continue
        return total

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
                self.proc.wait(timeout=10)
                code = self.exit_code()
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
    p_serve.add_argument("--isolate", default="auto", choices=ISOLATION_MODES,
                         help="auto: bwrap if usable, else namespaces, else rlimits only (default)")
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
            bw_ok, bw_why, _ = bwrap_support()
            ns_ok, ns_why = namespaces_support()
            print(json.dumps({"venv": venv_dir(), "set_up": is_set_up(), "appworld": APPWORLD_REQUIREMENT,
                              "data_root": root, "user_data": real, "bwrap": bw_ok or bw_why,
                              "namespaces": ns_ok or ns_why, "sandbox": choose_sandbox("auto")}, indent=1))
    except AppWorldSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
