"""``appworld``: AppWorld tasks through an isolated ``appworld serve environment`` process.

The agent writes Python code (the text inside its action tag); the code runs **only in the AppWorld server
process** (a separate venv, :mod:`.appworld_server`), never in the training process. This adapter is stdlib-only
and talks to the server over a Unix-socket HTTP connection with time limits.

- Tasks: the user's AppWorld data when present (``data_root=``, ``$VERL_HINDSIGHT_APPWORLD_ROOT`` or
  ``$APPWORLD_ROOT`` with ``data/datasets/*.txt``): split ``train`` -> ``train.txt``, ``val`` -> ``dev.txt``, and
  ``dev``/``test_normal``/``test_challenge`` by name, in the files' order. Otherwise the offline tasks built by
  :mod:`.appworld_tasks` (``setup`` builds them): ``train`` 3 tasks, ``val`` 2 tasks, over simple_note and todoist.
- Observation: AppWorld's execution output (stdout, or ``Execution failed. Traceback: ...``).
- Reward: AppWorld's own evaluation (``world.evaluate()`` through ``/evaluate``): 1.0 when every test passes, else
  0.0, given when the code calls ``apis.supervisor.complete_task(...)`` or at ``max_steps``.
- ``info["error"]``: the execution error of the step, or at the end the names of the failing tests.
- Server: one per env instance, launched by the constructor (``prestart``) so it imports and warms up while the
  caller does other work, and reused by every episode (``/initialize`` re-initialises the task on the running
  server, ~0.2 s); ``reset()`` waits for it up to ``start_timeout_s`` (240 s) and loads the task within
  ``init_timeout_s`` (120 s): generous, because a start on a busy machine is slow, not broken (measured on 2 cores,
  two servers starting at once: ready in ~12 s idle, ~21 s with both cores busy, ~50 s with eight busy loops).
  A server past half its CPU budget is replaced when an episode ends, so the new one warms up before the next
  reset. Sandbox (``isolate``): bubblewrap (read-only system, private writable working directory, no network)
  where usable, see :mod:`.appworld_server`; ``server_info()["sandbox"]`` says which is in use.
- Faults: a step that hangs past ``http_timeout_s`` (20 s, tight: it is model code) or kills the server ends the
  episode as failed (``info["server_failure"]`` = ``server_timeout``/``server_crashed``, reason in ``info["error"]``
  and in the observation); the server is killed and relaunched at once, so the next episode runs. Infinite Python
  loops are first stopped by AppWorld's own ``timeout_seconds`` (``execute_timeout_s``) and the episode goes on.
  A server that cannot start raises, so the runner records ``EnvFailure("env_error")``.

Runner limits: ``reset()`` of a fresh worker waits for its server's start (~12-25 s, ~50 s on a very busy machine),
so give the runner a ``step_timeout_s`` of 120 s or more (``verl-hindsight env-check appworld`` uses 120 s; for
training set ``hindsight.env.step_timeout_s=120``; the default 30 s is too tight for a start). The worker's own
start (``RunnerLimits.start_timeout_s``, 60 s) only covers the constructor, which launches the server and returns.
"""

from __future__ import annotations

import ast
import os
import random
from typing import Optional

from verl_hindsight.envs import appworld_server as aws
from verl_hindsight.envs import appworld_tasks
from verl_hindsight.environment.protocol import Environment, Observation, StepResult, register_env

REAL_SPLITS = {"train": "train", "val": "dev", "dev": "dev", "test_normal": "test_normal",
               "test_challenge": "test_challenge"}
GENERATED_SPLITS = {"train": "train", "val": "dev", "dev": "dev"}

_RANDOM_ACTIONS = (
    "print(apis.api_docs.show_app_descriptions())",
    "print(apis.api_docs.show_api_descriptions(app_name='supervisor'))",
    "print(apis.api_docs.show_api_descriptions(app_name='simple_note'))",
    "print(apis.supervisor.show_account_passwords())",
    "print(apis.supervisor.show_profile())",
    "print(apis.api_docs.show_api_doc(app_name='simple_note', api_name='search_notes'))",
)


