"""IFEval (qadapter/evaluation/ifeval.py): the shipped prompts, lm-eval's own checkers on known
answers (a broken instruction is counted, strict and loose differ where the harness says), a
missing punkt_tab raised instead of scored, the intervals, a Q-Adapter at several strengths, and
the ``ifeval`` entry of ``qadapter compare`` (cached, one point per strength). Tiny models only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import randomize_lora, tiny_llama
from test_compare import byte_level_tokenizer, job_and_config, write_jsonl
from qadapter.evaluation import HFPolicy, base_policy
from qadapter.evaluation.ifeval import (MissingNLTKData, NLTK_DATA_PACKAGE, ensure_nltk_data, evaluate_ifeval,
                                        ifeval_metrics, load_ifeval, score_ifeval)

SHIPPED = load_ifeval()


def doc(key):
    return next(d for d in SHIPPED if d["key"] == key)


class Scripted:
    """A policy that answers each prompt with a prepared text (what the checkers then score)."""

    def __init__(self, answers, tokenizer=None):
        self.answers, self.tokenizer, self.asked = answers, tokenizer, []

    def generate(self, prompts, *, max_new_tokens, **kwargs):
        self.asked += [p[-1]["content"] for p in prompts]
        return [self.answers[p[-1]["content"]] for p in prompts]


def test_the_shipped_prompts_are_the_541_of_ifeval_with_their_licence():
    from qadapter.evaluation.benchmarks import DATA_DIR

    assert len(SHIPPED) == 541 and len({d["key"] for d in SHIPPED}) == 541
    assert sum(len(d["instruction_id_list"]) for d in SHIPPED) == 834
    assert "Apache License" in (DATA_DIR / "ifeval" / "LICENSE.Apache-2.0").read_text()
    assert "ifeval/" in (DATA_DIR / "PROVENANCE.md").read_text()


def test_a_malformed_row_is_named_by_file_and_line(tmp_path):
    write_jsonl(tmp_path / "ifeval" / "input_data.jsonl", [doc(3615), {"key": 1, "prompt": "hi", "kwargs": [{}]}])
    with pytest.raises(ValueError, match=r"input_data.jsonl, line 2: missing instruction_id_list"):
        load_ifeval(tmp_path)


def test_lm_evals_checkers_score_known_answers():
    no_comma = doc(3615)  # "Write a riddle about Camilla that doesn't use commas." (punctuation:no_comma)
    assert no_comma["instruction_id_list"] == ["punctuation:no_comma"]
    lowercase = next(d for d in SHIPPED if d["instruction_id_list"] == ["change_case:english_lowercase"])
    sentences = next(d for d in SHIPPED if d["instruction_id_list"] == ["length_constraints:number_sentences"])
    limit = sentences["kwargs"][0]["num_sentences"]
    relation = sentences["kwargs"][0]["relation"]
    few, many = "One sentence here.", " ".join(f"Sentence number {i} is here." for i in range(limit + 3))
    fits = few if relation == "less than" else many
    breaks = many if relation == "less than" else few
    docs = [no_comma, no_comma, lowercase, lowercase, sentences, sentences, no_comma]
    answers = ["Who wears a crown and rides a horse but is not a king", "Red, white and blue",
               "all in lowercase here", "Not In Lowercase",
               fits, breaks,
               "Sure, here it is:\nA riddle with no commas at all"]  # strict fails, loose drops the first line
    records = score_ifeval(docs, answers)
    assert [r["prompt_level_strict_acc"] for r in records] == [True, False, True, False, True, False, False]
    assert [r["prompt_level_loose_acc"] for r in records] == [True, False, True, False, True, False, True]
    assert [r["inst_level_strict_acc"] for r in records][:2] == [[True], [False]]
    metrics = ifeval_metrics(records, n_boot=200)
    assert metrics["prompt_level_strict_acc"].value == pytest.approx(3 / 7)
    assert metrics["prompt_level_loose_acc"].value == pytest.approx(4 / 7)


def test_instruction_level_accuracy_pools_instructions_and_resamples_prompts():
    records = [{"prompt_level_strict_acc": False, "prompt_level_loose_acc": False,
                "inst_level_strict_acc": [True, False, False], "inst_level_loose_acc": [True, True, False]},
               {"prompt_level_strict_acc": True, "prompt_level_loose_acc": True,
                "inst_level_strict_acc": [True], "inst_level_loose_acc": [True]}] * 10
    m = ifeval_metrics(records, n_boot=500, seed=3)
    assert m["inst_level_strict_acc"].value == pytest.approx(2 / 4)  # pooled: 20 of 40, not the mean of 1/3 and 1
    assert m["inst_level_loose_acc"].value == pytest.approx(3 / 4)
    assert m["prompt_level_strict_acc"].value == pytest.approx(0.5)
    for metric in m.values():
        assert metric.ci_low < metric.value < metric.ci_high
    # every prompt alike: nothing to resample, a zero-width interval
    same = ifeval_metrics(records[:1] * 5, n_boot=100)["inst_level_strict_acc"]
    assert same.ci_low == same.value == same.ci_high == pytest.approx(1 / 3)


def test_missing_punkt_raises_before_generating_and_is_never_scored_as_failed(monkeypatch, tmp_path):
    import nltk
    from lm_eval.tasks.ifeval import instructions_util

    ensure_nltk_data()  # found where the package ships it
    sentences = next(d for d in SHIPPED if d["instruction_id_list"] == ["length_constraints:number_sentences"])

    # a checker whose data lookup fails raises: the instruction is not counted as not followed
    def no_punkt(text):
        raise LookupError("Resource punkt_tab not found.")

    monkeypatch.setattr(instructions_util, "count_sentences", no_punkt)
    with pytest.raises(MissingNLTKData, match=NLTK_DATA_PACKAGE):
        score_ifeval([sentences], ["One. Two. Three."])
    monkeypatch.undo()

    # without the package and with nothing on NLTK's path: a clear error, and nothing generated
    monkeypatch.setattr("qadapter.evaluation.ifeval.nltk_data_dir", lambda: None)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    policy = Scripted({})
    with pytest.raises(MissingNLTKData, match=f"pip install {NLTK_DATA_PACKAGE}"):
        evaluate_ifeval(policy, limit=2, progress=False)
    assert policy.asked == []


def test_evaluate_ifeval_scores_the_policys_answers(tmp_path):
    docs = [doc(3615)] + [d for d in SHIPPED if d["instruction_id_list"] == ["change_case:english_lowercase"]][:2]
    write_jsonl(tmp_path / "ifeval" / "input_data.jsonl", docs)
    answers = {docs[0]["prompt"]: "No commas here", docs[1]["prompt"]: "all lowercase", docs[2]["prompt"]: "UPPER"}
    policy = Scripted(answers)
    result = evaluate_ifeval(policy, data_dir=tmp_path, progress=False, n_boot=200)
    assert sorted(policy.asked) == sorted(answers)  # each prompt a user turn
    assert result.n == 3 and result.primary == "prompt_level_strict_acc"
    assert result.score == pytest.approx(2 / 3) and result["inst_level_loose_acc"] == pytest.approx(2 / 3)
    assert [s["response"] for s in result.samples] == [answers[d["prompt"]] for d in docs]
    assert result.config["max_new_tokens"] == 256 and result.extra["n_instructions"] == 3
    # a limit draws a seeded subsample: the same prompts every time
    assert [s["key"] for s in evaluate_ifeval(Scripted(answers), data_dir=tmp_path, limit=2, seed=1,
                                              progress=False).samples] == \
        [s["key"] for s in evaluate_ifeval(Scripted(answers), data_dir=tmp_path, limit=2, seed=1,
                                           progress=False).samples]


@pytest.fixture(scope="module")
def tiny_qadapter():
    from peft import LoraConfig, get_peft_model

    from qadapter.modeling import QAdapter
    from qadapter.settings import QAdapterSettings

    tok = byte_level_tokenizer()
    model = get_peft_model(tiny_llama(vocab_size=len(tok)), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                        target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, seed=1, scale=2.0)
    return QAdapter(model.eval(), tok, QAdapterSettings(alpha_tilde=0.5)), tok


def short_docs(n):
    return sorted(SHIPPED, key=lambda d: len(d["prompt"]))[:n]


def at_strength(qa, strength, fn):
    saved = qa.settings.alpha_0, qa.settings.alpha_tilde
    qa.settings.alpha_0, qa.settings.alpha_tilde = qa.settings.decoding_alphas(strength=strength)
    try:
        return fn()
    finally:
        qa.settings.alpha_0, qa.settings.alpha_tilde = saved


def test_a_qadapter_at_several_strengths(tiny_qadapter, tmp_path):
    qa, tok = tiny_qadapter
    write_jsonl(tmp_path / "ifeval" / "input_data.jsonl", short_docs(4))
    kw = dict(data_dir=tmp_path, max_new_tokens=12, batch_size=2, progress=False, n_boot=100)
    answers = {s: [x["response"] for x in at_strength(qa, s, lambda: evaluate_ifeval(qa, **kw)).samples]
               for s in (0.25, 1, 4)}
    plain = [x["response"] for x in evaluate_ifeval(HFPolicy(qa.model, tok), **kw).samples]
    assert answers[1] == plain  # strength 1 is the trained adapter model itself
    assert answers[4] != answers[1] and answers[0.25] != answers[4]  # a strength changes what is generated
    base = [x["response"] for x in evaluate_ifeval(base_policy(qa), **kw).samples]
    assert base == [x["response"] for x in at_strength(qa, 4, lambda: evaluate_ifeval(base_policy(qa), **kw)).samples]


def test_compare_runs_ifeval_and_fluency_per_strength_and_caches_them(tmp_path):
    from qadapter.recipes.compare import DEFAULT_BENCHMARKS, run_comparison

    assert "ifeval" not in DEFAULT_BENCHMARKS and "fluency" not in DEFAULT_BENCHMARKS  # opt-in: generation-heavy
    tok = byte_level_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    conv = lambda p, a: [{"role": "user", "content": p}, {"role": "assistant", "content": a}]  # noqa: E731
    write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": conv(f"w{i} w{i + 1}", f"w3{i % 10} w4"),
                                            "rejected": conv(f"w{i} w{i + 1}", "w50 w51 w52")} for i in range(12)])
    bench = tmp_path / "bench"
    write_jsonl(bench / "ifeval" / "input_data.jsonl", short_docs(3))
    write_jsonl(bench / "ultrafeedback_prompts" / "prompts.jsonl", [{"prompt": f"w{i} w12 w13"} for i in range(5)])
    job, config = job_and_config(tmp_path, learning_rate=0.1)
    kw = dict(methods=["qadapter"], strengths=[0.5, 1, 3], benchmarks=["ifeval", "fluency"],
              limits={"ifeval": 3, "fluency": 4, "preferences": 2}, max_new_tokens=6, eval_batch_size=4,
              data_dir=bench, progress=False, log=lambda *a: None)
    first = run_comparison(tmp_path / "out", job, config, **kw)
    points = ["base", "qadapter@0.5", "qadapter@1", "qadapter@3"]
    assert sorted(first.computed) == sorted((p, e) for p in points for e in ("ifeval", "fluency", "preferences"))
    for p in points:
        ifeval, fluency = first.results[p]["ifeval"], first.results[p]["fluency"]
        assert ifeval["n"] == 3 and fluency["n"] == 4
        for result in (ifeval, fluency):
            for name, m in result["metrics"].items():
                if np.isnan(m["value"]):  # random bytes without a space: no answer has a word bigram
                    assert name == "distinct_2" and result["extra"]["no_bigram"] == result["n"]
                else:
                    assert m["ci_low"] <= m["value"] <= m["ci_high"]
    stored = [json.loads(f.read_text()) for f in (tmp_path / "out" / "eval").rglob("ifeval.json")]
    assert len(stored) == 4 and all(x["key"]["max_new_tokens"] == 6 for x in stored)
    answers = {p: [s["answer"] for s in first.results[p]["fluency"]["samples"]] for p in points}
    assert answers["qadapter@3"] != answers["qadapter@0.5"]  # each strength decodes its own answers
    md = (tmp_path / "out" / "results.md").read_text()
    assert "IFEval prompt strict" in md and "fluency: repeated 4-grams" in md
    again = run_comparison(tmp_path / "out", job, config, **kw)
    assert again.computed == [] and (again.results["qadapter@3"]["fluency"]["samples"]
                                     == first.results["qadapter@3"]["fluency"]["samples"])
    longer = run_comparison(tmp_path / "out", job, config, **{**kw, "max_new_tokens": 7})
    assert sorted(longer.computed) == sorted((p, e) for p in points for e in ("ifeval", "fluency"))
    assert np.isfinite(longer.results["base"]["fluency"]["metrics"]["base_nll"]["value"])
