"""``qadapter serve`` serves a stack (``qadapter train --on``) beside single adapters of the same base:
greedy answers equal ``QAdapterStack.generate`` at the saved, a scalar and per-adapter strengths, in
one batch with a single adapter's and the base's rows; bad strengths are 400s naming the field."""

from __future__ import annotations

import pytest
import torch

from server_testing import USER, one_torch_thread, running_server, save_stack, server_clients  # noqa: F401

openai, httpx = server_clients()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved tiny base, a residual adapter ``one`` on it, and a stack ``two`` (server_testing.save_stack)."""
    return save_stack(tmp_path_factory.mktemp("stack_served"))


@pytest.fixture(scope="module")
def server(folders):
    from qadapter.server import ServedModels

    served = ServedModels.load(folders)
    with running_server(served, max_tokens_cap=32) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def stack(folders):
    from qadapter.stack import QAdapterStack

    return QAdapterStack.from_pretrained(folders["two"])


def test_model_card_says_stack(client, server):
    cards = httpx.get(server[0] + "/v1/models").json()["data"]
    kinds = {c["id"]: c["qadapter"]["kind"] for c in cards}
    assert kinds == {"tiny-base": "base", "one": "adapter", "two": "stack"}
    two = next(c for c in cards if c["id"] == "two")["qadapter"]
    assert two["adapters"] == 2 and two["strengths"] == [1.0, 1.0]


@pytest.mark.parametrize("extra, strengths", [({}, None), ({"strength": 0.5}, [0.5, 0.5]),
                                              ({"strengths": [1.0, 2.0]}, [1.0, 2.0]),
                                              ({"strengths": [0.0, 1.0]}, [0.0, 1.0]),
                                              ({"strength": [1.0, 2.0]}, [1.0, 2.0]), ({"strength": [0.5]}, [0.5, 0.5])])
def test_greedy_stack_answer_equals_qadapter_stack_generate(client, stack, extra, strengths):
    want = stack.generate([USER], strengths=strengths, max_new_tokens=20)[0]
    r = client.chat.completions.create(model="two", messages=USER, max_tokens=20, temperature=0,
                                       extra_body=extra or None)
    assert r.choices[0].message.content == want


def test_strengths_change_the_stack_answer(stack):
    answers = {tuple(s): stack.generate([USER], strengths=s, max_new_tokens=20)[0] for s in ([1, 1], [0, 0], [1, 3])}
    assert len(set(answers.values())) > 1  # the test above compares policies that really differ


def test_stack_rows_share_a_batch_with_other_models_and_keep_their_answers(server, folders, stack):
    """Concurrent requests for the stack at two strengths, the single adapter and the base: every
    answer equals the one its model gives alone."""
    import concurrent.futures

    from qadapter.modeling import QAdapter

    one = QAdapter.from_pretrained(folders["one"])
    with torch.no_grad():
        want = {("two", None): stack.generate([USER], max_new_tokens=16)[0],
                ("two", (1.0, 2.0)): stack.generate([USER], strengths=[1.0, 2.0], max_new_tokens=16)[0],
                ("one", None): one.generate([USER], max_new_tokens=16)[0],
                ("tiny-base", None): one.generate([USER], policy="base", max_new_tokens=16)[0]}

    def ask(key):
        model, strengths = key
        body = {"model": model, "messages": USER, "max_tokens": 16, "temperature": 0}
        if strengths:
            body["strengths"] = list(strengths)
        return key, httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=60).json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, list(want) * 2))
    for key, body in got:
        assert body["choices"][0]["message"]["content"] == want[key], key


@pytest.mark.parametrize("body, param, words", [
    ({"strengths": [1.0, 1.0, 1.0]}, "strengths", "3 values for 2 adapters"),
    ({"strength": [1.0, 1.0, 1.0]}, "strength", "3 values for 2 adapters"),
    ({"strengths": "1,1"}, "strengths", "array"),
    ({"strengths": [1.0, -1.0]}, "strengths[1]", ">= 0"),
    ({"strengths": [1.0, float("nan")]}, "strengths[1]", "finite"),
    ({"strengths": [1.0, 1.0], "strength": 2}, "strengths", "not both"),
    ({"alpha_0": 0.5}, "alpha_0", "stack"),
    ({"logprobs": True}, "logprobs", "a stack"),
])
def test_bad_stack_strengths_are_400s_naming_the_field(server, body, param, words):
    r = httpx.post(server[0] + "/v1/chat/completions", timeout=30,
                   content=_json({"model": "two", "messages": USER, "max_tokens": 4, **body}),
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]


def test_strengths_on_a_single_adapter_is_a_400(server):
    r = httpx.post(server[0] + "/v1/chat/completions", timeout=30,
                   json={"model": "one", "messages": USER, "max_tokens": 4, "strengths": [1.0]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "strengths"


def _json(obj) -> bytes:
    import json

    return json.dumps(obj, allow_nan=True).encode()
