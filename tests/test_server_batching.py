"""The server's decoder, without HTTP: a row's tokens do not depend on what else is in its batch.

Every row is decoded alone and inside batches of other compositions (other prompts and lengths,
base rows, other strengths, sampled rows, other token budgets); its token ids must be identical
every time and equal to ``QAdapter.generate`` for that prompt alone.
"""

from __future__ import annotations

import threading

import pytest

from server_testing import one_torch_thread, save_adapters  # noqa: F401

from qadapter.chat import encode_prompt
from qadapter.server.batching import BatchDecoder, QueueFull, Row, Scheduler, Unavailable, _Text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from qadapter.modeling import QAdapter
    from qadapter.server import ServedModels

    paths = save_adapters(tmp_path_factory.mktemp("batching"))
    served = ServedModels.load(paths)
    return served, {name: QAdapter.from_pretrained(p) for name, p in paths.items()}


def specs(served):
    tok = served.tokenizer
    a = served.adapters["tiny"].settings
    msgs = lambda text: encode_prompt(tok, [{"role": "user", "content": text}])  # noqa: E731
    return {
        "greedy": dict(prompt_ids=msgs("w1 w2 w3"), max_new_tokens=20, adapter="tiny",
                       alphas=a.decoding_alphas(strength=1.0)),
        "strong": dict(prompt_ids=msgs("w30 w31 w32 w33 w34 w35 w36 w37 w38"), max_new_tokens=12, adapter="tiny",
                       alphas=a.decoding_alphas(strength=2.5)),
        "base": dict(prompt_ids=msgs("w7"), max_new_tokens=25, adapter=None, alphas=None),
        "sampled": dict(prompt_ids=msgs("w11 w12"), max_new_tokens=16, adapter="tiny",
                        alphas=a.decoding_alphas(strength=0.5), temperature=0.8, top_p=0.9, top_k=30, seed=5),
        "alphas": dict(prompt_ids=msgs("w50 w51 w52 w53"), max_new_tokens=18, adapter="tiny", alphas=(0.3, 1.7)),
    }


def decode(served, names, stop=()):
    rows = {}
    for name in names:
        spec = specs(served)[name]
        rows[name] = Row(emit=lambda event: None, stop=stop, **spec)
    BatchDecoder(served).decode(list(rows.values()))
    return {name: r.new_ids for name, r in rows.items()}


def reference(qa, spec):
    kwargs = dict(max_new_tokens=spec["max_new_tokens"], return_ids=True)
    if spec["alphas"] is None:
        kwargs["policy"] = "base"
    else:
        kwargs["alpha_0"], kwargs["alpha_tilde"] = spec["alphas"]
    if spec.get("temperature"):
        kwargs.update(do_sample=True, temperature=spec["temperature"], top_p=spec["top_p"], top_k=spec["top_k"],
                      seed=spec["seed"])
    return qa.generate([spec["prompt_ids"]], **kwargs)[1][0]


def test_rows_decode_the_same_in_any_batch_and_equal_qadapter_generate(setup):
    served, qas = setup
    names = list(specs(served))
    alone = {name: decode(served, [name])[name] for name in names}
    for name in names:
        assert alone[name] == reference(qas["tiny"], specs(served)[name]), name
    for batch in (names, names[::-1], ["base", "greedy"], ["sampled", "strong", "alphas"], ["greedy", "greedy"]):
        got = decode(served, batch)
        for name in set(batch):
            assert got[name] == alone[name], (name, batch)
    assert len({tuple(v) for v in alone.values()}) == len(names)  # the settings really differ


def test_a_cancelled_row_stops_and_the_others_go_on(setup):
    served, _ = setup
    alone = decode(served, ["greedy", "base"])
    s = specs(served)
    cancel_after = 3
    rows = {}

    def emit_for(name):
        def emit(event):
            r = rows[name]
            if name == "base" and len(r.new_ids) >= cancel_after:
                r.cancel()
        return emit

    for name in ("greedy", "base"):
        rows[name] = Row(emit=emit_for(name), **s[name])
    BatchDecoder(served).decode(list(rows.values()))
    assert rows["base"].finish_reason == "cancelled" and len(rows["base"].new_ids) == cancel_after
    assert rows["greedy"].new_ids == alone["greedy"]


def test_events_and_finish_reasons(setup):
    served, _ = setup
    events = []
    spec = specs(served)["greedy"]
    row = Row(emit=events.append, **spec)
    BatchDecoder(served).decode([row])
    assert events[-1] == ("done", row.finish_reason, len(row.new_ids))
    text = "".join(e[1] for e in events if e[0] == "delta")
    assert text == served.tokenizer.decode(row.new_ids, skip_special_tokens=True)
    assert row.finish_reason == ("length" if len(row.new_ids) == spec["max_new_tokens"] else "stop")


def test_text_holds_back_a_possible_stop_string(setup):
    served, _ = setup
    tok = served.tokenizer
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    text = _Text(tok, threading.Lock(), ("w1w2",))
    row = Row(prompt_ids=[5], max_new_tokens=10, emit=None)
    row.new_ids = ids("w5") + ids("w1")
    assert text.update(row, final=False) == ("w5", False)  # "w1" may begin "w1w2": held back
    row.new_ids += ids("w3")
    assert text.update(row, final=False) == ("w1w3", False)
    row.new_ids += ids("w1") + ids("w2") + ids("w9")
    assert text.update(row, final=False) == ("", True)  # the stop string ends it and is cut
    assert row.emitted == "w5w1w3"


