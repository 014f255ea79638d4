"""How long an AppWorld server takes to become usable, idle vs. with every core busy, side by side in one run.

    python benchmarks/appworld_start_time.py [--rounds 3] [--servers 2] [--hogs N] [--isolate auto,none]

For each condition (``idle``: nothing added; ``loaded``: ``--hogs`` busy-loop processes, default one per core,
``python -c "while True: pass"``) and each sandbox mode, ``--rounds`` times: ``--servers`` servers start at once (as
``--workers 2`` episodes do) and each one measures

* ``ready``: launch -> the socket answers (python start, AppWorld imports, and with warm-up one throw-away world);
* ``1st /initialize``: the first task on that server (what ``reset()`` waits for after ``ready``);
* ``re-/initialize``: a second task on the same, running server (every later episode of a worker);
* ``/execute``: one small code action (``print(apis.supervisor.show_profile())``);
* ``cpu``: CPU seconds the server used until its first task was loaded;

with the warm-up (the default) and without it (``warmup=False``: the first ``/initialize`` imports every app).
The table prints median and max per condition and the loaded/idle ratio of the medians; the time limits in
``envs/appworld_server.py`` (``READY_TIMEOUT_S``, ``INITIALIZE_TIMEOUT_S``) come from these numbers with margin.
Other load on the machine moves every number; the load average is printed with each condition. ``--hogs 8``
shows a much busier machine (each server then gets about a fifth of a core).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

from verl_hindsight.envs import appworld_server as aws

INIT = {"experiment_name": "bench", "timeout_seconds": 10, "raise_on_unsafe_syntax": True,
        "null_patch_unsafe_execution": True}
METRICS = ("ready", "1st /initialize", "ready + 1st /initialize", "re-/initialize", "/execute", "cpu")


def one_server(venv, root, isolate: str, warmup: bool, tasks: list[str], out: dict) -> None:
    server = aws.AppWorldServer(venv, root, aws.ServerLimits(isolate=isolate), start_timeout_s=900, warmup=warmup)
    try:
        t0 = time.monotonic()
        server.start()
        server.wait_ready()
        t1 = time.monotonic()
        server.client.post("/initialize", 900, task_id=tasks[0], **INIT)
        t2 = time.monotonic()
        cpu = server.cpu_seconds()
        server.client.post("/initialize", 900, task_id=tasks[1], **INIT)
        t3 = time.monotonic()
        server.client.post("/execute", 900, task_id=tasks[1], code="print(apis.supervisor.show_profile())")
        t4 = time.monotonic()
        out.update({"ready": t1 - t0, "1st /initialize": t2 - t1, "ready + 1st /initialize": t2 - t0,
                    "re-/initialize": t3 - t2, "/execute": t4 - t3, "cpu": cpu, "sandbox": server.sandbox})
    except Exception as exc:  # reported, not fatal: the other measurements still print
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        server.stop()


def batch(n: int, *args) -> list[dict]:
    results = [{} for _ in range(n)]
    threads = [threading.Thread(target=one_server, args=(*args, results[i])) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def start_hogs(n: int) -> list[subprocess.Popen]:
    # each in its own session, like independent jobs: with the kernel's autogroup scheduling (on by default), busy
    # loops sharing one session would together get only one session's share against the servers (own sessions)
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for p in hogs:
        p.kill()
    for p in hogs:
        p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", type=int, default=2, help="servers started at once per round")
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="busy-loop processes when loaded")
    parser.add_argument("--isolate", default="auto", help="comma-separated sandbox modes (auto,bwrap,namespaces,none)")
    parser.add_argument("--no-compare-warmup", action="store_true", help="only measure with the warm-up")
    parser.add_argument("--venv", default=None)
    args = parser.parse_args()

    aws.setup(args.venv, log=lambda m: print(m, file=sys.stderr))
    root, _ = aws.resolve_data_root(None, args.venv)
    tasks = [t for t in open(os.path.join(root, "data", "datasets", "train.txt")).read().split() if t][:2]
    variants = [(mode, warm) for mode in args.isolate.split(",")
                for warm in ((True,) if args.no_compare_warmup else (True, False))]
    samples: dict[tuple, list[dict]] = {}
    loads = {}
    print(f"{os.cpu_count()} cores; {args.servers} servers at once; {args.rounds} rounds; tasks {tasks}",
          flush=True)
    for cond in ("idle", "loaded"):
        hogs = start_hogs(args.hogs) if cond == "loaded" else []
        try:
            time.sleep(1.0 if hogs else 0.0)
            loads[cond] = os.getloadavg()[0]
            started = time.monotonic()
            for r in range(args.rounds):
                for mode, warm in variants:
                    res = batch(args.servers, args.venv, root, mode, warm, tasks)
                    samples.setdefault((cond, mode, warm), []).extend(res)
                    errors = [x["error"] for x in res if "error" in x]
                    print(f"  {cond} round {r + 1} {mode} warmup={warm}: ready "
                          + ", ".join(f"{x['ready']:.1f}s" for x in res if "ready" in x)
                          + (f" errors: {errors}" if errors else ""), flush=True)
            print(f"{cond}: {args.hogs if hogs else 0} hog processes, 1-minute load average {loads[cond]:.2f} at "
                  f"start, {os.getloadavg()[0]:.2f} at end (it lags), {time.monotonic() - started:.0f}s", flush=True)
        finally:
            stop_hogs(hogs)

    def cell(xs: list[float]) -> str:
        return f"{statistics.median(xs):6.2f} ({max(xs):6.2f})" if xs else "      -         "

    print()
    print(f"seconds, median (max) of {args.rounds} rounds x {args.servers} servers; loaded = {args.hogs} busy loops "
          f"on {os.cpu_count()} cores")
    print(f"{'sandbox':<11}{'warm-up':<9}{'metric':<25}{'idle':>17}{'loaded':>19}{'ratio':>8}")
    for mode, warm in variants:
        sandbox = next((x["sandbox"] for x in samples[("idle", mode, warm)] if "sandbox" in x), mode)
        for metric in METRICS:
            idle = [x[metric] for x in samples[("idle", mode, warm)] if metric in x]
            loaded = [x[metric] for x in samples[("loaded", mode, warm)] if metric in x]
            ratio = (f"{statistics.median(loaded) / statistics.median(idle):7.1f}x"
                     if idle and loaded and statistics.median(idle) > 0 else "       -")
            print(f"{sandbox:<11}{'yes' if warm else 'no':<9}{metric:<25}{cell(idle):>17}  {cell(loaded):>17}{ratio}")
    worst = max((x["ready"] for k, v in samples.items() if k[2] for x in v if "ready" in x), default=0)
    worst_init = max((x["1st /initialize"] for k, v in samples.items() if k[2] for x in v
                      if "1st /initialize" in x), default=0)
    print(f"\nworst with warm-up: ready {worst:.1f}s, 1st /initialize {worst_init:.1f}s; limits in use: "
          f"READY_TIMEOUT_S={aws.READY_TIMEOUT_S:.0f}s, INITIALIZE_TIMEOUT_S={aws.INITIALIZE_TIMEOUT_S:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
