"""Test artifacts built once per test run, however many pytest-xdist workers run it."""

import os
import shutil
from pathlib import Path


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run once per test run, whichever pytest-xdist worker asks first: the folder lives where all
    workers of a run share their temporary folders, and a file lock keeps the others waiting until it is complete."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-xdist gives each worker its own subfolder of the run's folder
    folder = root / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder
