"""ONE strength rule at every entry point (docs/generation.md, "Strength"): on a stack, one value sets
every adapter, one value per adapter sets each, any other count is an error naming the flag or field
and the count. Checked through the CLI (generate, export), the Python API (QAdapter.generate,
QAdapterStack.generate), a server request, ``evaluation.load_policy`` and ``export``, on a saved tiny
base, a residual adapter ``one`` on it and a stack ``two`` (``one`` plus a second adapter)."""

from __future__ import annotations

import pytest

from qadapter.settings import strength_values
from server_testing import USER, one_torch_thread, running_server, save_stack, server_clients  # noqa: F401

PROMPT = "w1 w2 w3"
TOKENS = 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("strength_rule")
    return {**save_stack(root), "root": root}


@pytest.fixture(scope="module")
def stack(folders):
    from qadapter.stack import QAdapterStack

    return QAdapterStack.from_pretrained(folders["two"])


@pytest.fixture(scope="module")
def answers(stack):
    """Greedy answers of the stack at a few strengths (they differ, so a dropped setting is seen)."""
    out = {s: stack.generate([PROMPT], strengths=list(s), max_new_tokens=TOKENS, eos_token_id=[])[0]
           for s in ((1.0, 1.0), (2.0, 2.0), (0.5, 2.0))}
    assert len(set(out.values())) == 3
    return out


def test_the_rule_itself():
    assert strength_values(None, 2) is None
    assert strength_values(2, 2) == [2.0, 2.0]
    assert strength_values("2", 3) == [2.0, 2.0, 2.0]
    assert strength_values("0.5,2", 2) == [0.5, 2.0]
    assert strength_values([0.5], 2) == [0.5, 0.5]
    with pytest.raises(ValueError, match=r"--strength: 3 values for 2 adapters"):
        strength_values("1,2,3", 2, "--strength")
    with pytest.raises(ValueError, match=r"strength: a strength must be a finite number >= 0"):
        strength_values([1, float("nan")], 2)
    with pytest.raises(ValueError, match=r"--strength: 'x' is not a number"):
        strength_values("x", 2, "--strength")


def _cli(argv, capsys):
    from qadapter.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_applies_the_strength_to_a_stack(folders, answers, capsys):
    common = ["generate", PROMPT, "--adapter", folders["two"], "--max-new-tokens", str(TOKENS), "--device", "cpu"]
    # eos_token_id=[] above: the tiny model may emit its end token; the CLI stops there, so compare prefixes
    for flag, key in (("2", (2.0, 2.0)), ("0.5,2", (0.5, 2.0)), ("1", (1.0, 1.0))):
        code, out, _ = _cli(common + ["--strength", flag], capsys)
        assert code == 0
        assert answers[key].startswith(out.rstrip("\n")) and out.strip(), (flag, out, answers[key])
    outs = {flag: _cli(common + ["--strength", flag], capsys)[1] for flag in ("1", "2")}
    assert outs["1"] != outs["2"]  # --strength 2 is not ignored
    code, _, err = _cli(common + ["--strength", "1,2,3"], capsys)
    assert code == 2 and "--strength: 3 values for 2 adapters" in err and "Traceback" not in err


def test_python_api_stack_generate(stack, answers):
    kw = dict(max_new_tokens=TOKENS, eos_token_id=[])
    assert stack.generate([PROMPT], strength=2, **kw)[0] == answers[(2.0, 2.0)]
    assert stack.generate([PROMPT], strength=[0.5, 2], **kw)[0] == answers[(0.5, 2.0)]
    assert stack.generate([PROMPT], strengths=2.0, **kw)[0] == answers[(2.0, 2.0)]
    with pytest.raises(ValueError, match=r"strength: 3 values for 2 adapters"):
        stack.generate([PROMPT], strength=[1, 1, 1], **kw)


def test_python_api_qadapter_generate(folders):
    from qadapter.modeling import QAdapter

    qa = QAdapter.from_pretrained(folders["one"])
    kw = dict(max_new_tokens=TOKENS, eos_token_id=[])
    at_two = qa.generate([PROMPT], strength=2.0, **kw)[0]
    assert qa.generate([PROMPT], strength=[2.0], **kw)[0] == at_two
    q = qa.settings.q_scale
    assert qa.generate([PROMPT], alpha_0=q / 2, alpha_tilde=q / 2, **kw)[0] == at_two
    assert qa.generate([PROMPT], **kw)[0] != at_two
    with pytest.raises(ValueError, match=r"strength: 2 values for 1 adapter"):
        qa.generate([PROMPT], strength=[1.0, 2.0], **kw)


def test_load_policy(folders, answers):
    from qadapter.evaluation import load_policy

    kw = dict(max_new_tokens=TOKENS, eos_token_id=[])
    stack = load_policy(folders["two"], strength=2)
    assert stack.strengths == [2.0, 2.0]
    assert stack.generate([PROMPT], **kw)[0] == answers[(2.0, 2.0)]
    assert load_policy(folders["two"], strength=[0.5, 2]).strengths == [0.5, 2.0]
    assert load_policy(folders["two"], strengths="0.5,2").strengths == [0.5, 2.0]
    with pytest.raises(ValueError, match=r"strength: 3 values for 2 adapters"):
        load_policy(folders["two"], strength=[1, 1, 1])
    qa = load_policy(folders["one"], strength=2)
    assert qa.settings.alpha_0 == qa.settings.alpha_tilde == qa.settings.q_scale / 2
    with pytest.raises(ValueError, match=r"strength: 2 values for 1 adapter"):
        load_policy(folders["one"], strength=[1, 2])


def test_export(folders, capsys):
    from qadapter.export import export

    report = export(folders["two"], folders["root"] / "out", strengths=1)
    assert report["exact"] and report["strengths"] == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"strength: 3 values for 2 adapters"):
        export(folders["two"], folders["root"] / "bad", strengths=[1, 1, 1])
    code, _, err = _cli(["export", folders["two"], "--to", str(folders["root"] / "bad"), "--strength", "1,1,1"], capsys)
    assert code == 2 and "--strength: 3 values for 2 adapters" in err
    assert not (folders["root"] / "bad").exists()


def test_server_request(folders, answers):
    _, httpx = server_clients()
    from qadapter.server import ServedModels

    served = ServedModels.load({"two": folders["two"], "one": folders["one"]})
    with running_server(served, max_tokens_cap=32) as (url, _):
        def ask(model, **extra):
            return httpx.post(url + "/v1/chat/completions", timeout=60,
                              json={"model": model, "messages": USER, "max_tokens": TOKENS, "temperature": 0, **extra})

        # the chat template renders USER like PROMPT's single user turn
        for extra, key in (({"strength": 2}, (2.0, 2.0)), ({"strength": [0.5, 2]}, (0.5, 2.0))):
            r = ask("two", **extra)
            assert r.status_code == 200, r.text
            assert answers[key].startswith(r.json()["choices"][0]["message"]["content"]), extra
        r = ask("two", strength=[1, 1, 1])
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "strength" and "3 values for 2 adapters" in err["message"]
        r = ask("one", strength=[1, 2])
        assert r.status_code == 400 and "2 values for 1 adapter" in r.json()["error"]["message"]
        assert ask("one", strength=[2]).json()["choices"][0]["message"]["content"] == \
            ask("one", strength=2).json()["choices"][0]["message"]["content"]
