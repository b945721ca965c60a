"""Helpers for the server tests: tiny saved Q-Adapters and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from conftest import make_tiny_tokenizer, randomize_lora, tiny_llama


#: the one user turn most server tests send
USER = [{"role": "user", "content": "w1 w2 w3"}]


def server_clients():
    """(openai, httpx), or skip the calling test module where the server's or the clients' packages
    are missing (call it at module level, before importing anything of qadapter.server)."""
    openai = pytest.importorskip("openai", reason="the server tests need the openai client: pip install 'qadapter[test]'")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    return openai, httpx


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine two threads that
    wait for each other at every op make these tests many times slower; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_base(tok, seed: int = 0, endless: bool = False, context: int = 8192):
    """conftest's tiny Llama with ``tok``'s ids; ``endless``: it (almost surely) never ends by itself,
    for the tests that need a long generation."""
    return tiny_llama(tokenizer=tok, seed=seed, context=context, init_range=0.2, endless=endless)


def save_adapters(root, endless: bool = False, context: int = 8192) -> dict[str, str]:
    """A saved base model plus two adapters on it: ``tiny`` (residual, random LoRA) and ``tiny-full``
    (the authors' full parameterization). Returns {name: adapter folder}."""
    from qadapter.modeling import QAdapter
    from qadapter.settings import QAdapterSettings
    from qadapter.backbone import lora_config

    tok = make_tiny_tokenizer()
    base_dir = root / "tiny-base"
    base = tiny_base(tok, endless=endless, context=context)
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    out = {}
    for name, settings, seed in (("tiny", QAdapterSettings(alpha_tilde=1.0, base_model_name_or_path=str(base_dir)), 1),
                                 ("tiny-full", QAdapterSettings(parameterization="full", alpha_0=0.5, alpha_tilde=0.8,
                                                                base_model_name_or_path=str(base_dir)), 2)):
        qa = QAdapter.create(tiny_base(tok, endless=endless, context=context), tok, settings,
                             lora_config(r=4, lora_alpha=8, lora_dropout=0.0))
        randomize_lora(qa.model, seed=seed)
        qa.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def save_stack(root) -> dict[str, str]:
    """A saved tiny base under ``root``, a residual adapter ``one`` on it, and a stack ``two``: ``one``
    plus a second adapter trained (here: randomized) on the base with ``one`` merged in."""
    from qadapter.backbone import lora_config
    from qadapter.modeling import QAdapter
    from qadapter.settings import QAdapterSettings
    from qadapter.stack import merge_into, save_extended

    tok = make_tiny_tokenizer()
    base_dir = root / "tiny-base"
    tiny_base(tok).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    first = QAdapter.create(tiny_base(tok), tok, QAdapterSettings(base_model_name_or_path=str(base_dir)),
                            lora_config(r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_lora(first.model, seed=1)
    first.save_pretrained(root / "one")
    merged, _ = merge_into(tiny_base(tok), root / "one")
    second = QAdapter.create(merged, tok, QAdapterSettings(base_model_name_or_path=str(base_dir)),
                             lora_config(r=2, lora_alpha=4, lora_dropout=0.0))
    randomize_lora(second.model, seed=2)
    save_extended(root / "two", root / "one", second.save_pretrained, tok)
    return {"one": str(root / "one"), "two": str(root / "two")}


@contextlib.contextmanager
def running_server(served, **app_kwargs):
    """A real uvicorn server for ``served`` on 127.0.0.1 (a free port), in a thread; yields
    (base URL, app). Stops it (and its decoder thread) on exit."""
    import uvicorn

    from qadapter.server.app import create_app

    app = create_app(served, **app_kwargs)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.scheduler.close()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` until it is truthy (returns it) or ``timeout`` passes (returns the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
