"""The HTTP API and web page over a trained run (``distillrec serve RUN_DIR``), built with FastAPI, run by uvicorn.

Routes (the OpenAPI schema is at ``/openapi.json``, its pages at ``/docs``):

- ``POST /recommend`` ``{"items": [ids], "k": 10, "exclude_seen": true}`` -> the ranked items with scores, titles,
  image URLs and whether each is cold (unseen in training), and what happened to the session's own cold items;
- ``POST /recommend/batch`` ``{"requests": [...]}`` -> ``{"results": [...]}``, one per request, in order;
- ``GET /health``; ``GET /items/{id}``; ``GET /items?query=&limit=&offset=`` (title search, most popular first);
- ``GET /images/{id}`` (an item's image file, where the dataset has one) and ``GET /`` (the page, ``static/``).

A request that breaks the schema, an item id unknown to the catalogue (named, with its position), ``k`` out of
``1..max_k`` or an empty session is a 422 in FastAPI's validation-error form ``{"detail": [{"loc", "msg", "type"}]}``;
an unknown id in ``/items/{id}`` is a 404, and a body that is not UTF-8 a 400. The model and item table are loaded
once, at start, through :func:`distillrec.runs.load_trained`; concurrent requests are scored in micro-batches
(:mod:`.service`).
"""

from __future__ import annotations

import gc
import json
import os
import socket
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, Query as QueryParam, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..errors import ConfigError, UserError
from .recommend import Query, Ranked, TrainedRecommender, UnknownItems
from .service import RecommendService

MAX_K = 1000  # the most items one request may ask for
MAX_SESSION = 100_000  # the longest session accepted (the model reads its last train.max_len readable items)
MAX_BATCH_REQUESTS = 256  # the most sessions in one /recommend/batch request
SEARCH_LIMIT = 100


# ------------------------------------------------------------------------------------------------------ the schema
class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    items: list[str] = Field(..., min_length=1, max_length=MAX_SESSION,
                             description="The session: item ids as in the dataset, oldest first.",
                             examples=[["item00001", "item00002"]])
    k: int = Field(10, ge=1, le=MAX_K, description="How many items to return.")
    exclude_seen: bool = Field(True, description="Leave out the session's own items.")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    requests: list[RecommendRequest] = Field(..., min_length=1, max_length=MAX_BATCH_REQUESTS)


class Item(BaseModel):
    id: str
    title: str
    image_url: str | None = Field(description="GET it from this server; null where the dataset has no image.")
    cold: bool = Field(description="Never seen in training.")


class ScoredItem(Item):
    score: float


class Recommendation(BaseModel):
    items: list[ScoredItem] = Field(description="Best first; fewer than k where fewer items may be recommended.")
    cold_start: Literal["content", "none"] = Field(
        description="content: this model reads and recommends items unseen in training through their content "
                    "vectors; none: it has no vector for them and neither reads nor recommends them.")
    session_cold: list[str] = Field(description="The session's items unseen in training.")
    session_ignored: list[str] = Field(description="The session's cold items the model could not read (left out).")
    session_truncated: int = Field(description="The oldest readable session items beyond the model's max_len.")
    fallback: Literal["popular"] | None = Field(
        description="popular: nothing in the session was readable, so these are the most popular training items.")


class BatchResponse(BaseModel):
    results: list[Recommendation]


class ItemDetail(Item):
    text: dict[str, str]
    train_count: int = Field(description="How often the item occurs in the training sequences.")


class ItemPage(BaseModel):
    items: list[Item]
    total: int = Field(description="How many items match the query.")


class Batching(BaseModel):
    requests: int = Field(description="Recommendation requests scored since start.")
    batches: int
    largest_batch: int
    mean_batch: float
    scoring_ms_per_batch: float


class Health(BaseModel):
    status: Literal["ok"]
    run: str
    model: str
    dataset: str
    seed: int | None
    items: int
    cold_items: int
    cold_start: Literal["content", "none"]
    max_len: int
    max_k: int
    images: bool
    batching: Batching


class Detail(BaseModel):
    detail: str


# ------------------------------------------------------------------------------------------------------ the app
class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error that echoes a client's odd string (a lone surrogate)
    still renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _json(content: Any) -> Response:
    return Response(json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8"),
                    media_type="application/json")


def _unknown_errors(e: UnknownItems, loc: tuple, limit: int = 20) -> list[dict[str, Any]]:
    errors = [{"type": "unknown_item", "loc": [*loc, pos], "input": item,
               "msg": f"unknown item id {item!r}: not in the catalogue of '{e.dataset}'"}
              for pos, item in e.unknown[:limit]]
    if len(e.unknown) > limit:
        errors.append({"type": "unknown_item", "loc": list(loc), "input": len(e.unknown),
                       "msg": f"{len(e.unknown)} unknown item ids in all; the first {limit} are listed"})
    return errors


class Catalogue:
    """What the page and the responses show of each item: titles, image URLs, a lower-case search index."""

    def __init__(self, rec: TrainedRecommender):
        items = rec.dataset.items
        self.ids = items.ids
        self.titles = rec.item_titles()
        self._search = [f"{t}\n{i}".lower() for t, i in zip(self.titles, self.ids)]
        paths = items.image_paths or [None] * items.n_items
        self.image_paths = [p if p and os.path.isfile(p) else None for p in paths]
        self.image_urls = [f"/images/{quote(i, safe='')}" if p else None for i, p in zip(self.ids, self.image_paths)]
        self.cold = rec.cold
        counts = rec.train_counts
        self.by_popularity = sorted(range(1, items.n_items + 1), key=lambda i: (-int(counts[i]), i))

    def item(self, i: int) -> dict[str, Any]:
        return {"id": self.ids[i - 1], "title": self.titles[i - 1], "image_url": self.image_urls[i - 1],
                "cold": bool(self.cold[i])}

    def search(self, query: str, limit: int, offset: int) -> tuple[list[int], int]:
        q = query.strip().lower()
        hits = [i for i in self.by_popularity if q in self._search[i - 1]] if q else self.by_popularity
        return hits[offset: offset + limit], len(hits)


