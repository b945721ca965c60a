"""``qadapter serve``'s wider OpenAI API: the API key, ``/metrics``, ``n`` choices, ``logprobs`` /
``top_logprobs`` / ``echo``, and lm-eval's ``local-completions`` model against a served adapter.

Everything runs against a real uvicorn server on 127.0.0.1 with tiny models, through the real
``openai`` client, ``prometheus_client``'s parser and lm-eval's own client class.
"""

from __future__ import annotations

import math

import pytest
import torch

from server_testing import USER, one_torch_thread, running_server, save_adapters, server_clients  # noqa: F401

openai, httpx = server_clients()
prom_parser = pytest.importorskip("prometheus_client.parser")

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return save_adapters(tmp_path_factory.mktemp("served_api"))


@pytest.fixture(scope="module")
def served(adapters):
    from qadapter.server import ServedModels

    return ServedModels.load(adapters)


@pytest.fixture(scope="module")
def server(served):
    with running_server(served, max_tokens_cap=32, max_batch=8) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def qas(adapters):
    from qadapter.modeling import QAdapter

    return {name: QAdapter.from_pretrained(path) for name, path in adapters.items()}


# --------------------------------------------------------------------------------------- the API key


def test_api_key_guards_every_route_but_health(served):
    with running_server(served, max_tokens_cap=8, api_key=KEY) as (url, _):
        good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        out = good.chat.completions.create(model="tiny", messages=USER, max_tokens=3, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length")
        assert [m.id for m in good.models.list()] == ["tiny-base", "tiny", "tiny-full"]
        wrong = openai.OpenAI(base_url=url + "/v1", api_key=KEY + "x", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):  # a prefix of the key is not the key
            openai.OpenAI(base_url=url + "/v1", api_key=KEY[:-1], max_retries=0).models.list()
        for path in ("/v1/models", "/v1/models/tiny", "/metrics", "/v1/nothing"):
            r = httpx.get(url + path)
            assert r.status_code == 401, (path, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and "Authorization: Bearer" in err["message"]
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "w1", "max_tokens": 2},
                       headers={"Authorization": "Basic " + KEY})
        assert r.status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/").status_code == 200  # the playground's page; its API calls send the key
        script = httpx.get(url + "/static/playground.js").text
        assert "Authorization: `Bearer ${key}`" in script
        r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        families = {f.name: f for f in prom_parser.text_string_to_metric_families(r.text)}
        statuses = {s.labels["status"] for s in families["qadapter_requests"].samples
                    if s.name == "qadapter_requests_total"}
        assert {"200", "401"} <= statuses  # refused requests are counted too


def test_api_key_from_the_environment(monkeypatch, tmp_path):
    from qadapter.commands import serve as serve_cmd

    seen = {}
    monkeypatch.setenv("QADAPTER_API_KEY", "from-env")
    monkeypatch.setattr("qadapter.server.ServedModels.load", classmethod(lambda cls, *a, **k: _Fake()))
    monkeypatch.setattr("qadapter.server.app.serve", lambda served, **kw: seen.update(kw) or 0)
    import argparse

    parser = argparse.ArgumentParser()
    serve_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--adapter", f"a={tmp_path}"])
    assert serve_cmd.run(args) == 0 and seen["api_key"] == "from-env"
    args = parser.parse_args(["serve", "--adapter", f"a={tmp_path}", "--api-key", "flag"])
    assert serve_cmd.run(args) == 0 and seen["api_key"] == "flag"
    monkeypatch.delenv("QADAPTER_API_KEY")
    args = parser.parse_args(["serve", "--adapter", f"a={tmp_path}"])
    assert serve_cmd.run(args) == 0 and seen["api_key"] is None


class _Fake:
    def names(self):
        return ["base", "a"]


# --------------------------------------------------------------------------------------- /metrics


def scrape(url) -> dict[tuple, float]:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in prom_parser.text_string_to_metric_families(r.text) for s in f.samples}


