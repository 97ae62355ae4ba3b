"""Load test of ``distillrec serve``: p50/p99 latency and requests per second for top-10, loopback only.

The server runs in its own process (``python -m distillrec serve RUN --port 0 --threads 1``, one torch thread); the
client is this process, a small asyncio HTTP/1.1 client on keep-alive connections (kept small, not locust: on a
2-core machine the load generator's CPU is taken from the server). Every request is ``POST /recommend``
``{"items": <a test session of the run's dataset, as the dataset holds it>, "k": 10, "exclude_seen": true}``,
sessions drawn with a fixed seed. Phases, each bounded in count and time:

1. warm-up: ``--warmup`` requests, not counted;
2. **open loop** at ``--rate`` requests/s for ``--duration`` s: request i is due at ``t0 + i / rate`` whether or not
   earlier ones are answered (no coordinated omission: a request that waits for a free connection counts that
   wait); latency = answer time - due time; exactly ``rate * duration`` requests;
3. **closed loop** for ``--saturate`` s: ``--connections`` connections each send their next request as soon as the
   last is answered -- the most requests/s this server and client reach together on this machine.

Around the phases: the server's RSS (``/proc/<pid>/status`` VmRSS) and its micro-batching counters (``GET /health``).
After the server stops, in this process with one torch thread: the cost of one batch of scoring at batch sizes 1..64
(the model pass, and the ``[B, 64] x [64, n_items]`` product + top-10 alone), against faiss (exact ``IndexFlatIP``
and approximate HNSW, with its recall@10 against the exact top-10) when faiss is installed.

Usage::

    python benchmarks/serve_load.py --run runs/serve/sports-sasrec          # 60 s at 300 req/s + 20 s closed loop
    python benchmarks/serve_load.py --nice -5 --out benchmarks/results/serve_load_nice   # server and client first

On a machine that other jobs keep busy, the server and the client get a share of the cores like any other session,
and every wait for a core counts as latency; ``--nice -5`` puts both in a new session (a scheduling autogroup) of
nice -5, about three times the share of another session (what a machine that serves would give its server), the
closest this shared machine comes to the two cores alone. The scoring costs are measured after the load, in this
process (at the same nice value).

Writes ``<out>.md`` and ``<out>.json`` (default ``benchmarks/results/serve_load``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ the server
class ServerProcess:
    def __init__(self, run: Path, max_batch: int, log: Path, nice: int = 0):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "distillrec", "serve", str(run), "--port", "0", "--threads", "1",
               "--max-batch", str(max_batch)]
        self.command = (f"nice -n {nice} " if nice else "") + "distillrec serve " + " ".join(
            shlex.quote(c) for c in cmd[4:])
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)
        found: list[str] = []

        def read() -> None:
            for line in self.proc.stdout:
                m = re.search(r"at http://127\.0\.0\.1:(\d+)", line)
                if m and not found:
                    found.append(m.group(1))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 600
        while not found:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        self.port = int(found[0])

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def set_priority(nice: int) -> None:
    """This process (and what it starts) at ``nice``. Linux's autogroups share the cores between sessions first and
    apply a process's nice value only inside its session: so a new session, and the nice value on its group."""
    try:
        os.setsid()
    except PermissionError:  # already a session leader
        pass
    group = Path("/proc/self/autogroup")
    if group.exists():
        group.write_text(str(nice))
    os.nice(nice)


# ------------------------------------------------------------------------------------------------ the client
class Connection:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int):
        self.reader, self.writer, self.port = reader, writer, port

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", raw)
        data = await self.reader.readexactly(int(m.group(1))) if m else b""
        return status, data

    def close(self) -> None:
        self.writer.close()


