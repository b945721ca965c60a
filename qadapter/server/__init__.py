"""``qadapter serve``: an OpenAI-compatible HTTP server for Q-Adapters, with a web playground.

    from qadapter.server import ServedModels, create_app
    served = ServedModels.load({"harmless": "runs/harmless/adapter"})
    app = create_app(served)            # a FastAPI app; run it with uvicorn

* :mod:`.models`    the base model and every adapter, on one network (one PEFT model, one adapter each)
* :mod:`.batching`  the decoder thread: dynamic batching of concurrent requests, per-row settings
* :mod:`.protocol`  the OpenAI request schemas, validated field by field, and the response shapes
* :mod:`.app`       the FastAPI routes, server-sent events, errors, the playground at ``/``
* :mod:`.auth`      the optional API key (``Authorization: Bearer``)
* :mod:`.metrics`   ``/metrics`` in Prometheus' text format
* :mod:`.logprobs`  ``logprobs`` / ``top_logprobs`` / ``echo``, scored after decoding by :mod:`qadapter.scoring`
"""

from .models import ServedModels

__all__ = ["ServedModels", "create_app", "serve"]


def __getattr__(name):
    if name in ("create_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'qadapter.server' has no attribute {name!r}")
