"""The job runner of the results scripts: ``distillrec`` subprocesses with ``threads`` torch threads (default one), ``workers`` at a time,
in dependency order; a job whose ``done`` file exists is skipped, so a rerun after a kill continues."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def run_jobs(jobs: list[dict], workers: int, out: Path, before_start: Callable[[dict], None] | None = None,
             threads: int = 1) -> None:
    """``jobs``: dicts with ``name``, ``cmd`` (argv), ``done`` (a Path that exists when the job has finished) and
    ``deps`` (names). Logs go to ``<out>/logs/<name>.log``; a failed job stops the runner (finished jobs stay)."""
    pending = [j for j in jobs if not j["done"].exists()]
    done = {j["name"] for j in jobs if j["done"].exists()}
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    while pending or running:
        for name, (p, ts) in list(running.items()):
            if p.poll() is not None:
                del running[name]
                if p.returncode != 0:
                    raise SystemExit(f"job {name} failed (exit {p.returncode}); see {out / 'logs' / (name + '.log')}")
                done.add(name)
                print(f"[{time.time() - t0:7.0f}s] done {name} ({time.time() - ts:.0f}s)", flush=True)
        ready = [j for j in pending if all(d in done for d in j["deps"])]
        while ready and len(running) < workers:
            j = ready.pop(0)
            pending.remove(j)
            if before_start is not None:
                before_start(j)
            log = open(out / "logs" / f"{j['name']}.log", "w")
            running[j["name"]] = (subprocess.Popen(j["cmd"], stdout=log, stderr=subprocess.STDOUT, env=env),
                                  time.time())
            print(f"[{time.time() - t0:7.0f}s] start {j['name']}", flush=True)
        if pending and not running and not ready:
            raise SystemExit(f"jobs waiting on failed dependencies: {[j['name'] for j in pending]}")
        time.sleep(2)
