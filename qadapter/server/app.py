"""The FastAPI app: OpenAI-compatible routes, server-sent events, OpenAI-shaped errors, the playground.

    GET  /v1/models               the base model and every adapter
    POST /v1/chat/completions     OpenAI chat completions (stream, usage; extras: strength, alpha_0, alpha_tilde, top_k)
    POST /v1/completions          OpenAI (legacy) completions, same extras
    GET  /health                  liveness plus the decoder's queue and counters
    GET  /                        the playground (static files in ``static/``, no build step)
"""

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from .batching import QueueFull, Row, Scheduler, Unavailable
from .protocol import APIError, Limits, parse_json, validate

STATIC = Path(__file__).parent / "static"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(served, *, max_batch: int = 16, max_queue: int = 64, batch_wait: float = 0.01,
               max_tokens_cap: int = 512, max_body_bytes: int = 2 * 1024 * 1024, scheduler: Scheduler | None = None,
               continuous: bool = True):
    """The app for ``served`` (:class:`~qadapter.server.models.ServedModels`); its decoder thread starts
    with the app (lifespan) and stops with it."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = Limits(max_tokens_cap=max_tokens_cap, max_prompts=max_batch)
    sched = scheduler or Scheduler(served, max_batch=max_batch, max_queue=max_queue, batch_wait=batch_wait,
                                   continuous=continuous)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        if not sched.thread.is_alive() and not sched.closed:
            sched.start()
        yield
        sched.close()

    app = FastAPI(title="qadapter serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.scheduler, app.state.served, app.state.limits = sched, served, limits

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

    def model_card(name):
        card = {"id": name, "object": "model", "created": created, "owned_by": "qadapter"}
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

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in served.names()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in served.names():
            raise APIError(404, f"the model {name[:80]!r} does not exist here", param="model", code="model_not_found")
        return model_card(name)

    @app.get("/health")
    async def health():
        snap = sched.snapshot()
        ok = sched.thread.is_alive() and not sched.closed
        body = {"status": "ok" if ok else "unavailable", "models": served.names(),
                "max_batch": sched.max_batch, "max_queue": sched.max_queue, **snap}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def read_body(request: Request) -> bytes:
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

    def submit(req, loop):
        queue: asyncio.Queue = asyncio.Queue()
        rows = []
        for index, ids in enumerate(req.prompts):
            def emit(event, index=index):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))
                except RuntimeError:  # the event loop is gone (shutdown): stop this row
                    rows[index].cancel()

            rows.append(Row(prompt_ids=ids, max_new_tokens=req.max_tokens, emit=emit, adapter=req.adapter,
                            alphas=req.alphas, strengths=req.strengths, temperature=req.temperature, top_p=req.top_p,
                            top_k=req.top_k, seed=req.seed, stop=req.stop))
        try:
            sched.submit(rows)
        except QueueFull as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except Unavailable as exc:
            raise APIError(503, str(exc), type="server_error", code="unavailable",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        return rows, queue

    async def events(rows, queue, request):
        """(choice index, event) as the decoder emits them; cancels the rows if the client goes away."""
        left = len(rows)
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
                yield index, event
        finally:
            for r in rows:
                if r.finish_reason is None:
                    r.cancel()

    def usage(rows):
        prompt = sum(len(r.prompt_ids) for r in rows)
        completion = sum(len(r.new_ids) for r in rows)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def extra(req):
        return {"model": req.model, "adapter": req.adapter, "strength": req.strength,
                "alpha_0": req.alphas[0] if req.alphas else None,
                "alpha_tilde": req.alphas[1] if req.alphas else None,
                **({"strengths": list(req.strengths)} if req.strengths is not None else {})}

    async def complete(request: Request, kind: str):
        body = parse_json(await read_body(request))
        req = validate(body, kind, served, limits)
        rows, queue = submit(req, asyncio.get_running_loop())
        chat = kind == "chat"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if req.stream:
            return StreamingResponse(stream(rows, queue, request, req, rid, now, chat),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = [""] * len(rows)
        error = None
        async for index, event in events(rows, queue, request):
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
        choices = []
        for i, r in enumerate(rows):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                "logprobs": None, "finish_reason": r.finish_reason})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": None, "finish_reason": r.finish_reason})
        return {"id": rid, "object": obj, "created": now, "model": req.model, "choices": choices,
                "usage": usage(rows), "system_fingerprint": None, "qadapter": extra(req)}

    async def stream(rows, queue, request, req, rid, now, chat):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **more):
            return _sse({"id": rid, "object": obj, "created": now, "model": req.model, "choices": choices,
                         "system_fingerprint": None, **more})

        if chat:
            for i in range(len(rows)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        async for index, event in events(rows, queue, request):
            if event[0] == "delta":
                piece = {"delta": {"content": event[1]}} if chat else {"text": event[1]}
                yield chunk([{"index": index, **piece, "logprobs": None, "finish_reason": None}])
            elif event[0] == "done":
                piece = {"delta": {}} if chat else {"text": ""}
                yield chunk([{"index": index, **piece, "logprobs": None, "finish_reason": event[1]}])
            elif event[0] == "error":
                yield _sse(APIError(500, event[1], type="server_error").body())
                return
        if req.include_usage:
            yield chunk([], usage=usage(rows), qadapter=extra(req))
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "completion")

    return app


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
