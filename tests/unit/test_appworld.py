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


def test_sandbox_choice_and_fallback_warnings(monkeypatch, caplog):
    monkeypatch.setattr(aws, "_warned", set())
    monkeypatch.setattr(aws, "_bwrap_support", (True, "", aws._BWRAP_VARIANTS[0]))
    monkeypatch.setattr(aws, "_namespaces_support", (True, ""))
    assert aws.choose_sandbox("auto") == "bwrap" and aws.choose_sandbox("bwrap") == "bwrap"
    assert aws.choose_sandbox("namespaces") == "namespaces" and aws.choose_sandbox("none") == "rlimits"
    with pytest.raises(ValueError, match="isolate must be one of"):
        aws.choose_sandbox("docker")
    assert not caplog.records
    monkeypatch.setattr(aws, "_bwrap_support", (False, "`bwrap` is not installed (apt-get install bubblewrap)", ()))
    with caplog.at_level("WARNING", logger=aws.__name__):
        assert aws.choose_sandbox("auto") == "namespaces"
        assert aws.choose_sandbox("auto") == "namespaces"  # warned once per process
    assert len(caplog.records) == 1 and "sandbox: namespaces" in caplog.text and "not installed" in caplog.text
    with pytest.raises(aws.AppWorldSetupError, match="isolate='bwrap' but `bwrap` is not installed"):
        aws.choose_sandbox("bwrap")
    monkeypatch.setattr(aws, "_namespaces_support", (False, "unprivileged user namespaces are not permitted (x)"))
    caplog.clear()
    with caplog.at_level("WARNING", logger=aws.__name__):
        assert aws.choose_sandbox("auto") == "rlimits"
    assert "rlimits only" in caplog.text and "not permitted" in caplog.text and "not installed" in caplog.text
    with pytest.raises(aws.AppWorldSetupError, match="isolate='namespaces' but unprivileged"):
        aws.choose_sandbox("namespaces")


def test_bwrap_command_mount_order(tmp_path, monkeypatch):
    """Parents before children: hide $HOME, then put the venv back read-only; /tmp hidden, then the workdir bound
    writable inside it; the hiding tmpfs made read-only last (after every mount point inside exists)."""
    home, other = tmp_path / "home", tmp_path / "other"
    venv = home / ".cache" / "venv"
    venv.mkdir(parents=True)
    (other / "data").mkdir(parents=True)
    workdir = tmp_path / "tmp-work"  # lies under /tmp (pytest's tmp_path) on Linux
    workdir.mkdir()
    monkeypatch.setenv("HOME", str(home))
    cmd = aws.bwrap_command(str(workdir), keep=[str(venv), str(other / "data"), "/usr"], hide_paths=(str(other),),
                            flags=("--unshare-all", "--die-with-parent"))
    joined = " ".join(cmd)
    assert cmd[1:3] == ["--unshare-all", "--die-with-parent"] and "--ro-bind / / --dev /dev --proc /proc" in joined

    def at(*args):
        text = " ".join(args)
        assert text in joined, text
        return joined.index(text)

    home, venv, other, workdir = (os.path.realpath(p) for p in (home, venv, other, workdir))
    assert at("--tmpfs", home) < at("--ro-bind", venv, venv) < at("--remount-ro", home)
    assert at("--tmpfs", other) < at("--ro-bind", other + "/data") < at("--remount-ro", other)
    if workdir.startswith("/tmp/"):
        assert at("--tmpfs /tmp") < at("--bind", workdir, workdir) < at("--remount-ro /tmp")
    assert "--ro-bind /usr" not in joined  # not under a hidden directory: already visible (read-only)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert at("--tmpfs", os.path.realpath(repo)) < at("--remount-ro", os.path.realpath(repo))


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


# ---- isolation: AppWorld's own guard first, then the OS sandbox (bwrap, or unshare namespaces)


def _sandbox_or_skip(mode: str) -> None:
    ok, why = aws.bwrap_support()[:2] if mode == "bwrap" else aws.namespaces_support()
    if not ok:  # pragma: no cover - machines where the kernel or the container forbids it
        pytest.skip(f"isolate={mode!r} is not permitted here: {why}")


