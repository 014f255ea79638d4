"""The built wheel is complete and works when installed on its own, away from the checkout.

The wheel is built from a clean copy of the checkout's files (tracked plus untracked-but-not-ignored, as
``git ls-files`` lists them): building in the checkout itself would write ``build/`` there, and setuptools packs
whatever a stale ``build/lib`` still holds (a module deleted from the source would ship). It is installed,
non-editable and without its dependencies, into a fresh venv; the dependencies are this interpreter's, reached
through a path file (a folder a ``.pth`` file names is put on ``sys.path`` without running that folder's own
``.pth`` files, so the checkout's editable install does not come along). That pip resolves the wheel's dependencies
with the CPU torch the README pins is checked by a dry run that installs nothing. Then, from a folder outside the
repository, every ``verl-hindsight`` subcommand answers ``--help`` and every installed module imports on its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800), pytest.mark.xdist_group("wheel")]

REPO = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # resolves to the local CPU wheel here; never let pip pull a CUDA build
# logged by verl_hindsight.register / post_import when a registration step breaks (they never raise into verl)
REGISTRATION_FAILURE = re.compile(r"verl-hindsight: .* failed: .*")


def _run(cmd, *, cwd, env=None, timeout=600):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _source_copy(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():  # tracked files deleted in the working tree are listed too
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return _source_copy(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", ".", "-w", out],
                 cwd=source)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout[-4000:]}\n{built.stderr[-4000:]}"
    wheels = sorted(out.glob("verl_hindsight-*.whl"))
    assert len(wheels) == 1, f"expected one verl_hindsight wheel in {out}: {sorted(p.name for p in out.iterdir())}"
    return wheels[0]


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A working directory from which the checkout is not importable."""
    path = tmp_path_factory.mktemp("outside")
    assert REPO not in path.resolve().parents, f"{path} is inside the checkout {REPO}"
    return path


