"""AppWorld through its isolated environment server.

Fast tests (no AppWorld venv): module imports, CLI parsing, data-root resolution. The rest (``@pytest.mark.e2e``)
run the real ``appworld serve environment`` app from a separate venv that the session fixture creates with
:func:`verl_hindsight.envs.appworld_server.setup` (pip install from PyPI + ``appworld install`` + offline tasks;
about 45 s the first time, instant afterwards). Set ``VERL_HINDSIGHT_APPWORLD_VENV`` to choose where it goes.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from verl_hindsight.envs import appworld_server as aws
from verl_hindsight.envs import appworld_tasks

# ---------------------------------------------------------------------------------------------------- fast


def test_registry_and_stdlib_only_adapter():
    import verl_hindsight.envs.appworld as adapter
    from verl_hindsight.environment.protocol import _BUILTIN_ENV_MODULES

    assert _BUILTIN_ENV_MODULES["appworld"] == "verl_hindsight.envs.appworld"
    assert adapter.AppWorldEnv.name == "appworld"
    assert "appworld" not in sys.modules or not hasattr(sys.modules["appworld"], "AppWorld")  # package not imported


def test_generated_task_specs_are_consistent():
    ids = [t["id"] for t in appworld_tasks.TASKS]
    assert len(ids) == len(set(ids)) and all(i.count("_") == 1 for i in ids)  # AppWorld's id format
    assert {t["app"] for t in appworld_tasks.TASKS} >= {"simple_note", "todoist"}
    assert {t["split"] for t in appworld_tasks.TASKS} == {"train", "val"}
    for t in appworld_tasks.TASKS:
        assert t["oracle"] and t["wrong"] and "complete_task" in t["oracle"][-1]
        assert appworld_tasks._test_requirements(appworld_tasks._evaluation_code(t))


def test_venv_location_and_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv(aws.VENV_ENV_VAR, str(tmp_path / "v"))
    assert aws.venv_dir() == str(tmp_path / "v")
    assert aws.venv_dir(str(tmp_path / "w")) == str(tmp_path / "w")
    monkeypatch.delenv("APPWORLD_ROOT", raising=False)
    monkeypatch.delenv(aws.ROOT_ENV_VAR, raising=False)
    assert aws.resolve_data_root() == (str(tmp_path / "v" / "generated-root"), False)
    real = tmp_path / "aw"
    (real / "data" / "tasks").mkdir(parents=True)
    (real / "data" / "datasets").mkdir()
    (real / "data" / "datasets" / "train.txt").write_text("a_1\n")
    monkeypatch.setenv("APPWORLD_ROOT", str(real))
    assert aws.resolve_data_root() == (str(real), True)
    with pytest.raises(aws.AppWorldSetupError):
        aws.resolve_data_root(str(tmp_path / "nothing"))


def test_cli_parses(capsys):
    with pytest.raises(SystemExit):
        aws.main(["--help"])
    assert "setup" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- real server


@pytest.fixture(scope="session")
def appworld_venv():
    started = time.monotonic()
    try:
        path = aws.setup(log=lambda m: print(m, file=sys.stderr))
    except aws.AppWorldSetupError as exc:  # e.g. no PyPI access: say exactly why
        pytest.fail(f"AppWorld setup failed: {exc}")
    print(f"\nAppWorld venv ready in {time.monotonic() - started:.1f}s at {path}", file=sys.stderr)
    return path


@pytest.fixture()
def env(appworld_venv, tmp_path):
    from verl_hindsight.environment.protocol import make_env

    secret_dir = tmp_path / "trainer-secrets"
    secret_dir.mkdir()
    (secret_dir / "token.txt").write_text("TOPSECRET-TOKEN")
    e = make_env("appworld", venv=appworld_venv, execute_timeout_s=3, http_timeout_s=8, memory_mb=2048,
                 hide_paths=(str(secret_dir),))
    e.secret_file = str(secret_dir / "token.txt")
    yield e
    e.close()


def _play(env, task_id, actions):
    env.reset(task_id)
    res = None
    for code in actions:
        res = env.step(code)
        if res.done:
            break
    return res


@pytest.mark.e2e
def test_setup_is_idempotent_and_fast(appworld_venv):
    started = time.monotonic()
    assert aws.setup(appworld_venv) == appworld_venv
    assert time.monotonic() - started < 5
    assert aws.is_set_up(appworld_venv)


@pytest.mark.e2e
def test_env_check_oracle_passes_every_generated_task(appworld_venv):
    from verl_hindsight.agent_loops.env_check import run_env_check, summarize
    from verl_hindsight.environment.runner import RunnerLimits

    limits = RunnerLimits(step_timeout_s=120, episode_timeout_s=600, start_timeout_s=60)
    kwargs = {"venv": appworld_venv}
    for split in ("train", "val"):
        reports = run_env_check("appworld", policy="oracle", tasks=50, split=split, env_kwargs=kwargs,
                                limits=limits, max_turns=10)
        print(summarize(reports))
        assert reports and all(r.success and r.reward == 1.0 and r.failure is None for r in reports), \
            [(r.task_id, r.failure, r.transcript[-1:]) for r in reports]
    assert len(reports) == sum(t["split"] == "val" for t in appworld_tasks.TASKS)


@pytest.mark.e2e
def test_wrong_solution_fails_with_failing_test_named(env):
    wrong = appworld_tasks.load_tasks_file(env.root)["tasks"]["hsnote_2"]["wrong"]
    res = _play(env, "hsnote_2", wrong)
    assert res.done and res.reward == 0.0 and res.info["success"] is False
    assert "the note Gym plan keeps its other tags" in res.observation
    assert "Failed tests" in res.observation and "keeps its other tags" in res.info["error"]


@pytest.mark.e2e
def test_execution_error_is_immediate_feedback(env):
    env.reset("hsnote_1")
    res = env.step("apis.simple_note.login(username='ada@example.com', password='wrong-password')")
    assert not res.done and res.observation.startswith("Execution failed") and "error" in res.info


@pytest.mark.e2e
def test_max_steps_ends_with_evaluation(appworld_venv):
    from verl_hindsight.environment.protocol import make_env

    e = make_env("appworld", venv=appworld_venv, max_steps=2)
    try:
        e.reset("hsnote_3")
        assert not e.step("print(1)").done
        res = e.step("print(2)")
        assert res.done and res.reward == 0.0 and "step limit" in res.observation and res.info["failed_tests"]
    finally:
        e.close()


# ---- faults: each followed by a successful oracle episode on the same env (same or restarted server)


def _oracle_succeeds(env, task_id="hsnote_1"):
    res = _play(env, task_id, appworld_tasks.load_tasks_file(env.root)["tasks"][task_id]["oracle"])
    assert res.done and res.reward == 1.0, res.observation


@pytest.mark.e2e
def test_fault_python_infinite_loop_stopped_by_appworld_timeout(env):
    env.reset("hsnote_1")
    started = time.monotonic()
    res = env.step("while True:\n    pass")
    assert time.monotonic() - started < 8
    assert not res.done and "timed out" in res.observation  # AppWorld's own SIGALRM limit; the episode goes on
    _oracle_succeeds(env)


@pytest.mark.e2e
def test_fault_uninterruptible_loop_killed_by_http_time_limit(env):
    env.reset("hsnote_1")
    pid = env.server_info()["pid"]
    started = time.monotonic()
    # ignores AppWorld's SIGALRM timeout, so only the adapter's HTTP time limit can stop it
    res = env.step("__import__('signal').signal(14, lambda *a: None)\nwhile True:\n    pass")
    assert time.monotonic() - started < 20
    assert res.done and res.reward == 0.0 and res.info["success"] is False
    assert res.info["server_failure"] == "server_timeout" and "did not finish within" in res.info["error"]
    assert env.server_info()["restarts"] == 1 and env.server_info()["pid"] != pid
    _oracle_succeeds(env)


@pytest.mark.e2e
def test_fault_memory_exhaustion_contained(env):
    env.reset("hsnote_1")
    res = env.step("x = bytearray(10 * 1024**3)\nprint(len(x))")  # 10 GiB > RLIMIT_AS (2 GiB here)
    assert "MemoryError" in res.observation and not res.done
    res = env.step("y = []\nwhile True:\n    y.append(b'x' * (256 * 1024**2))")  # grows until the limit
    assert "MemoryError" in res.observation or "timed out" in res.observation or res.info.get("server_failure")
    _oracle_succeeds(env)


@pytest.mark.e2e
def test_fault_code_that_kills_the_server(env):
    env.reset("hsnote_1")
    res = env.step("import os\nos._exit(1)")
    assert "not allowed: os._exit" in res.observation and not res.done  # refused by AppWorld's safety guard
    pid = env.server_info()["pid"]
    res = env.step("import os\nos.abort()")  # not on AppWorld's list: really kills the server (SIGABRT)
    assert res.done and res.reward == 0.0 and res.info["server_failure"] == "server_crashed"
    assert "died" in res.observation and "exit code -6" in res.info["error"]
    assert env.server_info()["restarts"] == 1 and env.server_info()["pid"] != pid
    _oracle_succeeds(env)


@pytest.mark.e2e
def test_fault_through_the_runner_next_episode_runs(appworld_venv):
    """The same fault inside the trainer's worker processes: the episode ends failed, the next one succeeds."""
    from verl_hindsight.environment.runner import EnvPool, RunnerLimits

    pool = EnvPool("appworld", {"venv": appworld_venv, "http_timeout_s": 8},
                   RunnerLimits(step_timeout_s=120, episode_timeout_s=600))
    try:
        with pool.session() as s:
            s.reset("hsnote_1")
            res = s.step("import os\nos.abort()")
            assert res.done and res.info["server_failure"] == "server_crashed"
        with pool.session() as s:
            s.reset("hsnote_1")
            res = None
            while res is None or not res.done:
                res = s.step(s.oracle_action())
            assert res.reward == 1.0
        assert pool.stats["workers_started"] == 1  # the worker survived; only the AppWorld server was replaced
    finally:
        pool.close()