def test_scheduler_queue_bound_grouping_and_close(setup):
    served, _ = setup
    s = specs(served)
    sched = Scheduler(served, max_batch=4, max_queue=3, batch_wait=0.0)  # not started: rows stay queued
    with pytest.raises(Unavailable):
        sched.submit([Row(emit=print, **s["greedy"])])
    sched.thread.is_alive = lambda: True  # as if running, to inspect the queue
    rows = [Row(emit=print, **s[n]) for n in ("greedy", "base", "strong")]
    sched.submit(rows)
    with pytest.raises(QueueFull) as e:
        sched.submit([Row(emit=print, **s["alphas"])])
    assert e.value.retry_after >= 1 and "3 prompts are waiting" in str(e.value)
    rows[0].cancel()  # a cancelled row no longer counts
    other = dict(s["greedy"], adapter="tiny-full", alphas=(0.5, 0.8))
    sched.submit([Row(emit=print, **other)])
    batch = sched._take()
    assert [r.adapter for r in batch] == [None, "tiny"]  # one adapter (the oldest live one) plus base rows
    assert [r.adapter for r in sched._take()] == ["tiny-full"]
    sched.close()
    assert sched._take() is None


def more_specs(served):
    """specs() plus rows of the other kinds a running batch may take in: a second one-branch row
    (the trained policy, strength 1) and a second base row."""
    tok = served.tokenizer
    a = served.adapters["tiny"].settings
    msgs = lambda text: encode_prompt(tok, [{"role": "user", "content": text}])  # noqa: E731
    return {**specs(served),
            "greedy2": dict(prompt_ids=msgs("w9 w8 w7 w6 w5"), max_new_tokens=14, adapter="tiny",
                            alphas=a.decoding_alphas(strength=1.0)),
            "base2": dict(prompt_ids=msgs("w40 w41 w42"), max_new_tokens=9, adapter=None, alphas=None)}


def decode_with_joiners(served, first, later, at_call):
    """Decode rows ``first``; at the ``at_call``-th call of admit (between two tokens), offer the
    rows ``later``: those that fit join the running batch. Returns (ids by name, joined names, stats)."""
    s = more_specs(served)
    rows = {name: Row(emit=lambda event: None, **s[name]) for name in first}
    offered = {name: Row(emit=lambda event: None, **s[name]) for name in later}
    joined, calls = [], [0]

    def admit(fits, n):
        calls[0] += 1
        if calls[0] != at_call:
            return []
        take = [name for name, r in offered.items() if fits(r)][:n]
        joined.extend(take)
        return [offered[name] for name in take]

    decoder = BatchDecoder(served)
    decoder.decode(list(rows.values()), admit=admit)
    ids = {name: r.new_ids for name, r in {**rows, **offered}.items() if name in rows or name in joined}
    return ids, joined, decoder.stats


@pytest.mark.parametrize("first, later, at_call, expect_joined", [
    # two branches running: rows of the same adapter at any strength, sampled ones and base rows all fit
    (["strong", "base"], ["sampled", "alphas", "greedy2"], 3, ["sampled", "alphas", "greedy2"]),
    # one branch running (strength 1): only rows that need no base branch fit
    (["greedy"], ["strong", "greedy2", "base2"], 2, ["greedy2"]),
    # the base model alone: only base rows
    (["base"], ["greedy", "base2"], 5, ["base2"]),
    # the running rows have all finished (12 tokens): the newcomers continue the batch by themselves
    (["strong"], ["alphas", "base2"], 12, ["alphas", "base2"]),
])
def test_rows_joining_a_running_batch_decode_what_they_decode_alone(setup, first, later, at_call, expect_joined):
    """Continuous batching: a row admitted between two tokens of a running batch (prefilled by
    itself, its KV cache merged into the batch's) decodes the same tokens as alone, and so do the
    rows it joins; rows that need another engine are not taken in."""
    served, qas = setup
    ids, joined, stats = decode_with_joiners(served, first, later, at_call)
    assert joined == expect_joined
    assert stats["rows_joined_running_batch"] == len(expect_joined)
    s = more_specs(served)
    for name, got in ids.items():
        alone = decode(served, [name])[name] if name in specs(served) else None
        if alone is None:
            row = Row(emit=lambda event: None, **s[name])
            BatchDecoder(served).decode([row])
            alone = row.new_ids
        assert got == alone, (name, first, later)
        assert got == reference(qas["tiny"], s[name]), name


def test_scheduler_lets_a_late_request_join_the_running_batch(setup):
    """Through the scheduler: a request arriving while a long one decodes starts at once (it joins
    the running batch between two tokens) and ends long before it; with continuous=False it waits
    for the running batch to end."""
    served, _ = setup
    s = more_specs(served)
    for continuous in (True, False):
        sched = Scheduler(served, max_batch=4, max_queue=8, batch_wait=0.0, continuous=continuous).start()
        events = []
        done = {name: threading.Event() for name in ("long", "late")}
        started = threading.Event()

        def emitter(name):
            def emit(event):
                events.append((name, event[0]))
                if name == "long" and event[0] == "delta":
                    started.set()
                if event[0] in ("done", "error"):
                    done[name].set()
            return emit

        long_row = Row(emit=emitter("long"), **dict(s["strong"], max_new_tokens=60))
        # no stop at eos for the long row: it must still be running when the late one arrives
        sched.decoder.eos = []
        try:
            sched.submit([long_row])
            assert started.wait(30)
            sched.submit([Row(emit=emitter("late"), **s["alphas"])])
            assert done["late"].wait(60) and done["long"].wait(60)
        finally:
            sched.close()
        finished = [name for name, kind in events if kind == "done"]
        assert finished == (["late", "long"] if continuous else ["long", "late"]), continuous
        assert sched.stats["rows_joined_running_batch"] == (1 if continuous else 0)
