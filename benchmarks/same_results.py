"""Same seeds, same results: run a fixed set of commands with two versions of the code and compare the outputs exactly.

    python benchmarks/same_results.py --base 0dbbf61              # the restructure of issue 9 against its parent
    python benchmarks/same_results.py --base HEAD~3 --quick       # tiny runs only (a minute)

``--base REV`` (and ``--this REV``, default the working tree) is checked out into a temporary git worktree; both run
the same commands from their own tree (its ``src`` and ``configs``), each into its own folder under ``--out``:

* ``distillrec tpad benchmarks/same_results/tiny_tpad.yaml`` (tiny LM, all stages) -- item embeddings;
* ``distillrec align benchmarks/same_results/tiny_align.yaml`` (tiny LM) -- connector weights, before/after metrics;
* without ``--quick``: ``distillrec tpad configs/tpad/scientific-mm.yaml`` with SmolLM2 and 48 items per stage --
  item embeddings; ``distillrec quickstart --seed 1`` -- TPAD embeddings, every run's valid/test metrics and per-row
  test ranks.

Tensors and ranks are compared with ``array_equal`` (no tolerance). A recipe whose keys changed between the versions
can be given per version: ``benchmarks/same_results/<name>.base.yaml`` is used for the base when it exists. Prints
one line per comparison and ``ALL EQUAL`` or the number of differences (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks" / "same_results"


def commands(quick: bool, which: str) -> list[tuple[str, list[str]]]:
    def recipe(name: str) -> str:
        base = HERE / f"{name}.base.yaml"
        return str(base if which == "base" and base.is_file() else HERE / f"{name}.yaml")

    cmds = [("tiny_tpad", ["tpad", recipe("tiny_tpad")]), ("tiny_align", ["align", recipe("tiny_align")])]
    if not quick:
        cmds += [("sci_tpad", ["tpad", "configs/tpad/scientific-mm.yaml", "--set", "knowledge.max_items=48",
                               "--set", "transfer.max_items=48", "--set", "align.max_items=48",
                               "--set", "knowledge.gr_items=8", "--set", "progress=false"]),
                 ("qs", ["quickstart", "--seed", "1"])]
    return cmds


def run_all(src: Path, out: Path, quick: bool, which: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(src / "src")}
    out.mkdir(parents=True, exist_ok=True)
    for name, args in commands(quick, which):
        if (out / name / ".done").exists():
            continue
        with open(out / f"{name}.log", "w") as log:
            subprocess.run([sys.executable, "-m", "distillrec", *args, "--out", str(out / name)], cwd=src, env=env,
                           stdout=log, stderr=subprocess.STDOUT, check=True)
        (out / name / ".done").write_text("")


def compare(a: Path, b: Path) -> int:
    from safetensors.numpy import load_file

    bad = 0

    def tensors(rel: str, label: str) -> None:
        nonlocal bad
        if not (a / rel).exists():
            return
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        ok = x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        print(f"{'EQUAL' if ok else 'DIFF '} {label}")
        bad += not ok

    tensors("tiny_tpad/embeddings/item_embeddings.safetensors", "tiny TPAD item embeddings")
    tensors("tiny_align/connector/connector.safetensors", "tiny alignment connector")
    ra, rb = (json.loads((d / "tiny_align" / "report.json").read_text()) for d in (a, b))
    for part in ("before", "after"):
        ok = ra[part] == rb[part]
        print(f"{'EQUAL' if ok else 'DIFF '} tiny alignment {part}: caption loss {rb[part]['caption_loss']:.6f}")
        bad += not ok
    tensors("sci_tpad/embeddings/item_embeddings.safetensors", "scientific-mm TPAD item embeddings (SmolLM2)")
    tensors("qs/tpad/embeddings/item_embeddings.safetensors", "quickstart TPAD item embeddings")
    if (a / "qs").is_dir():
        for run in sorted(p.name for p in (a / "qs").iterdir() if (p / "metrics.json").exists()):
            ma, mb = (json.loads((d / "qs" / run / "metrics.json").read_text()) for d in (a, b))
            ranks = all(np.array_equal(np.load(f), np.load(b / "qs" / run / "ranks" / f.name))
                        for f in (a / "qs" / run / "ranks").glob("*.npy"))
            ok = ma["test"] == mb["test"] and ma["valid"] == mb["valid"] and ranks
            print(f"{'EQUAL' if ok else 'DIFF '} quickstart {run}: test NDCG@10 {ma['test']['ndcg@10']:.4f} / "
                  f"{mb['test']['ndcg@10']:.4f}, per-row ranks {'equal' if ranks else 'differ'}")
            bad += not ok
    print("ALL EQUAL" if not bad else f"{bad} DIFFERENCES")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the git revision to compare against")
    ap.add_argument("--this", default=None, help="the revision to check (default: this working tree)")
    ap.add_argument("--quick", action="store_true", help="tiny runs only")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "same_results")
    args = ap.parse_args(argv)
    def short(rev: str) -> str:
        return subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    def run_at(rev: str, out: Path, which: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src-tree"
            subprocess.run(["git", "worktree", "add", "--detach", "-f", str(src), rev], cwd=ROOT, check=True,
                           capture_output=True)
            try:
                run_all(src, out, args.quick, which)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(src)], cwd=ROOT, capture_output=True)

    base = args.out / f"base-{short(args.base)}"
    run_at(short(args.base), base, "base")
    if args.this is None:
        this = args.out / "working-tree"
        run_all(ROOT, this, args.quick, "this")
    else:
        this = args.out / f"this-{short(args.this)}"
        run_at(short(args.this), this, "this")
    return 1 if compare(base, this) else 0


if __name__ == "__main__":
    sys.exit(main())
