"""Worker process of :mod:`verl_hindsight.environment.runner` (``python -m verl_hindsight.environment.worker``).

Protocol: length-framed pickles ``(op, args)`` in on stdin, ``(status, payload)`` out on a private copy of the
original stdout; file descriptor 1 is pointed at stderr so environment prints cannot corrupt the channel.
Status is "ok", "env_error" (the environment raised) or "malformed_output" (wrong return types).
"""

from __future__ import annotations

import importlib
import os
import random
import sys
import traceback


def main() -> int:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # fd 1 -> stderr
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer

    from verl_hindsight.environment.protocol import (
        MalformedEnvOutput,
        make_env,
        validate_observation,
        validate_step_result,
    )
    from verl_hindsight.environment.runner import _HEADER, write_message

    env = None
    while True:
        header = inp.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return 0
        (size,) = _HEADER.unpack(header)
        import pickle

        op, args = pickle.loads(inp.read(size))
        try:
            if op == "init":
                name, kwargs, modules = args
                for module in modules:
                    importlib.import_module(module)
                env = make_env(name, **kwargs)
                result = None
            elif op == "close":
                if env is not None:
                    env.close()
                return 0
            elif op == "reset":
                result = validate_observation(env.reset(*args))
            elif op == "step":
                result = validate_step_result(env.step(*args))
            elif op == "invalid_action":
                result = validate_step_result(env.invalid_action(*args))
            elif op == "oracle_action":
                result = env.oracle_action()
            elif op == "random_action":
                result = env.random_action(random.Random(args[0]))
            elif op == "task_ids":
                result = list(env.task_ids(*args))
            elif op == "instructions":
                result = env.instructions
            elif op == "tools":
                result = env.tools()
            else:
                raise ValueError(f"unknown op {op!r}")
            write_message(out, ("ok", result))
        except MalformedEnvOutput as exc:
            write_message(out, ("malformed_output", str(exc)))
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            write_message(out, ("env_error", f"{type(exc).__name__}: {exc}"))


if __name__ == "__main__":
    sys.exit(main())
