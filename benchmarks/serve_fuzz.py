"""Fuzz of ``distillrec serve``: schemathesis from the OpenAPI schema plus hand cases; never a 5xx, RSS flat.

The server runs in its own process (``python -m distillrec serve RUN --port 0``) on loopback. Then, each bounded:

1. **hand cases**, ``--rounds`` times each: bad JSON, an empty or non-object body, ``k`` <= 0, huge, fractional or of
   the wrong type, an empty session, a 10,000-item session (200), a session past the limit, ids of wrong types,
   unicode ids (accents, CJK, emoji, NUL, a lone surrogate), bytes that are not UTF-8, JSON nested 10,000 deep, a
   2 MB id, an unknown key, batches (256 requests: 200; 257, none, one bad id: 422), the item routes' limits, a wrong
   method -- each with the status it must get; the server's RSS after every round;
2. **schemathesis** (``schemathesis run`` on ``/openapi.json``, every phase, ``--max-examples`` per operation, a
   ``--max-time`` budget), all checks but ``positive_data_acceptance``: a schema-valid item id that is not in the
   catalogue is a 422 by design, and the schema cannot list 18k ids. Its JSON report gives the counts.

Usage::

    python benchmarks/serve_fuzz.py --run runs/serve/sports-sasrec

Writes ``<out>.md`` and ``<out>.json`` (default ``benchmarks/results/serve_fuzz``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import ServerProcess  # noqa: E402  (the same server start)


def hand_cases(ids: list[str]) -> list[tuple[str, str, str, bytes | None, dict, set[int]]]:
    """(name, method, path, body, headers, allowed statuses)."""
    j = {"content-type": "application/json"}
    one = ids[0]

    def rec(obj) -> bytes:
        return json.dumps(obj).encode()

    long = [ids[i % len(ids)] for i in range(10_000)]
    deep = b'{"items": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    return [
        ("bad JSON", "POST", "/recommend", b'{"items": ["1",', j, {422}),
        ("empty body", "POST", "/recommend", b"", j, {422}),
        ("JSON null", "POST", "/recommend", b"null", j, {422}),
        ("JSON list", "POST", "/recommend", b"[]", j, {422}),
        ("not JSON content type", "POST", "/recommend", rec({"items": [one]}), {"content-type": "text/plain"},
         {422}),
        ("k = 0", "POST", "/recommend", rec({"items": [one], "k": 0}), j, {422}),
        ("k = -1", "POST", "/recommend", rec({"items": [one], "k": -1}), j, {422}),
        ("k = 10**30", "POST", "/recommend", rec({"items": [one], "k": 10**30}), j, {422}),
        ("k = 1000 (the limit)", "POST", "/recommend", rec({"items": [one], "k": 1000}), j, {200}),
        ("k = 1.5", "POST", "/recommend", rec({"items": [one], "k": 1.5}), j, {422}),
        ("k = \"10\"", "POST", "/recommend", rec({"items": [one], "k": "10"}), j, {422}),
        ("k = true", "POST", "/recommend", rec({"items": [one], "k": True}), j, {422}),
        ("empty session", "POST", "/recommend", rec({"items": []}), j, {422}),
        ("10,000-item session", "POST", "/recommend", rec({"items": long}), j, {200}),
        ("100,001-item session", "POST", "/recommend", rec({"items": [one] * 100_001}), j, {422}),
        ("items a string", "POST", "/recommend", rec({"items": " ".join(ids[:3])}), j, {422}),
        ("item ids as numbers", "POST", "/recommend", rec({"items": [1, 2]}), j, {422}),
        ("item id null", "POST", "/recommend", rec({"items": [None]}), j, {422}),
        ("item id a list", "POST", "/recommend", rec({"items": [[one]]}), j, {422}),
        ("unicode ids", "POST", "/recommend", rec({"items": ["ünïcødé", "日本語", "😀", "\u0000"]}), j, {422}),
        ("a lone surrogate id", "POST", "/recommend", b'{"items": ["\\ud800"]}', j, {422}),
        ("bytes that are not UTF-8", "POST", "/recommend", b'{"items": ["\xff\xfe"]}', j, {400}),
        ("JSON nested 10,000 deep", "POST", "/recommend", deep, j, {400, 422}),
        ("a 2 MB id", "POST", "/recommend", rec({"items": ["x" * 2_000_000]}), j, {422}),
        ("an unknown key", "POST", "/recommend", rec({"items": [one], "kk": 3}), j, {422}),
        ("batch of 256", "POST", "/recommend/batch", rec({"requests": [{"items": [i]} for i in ids[:256]]}), j,
         {200}),
        ("batch of 257", "POST", "/recommend/batch", rec({"requests": [{"items": [one]}] * 257}), j, {422}),
        ("empty batch", "POST", "/recommend/batch", rec({"requests": []}), j, {422}),
        ("batch with an unknown id", "POST", "/recommend/batch",
         rec({"requests": [{"items": [one]}, {"items": ["nope"]}]}), j, {422}),
        ("items limit = 0", "GET", "/items?limit=0", None, {}, {422}),
        ("items limit = 101", "GET", "/items?limit=101", None, {}, {422}),
        ("items offset = -1", "GET", "/items?offset=-1", None, {}, {422}),
        ("items offset past the end", "GET", "/items?offset=100000000", None, {}, {200}),
        ("items query of 201 characters", "GET", "/items?query=" + "a" * 201, None, {}, {422}),
        ("items unicode query", "GET", "/items?query=%E6%97%A5%F0%9F%98%80", None, {}, {200}),
        ("unknown item", "GET", "/items/no-such-item", None, {}, {404}),
        ("item id not UTF-8 when decoded", "GET", "/items/%ED%A0%80", None, {}, {404}),
        ("wrong method", "GET", "/recommend", None, {}, {405}),
    ]


def run_hand_cases(port: int, cases, rounds: int, server: ServerProcess) -> dict:
    import httpx

    results: dict[str, Counter] = {name: Counter() for name, *_ in cases}
    bad: list[str] = []
    rss = [server.rss_mb()]
    t0 = time.perf_counter()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for _ in range(rounds):
            for name, method, path, body, headers, allowed in cases:
                r = client.request(method, path, content=body, headers=headers)
                results[name][r.status_code] += 1
                if r.status_code not in allowed and len(bad) < 20:
                    bad.append(f"{name}: {r.status_code} {r.text[:200]}")
            rss.append(server.rss_mb())
    return {"cases": [{"name": n, "allowed": sorted(a), "statuses": dict(results[n])} for n, _, _, _, _, a in cases],
            "unexpected": bad, "requests": rounds * len(cases), "rss_mb": rss,
            "seconds": round(time.perf_counter() - t0, 1)}


def run_schemathesis(port: int, max_examples: int, max_time: int, seed: int, report: Path) -> dict:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"http://127.0.0.1:{port}/openapi.json",
           "--max-examples", str(max_examples), "--max-time", str(max_time), "--seed", str(seed),
           "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--report", "vcr",
           "--report-vcr-path", str(report), "--no-color"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time + 300)
    seconds = time.perf_counter() - t0
    text = report.read_text() if report.is_file() else ""
    import re

    statuses = Counter(int(c) for c in re.findall(r"status:\s*\n\s*code:\s*'?(\d+)", text))
    summary = [ln for ln in proc.stdout.splitlines() if re.search(r"generated|passed|failed|Failures|✅|❌", ln)]
    shown = [c for c in cmd[5:cmd.index("--report")]]
    return {"command": "schemathesis run http://127.0.0.1:PORT/openapi.json " + " ".join(map(shlex.quote, shown)),
            "exit_code": proc.returncode, "seconds": round(seconds, 1), "statuses": dict(sorted(statuses.items())),
            "summary": summary[-12:], "tail": proc.stdout[-4000:]}


def _every_tenth(xs: list[float]) -> list[float]:
    return xs[:: max(1, len(xs) // 10)]


def render(res: dict) -> str:
    h, s = res["hand"], res["schemathesis"]
    five = sum(n for c in h["cases"] for code, n in c["statuses"].items() if int(code) >= 500)
    five_s = sum(n for code, n in s["statuses"].items() if int(code) >= 500)
    lines = ["# `distillrec serve`: fuzz", "",
             f"Command: `{res['command']}`  ", f"Server: `{res['server_command']}` (its own process); run "
             f"`{res['run']}` ({res['items']} items), loopback.", "",
             f"**5xx answers: {five} of {h['requests']} hand-case requests, {five_s} of {sum(s['statuses'].values())} "
             f"schemathesis requests.** Server RSS: {res['rss_mb']['start']:.0f} MB at start, "
             f"{res['rss_mb']['after_hand']:.0f} MB after the hand cases, {res['rss_mb']['after_schemathesis']:.0f} "
             f"MB after schemathesis, {res['rss_mb']['after_hand_again']:.0f} MB after the hand cases again "
             f"(RSS per hand-case round: {', '.join(f'{x:.0f}' for x in _every_tenth(h['rss_mb']))} MB).",
             "", f"## Hand cases ({res['rounds']} rounds each, {h['seconds']} s)", "",
             "| case | must be | got (status: count) |", "|---|---|---|"]
    for c in h["cases"]:
        got = ", ".join(f"{k}: {v}" for k, v in c["statuses"].items())
        lines.append(f"| {c['name']} | {' or '.join(map(str, c['allowed']))} | {got} |")
    if h["unexpected"]:
        lines += ["", "Unexpected answers:", ""] + [f"- `{u}`" for u in h["unexpected"]]
    lines += ["", f"## schemathesis ({s['seconds']} s, exit code {s['exit_code']})", "",
              f"`{s['command']}`", "", "Statuses of its requests: "
              + ", ".join(f"{k}: {v}" for k, v in s["statuses"].items()), "", "```"] + s["summary"] + ["```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/serve/sports-sasrec"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--max-examples", type=int, default=100)
    p.add_argument("--max-time", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_fuzz")
    args = p.parse_args(argv)
    if args.rounds > 200 or args.max_examples > 1000 or args.max_time > 1800:
        raise SystemExit("bounded: at most 200 rounds, 1000 examples per operation, 1800 s of schemathesis")
    cmd = " ".join(["python benchmarks/serve_fuzz.py", *map(shlex.quote, argv or sys.argv[1:])])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(args.run, 64, Path(tempfile.gettempdir()) / f"serve_fuzz.{os.getpid()}.server.log")
    try:
        import httpx

        health = httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=60).json()
        page = httpx.get(f"http://127.0.0.1:{server.port}/items", params={"limit": 100}, timeout=60).json()
        ids = [it["id"] for it in page["items"]]
        while len(ids) < 300:
            more = httpx.get(f"http://127.0.0.1:{server.port}/items",
                             params={"limit": 100, "offset": len(ids)}, timeout=60).json()["items"]
            if not more:
                break
            ids += [it["id"] for it in more]
        cases = hand_cases(ids)
        rss = {"start": server.rss_mb()}
        print("hand cases ...", flush=True)
        hand = run_hand_cases(server.port, cases, args.rounds, server)
        rss["after_hand"] = server.rss_mb()
        print("schemathesis ...", flush=True)
        schema = run_schemathesis(server.port, args.max_examples, args.max_time, args.seed,
                                  args.out.with_suffix(".vcr.yaml"))
        rss["after_schemathesis"] = server.rss_mb()
        print("hand cases again ...", flush=True)
        hand2 = run_hand_cases(server.port, cases, args.rounds, server)
        rss["after_hand_again"] = server.rss_mb()
        alive = server.proc.poll() is None
    finally:
        server.stop()
    for c, c2 in zip(hand["cases"], hand2["cases"]):
        for k, v in c2["statuses"].items():
            c["statuses"][k] = c["statuses"].get(k, 0) + v
    hand["requests"] += hand2["requests"]
    hand["unexpected"] += hand2["unexpected"]
    hand["rss_mb"] += hand2["rss_mb"]
    hand["seconds"] = round(hand["seconds"] + hand2["seconds"], 1)
    res = {"command": cmd, "server_command": server.command, "run": str(args.run), "items": health["items"],
           "rounds": 2 * args.rounds, "rss_mb": rss, "hand": hand, "schemathesis": schema, "server_alive": alive}
    args.out.with_suffix(".vcr.yaml").unlink(missing_ok=True)  # large; the counts are in the JSON
    # paths relative to the repository: committed results name no machine's folders
    root = str(Path(__file__).resolve().parents[1]) + "/"
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1).replace(root, ""))
    args.out.with_suffix(".md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