# ---- isolation


@pytest.mark.e2e
def test_isolation_write_outside_workdir(env, tmp_path):
    target = tmp_path / "outside.txt"
    env.reset("hsnote_1")
    res = env.step(f"open({str(target)!r}, 'w').write('x')")
    assert "not allowed: builtins.open" in res.observation  # AppWorld refuses it (syntax check)
    res = env.step(f"getattr(__builtins__, 'op' + 'en')({str(target)!r}, 'w')")
    assert "Writing to OS file system is disabled" in res.observation  # AppWorld's runtime patch
    assert not target.exists()
    # The trainer's checkout is hidden (empty tmpfs) in the server's mount namespace: a write there is lost.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    marker = os.path.join(repo, f".appworld-escape-{os.getpid()}")
    env.step(f"f = __import__('io').FileIO({marker!r}, 'w')\nf.write(b'x')\nf.close()")
    if env.server_info()["sandbox"] == "namespaces":
        assert not os.path.exists(marker)
    else:  # pragma: no cover - only where user namespaces are disabled
        pytest.skip("no user namespaces here: only AppWorld's guard and RLIMIT_FSIZE apply")


@pytest.mark.e2e
def test_isolation_read_trainer_files(env):
    repo_file = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "pyproject.toml")
    env.reset("hsnote_1")
    res = env.step(f"print(open({repo_file!r}).read())")
    assert "not allowed: builtins.open" in res.observation  # AppWorld's syntax check
    if env.server_info()["sandbox"] != "namespaces":  # pragma: no cover
        pytest.skip("no user namespaces here")
    for path in (repo_file, env.secret_file):
        res = env.step(f"print(__import__('io').FileIO({path!r}).read())")  # bypasses AppWorld's guard
        assert "No such file or directory" in res.observation and "TOPSECRET" not in res.observation


@pytest.mark.e2e
def test_isolation_network_socket(env):
    env.reset("hsnote_1")
    res = env.step("import socket\nsocket.create_connection(('127.0.0.1', 22))")
    assert "not allowed: socket" in res.observation  # AppWorld's import allowlist
    if env.server_info()["sandbox"] != "namespaces":  # pragma: no cover
        pytest.skip("no user namespaces here")
    for host in ("127.0.0.1", "1.1.1.1"):
        res = env.step(f"s = __import__('socket').socket()\ns.settimeout(2)\ns.connect(({host!r}, 80))")
        assert "Network is unreachable" in res.observation  # empty network namespace


@pytest.mark.e2e
def test_server_process_limits_and_cleanup(env):
    env.reset("hsnote_1")
    info = env.server_info()
    with open(f"/proc/{info['pid']}/limits") as f:
        limits = f.read()
    assert "Max cpu time" in limits and "Max address space" in limits and "Max open files" in limits
    line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
    assert line.split()[3] == "256"
    workdir = info["workdir"]
    assert os.path.isdir(workdir)
    env.close()
    assert not os.path.exists(workdir)
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(info["pid"], 0)
            time.sleep(0.1)
