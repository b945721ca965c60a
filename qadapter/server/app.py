"""The FastAPI app: OpenAI-compatible routes, server-sent events, OpenAI-shaped errors, the playground.

    GET  /v1/models               the base model and every adapter
    POST /v1/chat/completions     OpenAI chat completions (stream, usage, n, logprobs / top_logprobs;
                                  extras: strength, alpha_0, alpha_tilde, top_k)
    POST /v1/completions          OpenAI (legacy) completions (n, logprobs, echo), same extras
    GET  /health                  liveness plus the decoder's queue and counters (open without the key)
    GET  /metrics                 Prometheus text format (:mod:`.metrics`)
    GET  /                        the playground (static files in ``static/``, no build step)

With ``api_key`` every route but ``/health`` and the playground's static files needs
``Authorization: Bearer <key>`` (:mod:`.auth`).
"""

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from .auth import BearerAuth
from .batching import QueueFull, Row, Scheduler, Unavailable
from .logprobs import chat_logprobs, completion_logprobs, score_rows
from .metrics import Metrics
from .protocol import MAX_SEED, APIError, DecodeRequest, Limits, parse_json, validate

STATIC = Path(__file__).parent / "static"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class Service:
    """What the routes share: the models, the decoder's scheduler, the limits and the metrics."""

    served: object
    sched: Scheduler
    limits: Limits
    metrics: Metrics
    max_body_bytes: int
    created: int


def create_app(served, *, max_batch: int = 16, max_queue: int = 64, batch_wait: float = 0.01,
               max_tokens_cap: int = 512, max_body_bytes: int = 2 * 1024 * 1024, scheduler: Scheduler | None = None,
               continuous: bool = True, api_key: str | None = None):
    """The app for ``served`` (:class:`~qadapter.server.models.ServedModels`); its decoder thread starts
    with the app (lifespan) and stops with it. ``api_key``: require ``Authorization: Bearer <key>``."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    sched = scheduler or Scheduler(served, max_batch=max_batch, max_queue=max_queue, batch_wait=batch_wait,
                                   continuous=continuous)
    service = Service(served, sched, Limits(max_tokens_cap=max_tokens_cap, max_prompts=max_batch), Metrics(sched),
                      max_body_bytes, int(time.time()))

    @asynccontextmanager
    async def lifespan(app):
        if not sched.thread.is_alive() and not sched.closed:
            sched.start()
        yield
        sched.close()

    app = FastAPI(title="qadapter serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.scheduler, app.state.served, app.state.limits = sched, served, service.limits
    app.state.metrics = service.metrics
    _error_handlers(app)
    _model_routes(app, service)
    _completion_routes(app, service)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if api_key:  # inside the metrics middleware, so that 401s are counted too
        app.add_middleware(_Wrap, wrap=lambda inner: BearerAuth(inner, api_key))
    app.add_middleware(_Wrap, wrap=service.metrics.middleware)
    return app


class _Wrap:
    """Starlette's ``add_middleware`` takes a class; this one wraps the app with ``wrap(app)``."""

    def __init__(self, app, wrap):
        self.inner = wrap(app)

    async def __call__(self, scope, receive, send):
        await self.inner(scope, receive, send)


def _error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        err = APIError(exc.status_code, str(exc.detail) if exc.status_code != 404 else
                       f"no route {request.method} {request.url.path}", type="invalid_request_error",
                       code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        first = (exc.errors() or [{}])[0]
        err = APIError(400, f"invalid request: {first.get('msg', exc)}",
                       param=".".join(str(p) for p in first.get("loc", ())[1:]) or None)
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, exc):
        err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return JSONResponse(err.body(), status_code=500)