@register_env("appworld")
class AppWorldEnv(Environment):
    instructions = (
        "You are an autonomous agent completing a task for your supervisor using apps (simple_note, todoist, "
        "spotify, gmail, ...) through their Python APIs. Each action is Python code, run in a persistent "
        "interpreter where `apis` is defined; you see what it prints. Call `apis.<app>.<api>(...)`; discover apps "
        "with `apis.api_docs.show_app_descriptions()`, their APIs with "
        "`apis.api_docs.show_api_descriptions(app_name=...)` and one API's parameters with "
        "`apis.api_docs.show_api_doc(app_name=..., api_name=...)`. Account passwords are in "
        "`apis.supervisor.show_account_passwords()`. When the task is done, call "
        "`apis.supervisor.complete_task(answer=...)` (answer only for questions, else `complete_task()`)."
    )

    def __init__(self, venv: Optional[str] = None, data_root: Optional[str] = None, max_steps: int = 30,
                 execute_timeout_s: int = 10, http_timeout_s: float = 20.0,
                 start_timeout_s: float = aws.READY_TIMEOUT_S, init_timeout_s: float = aws.INITIALIZE_TIMEOUT_S,
                 memory_mb: int = 4096, cpu_s: int = 900, open_files: int = 256, isolate: str = "auto",
                 hide_paths: tuple = (), max_observation_chars: int = 4000, experiment_name: str = "verl_hindsight",
                 prestart: bool = True):
        self.venv = aws.venv_dir(venv)
        self.root, self.user_data = aws.resolve_data_root(data_root, self.venv)
        if not os.path.isdir(os.path.join(self.root, "data", "datasets")):
            raise aws.AppWorldSetupError(
                f"no AppWorld tasks under {self.root}; run `python -m verl_hindsight.envs.appworld_server setup` "
                "(builds the offline tasks) or point data_root / $APPWORLD_ROOT at AppWorld's data")
        self.max_steps, self.execute_timeout_s = max_steps, int(execute_timeout_s)
        self.http_timeout_s, self.max_observation_chars = http_timeout_s, max_observation_chars
        self.experiment_name = experiment_name
        self.limits = aws.ServerLimits(cpu_s=cpu_s, memory_mb=memory_mb, open_files=open_files, isolate=isolate,
                                       hide_paths=tuple(hide_paths))
        self.start_timeout_s, self.init_timeout_s = start_timeout_s, init_timeout_s
        aws.choose_sandbox(isolate)  # an unknown or unavailable required mode fails here, not in reset()
        self._server: Optional[aws.AppWorldServer] = None
        self._generated = None if self.user_data else appworld_tasks.load_tasks_file(self.root)
        self._task_id: Optional[str] = None
        self._steps = 0
        self._done = True
        self._oracle: list[str] = []
        if prestart:  # boot (and warm) the server now, while the caller does other work; reset() waits for it
            self._new_server().start()

    def _new_server(self) -> aws.AppWorldServer:
        if self._server is None:
            self._server = aws.AppWorldServer(self.venv, self.root, self.limits, start_timeout_s=self.start_timeout_s)
        return self._server

    # -------------------------------------------------------------------------------------------- tasks
    def task_ids(self, split: str) -> list[str]:
        splits = REAL_SPLITS if self.user_data else GENERATED_SPLITS
        if split not in splits:
            raise KeyError(f"appworld env: unknown split {split!r}; use one of {sorted(splits)}")
        path = os.path.join(self.root, "data", "datasets", splits[split] + ".txt")
        with open(path) as f:
            return [line.strip().split(":")[0] for line in f if line.strip()]

    def _oracle_actions(self, task_id: str) -> list[str]:
        if self._generated is not None:
            return list(self._generated["tasks"].get(task_id, {}).get("oracle", []))
        # AppWorld's released train/dev ground truth has compiled_solution.py: `def solution(apis, requester): ...`
        path = os.path.join(self.root, "data", "tasks", task_id, "ground_truth", "compiled_solution.py")
        try:
            with open(path) as f:
                source = f.read()
            fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "solution")
            return ["\n".join(ast.get_source_segment(source, stmt) for stmt in fn.body)]
        except (OSError, StopIteration, SyntaxError):
            return []

    # -------------------------------------------------------------------------------------------- server
    def _ensure_server(self) -> aws.AppWorldServer:
        server = self._new_server()
        if server.proc is None or not server.alive():
            if server.proc is not None:
                server.restarts += 1
            server.start()
        elif server.cpu_seconds() > self.limits.cpu_s / 2:
            server.restart()  # fresh CPU budget before RLIMIT_CPU would kill it mid-episode
        try:
            server.wait_ready()
        except aws.ServerError as exc:
            if exc.reason == "server_start_timeout":
                raise  # too slow even with the generous limit: another start would be slower still
            server.restart()  # it died while starting: one more try, then let the runner record the failure
            server.wait_ready()
        return server

    def _episode_over(self) -> None:
        """Get the server ready for the next reset now: replaced early when past half its CPU budget."""
        server = self._server
        if server is not None and server.alive() and server.cpu_seconds() > self.limits.cpu_s / 2:
            server.restart()

    def server_info(self) -> dict:
        s = self._server
        return {"pid": s.proc.pid if s and s.proc else None, "restarts": s.restarts if s else 0,
                "sandbox": s.sandbox if s else None, "workdir": s.workdir if s else None,
                "ready_s": s.ready_s if s else None}

    def _call(self, path: str, timeout_s: Optional[float] = None, **payload):
        return self._server.client.post(path, timeout_s or self.http_timeout_s, task_id=self._task_id, **payload)

    # -------------------------------------------------------------------------------------------- episode
    def reset(self, task_id: str) -> Observation:
        server = self._ensure_server()
        if self._task_id is not None and not self._done:
            try:
                self._call("/close", timeout_s=10)
            except aws.ServerError:
                server.restart()
                server = self._ensure_server()
        self._task_id, self._steps, self._done = task_id, 0, False
        try:
            out = server.client.post(
                "/initialize", self.init_timeout_s, task_id=task_id, experiment_name=self.experiment_name,
                timeout_seconds=self.execute_timeout_s, raise_on_unsafe_syntax=True, null_patch_unsafe_execution=True)
        except aws.ServerError as exc:
            server.restart()
            raise RuntimeError(f"appworld: could not start task {task_id}: {exc}") from None
        self._oracle = self._oracle_actions(task_id)
        sup = out["supervisor"]
        text = (f"Task: {out['instruction']}\n"
                f"Supervisor: {sup['first_name']} {sup['last_name']}, {sup['email']}, {sup['phone_number']}\n"
                f"Current date and time: {out['datetime']}")
        return Observation(text, {"anchor": text, "task_id": task_id})

    def _clip(self, text: str) -> str:
        n = self.max_observation_chars
        return text if len(text) <= n else text[: n // 2] + "\n... (output truncated) ...\n" + text[-n // 2:]

    def _server_failure(self, exc: aws.ServerError) -> StepResult:
        """The server hung or died during the step: the episode is failed; relaunch the server for the next one."""
        self._done = True
        server = self._server
        log = server.log_tail(500) if server else ""
        code = None
        if server and server.proc and exc.reason != "server_timeout":
            try:
                server.proc.wait(timeout=2)
            except Exception:
                pass
            code = server.exit_code()
        server.restart()  # starts (and warms) the replacement now, so it is ready by the next reset
        if exc.reason == "server_timeout":
            why = f"the code did not finish within {self.http_timeout_s:.0f}s; the environment server was killed"
        else:
            why = f"the environment server died (exit code {code})"
        error = f"{why} ({exc.reason})"
        return StepResult(f"Execution failed: {why}. The episode is over.", 0.0, True,
                          {"success": False, "error": error, "server_failure": exc.reason,
                           "server_log_tail": log[-300:]})

    def step(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError("appworld env: step() after the episode ended; call reset()")
        self._steps += 1
        try:
            output = self._call("/execute", code=action)
            completed = bool(self._call("/task_completed", timeout_s=10))
        except aws.ServerError as exc:
            if exc.reason == "http_error":
                raise RuntimeError(f"appworld server error: {exc}") from None
            return self._server_failure(exc)
        output = str(output)
        error = output if output.startswith("Execution failed") else None
        info: dict = {"anchor": None}
        if error:
            info["error"] = self._clip(error)
        observation = self._clip(output)
        if not completed and self._steps < self.max_steps:
            return StepResult(observation, 0.0, False, {k: v for k, v in info.items() if v is not None})
        try:
            report = self._call("/evaluate", timeout_s=max(self.http_timeout_s, 60), suppress_errors=True)
        except aws.ServerError as exc:
            if exc.reason == "http_error":
                raise RuntimeError(f"appworld evaluation error: {exc}") from None
            return self._server_failure(exc)
        self._done = True
        self._episode_over()
        success = bool(report.get("success"))
        failures = [f.get("requirement", "") for f in report.get("failures", [])]
        num = report.get("num_tests", len(failures) + len(report.get("passes", [])))
        why = "the task was marked complete" if completed else f"the step limit ({self.max_steps}) was reached"
        summary = f"Evaluation ({why}): {num - len(failures)}/{num} tests passed."
        if failures:
            summary += "\nFailed tests:\n" + "\n".join(f"- {r}" for r in failures)
            info["error"] = ((info.get("error") + "\n") if info.get("error") else "") + \
                "failed tests: " + "; ".join(failures)
        info.update(success=success, tests_passed=num - len(failures), tests_total=num, failed_tests=failures)
        return StepResult(observation + "\n\n" + summary, 1.0 if success else 0.0, True,
                          {k: v for k, v in info.items() if v is not None})

    def oracle_action(self) -> Optional[str]:
        if self._done or self._steps >= len(self._oracle):
            return None
        return self._oracle[self._steps]

    def random_action(self, rng: random.Random) -> str:
        return rng.choice(_RANDOM_ACTIONS)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


__all__ = ["AppWorldEnv"]