@pytest.fixture(params=["bwrap", "namespaces"])
def sandboxed_env(request, appworld_venv, tmp_path):
    from verl_hindsight.environment.protocol import make_env

    _sandbox_or_skip(request.param)
    secret_dir = tmp_path / "trainer-secrets"
    secret_dir.mkdir()
    (secret_dir / "token.txt").write_text("TOPSECRET-TOKEN")
    e = make_env("appworld", venv=appworld_venv, execute_timeout_s=3, http_timeout_s=8, memory_mb=2048,
                 isolate=request.param, hide_paths=(str(secret_dir),))
    e.secret_file = str(secret_dir / "token.txt")
    e.reset("hsnote_1")
    assert e.server_info()["sandbox"] == request.param
    yield e
    e.close()


def _file_io(path: str, mode: str = "r") -> str:
    """Code that bypasses AppWorld's guard (``open`` refused, ``io.FileIO`` not)."""
    if mode == "w":
        return f"f = __import__('io').FileIO({path!r}, 'w')\nf.write(b'x')\nf.close()\nprint('WROTE')"
    return f"print(__import__('io').FileIO({path!r}).read())"


@pytest.mark.e2e
def test_isolation_write_outside_workdir(sandboxed_env, tmp_path):
    env = sandboxed_env
    target = tmp_path / "outside.txt"
    res = env.step(f"open({str(target)!r}, 'w').write('x')")
    assert "not allowed: builtins.open" in res.observation  # AppWorld refuses it (syntax check)
    res = env.step(f"getattr(__builtins__, 'op' + 'en')({str(target)!r}, 'w')")
    assert "Writing to OS file system is disabled" in res.observation  # AppWorld's runtime patch
    res = env.step(_file_io(os.path.join(env.server_info()["workdir"], "scratch.txt"), "w"))
    assert "WROTE" in res.observation  # the private working directory stays writable
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    repo_marker = os.path.join(repo, f".appworld-escape-{os.getpid()}")
    home_marker = os.path.join(os.path.expanduser("~"), f".appworld-escape-{os.getpid()}")
    targets = [repo_marker] + ([str(target), home_marker] if env.server_info()["sandbox"] == "bwrap" else [])
    try:
        for path in targets:
            res = env.step(_file_io(path, "w"))  # bypasses AppWorld's guard
            assert not os.path.exists(path), path
            if env.server_info()["sandbox"] == "bwrap":  # read-only everywhere but the working directory
                assert "Read-only file system" in res.observation and "WROTE" not in res.observation, path
            # namespaces: the trainer's checkout is an empty tmpfs only the server sees, so the write is lost;
            # elsewhere (tmp_path, $HOME) writes are not prevented (not tried here), see docs/benchmarks/appworld.md
    finally:
        for path in targets:
            if os.path.exists(path):
                os.remove(path)


@pytest.mark.e2e
def test_isolation_read_trainer_files(sandboxed_env, tmp_path):
    env = sandboxed_env
    repo_file = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "pyproject.toml")
    res = env.step(f"print(open({repo_file!r}).read())")
    assert "not allowed: builtins.open" in res.observation  # AppWorld's syntax check
    other = tmp_path / "not-hidden.txt"  # under /tmp, not in hide_paths
    other.write_text("TOPSECRET-TMP")
    paths = [repo_file, env.secret_file] + ([str(other)] if env.server_info()["sandbox"] == "bwrap" else [])
    for path in paths:
        res = env.step(_file_io(path))  # bypasses AppWorld's guard
        assert "No such file or directory" in res.observation and "TOPSECRET" not in res.observation, path
    res = env.step(_file_io(os.path.join(env.root, "data", "datasets", "train.txt")))
    assert "hsnote_1" in res.observation  # the task data stays readable