def test_metrics_move_by_the_measured_amounts(client, server):
    url = server[0]
    before = scrape(url)
    answers = [client.chat.completions.create(model="tiny", messages=USER, max_tokens=n, temperature=0)
               for n in (2, 5)]
    answers.append(client.completions.create(model="tiny-base", prompt="w1 w2", max_tokens=3, temperature=0))
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = chunks[-1].usage
    assert httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": USER, "n": "x"}).status_code == 400
    after = scrape(url)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    chat = "/v1/chat/completions"
    assert moved("qadapter_requests_total", endpoint=chat, status="200") == 3
    assert moved("qadapter_requests_total", endpoint="/v1/completions", status="200") == 1
    assert moved("qadapter_requests_total", endpoint=chat, status="400") == 1
    assert moved("qadapter_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    assert moved("qadapter_generated_tokens_total", model="tiny") == (
        sum(a.usage.completion_tokens for a in answers[:2]) + streamed.completion_tokens)
    assert moved("qadapter_prompt_tokens_total", model="tiny") == (
        sum(a.usage.prompt_tokens for a in answers[:2]) + streamed.prompt_tokens)
    assert moved("qadapter_generated_tokens_total", model="tiny-base") == answers[2].usage.completion_tokens
    assert moved("qadapter_request_latency_seconds_count", endpoint=chat) == 4
    assert moved("qadapter_request_latency_seconds_sum", endpoint=chat) > 0
    assert moved("qadapter_time_to_first_token_seconds_count", endpoint=chat) == 3  # the 400 generated nothing
    assert moved("qadapter_request_latency_seconds_bucket", endpoint=chat, le="+Inf") == 4
    assert after[("qadapter_queue_depth", ())] == 0 and after[("qadapter_running_rows", ())] == 0


# --------------------------------------------------------------------------------------- n choices


def test_n_sampled_choices_are_indexed_seeded_and_summed(client):
    one = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=1.0, seed=7)
    many = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=1.0, seed=7, n=4,
                                          logprobs=True)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].message.content == one.choices[0].message.content  # choice j samples with seed + j
    assert len({c.message.content for c in many.choices}) > 1
    assert many.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once
    # the end-of-turn token is counted in usage, not listed in logprobs (as OpenAI lists them)
    assert many.usage.completion_tokens == sum(len(c.logprobs.content) + (c.finish_reason == "stop")
                                               for c in many.choices)


def test_n_greedy_gives_identical_copies_like_openai(client):
    out = client.completions.create(model="tiny", prompt=["w1 w2", "w3"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt i's j-th choice is i * n + j
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0).choices[0].text
             for p in ("w1 w2", "w3")]
    assert [c.text for c in out.choices] == [alone[0], alone[0], alone[1], alone[1]]


# --------------------------------------------------------------------------------------- logprobs