async def _open_loop(port: int, bodies: list[bytes], rate: float, duration: float, connections: int) -> dict:
    pool: asyncio.Queue = asyncio.Queue()
    conns = [await Connection.open(port) for _ in range(connections)]
    for c in conns:
        pool.put_nowait(c)
    n = int(rate * duration)
    latency = np.zeros(n)
    status = np.zeros(n, dtype=np.int64)
    clock = time.perf_counter  # (uvloop's loop.time() counts whole milliseconds)
    t0 = clock() + 0.2

    async def one(i: int) -> None:
        due = t0 + i / rate
        c = await pool.get()
        try:
            status[i], _ = await c.request("POST", "/recommend", bodies[i % len(bodies)])
        finally:
            pool.put_nowait(c)
        latency[i] = clock() - due

    tasks = []
    for i in range(n):
        wait = t0 + i / rate - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    wall = clock() - t0
    for c in conns:
        c.close()
    return _summary(latency, status, wall, offered=rate)


async def _closed_loop(port: int, bodies: list[bytes], seconds: float, connections: int, start: int) -> dict:
    clock = time.perf_counter
    conns = [await Connection.open(port) for _ in range(connections)]
    lat: list[float] = []
    codes: list[int] = []
    t0 = clock()
    end = t0 + seconds
    counter = iter(range(start, start + 10**9))

    async def worker(c: Connection) -> None:
        while clock() < end:
            t = clock()
            st, _ = await c.request("POST", "/recommend", bodies[next(counter) % len(bodies)])
            lat.append(clock() - t)
            codes.append(st)

    await asyncio.gather(*(worker(c) for c in conns))
    wall = clock() - t0
    for c in conns:
        c.close()
    return _summary(np.array(lat), np.array(codes), wall, offered=None)


async def _get_json(port: int, path: str) -> dict:
    c = await Connection.open(port)
    try:
        status, data = await c.request("GET", path)
    finally:
        c.close()
    return json.loads(data)


async def _warmup(port: int, bodies: list[bytes], n: int) -> None:
    c = await Connection.open(port)
    try:
        for i in range(n):
            status, _ = await c.request("POST", "/recommend", bodies[i % len(bodies)])
            if status != 200:
                raise SystemExit(f"warm-up request {i} answered {status}")
    finally:
        c.close()