def _model_card(service: Service, name: str) -> dict:
    served = service.served
    card = {"id": name, "object": "model", "created": service.created, "owned_by": "qadapter"}
    if name == served.base_name:
        card["qadapter"] = {"kind": "base"}
    elif served.adapters[name].stack is not None:
        stack = served.adapters[name].stack
        card["parent"] = served.base_name
        card["qadapter"] = {"kind": "stack", "adapters": len(stack), "strengths": list(stack.strengths)}
    else:
        s = served.adapters[name].settings
        card["parent"] = served.base_name
        card["qadapter"] = {"kind": "adapter", "parameterization": s.parameterization, "alpha_0": s.alpha_0,
                            "alpha_tilde": s.alpha_tilde, "strength": s.parameterization == "residual"}
    return card


def _model_routes(app, service: Service) -> None:
    from fastapi.responses import FileResponse, JSONResponse, Response

    served, sched = service.served, service.sched

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(service, n) for n in served.names()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in served.names():
            raise APIError(404, f"the model {name[:80]!r} does not exist here", param="model", code="model_not_found")
        return _model_card(service, name)

    @app.get("/health")
    async def health():
        snap = sched.snapshot()
        ok = sched.thread.is_alive() and not sched.closed
        body = {"status": "ok" if ok else "unavailable", "models": served.names(),
                "max_batch": sched.max_batch, "max_queue": sched.max_queue, **snap}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        data, content_type = service.metrics.exposition()
        return Response(data, media_type=content_type)

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")