def reference_logprobs(qa, ids, model, strength=None):
    """log π(·|prefix) at every position by a plain full forward: π1 for the base, π̃ for an adapter."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = qa.base_logits(x) if model == "tiny-base" else qa.logits(x, strength=strength)
    return torch.log_softmax(logits[0].float(), dim=-1)


@pytest.mark.parametrize("model, strength", [("tiny", None), ("tiny", 0.5), ("tiny-base", None)])
def test_completion_echo_logprobs_equal_the_reference_policy(client, served, qas, model, strength):
    from qadapter.chat import encode_prompt

    text = "w1 w2 w3 w4"
    prompt = encode_prompt(served.tokenizer, text, raw_text=True)
    extra = {"strength": strength} if strength is not None else {}
    out = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=5,
                                    extra_body=extra)
    choice = out.choices[0]
    lp = choice.logprobs
    _, new = qas["tiny"].generate([text], return_ids=True, max_new_tokens=4, raw_text=True,
                                  **({"policy": "base"} if model == "tiny-base" else extra))
    ids = prompt + list(new[0])
    if choice.finish_reason == "stop" and ids[-1] == served.tokenizer.eos_token_id:
        ids = ids[:-1]  # the end-of-turn token ends the answer and is not listed
    assert len(lp.tokens) == len(ids) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == choice.text and lp.text_offset[-1] == len(choice.text) - len(lp.tokens[-1])
    ref = reference_logprobs(qas["tiny"], ids, model, strength)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
        top = lp.top_logprobs[t]
        values = list(top.values())
        assert values == sorted(values, reverse=True) and len(values) == 5
        want = ref[t - 1].topk(5).values.tolist()
        assert values == pytest.approx(want, abs=1e-4)
        if ref[t - 1, ids[t]] >= want[-1]:
            assert lp.tokens[t] in top
    # greedy tokens are the policy's argmax: each is its position's best alternative
    for t in range(len(prompt), len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(max(lp.top_logprobs[t].values()), abs=1e-6)


def test_chat_logprobs_and_top_logprobs(client, served, qas):
    from qadapter.chat import encode_prompt

    out = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=1.0, seed=3,
                                         logprobs=True, top_logprobs=3, extra_body={"strength": 2.0})
    content = out.choices[0].logprobs.content
    assert "".join(c.token for c in content) == out.choices[0].message.content
    assert len(content) == out.usage.completion_tokens - (out.choices[0].finish_reason == "stop")
    prompt = encode_prompt(served.tokenizer, USER)
    ids = prompt + [served.tokenizer.convert_tokens_to_ids(c.token) for c in content]
    ref = reference_logprobs(qas["tiny"], ids, "tiny", 2.0)
    for k, c in enumerate(content):
        t = len(prompt) + k
        assert c.logprob == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
        assert bytes(c.bytes).decode() == c.token
        tops = [a.logprob for a in c.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert tops == pytest.approx(ref[t - 1].topk(3).values.tolist(), abs=1e-4)
        if c.logprob >= tops[-1] + 1e-6:
            assert c.token in [a.token for a in c.top_logprobs]
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, logprobs=True)
    assert all(c.top_logprobs == [] for c in plain.choices[0].logprobs.content)
    off = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert off.choices[0].logprobs is None


def test_logprobs_list_the_tokens_of_the_text_returned_before_a_stop_string(client):
    full = client.completions.create(model="tiny", prompt="w1 w2", max_tokens=8, temperature=0, logprobs=1)
    tokens = full.choices[0].logprobs.tokens
    assert "".join(tokens) == full.choices[0].text and len(tokens) >= 4
    stop = tokens[2] + tokens[3]
    assert full.choices[0].text.find(stop) == len(tokens[0] + tokens[1])  # the stop string's first place
    cut = client.completions.create(model="tiny", prompt="w1 w2", max_tokens=8, temperature=0, logprobs=1, stop=[stop])
    choice = cut.choices[0]
    assert choice.finish_reason == "stop" and choice.text == tokens[0] + tokens[1]
    assert choice.logprobs.tokens == tokens[:2]
    assert choice.logprobs.token_logprobs == pytest.approx(full.choices[0].logprobs.token_logprobs[:2], abs=1e-6)


def test_echo_with_max_tokens_zero_scores_the_prompt_only(client, served, qas):
    from qadapter.scoring import score

    prompt = [1, 10, 11, 12, 13]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    lp = out.choices[0].logprobs
    assert out.usage.completion_tokens == 0 and len(lp.token_logprobs) == len(prompt)
    qa = qas["tiny"]
    want = score(qa.model, [(prompt[:1], prompt[1:])], settings=qa.settings, top_logprobs=0)
    assert lp.token_logprobs[1:] == pytest.approx(want.token_logprobs["customized"][0], abs=1e-5)
    assert sum(lp.token_logprobs[1:]) == pytest.approx(want.logprobs["customized"][0], abs=1e-4)


@pytest.mark.parametrize("body, param, words", [
    ({"model": "tiny", "prompt": "w1", "logprobs": 2, "stream": True}, "logprobs", "cannot be streamed"),
    ({"model": "tiny", "prompt": "w1", "echo": True, "stream": True}, "echo", "cannot be streamed"),
    ({"model": "tiny", "prompt": "w1", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"model": "tiny", "prompt": "w1", "logprobs": 21}, "logprobs", "<= 20"),
    ({"model": "tiny", "prompt": "w1", "logprobs": True}, "logprobs", "integer"),
])
def test_logprobs_errors_name_the_field(server, body, param, words):
    r = httpx.post(server[0] + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


# --------------------------------------------------------------------------------------- lm-eval


def test_lm_eval_local_completions_loglikelihoods_equal_the_scorer(server, served, qas, adapters):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from qadapter.scoring import score

    tokenizer_dir = str(__import__("pathlib").Path(adapters["tiny"]).parent / "tiny-base")
    lm = LocalCompletionsAPI(base_url=server[0] + "/v1/completions", model="tiny", tokenizer_backend="huggingface",
                             tokenizer=tokenizer_dir, max_retries=1, timeout=60, num_concurrent=1)
    pairs = [("w1 w2", " w3"), ("w5 w6 w7", " w8 w9"), ("w1 w2", " w4 w4 w4")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    tok = served.tokenizer
    qa = qas["tiny"]
    scorer_requests = []
    for c, x in pairs:  # lm-eval's split: the continuation is what the whole adds to the context
        context, whole = tok(c, add_special_tokens=False).input_ids, tok(c + x, add_special_tokens=False).input_ids
        scorer_requests.append((context, whole[len(context):]))
    want = score(qa.model, scorer_requests, settings=qa.settings, greedy=True)
    for (ll, greedy), w, g in zip(got, want.logprobs["customized"], want.greedy["customized"]):
        assert math.isfinite(ll) and ll == pytest.approx(w, abs=1e-4)
        assert greedy == g


def test_logprobs_while_other_adapters_decode(client, served, qas):
    """Log-probs stay exact while requests to another adapter decode at the same time (the decoder
    switches the PEFT adapter). A smoke test: the tiny model's race window is too small for it to
    catch a scorer that did not wait; the next test checks the waiting itself."""
    import concurrent.futures

    from qadapter.chat import encode_prompt

    text = "w3 w1 w4"
    prompt = encode_prompt(served.tokenizer, text, raw_text=True)

    def scored():
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
        return out.choices[0].logprobs.token_logprobs

    def other():
        return client.chat.completions.create(model="tiny-full", messages=USER, max_tokens=24, temperature=1.0)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(other) for _ in range(4)]
        got = [pool.submit(scored) for _ in range(4)]
        assert all(f.result().choices[0].finish_reason in ("stop", "length") for f in busy)
        got = [f.result() for f in got]
    ref = reference_logprobs(qas["tiny"], prompt, "tiny")
    want = [ref[t - 1, prompt[t]].item() for t in range(1, len(prompt))]
    for lps in got:
        assert lps[1:] == pytest.approx(want, abs=1e-4)


def test_scoring_waits_until_the_decoder_is_between_batches(server):
    """While the decoder runs a batch (``running > 0``) a logprobs request is not scored; it is as
    soon as the batch ends (the decoder's end-of-batch notify)."""
    import concurrent.futures
    import time

    sched = server[1].state.scheduler
    body = {"model": "tiny", "prompt": [1, 10, 11], "max_tokens": 0, "echo": True, "logprobs": 0}
    with sched.cv:
        assert sched.running == 0
        sched.running = 1  # what the decoder sets while it decodes a batch
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, server[0] + "/v1/completions", json=body, timeout=30)
            time.sleep(1.0)
            assert not answer.done()
            with sched.cv:
                sched.running = 0
                sched.cv.notify_all()
            r = answer.result(timeout=20)
    finally:
        with sched.cv:
            sched.running = 0
            sched.cv.notify_all()
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == 3
