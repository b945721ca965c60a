"""``qadapter serve``: the real ``openai`` client against a real server on 127.0.0.1 with tiny models.

Chat and completions, streaming, usage, the strength extras, greedy and seeded output equal to
``QAdapter.generate``, batching that does not change a request's output, overload (429 / 503 with
Retry-After), disconnects that stop generation, and OpenAI-shaped 4xx errors naming the field.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import subprocess
import sys
import time

import pytest

from server_testing import USER, one_torch_thread, running_server, save_adapters, server_clients, wait_for  # noqa: F401

openai, httpx = server_clients()

from qadapter.chat import encode_prompt  # noqa: E402


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return save_adapters(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def served(adapters):
    from qadapter.server import ServedModels

    return ServedModels.load(adapters)


@pytest.fixture(scope="module")
def server(served):
    with running_server(served, max_tokens_cap=64) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def qas(adapters):
    """Each adapter loaded on its own by the public API, to compare the server with."""
    from qadapter.modeling import QAdapter

    return {name: QAdapter.from_pretrained(path) for name, path in adapters.items()}


def expected(qa, prompt, **kwargs):
    texts, ids = qa.generate([prompt], return_ids=True, **kwargs)
    return texts[0], ids[0]


# --------------------------------------------------------------------------------------- happy paths


def test_models_and_health(client, server):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny-base", "tiny", "tiny-full"]
    assert client.models.retrieve("tiny").id == "tiny"
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["models"] == ids


@pytest.mark.parametrize("model, extra, gen_kwargs", [
    ("tiny", {}, {}),
    ("tiny", {"strength": 0.5}, {"strength": 0.5}),
    ("tiny", {"strength": 2.5}, {"strength": 2.5}),
    ("tiny-full", {"alpha_0": 0.2, "alpha_tilde": 1.5}, {"alpha_0": 0.2, "alpha_tilde": 1.5}),
    ("tiny-base", {}, {"policy": "base"}),
])
def test_greedy_chat_equals_qadapter_generate(client, qas, model, extra, gen_kwargs):
    qa = qas["tiny" if model == "tiny-base" else model]
    text, ids = expected(qa, USER, max_new_tokens=24, **gen_kwargs)
    r = client.chat.completions.create(model=model, messages=USER, max_tokens=24, temperature=0,
                                       extra_body=extra or None)
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.prompt_tokens == len(encode_prompt(qa.tokenizer, USER))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if len(ids) == 24 else "stop")
    assert r.model == model


def test_strength_changes_the_answer_and_is_reported(client):
    answers = {}
    for s in (0.2, 1.0, 3.0):
        r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, temperature=0,
                                           extra_body={"strength": s})
        answers[s] = r.choices[0].message.content
        extra = r.model_extra["qadapter"]
        assert extra["strength"] == s and math.isclose(extra["alpha_0"], 1.0 / s)
    assert len(set(answers.values())) > 1  # the random adapter really customizes


def test_greedy_completion_equals_qadapter_generate(client, qas):
    prompt = "w4 w5 w6 w7"
    text, ids = expected(qas["tiny"], prompt, max_new_tokens=20, raw_text=True)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == text and r.usage.completion_tokens == len(ids)
    assert r.usage.prompt_tokens == len(qas["tiny"].tokenizer(prompt, add_special_tokens=False)["input_ids"])
    # several prompts in one request: one choice each, each as if alone
    prompts = ["w4 w5 w6 w7", "w9", "w10 w11 w12 w13 w14 w15"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0, extra_body={"strength": 2})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice, p in zip(r.choices, prompts):
        assert choice.text == expected(qas["tiny"], p, max_new_tokens=12, raw_text=True, strength=2)[0]


def test_token_id_prompt(client, qas):
    ids = [5, 6, 7, 8]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == expected(qas["tiny"], ids, max_new_tokens=10)[0]


def test_seeded_sampling_equals_qadapter_generate(client, qas):
    kwargs = dict(temperature=0.9, top_p=0.9, seed=7)
    text, _ = expected(qas["tiny"], USER, max_new_tokens=20, do_sample=True, top_k=20, strength=1.5, **kwargs)
    answers = [client.chat.completions.create(model="tiny", messages=USER, max_tokens=20,
                                              extra_body={"top_k": 20, "strength": 1.5}, **kwargs)
               .choices[0].message.content for _ in range(2)]
    assert answers == [text, text]
    other = client.chat.completions.create(model="tiny", messages=USER, max_tokens=20, temperature=0.9, top_p=0.9,
                                           seed=8, extra_body={"top_k": 20, "strength": 1.5})
    assert other.choices[0].message.content != text


def test_streaming_chat(client, qas):
    text, ids = expected(qas["tiny"], USER, max_new_tokens=24, strength=0.7)
    stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"strength": 0.7})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length" if len(ids) == 24 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_streaming_completion(client, qas):
    prompt = "w20 w21"
    text, _ = expected(qas["tiny"], prompt, max_new_tokens=16, raw_text=True)
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_end_the_answer_and_are_cut(client, qas):
    full, _ = expected(qas["tiny"], USER, max_new_tokens=30)
    words = [w for w in full.replace("\n", " ").split("w") if w]
    stop = "w" + words[len(words) // 2]  # a word from the middle of the greedy answer
    cut = full.index(stop)
    for stream in (False, True):
        r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=30, temperature=0, stop=[stop],
                                           stream=stream)
        if stream:
            chunks = list(r)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        else:
            content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert content == full[:cut] and finish == "stop"


def test_concurrent_requests_share_a_batch_and_keep_their_answers(server, client, qas):
    """Requests sent together are decoded in one batch; each gets what it gets alone."""
    app = server[1]
    cases = [("tiny", USER, {}, {}),
             ("tiny", [{"role": "user", "content": "w30 w31 w32 w33 w34 w35 w36 w37"}], {"strength": 2.0}, {"strength": 2.0}),
             ("tiny-base", [{"role": "user", "content": "w8"}], {}, {"policy": "base"}),
             ("tiny", [{"role": "system", "content": "w2"}, {"role": "user", "content": "w40 w41"}],
              {"strength": 0.3}, {"strength": 0.3})]
    want = [expected(qas["tiny"], msgs, max_new_tokens=32, **gk)[0] for _, msgs, _, gk in cases]
    before = app.state.scheduler.snapshot()
    app.state.scheduler.batch_wait = 0.5  # let them all arrive: batching is what this test is about
    try:
        def call(case):
            model, msgs, extra, _ = case
            return client.chat.completions.create(model=model, messages=msgs, max_tokens=32, temperature=0,
                                                  extra_body=extra or None).choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            got = list(pool.map(call, cases))
    finally:
        app.state.scheduler.batch_wait = 0.01
    after = app.state.scheduler.snapshot()
    assert got == want
    assert after["max_batch_rows"] >= 2 and after["batches"] - before["batches"] < len(cases)


# --------------------------------------------------------------------------------------- errors


def post(url, path, body=None, raw=None):
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
OK = {"model": "tiny", "messages": USER}


@pytest.mark.parametrize("path, body, status, param, words", [
    (CHAT, b'{"model": "tiny", "messages": [', 400, None, "not valid JSON"),
    (CHAT, b'[1, 2]', 400, None, "JSON object"),
    (CHAT, b'', 400, None, "empty"),
    (CHAT, b'\xff\xfe', 400, None, "UTF-8"),
    (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "w1"}], "temperature": NaN}', 400,
     "temperature", "finite"),
    (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "w1"}], "strength": Infinity}', 400,
     "strength", "finite"),
    (CHAT, {**OK, "model": "gpt-4"}, 404, "model", "does not exist"),
    (CHAT, {"messages": USER}, 400, "model", "required"),
    (CHAT, {**OK, "model": 3}, 400, "model", "string"),
    (CHAT, {"model": "tiny"}, 400, "messages", "required"),
    (CHAT, {**OK, "messages": "w1"}, 400, "messages", "array"),
    (CHAT, {**OK, "messages": []}, 400, "messages", "empty"),
    (CHAT, {**OK, "messages": [{"role": "wizard", "content": "w1"}]}, 400, "messages[0].role", "wizard"),
    (CHAT, {**OK, "messages": [USER[0], {"role": "tool", "content": "w1"}]}, 400, "messages[1].role", "not supported"),
    (CHAT, {**OK, "messages": [{"role": "user", "content": None}]}, 400, "messages[0].content", "string"),
    (CHAT, {**OK, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]",
     "text"),
    (CHAT, {**OK, "messages": [7]}, 400, "messages[0]", "object"),
    (CHAT, {**OK, "max_tokens": "10"}, 400, "max_tokens", "integer"),
    (CHAT, {**OK, "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    (CHAT, {**OK, "max_tokens": True}, 400, "max_tokens", "boolean"),
    (CHAT, {**OK, "max_tokens": -3}, 400, "max_tokens", ">= 1"),
    (CHAT, {**OK, "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    (CHAT, {**OK, "max_tokens": 65}, 400, "max_tokens", "cap"),
    (CHAT, {**OK, "max_tokens": 10**30}, 400, "max_tokens", "cap"),
    (CHAT, {**OK, "max_completion_tokens": 1000}, 400, "max_completion_tokens", "cap"),
    (CHAT, {**OK, "temperature": "hot"}, 400, "temperature", "number"),
    (CHAT, {**OK, "temperature": -0.5}, 400, "temperature", ">= 0"),
    (CHAT, {**OK, "temperature": 1e308}, 400, "temperature", "<= 2"),
    (CHAT, {**OK, "top_p": 0}, 400, "top_p", "> 0"),
    (CHAT, {**OK, "top_p": 1.5}, 400, "top_p", "<= 1"),
    (CHAT, {**OK, "top_k": -5}, 400, "top_k", ">= -1"),
    (CHAT, {**OK, "top_k": 10**9}, 400, "top_k", "vocabulary"),
    (CHAT, {**OK, "seed": -1}, 400, "seed", ">= 0"),
    (CHAT, {**OK, "seed": 2**70}, 400, "seed", "<="),
    (CHAT, {**OK, "seed": "x"}, 400, "seed", "integer"),
    (CHAT, {**OK, "stream": "yes"}, 400, "stream", "true or false"),
    (CHAT, {**OK, "stream_options": {"include_usage": True}}, 400, "stream_options", "stream is true"),
    (CHAT, {**OK, "stop": 5}, 400, "stop", "string"),
    (CHAT, {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    (CHAT, {**OK, "stop": ["w1", ""]}, 400, "stop[1]", "empty"),
    (CHAT, {**OK, "n": 17}, 400, "n", "--max-batch"),
    (COMP, {"model": "tiny", "prompt": ["w1"] * 9, "n": 2}, 400, "n", "18 rows"),
    (CHAT, {**OK, "strength": 0}, 400, "strength", "> 0"),
    (CHAT, {**OK, "strength": -1}, 400, "strength", "> 0"),
    (CHAT, {**OK, "strength": 1e9}, 400, "strength", "<="),
    (CHAT, {**OK, "strength": "strong"}, 400, "strength", "number"),
    (CHAT, {**OK, "strength": 1, "alpha_0": 0.5}, 400, "strength", "not both"),
    (CHAT, {**OK, "alpha_tilde": 0}, 400, "alpha_tilde", ">="),
    (CHAT, {**OK, "alpha_0": -1}, 400, "alpha_0", ">= 0"),
    (CHAT, {**OK, "model": "tiny-full", "strength": 2}, 400, "strength", "residual"),
    (CHAT, {**OK, "model": "tiny-base", "strength": 2}, 400, "strength", "base model"),
    (CHAT, {**OK, "strenght": 2}, 400, "strenght", "unknown field"),
    (CHAT, {**OK, "logprobs": True, "stream": True}, 400, "logprobs", "cannot be streamed"),
    (CHAT, {**OK, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
    (CHAT, {**OK, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "<= 20"),
    (CHAT, {**OK, "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    (CHAT, {**OK, "messages": [{"role": "user", "content": "w1 " * 9000}]}, 400, "messages", "context"),
    (CHAT, {**OK, "messages": [{"role": "user", "content": "w1 " * 4080}], "max_tokens": 64}, 400, "max_tokens",
     "context"),
    (COMP, {"model": "tiny"}, 400, "prompt", "required"),
    (COMP, {"model": "tiny", "prompt": ""}, 400, "prompt", "empty"),
    (COMP, {"model": "tiny", "prompt": []}, 400, "prompt", "non-empty"),
    (COMP, {"model": "tiny", "prompt": {"text": "w1"}}, 400, "prompt", "string or array"),
    (COMP, {"model": "tiny", "prompt": ["w1", 3]}, 400, "prompt[1]", "string or an array"),
    (COMP, {"model": "tiny", "prompt": [1, 2, 100000]}, 400, "prompt", "vocabulary"),
    (COMP, {"model": "tiny", "prompt": ["w1"] * 17}, 400, "prompt", "at most"),
    (COMP, {"model": "tiny", "prompt": "w1", "messages": USER}, 400, "messages", "unknown field"),
])
def test_bad_requests_get_openai_errors_naming_the_field(server, path, body, status, param, words):
    r = post(server[0], path, raw=body if isinstance(body, bytes) else None, body=None if isinstance(body, bytes) else body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and words in err["message"], err


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=USER)
    assert "nope" in e.value.message and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, stream=True, extra_body={"strength": -2})
    assert e.value.body["param"] == "strength"


def test_unknown_route_and_body_too_large(server):
    r = httpx.get(server[0] + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server[0] + CHAT)
    assert r.status_code == 405 and "error" in r.json()
    r = post(server[0], CHAT, body={**OK, "messages": [{"role": "user", "content": "w1 " * 800_000}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_never_loads_from_a_path_a_request_names(server, adapters, monkeypatch):
    """A request naming a real adapter folder (or any path) gets 404; nothing is loaded."""
    from peft import PeftModel

    from qadapter.modeling import QAdapter

    calls = []
    monkeypatch.setattr(QAdapter, "from_pretrained", classmethod(lambda cls, *a, **k: calls.append(a)))
    monkeypatch.setattr(PeftModel, "load_adapter", lambda self, *a, **k: calls.append(a))
    for name in (adapters["tiny"], "../tiny", "/etc/passwd", adapters["tiny"] + "/adapter_model.safetensors"):
        for path, body in ((CHAT, {**OK, "model": name}), (COMP, {"model": name, "prompt": "w1"})):
            r = post(server[0], path, body=body)
            assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert httpx.get(server[0] + "/v1/models/" + adapters["tiny"]).status_code == 404
    assert calls == []


def test_server_survives_bad_input(server, client):
    for raw in (b"\x00" * 10, b'{"model": {"$gt": ""}}', b'{"model": "tiny", "messages": [{"role": ["user"]}]}'):
        assert post(server[0], CHAT, raw=raw).status_code == 400
    assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=3).choices[0].message.content


# --------------------------------------------------------------------------------------- load and disconnects


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """Adapters whose greedy answers never end by themselves (a long generation on demand)."""
    from qadapter.server import ServedModels

    return ServedModels.load(save_adapters(tmp_path_factory.mktemp("endless"), endless=True))


LONG = 4000  # tokens: many seconds of decoding, were it not stopped


def test_disconnect_stops_generation(endless):
    with running_server(endless, max_tokens_cap=LONG) as (url, app):
        sched = app.state.scheduler
        body = {"model": "tiny", "messages": USER, "max_tokens": LONG, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + CHAT, json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]  # the answer is streaming
                assert sum(line.startswith("data: ") for line in got) >= 3
        assert wait_for(lambda: sched.snapshot()["running"] == 0, timeout=10)
        snap = sched.snapshot()
        assert snap["rows_cancelled"] == 1 and snap["tokens"] < LONG // 2
        # a non-streaming request whose client gives up is stopped too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + CHAT, json={**body, "stream": False}, timeout=1.0)
        assert wait_for(lambda: sched.snapshot()["rows_cancelled"] == 2, timeout=10)
        assert wait_for(lambda: sched.snapshot()["running"] == 0, timeout=10)
        assert sched.snapshot()["tokens"] < LONG


def test_overload_answers_429_with_retry_after_then_recovers(endless):
    with running_server(endless, max_tokens_cap=LONG, max_batch=1, max_queue=1) as (url, app):
        sched = app.state.scheduler
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        long_body = {"model": "tiny", "messages": USER, "max_tokens": LONG, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as http, http.stream("POST", url + CHAT, json=long_body) as running:
            assert running.status_code == 200
            assert wait_for(lambda: sched.snapshot()["running"] == 1)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # this one waits in the queue
                queued = pool.submit(lambda: client.chat.completions.create(model="tiny", messages=USER, max_tokens=4))
                assert wait_for(lambda: sched.snapshot()["queued"] == 1)
                with pytest.raises(openai.RateLimitError) as e:
                    client.chat.completions.create(model="tiny", messages=USER, max_tokens=4)
                assert int(e.value.response.headers["retry-after"]) >= 1
                assert e.value.body["code"] == "server_busy"
                running.close()  # the long one's client leaves: the queued one runs
                assert queued.result(timeout=20).usage.completion_tokens == 4
        assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=2).usage.completion_tokens == 2


def test_stopped_decoder_answers_503_with_retry_after(served):
    with running_server(served) as (url, app):
        app.state.scheduler.close()
        r = post(url, CHAT, body=OK)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "unavailable"
        assert httpx.get(url + "/health").status_code == 503


# --------------------------------------------------------------------------------------- the command


def test_cli_serve_starts_and_answers(adapters):
    cmd = [sys.executable, "-m", "qadapter.cli", "serve", "--adapter", f"tiny={adapters['tiny']}",
           "--adapter", f"full={adapters['tiny-full']}", "--port", "0", "--threads", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600  # importing torch + transformers can take minutes on a busy machine
        lines = [""]
        while " on http://" not in lines[-1] and time.monotonic() < deadline and proc.poll() is None:
            lines.append(proc.stdout.readline())
        line = lines[-1]
        assert "http://127.0.0.1:" in line, "".join(lines)
        url = line.split(" on ")[1].split("/v1")[0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()] == ["tiny-base", "tiny", "full"]
        r = client.chat.completions.create(model="full", messages=USER, max_tokens=5, temperature=0)
        assert r.usage.completion_tokens <= 5
        assert httpx.get(url + "/").text.startswith("<!doctype html>")
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize("argv, words", [
    (["serve"], "--adapter"),
    (["serve", "--adapter", "nameonly"], "NAME=PATH"),
    (["serve", "--adapter", "x=/nonexistent/folder"], "qadapter_config.json"),
    (["serve", "--adapter", "bad name=/tmp"], "adapter name"),
    (["serve", "--adapter", "x=/tmp", "--max-batch", "0"], "--max-batch"),
])
def test_cli_serve_rejects_bad_arguments(argv, words, capsys):
    from qadapter.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert words in capsys.readouterr().err