@pytest.fixture(scope="module")
def venv(wheel, outside, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fresh") / "venv"
    created = _run([sys.executable, "-m", "venv", path], cwd=outside)
    assert created.returncode == 0, created.stderr
    site = _python(path, "import sysconfig; print(sysconfig.get_paths()['purelib'])", outside).stdout.strip()
    (Path(site) / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run([path / "bin" / "pip", "install", "--no-deps", "--ignore-installed", "--progress-bar", "off",
                      wheel], cwd=outside, env=_env(path))
    assert installed.returncode == 0, f"install failed:\n{installed.stdout[-4000:]}\n{installed.stderr[-4000:]}"
    return path


def _env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _python(venv: Path, code: str, cwd: Path, timeout=600):
    return _run([venv / "bin" / "python", "-c", code], cwd=cwd, env=_env(venv), timeout=timeout)


def test_wheel_contents(wheel, source):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(source).as_posix() for p in (source / "verl_hindsight").rglob("*.py")}
    expected |= {"verl_hindsight/" + p.relative_to(source).as_posix() for p in (source / "envs").rglob("*.py")}
    expected |= {"verl_hindsight/" + p.relative_to(source).as_posix() for p in (source / "recipes").rglob("*.yaml")}
    expected.add("verl_hindsight/envs/data_files/webshop_catalog.json")
    assert any(n.startswith("verl_hindsight/demo/") for n in expected), "no demo package in the source?"
    assert any(n.startswith("verl_hindsight/report/") for n in expected), "no report package in the source?"
    assert any(n.startswith("verl_hindsight/recipes/") and n.endswith(".yaml") for n in expected)
    missing = sorted(expected - names)
    stray = sorted(n for n in names if not n.startswith(("verl_hindsight/", "verl_hindsight-")))
    assert not missing and not stray, f"{wheel.name}: missing {missing}; outside the verl_hindsight package {stray}"


def test_installed_copy_is_the_wheel(venv, outside):
    probe = _python(venv, "import json, verl_hindsight, verl_hindsight.envs; from importlib.metadata import "
                          "distribution; print(json.dumps([verl_hindsight.__file__, verl_hindsight.envs.__file__, "
                          "str(distribution('verl-hindsight').locate_file(''))]))", outside)
    assert probe.returncode == 0, probe.stderr[-4000:]
    for where in json.loads(probe.stdout.strip().splitlines()[-1]):
        assert Path(where).resolve().is_relative_to(venv.resolve()), f"{where}: not the fresh venv's copy"


def test_dependencies_resolve_with_the_cpu_torch(wheel, venv, outside, tmp_path):
    """What `pip install torch==2.13.0 <wheel>` would install into a fresh venv, resolved without installing."""
    report = tmp_path / "report.json"
    resolved = _run([venv / "bin" / "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                     report, TORCH, wheel], cwd=outside, env=_env(venv))
    assert resolved.returncode == 0, f"resolution failed:\n{resolved.stdout[-4000:]}\n{resolved.stderr[-4000:]}"
    versions = {d["metadata"]["name"].lower(): d["metadata"]["version"] for d in json.loads(report.read_text())["install"]}
    assert versions["torch"].endswith("+cpu"), f"pip resolved torch {versions['torch']}, not the local CPU build"
    assert "verl" in versions and "verl-hindsight" in versions
    cuda = sorted(n for n in versions if n.startswith("nvidia-"))
    assert not cuda, f"CUDA packages would be pulled into the CPU install: {cuda}"


def test_every_cli_subcommand_answers_help(venv, outside):
    listed = _python(venv, "import argparse, json; from verl_hindsight.cli import build_parser; "
                           "print(json.dumps([c for a in build_parser()._actions "
                           "if isinstance(a, argparse._SubParsersAction) for c in a.choices]))", outside)
    assert listed.returncode == 0, listed.stderr[-4000:]
    subcommands = json.loads(listed.stdout.strip().splitlines()[-1])
    assert subcommands, "the parser defines no subcommands"
    failures = []
    for args in [["--help"], *([sub, "--help"] for sub in subcommands)]:
        result = _run([venv / "bin" / "verl-hindsight", *args], cwd=outside, env=_env(venv), timeout=300)
        if result.returncode != 0 or "usage:" not in result.stdout:
            failures.append(f"verl-hindsight {' '.join(args)}: exit {result.returncode}\n{result.stderr[-2000:]}")
    assert not failures, "\n".join(failures)


# Run by the fresh venv's interpreter: third-party modules the package imports anyway (none of them imports verl,
# whose import runs the plugin's registration) are loaded once, then each module named in argv is imported in a
# forked child, the first import of the package in that child. A fresh interpreter per module took ~4 s each.
FORKED_IMPORTS = r"""
import json, os, sys, tempfile
import numpy, pandas, torch, tensordict, transformers, ray, omegaconf, hydra, datasets  # noqa: F401
results = {}
for name in sys.argv[1:]:
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            import importlib, verl_hindsight
            m = importlib.import_module(name)
            print(json.dumps([m.__file__, verl_hindsight.__file__]), flush=True)
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    results[name] = [os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def imported(venv, outside) -> dict[str, subprocess.CompletedProcess]:
    """Every module of the installed package, imported alone (see FORKED_IMPORTS)."""
    where = _python(venv, "import verl_hindsight, pathlib; print(pathlib.Path(verl_hindsight.__file__).parent)",
                    outside)
    assert where.returncode == 0, where.stderr[-4000:]
    package_dir = Path(where.stdout.strip().splitlines()[-1])
    modules = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    ran = _run([venv / "bin" / "python", "-c", FORKED_IMPORTS, *modules], cwd=outside, env=_env(venv), timeout=900)
    assert ran.returncode == 0, ran.stderr[-4000:]
    results = json.loads(ran.stdout.strip().splitlines()[-1])
    return {name: subprocess.CompletedProcess(name, *results[name]) for name in modules}


def test_every_installed_module_imports(imported, venv):
    assert len(imported) > 20, f"only {len(imported)} modules found in the installed package"
    failures = []
    for name, result in imported.items():
        if result.returncode != 0:
            failures.append(f"{name}: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        files = json.loads(result.stdout.strip().splitlines()[-1])
        outside_venv = [f for f in files if not Path(f).resolve().is_relative_to(venv.resolve())]
        if outside_venv:
            failures.append(f"{name}: imported from {outside_venv}, not from the fresh venv")
    assert not failures, "modules of the installed wheel that do not import on their own:\n" + "\n".join(failures)


@pytest.mark.xfail(strict=True, reason="known: a process whose first import is agent_loops.env_loop or "
                   "runtime.cpu_platform/cpu_engine imports verl from inside that module, and verl's plugin "
                   "registration then meets the half-initialised module (logged, not raised); verl's own processes "
                   "import verl first")
def test_no_registration_failure_whichever_module_comes_first(imported):
    """verl imports the plugin (register.py) during the first verl import, whichever module triggers it."""
    failures = [f"import {name}: {line.strip()}" for name, result in imported.items()
                for line in result.stderr.splitlines() if REGISTRATION_FAILURE.search(line)]
    assert not failures, "registration steps that failed when a module was the first one imported:\n" + "\n".join(
        failures)
