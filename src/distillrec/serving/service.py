"""Micro-batching: the requests that arrive while a batch is being scored are scored together in the next one.

Every batch (at most ``max_batch`` queries) is one :meth:`TrainedRecommender.top_k` call: one model pass, one matrix
product, one top-k. Nothing waits for a batch to fill: a lone request is scored at once, and batches grow only when
requests queue up (under load). Torch runs with the process's threads (``distillrec serve --threads``, default 1).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .recommend import Query, Ranked, TrainedRecommender


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    scoring_s: float = 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest_batch,
                "mean_batch": round(self.requests / self.batches, 3) if self.batches else 0.0,
                "scoring_ms_per_batch": round(1000 * self.scoring_s / self.batches, 3) if self.batches else 0.0}


_STOP = object()


class RecommendService:
    """A :class:`TrainedRecommender` behind a scoring thread that micro-batches concurrent queries.

    The thread takes the first waiting query and every other one already waiting (up to ``max_batch``); the event
    loop stays free to read, parse and answer requests meanwhile. (Scoring in the event loop itself, with no thread
    hand-off, was tried and measured: on this busy 2-core machine it answered at about half the rate, with higher
    latency -- the two threads get two shares of the cores, and parsing overlaps scoring.)"""

    def __init__(self, recommender: TrainedRecommender, max_batch: int = 64):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.recommender = recommender
        self.max_batch = max_batch
        self.stats = BatchStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="distillrec-scorer", daemon=True)
        self._thread.start()

    async def top_k(self, queries: Sequence[Query]) -> list[Ranked]:
        """Score the queries (with whatever else is waiting) and return their rankings, in order."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in queries]
        for q, f in zip(queries, futures):
            self._queue.put((q, f, loop))
        return list(await asyncio.gather(*futures))

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------------------------------ the scoring thread
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            live = [(q, f, loop) for q, f, loop in batch if not f.done()]  # a cancelled request is not scored
            if live:
                try:
                    results = self._score([q for q, _, _ in live])
                except BaseException as e:  # noqa: BLE001  (handed to every waiting request; the thread goes on)
                    for _, f, loop in live:
                        loop.call_soon_threadsafe(_set_exception, f, e)
                else:
                    for (_, f, loop), r in zip(live, results):
                        loop.call_soon_threadsafe(_set_result, f, r)
            if stop:
                return

    def _score(self, queries: list[Query]) -> list[Ranked]:
        t0 = time.perf_counter()
        results = self.recommender.top_k(queries)
        s = self.stats
        s.scoring_s += time.perf_counter() - t0
        s.requests += len(queries)
        s.batches += 1
        s.largest_batch = max(s.largest_batch, len(queries))
        return results


def _set_result(f: asyncio.Future, r: Ranked) -> None:
    if not f.done():
        f.set_result(r)


def _set_exception(f: asyncio.Future, e: BaseException) -> None:
    if not f.done():
        f.set_exception(e)