def _completion_routes(app, service: Service) -> None:
    from fastapi import Request

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(service, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(service, request, "completion")


async def _read_body(request, max_body_bytes: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_body_bytes:
        raise APIError(413, f"the request body is {length} bytes; at most {max_body_bytes}", code="too_large")
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise APIError(413, f"the request body is over {max_body_bytes} bytes", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _submit(sched: Scheduler, req: DecodeRequest, loop):
    """One row per choice: prompt i's j-th of ``n`` choices is choice ``i * n + j`` (OpenAI's order);
    with a seed, choice j samples with seed + j (so choice 0 is what n=1 gives)."""
    queue: asyncio.Queue = asyncio.Queue()
    rows = []
    for ids in req.prompts:
        for j in range(req.n):
            index = len(rows)

            def emit(event, index=index):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))
                except RuntimeError:  # the event loop is gone (shutdown): stop this row
                    rows[index].cancel()

            seed = None if req.seed is None else (req.seed + j) % (MAX_SEED + 1)
            rows.append(Row(prompt_ids=ids, max_new_tokens=req.max_tokens, emit=emit, adapter=req.adapter,
                            alphas=req.alphas, strengths=req.strengths, temperature=req.temperature,
                            top_p=req.top_p, top_k=req.top_k, seed=seed, stop=req.stop))
    if req.max_tokens == 0:  # echo with max_tokens=0: nothing to decode, only the prompt to score
        for r in rows:
            r.finish_reason = "length"
        return rows, None
    try:
        sched.submit(rows)
    except QueueFull as exc:
        raise APIError(429, str(exc), type="rate_limit_error", code="server_busy",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    except Unavailable as exc:
        raise APIError(503, str(exc), type="server_error", code="unavailable",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    return rows, queue


async def _events(rows, queue, request, on_first=None):
    """(choice index, event) as the decoder emits them; cancels the rows if the client goes away;
    calls ``on_first()`` at the first piece of text."""
    left = len(rows) if queue is not None else 0
    checked = time.monotonic()
    try:
        while left:
            try:
                index, event = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                index = event = None
            if time.monotonic() - checked >= 0.25:  # however busy the stream, look now and then
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if event is None:
                continue
            if event[0] in ("done", "error"):
                left -= 1
            elif on_first is not None and event[0] == "delta" and event[1]:
                on_first()
                on_first = None
            yield index, event
    finally:
        for r in rows:
            if r.finish_reason is None:
                r.cancel()


def _usage(req: DecodeRequest, rows) -> dict:
    prompt = sum(len(p) for p in req.prompts)  # a prompt is read once however many choices it has
    completion = sum(len(r.new_ids) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extra(req: DecodeRequest) -> dict:
    return {"model": req.model, "adapter": req.adapter, "strength": req.strength,
            "alpha_0": req.alphas[0] if req.alphas else None,
            "alpha_tilde": req.alphas[1] if req.alphas else None,
            **({"strengths": list(req.strengths)} if req.strengths is not None else {})}


def _ttft(service: Service, request):
    arrived = request.scope.get("state", {}).get("arrived")
    if arrived is None:
        return None
    return lambda: service.metrics.first_token(request.url.path, arrived)


async def _complete(service: Service, request, kind: str):
    sched = service.sched
    body = parse_json(await _read_body(request, service.max_body_bytes))
    req = validate(body, kind, service.served, service.limits)
    rows, queue = _submit(sched, req, asyncio.get_running_loop())
    chat = kind == "chat"
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    now = int(time.time())
    if req.stream:
        return _streaming(_stream(service, rows, queue, request, req, rid, now, chat))
    texts = [""] * len(rows)
    error = None
    async for index, event in _events(rows, queue, request, _ttft(service, request)):
        if event[0] == "delta":
            texts[index] += event[1]
        elif event[0] == "error":
            error = event[1]
    if error:
        raise APIError(500, error, type="server_error")
    if any(r.finish_reason is None or r.finish_reason == "cancelled" for r in rows):
        if sched.closed:
            raise APIError(503, "the server is shutting down", type="server_error", code="unavailable",
                           headers={"Retry-After": str(sched.retry_after())})
        raise APIError(499, "the client closed the request", code="cancelled")
    scored = await score_rows(service.served, sched, req, rows, texts) if req.logprobs is not None else None
    choices = []
    for i, r in enumerate(rows):
        if chat:
            lp = chat_logprobs(service.served, scored[i], req.logprobs) if scored else None
            choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                            "logprobs": lp, "finish_reason": r.finish_reason})
        else:
            text = texts[i]
            lp = None
            if scored:
                lp = completion_logprobs(service.served, scored[i], req.logprobs, req.echo)
            if req.echo:
                text = _decode(service.served, r.prompt_ids) + text
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
    usage = _usage(req, rows)
    service.metrics.tokens(req.model, usage["prompt_tokens"], usage["completion_tokens"])
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
            "model": req.model, "choices": choices, "usage": usage, "system_fingerprint": None, "qadapter": _extra(req)}


def _decode(served, ids) -> str:
    with served.tokenizer_lock:
        return served.tokenizer.decode(ids, skip_special_tokens=False)


def _streaming(gen):
    from fastapi.responses import StreamingResponse

    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(service: Service, rows, queue, request, req, rid, now, chat):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, **more):
        return _sse({"id": rid, "object": obj, "created": now, "model": req.model, "choices": choices,
                     "system_fingerprint": None, **more})

    if chat:
        for i in range(len(rows)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
    async for index, event in _events(rows, queue, request, _ttft(service, request)):
        if event[0] == "delta":
            piece = {"delta": {"content": event[1]}} if chat else {"text": event[1]}
            yield chunk([{"index": index, **piece, "logprobs": None, "finish_reason": None}])
        elif event[0] == "done":
            piece = {"delta": {}} if chat else {"text": ""}
            yield chunk([{"index": index, **piece, "logprobs": None, "finish_reason": event[1]}])
        elif event[0] == "error":
            yield _sse(APIError(500, event[1], type="server_error").body())
            return
    usage = _usage(req, rows)
    service.metrics.tokens(req.model, usage["prompt_tokens"], usage["completion_tokens"])
    if req.include_usage:
        yield chunk([], usage=usage, qadapter=_extra(req))
    yield "data: [DONE]\n\n"


def serve(served, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", on_ready=None, **app_kwargs):
    """Run the app with uvicorn until interrupted. ``on_ready(url)`` is called once it listens."""
    import uvicorn

    app = create_app(served, **app_kwargs)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
    server = uvicorn.Server(config)

    async def main():
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started and on_ready is not None:
            sock = server.servers[0].sockets[0].getsockname()
            on_ready(f"http://{sock[0]}:{sock[1]}")
        await task

    asyncio.run(main())
    return 0
