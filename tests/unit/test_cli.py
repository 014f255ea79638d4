"""The command line's answers to user mistakes: a non-zero exit, one line on stderr naming the fix, nothing left
behind; every argument documented. Run as subprocesses, the way a user meets them."""

import argparse
import subprocess
import sys
from importlib.metadata import version

import pytest

from verl_hindsight.cli import build_parser


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "verl_hindsight.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def shipped_envs():
    """The registry a fresh interpreter sees; this process's may hold environments other tests registered."""
    code = "from verl_hindsight.environment.protocol import registered_envs; print(' '.join(registered_envs()))"
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "toy" in names and len(names) >= 6, names
    return names


def one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no traceback
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_unknown_environment_is_one_line_naming_the_registered_ones(tmp_path):
    out = tmp_path / "out"
    line = one_line_error(cli("prepare-data", "nosuchenv", out), "unknown environment 'nosuchenv'", "toy")
    assert all(name in line for name in shipped_envs())
    assert not out.exists()  # nothing left behind
    one_line_error(cli("env-check", "nosuchenv"), "env-check", "unknown environment 'nosuchenv'")


def test_prepare_data_into_an_existing_file_or_with_bad_env_kwargs_is_refused(tmp_path):
    target = tmp_path / "afile"
    target.write_text("keep me")
    one_line_error(cli("prepare-data", "toy", target), "exists and is not a folder")
    assert target.read_text() == "keep me"
    out = tmp_path / "out"
    one_line_error(cli("prepare-data", "toy", out, "--env-kwargs", '{"no_such_option": 1}'), "cannot build 'toy'",
                   "no_such_option")
    assert not out.exists()


def test_view_needs_a_folder_with_dumps(tmp_path):
    missing = tmp_path / "nope"
    one_line_error(cli("view", missing), "no such folder")
    assert not missing.exists()  # not created
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli("view", empty), "no trajectory dumps")
    assert list(empty.iterdir()) == []  # no empty viewer written


def test_version_and_the_tiny_model_short_options(tmp_path):
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"verl-hindsight {version('verl-hindsight')}"
    args = build_parser().parse_args(["make-tiny-model", str(tmp_path), "--layers", "3", "--heads", "2"])
    assert args.num_hidden_layers == 3 and args.num_attention_heads == 2  # the form the module docstring shows
    args = build_parser().parse_args(["make-tiny-model", str(tmp_path), "--num-hidden-layers", "3"])
    assert args.num_hidden_layers == 3


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", sorted(_subparsers(build_parser())))
def test_every_argument_has_help_text(command):
    sub = _subparsers(build_parser())[command]
    undocumented = [a.dest for a in sub._actions if not isinstance(a, argparse._HelpAction)
                    and a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert not undocumented, f"{command}: arguments without help: {undocumented}"
