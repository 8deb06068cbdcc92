"""The HTTP app of `dina serve` (FastAPI), shared by the single-process server and the Ray Serve replicas.

- `GET /healthz`: 200 `{"status": "ok", ...}` once the model is loaded and warmed up, 503 before.
- `POST /v1/score`: DRM HTTP v1 (see `protocol.py`) -> `{"protocol_version": "1", "raw_scores": [...]}`.
- `POST /v1/score_images`: JSON `{"prompts", "images": [base64 PNG/JPEG], "noise_level"?, "seeds"?}` or multipart
  (`prompt` fields, `images` files) -> the same, plus `"scores"` (normalised).

A bad request gets a 4xx with `{"error": {"field": ..., "message": ...}}`; the server keeps serving. Request bodies are
never unpickled.
"""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .engine import RewardEngine
from .protocol import (
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    RequestError,
    check_protocol_version,
    parse_drm_body,
    parse_images_form,
    parse_images_json,
)

DEFAULT_MAX_BODY_BYTES = 64 * 2**20


def create_app(engine: RewardEngine, scorer, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The app over `engine`. `scorer.submit(items) -> rewards` batches the scoring (a `MicroBatcher`, or a Ray Serve
    replica's batched method); its optional `start()`/`stop()` run with the app's lifespan. An engine not loaded yet
    is loaded in the background on its own thread, `/healthz` answering 503 until it is ready."""

    @asynccontextmanager
    async def lifespan(app):
        if hasattr(scorer, "start"):
            scorer.start()
        if not engine.ready.is_set() and engine.load_error is None:
            asyncio.get_running_loop().run_in_executor(engine.executor, engine.load)
        yield
        if hasattr(scorer, "stop"):
            await scorer.stop()

    app = FastAPI(title="DiNa-LRM reward server", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return JSONResponse(err.to_json(), status_code=err.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        return JSONResponse({"error": {"field": None, "message": f"{type(err).__name__}: {err}"}}, status_code=500)

    @app.get("/healthz")
    async def healthz():
        if engine.load_error is not None:
            return JSONResponse({"status": "failed", "error": repr(engine.load_error)}, status_code=500)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {
            "status": "ok",
            "model": engine.model_name,
            "protocol_version": PROTOCOL_VERSION,
            "pid": os.getpid(),  # tells replicas apart
            "cached_prompts": engine.cached_prompts,
        }

    @app.post("/v1/score")
    async def score(request: Request):
        _check_ready(engine)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/octet-stream":
            raise RequestError(
                "content-type", "DRM v1 bodies are `application/octet-stream` (a safetensors file).", 415
            )
        check_protocol_version(request.headers.get(PROTOCOL_HEADER))
        body = await read_body(request, max_body_bytes)
        drm = await run_in_threadpool(parse_drm_body, body, engine.spec)
        items = await run_in_threadpool(engine.latent_items, drm)
        rewards = await _submit(scorer, items)
        return JSONResponse({"protocol_version": PROTOCOL_VERSION, "raw_scores": rewards})

    @app.post("/v1/score_images")
    async def score_images(request: Request):
        _check_ready(engine)
        body = await read_body(request, max_body_bytes)
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind == "application/json":
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError("body", f"the body is not valid JSON ({err}).", 400) from err
            parsed = await run_in_threadpool(parse_images_json, payload)
        elif kind == "multipart/form-data":
            parsed = await _parse_form(request, body)
        else:
            raise RequestError("content-type", "send `application/json` or `multipart/form-data`.", 415)
        try:
            items = await asyncio.get_running_loop().run_in_executor(engine.executor, engine.image_items, parsed)
        except ValueError as err:  # e.g. an image smaller than one latent patch
            raise RequestError("images", str(err)) from err
        rewards = await _submit(scorer, items)
        scores = [
            (r + engine.pipe.reward_model.config.score_offset) / engine.pipe.reward_model.config.score_scale
            for r in rewards
        ]
        return JSONResponse({"protocol_version": PROTOCOL_VERSION, "raw_scores": rewards, "scores": scores})

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes (header or stream)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError("body", f"the body is {int(length)} bytes, over the server's limit of {limit}.", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError("body", f"the body exceeds the server's limit of {limit} bytes.", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_form(request: Request, body: bytes):
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as err:  # starlette raises its own parse errors for malformed multipart
        raise RequestError("body", f"the multipart body could not be parsed ({err}).", 400) from err
    prompts = [v for v in form.getlist("prompt") + form.getlist("prompts") if isinstance(v, str)]
    files = [(f.filename, await f.read()) for f in form.getlist("images") if not isinstance(f, str)]
    noise_level = form.get("noise_level")
    seeds = [s for s in form.getlist("seeds") if isinstance(s, str)]
    return await run_in_threadpool(parse_images_form, prompts, files, noise_level, seeds)


def _check_ready(engine: RewardEngine) -> None:
    if not engine.ready.is_set():
        raise RequestError("model", "the model is still loading; poll /healthz.", 503)


async def _submit(scorer, items) -> list[float]:
    try:
        return await scorer.submit(items)
    except ValueError as err:  # an input the validation let through but the model refuses: the client's
        raise RequestError("body", str(err), 422) from err


__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app", "read_body"]
