"""``GET /metrics``: the server's counters in Prometheus' text format, through ``prometheus_client``.

Each app has its own registry (two apps in one process, as in the tests, count apart):

* ``qadapter_requests_total{endpoint, status}``: every answered request (401s and 4xx included)
* ``qadapter_request_latency_seconds{endpoint}``: from the request's arrival to its last byte
* ``qadapter_time_to_first_token_seconds{endpoint}``: from arrival to the first generated text
* ``qadapter_prompt_tokens_total{model}``, ``qadapter_generated_tokens_total{model}``
* ``qadapter_queue_depth`` (prompts waiting) and ``qadapter_running_rows`` (rows being decoded),
  read from the scheduler at scrape time
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: endpoints counted by name; any other path is counted as "other" (labels must stay few)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class Metrics:
    """The app's Prometheus metrics; ``middleware(app)`` counts requests and their latency."""

    def __init__(self, scheduler):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qadapter_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("qadapter_request_latency_seconds", "request arrival to last response byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("qadapter_time_to_first_token_seconds", "request arrival to the first generated text",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qadapter_prompt_tokens", "prompt tokens of answered completions", ["model"],
                                     registry=r)
        self.generated_tokens = Counter("qadapter_generated_tokens", "tokens generated for answered completions",
                                        ["model"], registry=r)
        queue = Gauge("qadapter_queue_depth", "prompts waiting for the decoder", registry=r)
        queue.set_function(lambda: scheduler.snapshot()["queued"])
        running = Gauge("qadapter_running_rows", "rows the decoder is decoding", registry=r)
        running.set_function(lambda: scheduler.snapshot()["running"])

    def first_token(self, path: str, arrived: float) -> None:
        self.ttft.labels(endpoint_label(path)).observe(time.monotonic() - arrived)

    def tokens(self, model: str, prompt: int, generated: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.generated_tokens.labels(model).inc(generated)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware(self, app):
        """An ASGI middleware: counts each HTTP request by endpoint and status when its last byte is
        sent (a stream: when it ends) and observes its latency; stores the arrival time in the scope."""
        metrics = self

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            arrived = time.monotonic()
            scope.setdefault("state", {})["arrived"] = arrived
            label, status = endpoint_label(scope["path"]), [500]
            done = [False]

            def finish():
                if not done[0]:
                    done[0] = True
                    metrics.requests.labels(label, str(status[0])).inc()
                    metrics.latency.labels(label).observe(time.monotonic() - arrived)

            async def watched(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    finish()

            try:
                await app(scope, receive, watched)
            finally:
                finish()  # a client that went away mid-stream is still counted

        return counted
