"""Fluency (qadapter/evaluation/fluency.py): the per-answer statistics on known texts (a loop is
counted, an empty answer is left out of the NLL and counted), the base NLL equal to the base
model's own log-likelihood of the answer, and a Q-Adapter at several strengths. Tiny models only;
the ``fluency`` entry of ``qadapter compare`` is run in tests/test_ifeval.py."""

from __future__ import annotations

import pytest
import torch

from test_compare import byte_level_tokenizer
from test_ifeval import at_strength, tiny_qadapter  # noqa: F401 - the fixture
from qadapter.chat import as_messages, encode_prompt
from qadapter.evaluation import HFPolicy, base_policy
from qadapter.evaluation.fluency import FLUENCY_PROMPTS, answer_statistics, distinct_n, evaluate_fluency
from qadapter.evaluation.policy import encode

PROMPTS = ["w1 w2 tell me", "what is w3", "say w4 w5", "hello"]


class Scripted:
    """A policy answering each prompt with a prepared text."""

    def __init__(self, answers, tokenizer):
        self.answers, self.tokenizer = answers, tokenizer

    def generate(self, prompts, *, max_new_tokens, **kwargs):
        return [self.answers[p[-1]["content"]] for p in prompts]


def test_statistics_of_known_answers():
    loop = "I can help. " * 10
    assert distinct_n("a b c d") == 1.0 and distinct_n("a b a b") == pytest.approx(2 / 3) and distinct_n("one") is None
    stats = answer_statistics(["the cat sat on the mat", loop, "", "word"], [6, 30, 0, 64], max_new_tokens=64)
    assert [s["repeated_4grams"] for s in stats] == [0.0, pytest.approx(24 / 27), 0.0, 0.0]
    assert stats[1]["distinct_2"] == pytest.approx(3 / 29) and stats[0]["distinct_2"] == 1.0
    assert [s["distinct_2"] for s in stats[2:]] == [None, None]
    assert [s["at_cap"] for s in stats] == [0.0, 0.0, 0.0, 1.0]


def test_the_base_nll_is_the_base_models_own_likelihood_and_a_loop_is_counted(tiny_qadapter):
    qa, tok = tiny_qadapter
    base = base_policy(qa)
    answers = {"w1 w2 tell me": "Sure, here it is.", "what is w3": "It is w3. " * 8, "say w4 w5": "", "hello": "Hi!"}
    result = evaluate_fluency(Scripted(answers, tok), base, prompts=PROMPTS, max_new_tokens=16, batch_size=3,
                              progress=False, n_boot=200)
    assert result.n == 4 and result.primary == "repeated_4grams"
    by = {s["answer"]: s for s in result.samples}
    assert by["It is w3. " * 8]["repeated_4grams"] > 0.7 and by["Sure, here it is."]["repeated_4grams"] == 0
    assert result.score == pytest.approx(by["It is w3. " * 8]["repeated_4grams"] / 4)
    # the empty answer: no NLL, no bigram, counted
    assert by[""]["base_nll"] is None and result.extra["empty_answers"] == 1 and result.extra["no_bigram"] == 2
    # the NLL of each answer is π1's own: the adapter switched off, computed here by a plain forward
    with qa.model.disable_adapter():
        for prompt in PROMPTS:
            ids = encode(tok, answers[prompt])
            if not ids:
                continue
            context = encode_prompt(tok, as_messages(prompt))
            logits = qa.model(torch.tensor([context + ids])).logits[0, len(context) - 1:-1].float()
            nll = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).mean().item()
            assert by[answers[prompt]]["base_nll"] == pytest.approx(nll, abs=1e-4)
    nlls = [s["base_nll"] for s in result.samples if s["base_nll"] is not None]
    assert result["base_nll"] == pytest.approx(sum(nlls) / 3)
    m = result.metrics["length"]
    assert m.ci_low <= m.value <= m.ci_high and m.ci_low < m.ci_high


def test_a_qadapter_at_several_strengths(tiny_qadapter):
    qa, tok = tiny_qadapter
    kw = dict(prompts=PROMPTS, max_new_tokens=10, batch_size=2, progress=False, n_boot=100)
    runs = {s: at_strength(qa, s, lambda: evaluate_fluency(qa, base_policy(qa), **kw)) for s in (0.25, 1, 4)}
    plain = evaluate_fluency(HFPolicy(qa.model, tok), base_policy(HFPolicy(qa.model, tok)), **kw)
    # strength 1 is the trained adapter model itself: the same answers, the same base NLL
    assert [s["answer"] for s in runs[1].samples] == [s["answer"] for s in plain.samples]
    assert [s["base_nll"] for s in runs[1].samples] == pytest.approx([s["base_nll"] for s in plain.samples], abs=1e-5)
    answers = {s: [x["answer"] for x in r.samples] for s, r in runs.items()}
    assert answers[4] != answers[1] and answers[0.25] != answers[4]
    # the base model's answers are what π1 finds most natural: a lower NLL than the amplified adapter's
    base = evaluate_fluency(base_policy(qa), base_policy(qa), **kw)
    assert base["base_nll"] < runs[4]["base_nll"]


def test_default_prompts_are_100_of_the_kl_evaluations_general_prompts():
    from qadapter.evaluation import load_general_prompts, subsample

    assert FLUENCY_PROMPTS == 100 and len(load_general_prompts()) >= 100
    seen = []

    class Recorder:
        tokenizer = byte_level_tokenizer()

        def generate(self, prompts, *, max_new_tokens, **kwargs):
            seen.extend(p[-1]["content"] for p in prompts)
            return [""] * len(prompts)

    result = evaluate_fluency(Recorder(), None, progress=False, n_boot=10)  # empty answers: the base scores nothing
    assert result.n == 100 and sorted(seen) == sorted(subsample(load_general_prompts(), 100, 0))
