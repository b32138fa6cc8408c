"""The HTTP API (FastAPI) and the uvicorn runner behind ``recjpq serve``.

Endpoints: ``POST /recommend``, ``POST /recommend/batch``, ``GET /healthz``, ``GET /metrics``.
Bodies are read and checked here by hand, so every bad input gets a 4xx whose message names the
problem: 400 malformed JSON, 413 body over ``max_body_bytes``, 422 a well-formed body with bad
values (wrong types, empty history, unknown item ids, k out of range, integers too long to parse,
too many users), 503 while shutting down. Anything unexpected becomes a 500 with a JSON body; a
client that hangs up before its answer is counted as 499. Every response is counted in /metrics.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.requests import ClientDisconnect

from recjpq.serve.batcher import BatcherClosed, MicroBatcher
from recjpq.serve.engine import Recommendation, Recommender
from recjpq.serve.metrics import CONTENT_TYPE, Metrics

ENDPOINTS = ("/recommend", "/recommend/batch", "/healthz", "/metrics")
SINGLE_FIELDS = {"history", "k", "exclude_seen"}
BATCH_FIELDS = {"histories", "k", "exclude_seen"}
CLIENT_CLOSED = 499  # nginx's status for a client that hung up before its answer; never sent
log = logging.getLogger("uvicorn.error")  # the server's own log, formatted by uvicorn


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _RequestMetrics:
    """ASGI middleware: count every HTTP response by endpoint and status, time it to its last byte.

    It is also the last line of defence: an unexpected exception becomes a counted 500 with a JSON
    body and one log line (no traceback), and a client that hangs up before its answer (starlette's
    ``ClientDisconnect``, e.g. mid-body) is counted as 499 without a log line.
    """

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = None
        recorded = False

        def record(code: int) -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self.metrics.observe_request(endpoint, code, time.perf_counter() - start)

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record(status)

        try:
            await self.app(scope, receive, send_and_record)
        except ClientDisconnect:
            record(CLIENT_CLOSED)
        except Exception as e:
            log.error("%s %s failed: %s: %s", scope["method"], scope["path"], type(e).__name__, e)
            if status is not None:  # too late for a 500: the client got a cut-off answer
                record(status)
                return
            # the message stays in the log: it may quote internals a client should not see
            body = json.dumps({"detail": f"internal server error ({type(e).__name__}); see the server log"}).encode()
            await send_and_record({"type": "http.response.start", "status": 500,
                                   "headers": [(b"content-type", b"application/json"),
                                               (b"content-length", str(len(body)).encode())]})
            await send_and_record({"type": "http.response.body", "body": body})


async def _read_json(request: Request, max_bytes: int, fields: set[str]) -> dict:
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > max_bytes):
        raise BadRequest(413, f"body of {declared[:20]} bytes exceeds the limit of {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise BadRequest(413, f"body exceeds the limit of {max_bytes} bytes")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadRequest(400, f"malformed JSON: {e}") from None
    except ValueError:  # well-formed, but int() refuses the digits (CPython's int_max_str_digits)
        raise BadRequest(422, f"the body holds an integer of more than {sys.get_int_max_str_digits()} "
                              "digits; k and item ids must be far shorter") from None
    if not isinstance(data, dict):
        raise BadRequest(422, f"body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise BadRequest(422, f"unknown field(s) {unknown}; expected {sorted(fields)}")
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _history(value, name: str) -> list:
    if not isinstance(value, list):
        raise BadRequest(422, f"{name} must be a list of item ids, got {type(value).__name__}")
    for pos, item in enumerate(value):
        if not (_is_int(item) or isinstance(item, str)):
            raise BadRequest(422, f"{name}[{pos}] must be an item id (integer or string), got {item!r}")
    return value


def _options(data: dict) -> tuple[int, bool]:
    k, exclude_seen = data.get("k", 10), data.get("exclude_seen", True)
    if not _is_int(k):
        raise BadRequest(422, f"k must be an integer, got {k!r}")
    if not isinstance(exclude_seen, bool):
        raise BadRequest(422, f"exclude_seen must be true or false, got {exclude_seen!r}")
    return k, exclude_seen


def _as_json(rec: Recommendation) -> dict:
    return {"items": rec.items, "scores": rec.scores}


def create_app(recommender: Recommender, *, max_batch: int = 64, max_wait_ms: float = 5.0,
               batching: bool = True, max_body_bytes: int = 1 << 20, max_users: int = 1024) -> FastAPI:
    """The ASGI app. ``batching=False`` runs every request alone (``max_batch=1``, no waiting)."""
    for name, value in (("max_body_bytes", max_body_bytes), ("max_users", max_users)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    metrics = Metrics()
    batcher = MicroBatcher(recommender.recommend, max_batch=max_batch if batching else 1,
                           max_wait_s=max_wait_ms / 1e3 if batching else 0.0,
                           on_batch=metrics.batch_size.observe)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()  # uvicorn has let in-flight requests finish; this drains the queue

    app = FastAPI(title="recjpq", summary="Top-k next-item recommendations", lifespan=lifespan)
    app.add_middleware(_RequestMetrics, metrics=metrics)
    app.state.batcher = batcher

    async def run(queries):
        try:
            return await batcher.submit(queries)
        except BatcherClosed as e:
            raise BadRequest(503, str(e)) from None

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.post("/recommend")
    async def recommend(request: Request):
        """``{"history": [ids], "k": 10, "exclude_seen": true}`` -> ``{"items": [...], "scores": [...]}``."""
        data = await _read_json(request, max_body_bytes, SINGLE_FIELDS)
        if "history" not in data:
            raise BadRequest(422, "missing field 'history'")
        k, exclude_seen = _options(data)
        try:
            query = recommender.query(_history(data["history"], "history"), k, exclude_seen)
        except ValueError as e:
            raise BadRequest(422, str(e)) from None
        (rec,) = await run([query])
        return _as_json(rec)

    @app.post("/recommend/batch")
    async def recommend_batch(request: Request):
        """``{"histories": [[ids], ...], "k": 10, "exclude_seen": true}`` -> ``{"results": [...]}``."""
        data = await _read_json(request, max_body_bytes, BATCH_FIELDS)
        histories = data.get("histories")
        if not isinstance(histories, list) or not histories:
            raise BadRequest(422, "histories must be a non-empty list of histories")
        if len(histories) > max_users:
            raise BadRequest(422, f"histories has {len(histories)} users; at most {max_users} per request")
        k, exclude_seen = _options(data)
        queries = []
        for user, history in enumerate(histories):
            try:
                queries.append(recommender.query(_history(history, f"histories[{user}]"), k, exclude_seen))
            except ValueError as e:
                raise BadRequest(422, f"histories[{user}]: {e}") from None
        return {"results": [_as_json(rec) for rec in await run(queries)]}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "num_items": recommender.num_items, "max_len": recommender.max_len,
                "max_k": recommender.max_k, "max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait_s * 1e3,
                "queued": batcher.pending}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    return app


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, backend: str | None = None,
          max_k: int = 1000, graceful_timeout_s: float = 30.0, log_level: str = "info",
          **app_options) -> None:
    """Load ``checkpoint`` and serve it until SIGINT/SIGTERM; in-flight requests finish first
    (up to ``graceful_timeout_s``)."""
    server = make_server(create_app(Recommender.from_checkpoint(checkpoint, backend=backend, max_k=max_k),
                                    **app_options),
                         host=host, port=port, graceful_timeout_s=graceful_timeout_s, log_level=log_level)
    server.run()


def make_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, graceful_timeout_s: float = 30.0,
                log_level: str = "info"):
    """A ``uvicorn.Server`` for ``app``; ``server.should_exit = True`` stops it gracefully."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout_s, access_log=False)
    return uvicorn.Server(config)
