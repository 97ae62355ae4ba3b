"""Shared-CPU behaviour (issue 14): wall time of two of the quickstart's workloads alone and beside a busy neighbour,
under this project's thread defaults and under torch's own. Prints a table and writes
``benchmarks/results/shared_cpu.md`` (and ``.json``)::

    python benchmarks/shared_cpu.py                       # both workloads, every condition (about 15 min on 2 cores)
    python benchmarks/shared_cpu.py --workloads sasrec     # one workload

Workloads (each a ``distillrec`` subprocess started from scratch with ``--restart``):

* ``sasrec``: the quickstart's SASRec run (demo shop, its settings, 3 seeds): ``distillrec train``;
* ``tpad_knowledge``: TPAD's first stage on the demo shop (``configs/tpad/demo.yaml --stage knowledge``, with
  ``knowledge.max_items`` = 200 so that one run takes about a minute; the LM load and the cached features included).

Conditions:

* ``idle``: nothing else running;
* ``neighbour``: beside one CPU-bound process (``yes > /dev/null``, started first);
* ``two jobs``: two copies of the workload at once (the slower one is reported);

each under two settings: **ours** (what a user gets now: ``config.auto_threads`` picks this process's CPUs minus
those other processes keep busy, and the CLI's ``OMP_WAIT_POLICY=PASSIVE``) and **torch default** (every core,
OpenMP's default spin-then-sleep wait: ``num_threads`` = the CPU count, ``OMP_WAIT_POLICY`` empty). The ratio is the
wall time against the same setting's idle run; the issue's bound is 2x. Run it on an otherwise idle machine: every
other busy process is a neighbour the table does not name (the script prints the load average it saw).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
OUT = ROOT / "benchmarks" / "results" / "shared_cpu"


def sasrec_config(folder: Path) -> Path:
    from distillrec.quickstart import QUICKSTART_RUNS

    name, model, params, train = next(r for r in QUICKSTART_RUNS if r[0] == "sasrec")
    cfg = {"model": {"name": model, "params": params}, "dataset": {"name": "demo"},
           "train": {"patience": 3, "batch_size": 256, "seeds": [1, 2, 3], "progress": False, **train}}
    path = folder / "sasrec.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def workload_cmd(name: str, folder: Path, out: Path, threads: int | None) -> list[str]:
    py = [sys.executable, "-m", "distillrec"]
    if name == "sasrec":
        cmd = py + ["train", str(sasrec_config(folder)), "--out", str(out), "--restart"]
        if threads:
            cmd += ["--set", f"train.num_threads={threads}"]
        return cmd
    cmd = py + ["tpad", str(ROOT / "configs" / "tpad" / "demo.yaml"), "--stage", "knowledge", "--out", str(out),
                "--restart", "--set", "knowledge.max_items=200", "--set", "progress=false"]
    if threads:
        cmd += ["--set", f"num_threads={threads}"]
    return cmd


def env_for(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    if setting == "torch default":
        env["OMP_WAIT_POLICY"] = ""  # set but empty: the CLI keeps it, OpenMP ignores it (its default policy)
    return env


def timed(cmds: list[list[str]], env: dict[str, str], log: Path) -> list[float]:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        procs = [subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT) for c in cmds]
        ends = []
        for p in procs:
            if p.wait():
                raise SystemExit(f"{' '.join(cmds[0])} failed (exit {p.returncode}); see {log}")
            ends.append(time.perf_counter() - t0)
    return ends


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["sasrec", "tpad_knowledge"],
                    choices=["sasrec", "tpad_knowledge"])
    ap.add_argument("--settings", nargs="+", default=["ours", "torch default"], choices=["ours", "torch default"])
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json (no runs)")
    args = ap.parse_args()
    if args.render_only:
        args.workloads = []
    OUT.parent.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0))
    rows: list[list[str]] = []
    # rows of earlier invocations (other workloads) are kept; the ones run now replace theirs
    raw = json.loads(OUT.with_suffix(".json").read_text()) if OUT.with_suffix(".json").is_file() else []
    work = Path(tempfile.mkdtemp(prefix="shared_cpu_"))
    log = work / "jobs.log"
    print(f"logs: {log}; load average at start {os.getloadavg()}", flush=True)
    for wl in args.workloads:
        # warm-up: the demo shop's images and encoder features are made once and cached, outside the timings
        timed([workload_cmd(wl, work, work / wl / "warm", None)], env_for("ours"), log)
        for setting in args.settings:
            threads = cpus if setting == "torch default" else None
            env = env_for(setting)
            a, b = work / wl / "a", work / wl / "b"
            idle = timed([workload_cmd(wl, work, a, threads)], env, log)[0]
            yes = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
            try:
                time.sleep(1.0)  # the neighbour is running before the job looks at the machine
                beside = timed([workload_cmd(wl, work, a, threads)], env, log)[0]
            finally:
                yes.kill()
                yes.wait()
            two = max(timed([workload_cmd(wl, work, a, threads), workload_cmd(wl, work, b, threads)], env, log))
            r = {"workload": wl, "setting": setting, "threads": threads or "auto", "idle_s": round(idle, 1),
                 "neighbour_s": round(beside, 1), "two_jobs_s": round(two, 1)}
            raw = [x for x in raw if (x["workload"], x["setting"]) != (wl, setting)] + [r]
            OUT.with_suffix(".json").write_text(json.dumps(raw, indent=1))  # after every row: a crash keeps them
            print(r, flush=True)
    from distillrec.evaluation.report import markdown_table

    order = {w: i for i, w in enumerate(["sasrec", "tpad_knowledge"])}
    for r in sorted(raw, key=lambda r: (order.get(r["workload"], 9), r["setting"] != "ours")):
        idle, beside, two = r["idle_s"], r["neighbour_s"], r["two_jobs_s"]
        rows.append([r["workload"], r["setting"], str(r["threads"]), f"{idle:.1f}", f"{beside:.1f}",
                     f"{beside / idle:.2f}", f"{two:.1f}", f"{two / idle:.2f}"])

    head = ["workload", "setting", "torch threads", "idle s", "beside `yes` s", "× idle (≤ 2)", "two jobs s (slower)",
            "× idle (≤ 2)"]
    md = ["# Shared-CPU behaviour", "", "Command: `python benchmarks/shared_cpu.py` (rows are replaced per workload "
          "and setting by later invocations; the rows here come from `--workloads sasrec` and `--workloads "
          "tpad_knowledge` with each setting; "
          f"{cpus} CPUs; written {time.strftime('%Y-%m-%d %H:%M')}).", "",
          markdown_table(head, rows), "",
          "ours = `config.auto_threads` (this process's CPUs minus those other processes keep busy when the job "
          "starts) + `OMP_WAIT_POLICY=PASSIVE` (set by the CLI); torch default = every core + OpenMP's default wait. "
          "The ratio is against the same setting's idle time. Workloads: see the script's docstring."]
    (OUT.with_suffix(".md")).write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