def _summary(latency: np.ndarray, status: np.ndarray, wall: float, offered: float | None) -> dict:
    ms = latency * 1000
    return {"requests": int(len(ms)), "offered_rps": offered, "achieved_rps": round(len(ms) / wall, 1),
            "wall_s": round(wall, 2), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p90_ms": round(float(np.percentile(ms, 90)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2), "non_200": int((status != 200).sum())}


def _batching_delta(before: dict, after: dict) -> dict:
    req = after["requests"] - before["requests"]
    bat = after["batches"] - before["batches"]
    return {"requests": req, "batches": bat, "mean_batch": round(req / bat, 2) if bat else 0.0,
            "largest_batch_so_far": after["largest_batch"]}


# ------------------------------------------------------------------------------------------------ scoring costs
def scoring_costs(run: Path, sessions: list[list[str]], batch_sizes: list[int], repeats: int) -> dict:
    import torch

    from distillrec.data.batching import pad_histories
    from distillrec.serving.recommend import TrainedRecommender

    torch.set_num_threads(1)
    rec = TrainedRecommender.from_run(run)
    model = rec.model
    queries = [rec.query(s, 10, True) for s in sessions[: max(batch_sizes) * 4]]
    out: dict = {"items": rec.dataset.n_items, "rows": []}
    table = model.item_table().detach() if hasattr(model, "item_table") else None
    try:
        import faiss  # noqa: F401

        have_faiss = True
        faiss.omp_set_num_threads(1)
    except ImportError:
        have_faiss = False
    out["faiss"] = have_faiss
    if have_faiss and table is not None:
        items = np.ascontiguousarray(table[1:].numpy().astype(np.float32))
        flat = faiss.IndexFlatIP(items.shape[1])
        flat.add(items)
        t = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(items.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 80
        hnsw.add(items)
        out["hnsw_build_s"] = round(time.perf_counter() - t, 2)
        hnsw.hnsw.efSearch = 64
    for b in batch_sizes:
        qs = queries[:b]
        history, lengths = pad_histories([q.history for q in qs], rec.max_len)
        row: dict = {"batch": b}
        with torch.no_grad():
            rec.top_k(qs)  # warm-up
            t = time.perf_counter()
            for _ in range(repeats):
                rec.top_k(qs)
            row["top_k_ms"] = (time.perf_counter() - t) / repeats * 1000
            if table is not None and hasattr(model, "encode"):
                h = model.encode(history, table)
                h = h[torch.arange(len(qs)), (lengths - 1).clamp(min=0)].contiguous()
                t = time.perf_counter()
                for _ in range(repeats):
                    torch.topk(h @ table.T, 10)
                row["product_topk_ms"] = (time.perf_counter() - t) / repeats * 1000
                if have_faiss:
                    hq = np.ascontiguousarray(h.numpy().astype(np.float32))
                    exact = torch.topk(h @ table[1:].T, 10).indices.numpy()
                    t = time.perf_counter()
                    for _ in range(repeats):
                        flat.search(hq, 10)
                    row["faiss_flat_ms"] = (time.perf_counter() - t) / repeats * 1000
                    t = time.perf_counter()
                    for _ in range(repeats):
                        _, approx = hnsw.search(hq, 10)
                    row["faiss_hnsw_ms"] = (time.perf_counter() - t) / repeats * 1000
                    row["hnsw_recall@10"] = float(np.mean([len(set(a) & set(e)) / 10
                                                           for a, e in zip(approx, exact)]))
        out["rows"].append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return out


# ------------------------------------------------------------------------------------------------ the report
def render(res: dict) -> str:
    a, c = res["open_loop"], res["closed_loop"]
    lines = [
        "# `distillrec serve`: load test", "",
        f"Command: `{res['command']}`  ",
        f"Server: `{res['server_command']}` (its own process, one torch thread, micro-batches of at most "
        f"{res['max_batch']}); run `{res['run']}` ({res['model']} on {res['dataset']}, {res['items']} items). "
        f"Client: this script's asyncio HTTP/1.1 client, {res['connections']} keep-alive connections, loopback. "
        f"Every request: POST /recommend, k=10, exclude_seen, one of {res['sessions']} test sessions of the "
        f"dataset. Machine: {res['machine']}; load average before the run {res['loadavg_before']} (other jobs were "
        f"running on its 2 cores: these numbers are what the server got, not what it would get alone).", "",
        "| phase | requests | offered req/s | achieved req/s | p50 ms | p90 ms | p99 ms | max ms | non-200 "
        "| mean batch | server CPU ms / request |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r, b in (("open loop", a, res["batching_open"]), ("closed loop (saturation)", c,
                                                                  res["batching_closed"])):
        lines.append(f"| {name}, {r['wall_s']:.0f} s | {r['requests']} | {r['offered_rps'] or '–'} | "
                     f"{r['achieved_rps']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} | "
                     f"{r['non_200']} | {b['mean_batch']} | {r['server_cpu_ms_per_request']} |")
    target = "met" if a["p99_ms"] <= 20 and a["achieved_rps"] >= 300 else "not met"
    lines += ["", f"Target (p99 ≤ 20 ms at ≥ 300 req/s, open loop): **{target}** (p99 {a['p99_ms']} ms at "
                  f"{a['achieved_rps']} req/s).", "",
              f"Server RSS: {res['rss_mb']['start']:.0f} MB after start, {res['rss_mb']['after_warmup']:.0f} MB "
              f"after the warm-up, {res['rss_mb']['after_open']:.0f} MB after the open loop, "
              f"{res['rss_mb']['after_closed']:.0f} MB after the closed loop.", ""]
    s = res["scoring"]
    lines += ["## One batch of scoring (this process, one torch thread)", "",
              f"{s['items']} items. `top_k`: the server's whole scoring step (SASRec encoder, the product, masks, "
              "top-k); `product + top-10`: the `[B, d] x [d, n_items]` product and `topk` alone"
              + ("; faiss: exact `IndexFlatIP` and HNSW (M=32, efSearch=64) over the same item vectors, "
                 f"the HNSW index built in {s.get('hnsw_build_s')} s." if s["faiss"] else "; faiss is not installed."),
              "", "| batch | top_k ms | product + top-10 ms | faiss flat ms | faiss HNSW ms | HNSW recall@10 |",
              "|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['batch']} | {r['top_k_ms']} | {r.get('product_topk_ms', '–')} | "
                     f"{r.get('faiss_flat_ms', '–')} | {r.get('faiss_hnsw_ms', '–')} | "
                     f"{r.get('hnsw_recall@10', '–')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/serve/sports-sasrec"))
    p.add_argument("--rate", type=float, default=300.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--saturate", type=float, default=20.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--sessions", type=int, default=5000)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--nice", type=int, default=0,
                   help="the nice value of the server and of this client (negative: they get more of the cores than "
                        "the machine's other jobs; needs root)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load")
    args = p.parse_args(argv)
    if args.rate * args.duration > 100_000 or args.duration > 600 or args.saturate > 600:
        raise SystemExit("bounded: at most 100,000 open-loop requests and 600 s per phase")
    cmd = " ".join(["python benchmarks/serve_load.py", *map(shlex.quote, argv or sys.argv[1:])])

    from distillrec.data.loaders import load_dataset
    from distillrec.runs import RunFolder

    cfg = RunFolder(args.run).read_config()
    ds = load_dataset(cfg.dataset)
    rng = np.random.default_rng(args.seed)
    rows = rng.choice(len(ds.test), size=min(args.sessions, len(ds.test)), replace=False)
    sessions = [[ds.items.ids[i - 1] for i in ds.test.histories[r]] for r in rows]
    bodies = [json.dumps({"items": s, "k": 10, "exclude_seen": True}).encode() for s in sessions]
    n_items = ds.n_items
    del ds
    # the client's own pauses would count as the server's latency: its long-lived objects frozen, and no collection
    # at all while it measures (a full collection over a loaded dataset takes a third of a second here)
    gc.collect()
    gc.freeze()
    gc.disable()
    loadavg = ", ".join(f"{x:.2f}" for x in os.getloadavg())

    log = Path(tempfile.gettempdir()) / f"serve_load.{os.getpid()}.server.log"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.nice:
        set_priority(args.nice)  # before the server starts: it inherits the scheduling group
    server = ServerProcess(args.run, args.max_batch, log, args.nice)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        rss = {"start": server.rss_mb()}
        asyncio.run(_warmup(server.port, bodies, args.warmup))
        rss["after_warmup"] = server.rss_mb()
        h0 = asyncio.run(_get_json(server.port, "/health"))
        print(f"open loop: {args.rate:g} req/s for {args.duration:g} s ...", flush=True)
        cpu0 = server.cpu_s()
        open_loop = asyncio.run(_open_loop(server.port, bodies, args.rate, args.duration, args.connections))
        cpu1 = server.cpu_s()
        open_loop["server_cpu_ms_per_request"] = round((cpu1 - cpu0) * 1000 / open_loop["requests"], 3)
        rss["after_open"] = server.rss_mb()
        h1 = asyncio.run(_get_json(server.port, "/health"))
        print(f"  {open_loop}\nclosed loop: {args.connections} connections for {args.saturate:g} s ...", flush=True)
        cpu1 = server.cpu_s()
        closed = asyncio.run(_closed_loop(server.port, bodies, args.saturate, args.connections,
                                          int(args.rate * args.duration)))
        closed["server_cpu_ms_per_request"] = round((server.cpu_s() - cpu1) * 1000 / closed["requests"], 3)
        rss["after_closed"] = server.rss_mb()
        h2 = asyncio.run(_get_json(server.port, "/health"))
        print(f"  {closed}", flush=True)
    finally:
        server.stop()
    gc.enable()
    print("scoring costs ...", flush=True)
    scoring = scoring_costs(args.run, sessions, args.batch_sizes, args.repeats)
    res = {
        "command": cmd, "server_command": server.command, "run": str(args.run), "model": cfg.model.name,
        "dataset": cfg.dataset.name, "items": n_items, "sessions": len(sessions), "connections": args.connections,
        "max_batch": args.max_batch, "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "loadavg_before": loadavg, "nice": args.nice, "rss_mb": rss, "open_loop": open_loop, "closed_loop": closed,
        "batching_open": _batching_delta(h0["batching"], h1["batching"]),
        "batching_closed": _batching_delta(h1["batching"], h2["batching"]), "scoring": scoring,
    }
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    args.out.with_suffix(".md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