def create_app(service: RecommendService, run_name: str = "run") -> FastAPI:
    """The FastAPI app over a loaded run (``service`` owns the model and its scoring thread)."""
    rec = service.recommender
    cat = Catalogue(rec)
    cold_start = "content" if rec.content_vectors else "none"
    static = files("distillrec.serving") / "static"

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="distillrec", version="1", lifespan=lifespan,
                  summary=f"Top-k recommendations from the run '{run_name}' ({rec.config.model.name} on "
                          f"{rec.dataset.name}, {rec.dataset.n_items} items).")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    def _queries(reqs: list[RecommendRequest], batch: bool) -> list[Query]:
        out, errors = [], []
        for j, r in enumerate(reqs):
            where = ("body", "requests", j) if batch else ("body",)
            try:
                out.append(rec.query(r.items, r.k, r.exclude_seen))
            except UnknownItems as e:
                errors += _unknown_errors(e, (*where, "items"))
            except UserError as e:
                errors.append({"type": "value_error", "loc": list(where), "msg": str(e), "input": None})
        if errors:
            raise RequestValidationError(errors)
        return out

    def _response(q: Query, r: Ranked) -> dict[str, Any]:
        return {"items": [{**cat.item(i), "score": s} for i, s in zip(r.items, r.scores)],
                "cold_start": cold_start, "session_cold": list(q.cold), "session_ignored": list(q.ignored),
                "session_truncated": q.truncated, "fallback": r.fallback}

    unreadable = {400: {"model": Detail, "description": "The body could not be read (bytes that are not UTF-8)."}}

    # the two hot routes answer with JSON they write themselves (response_model documents it; the schema tests and
    # the fuzz check that it conforms): no second validation of what the service built
    @app.post("/recommend", response_model=Recommendation, tags=["recommend"], responses=unreadable)
    async def recommend(body: RecommendRequest) -> Response:
        """The top-k items for one session."""
        queries = _queries([body], batch=False)
        return _json(_response(queries[0], (await service.top_k(queries))[0]))

    @app.post("/recommend/batch", response_model=BatchResponse, tags=["recommend"], responses=unreadable)
    async def recommend_batch(body: BatchRequest) -> Response:
        """The top-k items for several sessions (scored together), in order."""
        queries = _queries(body.requests, batch=True)
        return _json({"results": [_response(q, r) for q, r in zip(queries, await service.top_k(queries))]})

    @app.get("/health", response_model=Health, tags=["meta"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "run": run_name, "model": rec.config.model.name, "dataset": rec.dataset.name,
                "seed": rec.seed, "items": rec.dataset.n_items, "cold_items": int(rec.cold.sum()),
                "cold_start": cold_start, "max_len": rec.max_len, "max_k": MAX_K,
                "images": any(p is not None for p in cat.image_paths), "batching": service.stats.as_dict()}

    @app.get("/items", response_model=ItemPage, tags=["items"])
    async def items(query: str = QueryParam("", max_length=200, description="Words of the title (or the id)."),
                    limit: int = QueryParam(24, ge=1, le=SEARCH_LIMIT),
                    offset: int = QueryParam(0, ge=0)) -> dict[str, Any]:
        """Search the catalogue by title, most popular in training first (all items for an empty query)."""
        hits, total = cat.search(query, limit, offset)
        return {"items": [cat.item(i) for i in hits], "total": total}

    @app.get("/items/{item_id}", response_model=ItemDetail, tags=["items"],
             responses={404: {"model": Detail, "description": "No such item in the catalogue."}})
    async def item(item_id: str) -> dict[str, Any]:
        i = rec.index.get(item_id)
        if i is None:
            raise HTTPException(404, f"unknown item id {item_id!r}: not in this run's catalogue")
        text = {name: values[i - 1] for name, values in rec.dataset.items.text.items()}
        return {**cat.item(i), "text": text, "train_count": int(rec.train_counts[i])}

    @app.get("/images/{item_id}", include_in_schema=False)
    async def image(item_id: str) -> FileResponse:
        i = rec.index.get(item_id)
        path = cat.image_paths[i - 1] if i is not None else None
        if path is None:
            raise HTTPException(404, f"no image for item id {item_id!r}")
        return FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


# ------------------------------------------------------------------------------------------------------ the server
def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); a port in use is a ConfigError naming it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host "
                          "(--port 0 takes a free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, seed: int | None = None,
          max_batch: int = 64, access_log: bool = False, announce=print) -> None:
    """Load the run once, then answer HTTP requests until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    rec = TrainedRecommender.from_run(run_dir, seed)
    service = RecommendService(rec, max_batch=max_batch)
    app = create_app(service, run_name=Path(run_dir).resolve().name)
    # the loaded run is some 10^5 long-lived objects (the dataset's arrays, ids, texts): a full collection walking
    # them took 0.36 s on amazon2014-sports. Frozen, the collector never walks them again (the tail of the latency).
    gc.collect()
    gc.freeze()
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {Path(run_dir)} ({rec.config.model.name} on {rec.dataset.name}, {rec.dataset.n_items} items, "
             f"seed {rec.seed}) at http://{shown}:{sock.getsockname()[1]}  (page: /, API: /docs)")
    config = uvicorn.Config(app, log_level="warning", access_log=access_log, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
