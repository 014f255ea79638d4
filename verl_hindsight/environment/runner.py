"""Run environments in worker processes with time limits; failures become data, never hangs.

Every episode leases a worker process from a per-process :class:`EnvPool`. The agent loop talks to it through
an :class:`EnvSession`; each call has a time limit (``step_timeout_s``, and what is left of
``episode_timeout_s``). When the environment raises, returns malformed data, hangs past the limit or the worker
dies, the call raises :class:`EnvFailure` with a short ``reason`` (``env_error``, ``malformed_output``,
``step_timeout``, ``episode_timeout``, ``worker_crashed``, ``worker_start_failed``) and the worker is replaced,
so the next episode runs on a fresh process. The agent loop records the reason on the trajectory.

Workers are started with ``python -m verl_hindsight.environment.worker`` (not multiprocessing), so they never re-import
the parent's ``__main__`` (a Ray worker) and never load torch or verl. Messages are pickled and length-framed
over the worker's stdin and a private copy of its stdout; anything the environment prints goes to stderr.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from verl_hindsight.environment.protocol import Observation, StepResult

_HEADER = struct.Struct("!Q")


class EnvFailure(RuntimeError):
    """An episode cannot continue. ``reason`` is a short, stable label for metrics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def write_message(stream, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    chunks, remaining = [], n
    while remaining:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError
        chunk = os.read(fd, remaining)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_message(fd: int, deadline: float) -> Any:
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exact(fd, size, deadline))


class EnvWorker:
    """One worker process hosting one environment instance."""

    def __init__(self, env_name: str, env_kwargs: dict, start_timeout_s: float, import_modules: tuple[str, ...]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "verl_hindsight.environment.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # environment prints and tracebacks go to the parent's stderr (verl's log)
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.healthy = True
        self.call("init", env_name, env_kwargs, import_modules, timeout_s=start_timeout_s,
                  timeout_reason="worker_start_failed")

    def call(self, op: str, *args, timeout_s: float, timeout_reason: str = "step_timeout") -> Any:
        if not self.healthy:
            raise EnvFailure("worker_crashed", "worker already failed")
        try:
            write_message(self.proc.stdin, (op, args))
            status, payload = read_message(self.proc.stdout.fileno(), time.monotonic() + timeout_s)
        except TimeoutError:
            self.kill()
            raise EnvFailure(timeout_reason, f"{op} took longer than {timeout_s:.1f}s") from None
        except (EOFError, BrokenPipeError, OSError, pickle.UnpicklingError) as exc:
            code = self.kill()
            reason = "worker_start_failed" if op == "init" else "worker_crashed"
            raise EnvFailure(reason, f"worker died during {op} (exit code {code}): {type(exc).__name__}") from None
        if status == "ok":
            return payload
        # env_error / malformed_output: the environment's state is suspect, so the worker is not reused.
        self.kill()
        raise EnvFailure(status, payload)

    def kill(self) -> Optional[int]:
        self.healthy = False
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.healthy and self.proc.poll() is None:
            try:
                write_message(self.proc.stdin, ("close", ()))
                self.proc.wait(timeout=2)
            except Exception:
                pass
        self.kill()


@dataclass(frozen=True)
class RunnerLimits:
    step_timeout_s: float = 30.0
    episode_timeout_s: float = 600.0
    start_timeout_s: float = 60.0


class EnvSession:
    """One episode on a leased worker. Use as a context manager; methods raise :class:`EnvFailure`."""

    def __init__(self, pool: "EnvPool", worker: Optional[EnvWorker], start_error: Optional[EnvFailure] = None):
        self.pool, self.worker, self.start_error = pool, worker, start_error
        self.started = time.monotonic()
        self.failure: Optional[EnvFailure] = None

    def _call(self, op: str, *args) -> Any:
        if self.failure is not None:
            raise self.failure
        if self.start_error is not None:
            self.failure = self.start_error
            raise self.failure
        limits = self.pool.limits
        left = limits.episode_timeout_s - (time.monotonic() - self.started)
        if left <= 0:
            self.failure = EnvFailure("episode_timeout", f"episode exceeded {limits.episode_timeout_s:.1f}s")
            raise self.failure
        timeout, reason = (limits.step_timeout_s, "step_timeout")
        if left < timeout:
            timeout, reason = left, "episode_timeout"
        try:
            return self.worker.call(op, *args, timeout_s=timeout, timeout_reason=reason)
        except EnvFailure as exc:
            self.failure = exc
            raise

    def reset(self, task_id: str) -> Observation:
        self.started = time.monotonic()
        return self._call("reset", task_id)

    def step(self, action: str) -> StepResult:
        return self._call("step", action)

    def invalid_action(self, raw_text: str, reason: str) -> StepResult:
        return self._call("invalid_action", raw_text, reason)

    def oracle_action(self) -> Optional[str]:
        return self._call("oracle_action")

    def random_action(self, seed: int) -> str:
        return self._call("random_action", seed)

    def task_ids(self, split: str) -> list[str]:
        return self._call("task_ids", split)

    def instructions(self) -> str:
        return self._call("instructions")

    def tools(self) -> Optional[list[dict]]:
        return self._call("tools")

    def close(self) -> None:
        if self.worker is not None:
            self.pool._release(self.worker)
            self.worker = None

    def __enter__(self) -> "EnvSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EnvPool:
    """Warm worker processes for one environment configuration, shared by the episodes of one process."""

    def __init__(self, env_name: str, env_kwargs: Optional[dict] = None, limits: RunnerLimits = RunnerLimits(),
                 import_modules: tuple[str, ...] = ()):
        self.env_name, self.env_kwargs = env_name, dict(env_kwargs or {})
        self.limits, self.import_modules = limits, tuple(import_modules)
        self._idle: list[EnvWorker] = []
        self._lock = threading.Lock()
        self.stats = {"workers_started": 0, "workers_replaced": 0}

    def session(self) -> EnvSession:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.healthy and worker.proc.poll() is None:
                    return EnvSession(self, worker)
        try:
            worker = EnvWorker(self.env_name, self.env_kwargs, self.limits.start_timeout_s, self.import_modules)
        except EnvFailure as exc:
            return EnvSession(self, None, start_error=exc)
        self.stats["workers_started"] += 1
        return EnvSession(self, worker)

    def _release(self, worker: EnvWorker) -> None:
        if worker.healthy and worker.proc.poll() is None:
            with self._lock:
                self._idle.append(worker)
        else:
            worker.kill()
            self.stats["workers_replaced"] += 1

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


_POOLS: dict[tuple, EnvPool] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(env_name: str, env_kwargs: Optional[dict] = None, limits: RunnerLimits = RunnerLimits(),
             import_modules: tuple[str, ...] = ()) -> EnvPool:
    """The process-wide pool for this configuration (agent loops are created per trajectory)."""
    key = (env_name, repr(sorted((env_kwargs or {}).items())), limits, tuple(import_modules))
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = EnvPool(env_name, env_kwargs, limits, import_modules)
        return _POOLS[key]
