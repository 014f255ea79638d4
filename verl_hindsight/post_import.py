"""Run a callback right after a module finishes importing (a post-import hook).

The plugin entry point runs in every verl process and must stay light, yet some registrations need heavy verl
modules (the V1 trainer registry lives in ``verl.trainer.ppo.v1``; agent loops register against
``verl.experimental.agent_loop``). Registering when those modules are imported anyway — and only in processes
that import them — keeps ``import verl`` fast and never imports verl's trainer into a rollout server.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from typing import Callable

_hooks: dict[str, list[Callable[[], None]]] = {}
_lock = threading.RLock()


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run_hooks(self._name)

    def __getattr__(self, item):  # get_source, is_package, ... of the wrapped loader
        return getattr(self._loader, item)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None


_finder = _PostImportFinder()


def _run_hooks(name: str) -> None:
    with _lock:
        callbacks = _hooks.pop(name, [])
    for callback in callbacks:
        try:
            callback()
        except Exception as exc:  # never break the import of the verl module that triggered the hook
            logging.getLogger("verl_hindsight").warning(
                "verl-hindsight: registration after importing %s failed: %s: %s", name, type(exc).__name__, exc)


def when_imported(module_name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once ``module_name`` is imported (now, if it already is)."""
    if module_name in sys.modules:
        callback()
        return
    with _lock:
        _hooks.setdefault(module_name, []).append(callback)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