@pytest.mark.e2e
def test_isolation_network_socket(sandboxed_env):
    import socket

    env = sandboxed_env
    res = env.step("import socket\nsocket.create_connection(('127.0.0.1', 22))")
    assert "not allowed: socket" in res.observation  # AppWorld's import allowlist
    listener = socket.socket()  # a service of the trainer's machine on loopback
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        for host, p in (("127.0.0.1", port), ("1.1.1.1", 80)):
            res = env.step(f"s = __import__('socket').socket()\ns.settimeout(2)\ns.connect(({host!r}, {p}))\n"
                           "print('CONNECTED')")
            assert "CONNECTED" not in res.observation
            # empty network namespace: no interface at all (namespaces), or only its own loopback (bwrap)
            assert "Network is unreachable" in res.observation or (
                host == "127.0.0.1" and "Connection refused" in res.observation), res.observation
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


@pytest.mark.e2e
def test_server_process_limits_and_cleanup(env):
    env.reset("hsnote_1")
    info = env.server_info()
    pids = env._server.server_pids()  # bwrap: bwrap, its init in the new pid namespace, the server's python
    assert pids[0] == info["pid"] and len(pids) == (3 if info["sandbox"] == "bwrap" else 1)
    for pid in pids:  # set before exec, inherited through bwrap by the server's python
        with open(f"/proc/{pid}/limits") as f:
            limits = f.read()
        assert "Max cpu time" in limits and "Max address space" in limits and "Max open files" in limits
        line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
        assert line.split()[3] == "256"
    assert 1 < env._server.cpu_seconds() < 120  # the python's CPU time (imports + warm-up), not bwrap's
    workdir = info["workdir"]
    assert os.path.isdir(workdir)
    env.close()
    assert not os.path.exists(workdir)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)


@pytest.mark.e2e
def test_server_started_ahead_and_reused_across_episodes(appworld_venv):
    from verl_hindsight.environment.protocol import make_env

    e = make_env("appworld", venv=appworld_venv)
    try:
        pid = e.server_info()["pid"]
        assert pid is not None  # launched by the constructor, warming up before the first reset
        _oracle_succeeds(e, "hsnote_1")
        assert e.server_info()["ready_s"] > 0
        started = time.monotonic()
        e.reset("hsnote_2")  # re-initialises the task on the same, running, warm server
        assert time.monotonic() - started < 10  # ~0.2 s idle, < 1 s with both cores busy
        _oracle_succeeds(e, "hstodo_1")
        assert e.server_info()["pid"] == pid and e.server_info()["restarts"] == 0
    finally:
        e.close()


@pytest.mark.e2e
def test_env_check_two_workers_on_a_busy_machine(appworld_venv):
    """`env-check appworld --policy oracle --split train --tasks 3 --workers 2` while two busy loops hold both
    cores: fresh workers start fresh servers under load, and every episode is solved (issue: 1/3 with the old
    60 s /initialize limit)."""
    import subprocess

    from verl_hindsight.agent_loops.env_check import run_env_check, summarize
    from verl_hindsight.environment.runner import RunnerLimits, get_pool
    from verl_hindsight.cli import SLOW_ENV_STEP_TIMEOUT

    limits = RunnerLimits(step_timeout_s=SLOW_ENV_STEP_TIMEOUT["appworld"])  # what the CLI uses
    kwargs = {"venv": appworld_venv, "experiment_name": "busy_machine"}  # its own pool: new workers, cold servers
    # own sessions: with autogroup scheduling, loops in one session would share one session's CPU share
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(2)]
    try:
        started = time.monotonic()
        reports = run_env_check("appworld", policy="oracle", tasks=3, workers=2, split="train", env_kwargs=kwargs,
                                limits=limits, max_turns=10)
        print(summarize(reports), f"\n{time.monotonic() - started:.1f}s with both cores busy", file=sys.stderr)
        assert len(reports) == 3 and all(r.success and r.reward == 1.0 and r.failure is None for r in reports), \
            [(r.task_id, r.failure, r.transcript[-1:]) for r in reports]
    finally:
        for p in hogs:
            p.kill()
        for p in hogs:
            p.wait()
        get_pool("appworld", kwargs, limits).close()
