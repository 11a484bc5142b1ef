"""The HTTP surface, written once: the Ray Serve ingress and the standalone server both call
`build_app(backend, ...)` with their own `Backend` (Ray handles or the in-process `LocalBackend`).

Routes:
    POST /recommend        RecommendRequest -> RecommendResponse
    POST /recommend/batch  BatchRecommendRequest -> BatchRecommendResponse
    GET  /healthz          HealthResponse (503 while the backend is unavailable, or while it answers
                           with an older bundle version: a reload not every replica could load)
    GET  /model            ModelInfo: version, schema summary, training metrics, batching stats
    POST /admin/reload     header X-Admin-Token; reloads the bundle directory (ReloadResponse)
    GET  /docs             OpenAPI
Errors: 413 body over max_body_bytes (checked before parsing); 422 with FastAPI's
`detail: [{"loc": [...], "msg": ..., "type": ...}]` for every invalid field, including those found
after parsing (k above the catalog, a price whose log is not finite, a timestamp beyond the year
5000), with the value in `input`; 401/403 admin token; 409 reload of a bundle the service cannot
serve (other event fields, files that do not load, fewer items than default_k); 503 backend
unavailable (replica restarting), or a reload in progress.
The response header X-Raytr-Batch-Size says how many requests shared the model call.
"""

import hmac
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raytr.config import DataConfig, ServeConfig
from serve.api import (
    BatchRecommendResponse,
    HealthResponse,
    ModelInfo,
    RecommendResponse,
    ReloadResponse,
    build_api_models,
    request_events,
)
from serve.core import Query, Recommendations, Rejection

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "RAYTR_ADMIN_TOKEN"
ADMIN_TOKEN_HEADER = "X-Admin-Token"
BATCH_SIZE_HEADER = "X-Raytr-Batch-Size"


class Backend(Protocol):
    """What the routes need from a deployment: Ray Serve handles or one process."""

    async def recommend(self, queries: list[Query]) -> Recommendations | Rejection: ...

    async def model_info(self) -> ModelInfo | Rejection: ...

    async def health(self) -> HealthResponse | Rejection: ...

    async def reload(self) -> ReloadResponse | Rejection: ...


def resolve_admin_token(config: ServeConfig) -> str | None:
    """The admin token: env RAYTR_ADMIN_TOKEN, else the contents of `config.admin_token_file`;
    None (admin routes disabled) when neither is set or the token is empty."""
    token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if not token and config.admin_token_file:
        path = Path(config.admin_token_file)
        if not path.is_file():
            raise FileNotFoundError(f"serve.admin_token_file={str(path)!r} "
                                    + ("is a directory: name the file holding the token" if path.is_dir()
                                       else "does not exist"))
        token = path.read_text().strip()
    return token or None


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over `max_bytes`, from Content-Length before reading, or
    while reading a body that has none (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"request body is larger than max_body_bytes={self.max_bytes}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _send_json(send, 413 if declared.isdigit() else 400,
                             self._too_large().detail if declared.isdigit() else "invalid Content-Length")
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()  # FastAPI re-raises HTTPException from body reading
            return message

        await self.app(scope, limited, send)


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


MAX_ECHOED_ITEMS = 5
MAX_ECHOED_CHARS = 200


def _utf8(text: str) -> str:
    """`text` as UTF-8 can carry it: a lone surrogate (JSON allows "\\ud800", UTF-8 has none) as
    its escape, which would otherwise turn the 422 echoing it into a 500."""
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def _echoable(value: Any) -> Any:
    """An invalid input as it can be echoed back in JSON: non-finite floats as strings (JSON has
    none, and echoing NaN would turn the 422 into a 500), raw bytes as text (a body that is not
    UTF-8 would too), lone surrogates escaped, long lists and strings cut short."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {_utf8(str(k)): _echoable(v) for k, v in list(value.items())[:4 * MAX_ECHOED_ITEMS]}
    if isinstance(value, (list, tuple)):
        head = [_echoable(v) for v in value[:MAX_ECHOED_ITEMS]]
        return head + ([f"... {len(value) - MAX_ECHOED_ITEMS} more"] if len(value) > MAX_ECHOED_ITEMS else [])
    if isinstance(value, str):
        value = _utf8(value)
        return f"{value[:MAX_ECHOED_CHARS]}..." if len(value) > MAX_ECHOED_CHARS else value
    return value


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for error in exc.errors():
        error = {k: v for k, v in error.items() if k in ("type", "loc", "msg", "input")}
        if "input" in error:
            error["input"] = _echoable(error["input"])
        errors.append(error)
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


def _unwrap(outcome: Any) -> Any:
    if isinstance(outcome, Rejection):
        raise HTTPException(outcome.status, outcome.detail)
    return outcome


def build_app(backend: Backend, data: DataConfig, config: ServeConfig, admin_token: str | None,
              title: str = "raytr recommendations") -> FastAPI:
    """The FastAPI app over `backend`. Built inside each replica (or process), never pickled."""
    models = build_api_models(data, config)
    RecommendRequest, BatchRecommendRequest = models.request, models.batch_request
    app = FastAPI(title=title, description=__doc__)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)

    def query(body: Any, loc: tuple[str | int, ...]) -> Query:
        return Query(events=request_events(body, data), k=body.k, exclude_seen=body.exclude_seen,
                     session_id=body.session_id, loc=loc)

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(body: RecommendRequest, response: Response) -> RecommendResponse:  # type: ignore[valid-type]
        """Top-k next items for one session."""
        outcome: Recommendations = _unwrap(await backend.recommend([query(body, ("body",))]))
        response.headers[BATCH_SIZE_HEADER] = str(outcome.batch_requests)
        return outcome.responses[0]

    @app.post("/recommend/batch", response_model=BatchRecommendResponse)
    async def recommend_batch(body: BatchRecommendRequest, response: Response) -> BatchRecommendResponse:  # type: ignore[valid-type]
        """Top-k next items for several sessions (each with its own k and exclude_seen)."""
        queries = [query(r, ("body", "requests", i)) for i, r in enumerate(body.requests)]
        outcome: Recommendations = _unwrap(await backend.recommend(queries))
        response.headers[BATCH_SIZE_HEADER] = str(outcome.batch_requests)
        return BatchRecommendResponse(results=outcome.responses, model_version=outcome.version)

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        """200 when the whole chain (preprocessing and model) answers with the newest bundle version."""
        return _unwrap(await backend.health())

    @app.get("/model", response_model=ModelInfo)
    async def model_info() -> ModelInfo:
        """The served model: version, schema summary, training metrics, batching counters."""
        return _unwrap(await backend.model_info())

    @app.post("/admin/reload", response_model=ReloadResponse)
    async def reload(x_admin_token: str | None = Header(None, alias=ADMIN_TOKEN_HEADER)) -> ReloadResponse:
        """Reload the bundle directory: load the new version next to the old one, then swap."""
        if admin_token is None:
            raise HTTPException(403, f"admin routes are disabled: set {ADMIN_TOKEN_ENV} or serve.admin_token_file")
        if not x_admin_token:
            raise HTTPException(401, f"the {ADMIN_TOKEN_HEADER} header is required")
        if not hmac.compare_digest(x_admin_token.encode(), admin_token.encode()):
            raise HTTPException(403, f"the {ADMIN_TOKEN_HEADER} header is wrong")
        outcome: ReloadResponse = _unwrap(await backend.reload())
        log.info("admin reload: %s", outcome.detail)
        return outcome

    return app
