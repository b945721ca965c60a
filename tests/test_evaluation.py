"""qadapter.evaluation: known answers on hand-made inputs, tiny random models built in-process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qadapter.evaluation import (ConstantJudge, EvalResult, HFPolicy, MCItem, QAdapterBaseView, RewardModelJudge,
                                 base_policy, bbh_match, bootstrap_ci, continuation_logprobs, evaluate_arc,
                                 evaluate_bbh, evaluate_gsm8k, evaluate_mmlu, evaluate_preferences,
                                 extract_bbh_answer, extract_gsm8k_answer, generate_texts, gsm8k_target, kl_from_base,
                                 load_arc, load_bbh, load_bbh_cot_prompt, load_general_prompts, load_gsm8k, load_mmlu,
                                 load_policy, mmlu_subjects, multiple_choice_accuracy, subsample, win_rate)
from qadapter.evaluation.benchmarks import DATA_DIR
from qadapter.evaluation.policy import encode

from conftest import byte_bpe_tokenizer, randomize_lora, tiny_llama

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_TASK = REPO / "examples" / "lm_eval_task"
SHARED_DATA = REPO.parent / "shared" / "data"


# --------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tokenizer():
    return byte_bpe_tokenizer(["The following are multiple choice questions (with answers) about anatomy.",
                               "Question: What is the capital of France? Answer: Paris. A. B. C. D.",
                               "Q: There are 15 trees. A: The answer is 6. Let's think step by step.",
                               "0123456789 + - * / = the a an of to in is was user assistant"] * 4, vocab_size=320)


def tiny_model(tokenizer, seed: int):
    # conftest's tiny Llama; its special ids (pad 0, eos 2) are this tokenizer's <|endoftext|> and <|im_end|>
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2
    return tiny_llama(vocab_size=len(tokenizer), seed=seed)


@pytest.fixture(scope="module")
def policy(tokenizer):
    return HFPolicy(tiny_model(tokenizer, 0), tokenizer, name="tiny-0")


@pytest.fixture(scope="module")
def other_policy(tokenizer):
    return HFPolicy(tiny_model(tokenizer, 1), tokenizer, name="tiny-1")


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model(tokenizer, 0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class FavorPolicy:
    """A stub policy: at every position, token ``favored`` gets logit ``strength``, the rest 0."""

    def __init__(self, tokenizer, favored: int | None, strength: float = 10.0):
        self.tokenizer, self.favored, self.strength = tokenizer, favored, strength
        self.vocab = len(tokenizer)

    @property
    def device(self):
        return torch.device("cpu")

    def logits(self, input_ids, attention_mask):
        out = torch.zeros(*input_ids.shape, self.vocab)
        if self.favored is not None:
            out[..., self.favored] = self.strength
        return out

    def generate(self, prompts, *, max_new_tokens, stop_strings=None, **kwargs):
        return ["The answer is 42." for _ in prompts]


# --------------------------------------------------------------------------- statistics
def test_bootstrap_interval_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    values = rng.normal(3.0, 1.0, size=200)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high
    assert high - low < 1.0
    assert bootstrap_ci(values) == (low, high)  # seeded
    assert bootstrap_ci(values, seed=1) != (low, high)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert bootstrap_ci([0.25]) == (0.25, 0.25)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    bern = [1.0] * 30 + [0.0] * 70
    low, high = bootstrap_ci(bern, n_boot=2000)
    assert low < 0.3 < high and 0.0 <= low and high <= 1.0


def test_subsample_is_deterministic_and_ordered():
    items = list(range(100))
    a, b = subsample(items, 10, seed=3), subsample(items, 10, seed=3)
    assert a == b and a == sorted(a) and len(set(a)) == 10
    assert subsample(items, 10, seed=4) != a
    assert subsample(items, None) == items and subsample(items, 1000) == items


# --------------------------------------------------------------------------- policies
def test_hf_policy_left_padding_matches_unpadded(policy, tokenizer):
    short, long = encode(tokenizer, "Paris"), encode(tokenizer, "The capital of France is Paris")
    [(alone, _)] = continuation_logprobs(policy, [(short[:-1], short[-1:])], progress=False)
    both = continuation_logprobs(policy, [(short[:-1], short[-1:]), (long[:-1], long[-1:])], progress=False)
    assert both[0][0] == pytest.approx(alone, abs=1e-5)


def test_continuation_logprobs_needs_a_context(policy, tokenizer):
    with pytest.raises(ValueError, match="empty context"):
        continuation_logprobs(policy, [([], encode(tokenizer, "Paris is"))], progress=False)


def test_continuation_logprobs_against_manual_sum(policy, tokenizer):
    ctx, cont = encode(tokenizer, "Question: What is 7 plus 5?\nAnswer:"), encode(tokenizer, " 12")
    [(score, greedy)] = continuation_logprobs(policy, [(ctx, cont)], progress=False)
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(policy.logits(ids, torch.ones_like(ids))[0].float(), -1)
    manual = sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
    assert score == pytest.approx(manual, abs=1e-4)
    assert greedy == all(logp[len(ctx) - 1 + k].argmax().item() == t for k, t in enumerate(cont))


def test_hf_policy_generate_reads_prompts_like_qadapter_generation(policy):
    raw = policy.generate(["Q: 1 + 1\nA:", "Question: hi"], max_new_tokens=6, raw_text=True)
    assert len(raw) == 2 and all(isinstance(t, str) for t in raw)
    # a str is one user turn unless raw_text=True, as in qadapter.generation.generate
    as_turn = policy.generate(["Question: hi"], max_new_tokens=6)
    as_messages = policy.generate([[{"role": "user", "content": "Question: hi"}]], max_new_tokens=6)
    assert as_turn == as_messages
    full = policy.generate(["Q: 1 + 1\nA:"], max_new_tokens=12, raw_text=True)[0]
    if len(full) > 2:
        stop = full[1:3]
        cut = policy.generate(["Q: 1 + 1\nA:"], max_new_tokens=12, stop_strings=[stop], raw_text=True)[0]
        assert stop not in cut and full.startswith(cut)
    texts = generate_texts(policy, ["a", "bb", "a"], max_new_tokens=3, batch_size=2, progress=False)
    assert texts[0] == texts[2]  # greedy, order restored
    assert texts[1] == policy.generate(["bb"], max_new_tokens=3, raw_text=True)[0]  # generate_texts: raw text


def test_load_policy_plain_and_peft(model_dir, tmp_path, tokenizer):
    plain = load_policy(model_dir)
    assert isinstance(plain, HFPolicy) and plain.tokenizer.eos_token == "<|im_end|>"
    with pytest.raises(ValueError):
        base_policy(plain)
    from peft import LoraConfig, get_peft_model

    peft_model = randomize_lora(get_peft_model(tiny_model(tokenizer, 0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])))
    peft_model.save_pretrained(tmp_path / "lora")
    loaded = load_policy(tmp_path / "lora", base_model=str(model_dir))
    assert isinstance(loaded, HFPolicy) and hasattr(loaded.model, "disable_adapter")
    base = base_policy(loaded)
    ids = torch.tensor([encode(tokenizer, "The answer is 6.")])
    mask = torch.ones_like(ids)
    assert torch.allclose(base.logits(ids, mask), plain.logits(ids, mask), atol=1e-5)
    assert not torch.allclose(loaded.logits(ids, mask), plain.logits(ids, mask), atol=1e-4)


def test_qadapter_satisfies_the_policy_interface(model_dir, tokenizer, tmp_path):
    from qadapter.modeling import QAdapter
    from qadapter.settings import QAdapterSettings

    qa = QAdapter.create(tiny_model(tokenizer, 0), tokenizer, QAdapterSettings(base_model_name_or_path=str(model_dir)))
    base = base_policy(qa)
    assert isinstance(base, QAdapterBaseView)
    plain = HFPolicy(tiny_model(tokenizer, 0), tokenizer)
    prompts, responses = ["What is the capital of France?"], ["Paris is the capital."]
    # a fresh residual adapter is Q̂ = 0: at the default tied alphas, pi~ = pi1 = the plain model
    assert kl_from_base(qa, plain, prompts=prompts, responses=responses, progress=False).score < 1e-6
    assert kl_from_base(base, plain, prompts=prompts, responses=responses, progress=False).score < 1e-6
    # untied, alpha_0 < alpha_tilde flattens pi1 (pi1^0.5): a positive KL
    qa.settings.alpha_0 = 0.5
    assert kl_from_base(qa, base, prompts=prompts, responses=responses, progress=False).score > 1e-4
    qa.save_pretrained(tmp_path / "qa")
    loaded = load_policy(tmp_path / "qa", alpha_0=0.25)
    assert isinstance(loaded, QAdapter) and loaded.settings.alpha_0 == 0.25


def test_qadapter_generates_through_the_evaluators(model_dir, tokenizer, tmp_path, monkeypatch):
    from qadapter.modeling import QAdapter
    from qadapter.settings import QAdapterSettings

    # a fresh residual adapter at the default tied alphas is exactly the plain model: same greedy text
    qa = QAdapter.create(tiny_model(tokenizer, 0), tokenizer, QAdapterSettings(base_model_name_or_path=str(model_dir)))
    plain = load_policy(model_dir)
    prompts = ["Q: 2 + 3\nA:", "Question: What is the capital of France?\nAnswer:"]
    expected = generate_texts(plain, prompts, max_new_tokens=5, progress=False)
    assert generate_texts(qa, prompts, max_new_tokens=5, progress=False) == expected
    assert generate_texts(base_policy(qa), prompts, max_new_tokens=5, progress=False) == expected
    chat = [[{"role": "user", "content": "Say hi"}]]
    assert generate_texts(qa, chat, max_new_tokens=5, progress=False) == plain.generate(chat, max_new_tokens=5)
    result = win_rate(qa, base_policy(qa), ConstantJudge(1.0), prompts=["Say hi"], max_new_tokens=4, progress=False)
    assert result.extra["policy_answers"] == result.extra["base_answers"]
    # ... and through lm-eval: the harness scores the Q-Adapter folder exactly like the plain model
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import qadapter.evaluation.lm_eval_model  # noqa: F401  (registers the "qadapter" model type)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    qa.save_pretrained(tmp_path / "qa")
    scores = {}
    for name, path in (("qadapter", tmp_path / "qa"), ("plain", model_dir)):
        out = lm_eval.simple_evaluate(model="qadapter", model_args={"pretrained": str(path)},
                                      tasks=["qadapter_example_mc", "qadapter_example_gen"], bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(EXAMPLE_TASK), include_defaults=False))
        scores[name] = {task: {k: v for k, v in r.items() if "," in k and "stderr" not in k}
                        for task, r in out["results"].items()}
    assert scores["qadapter"] == scores["plain"]


# --------------------------------------------------------------------------- multiple choice
def test_multiple_choice_forced_answer_gets_accuracy_one(tokenizer):
    letters = [" B", " C", " D", " E"]  # (" A" is one token in the tiny vocabulary, the others two)
    encoded = [encode(tokenizer, "Answer:" + l) for l in letters]
    assert len({len(e) for e in encoded}) == 1  # same length: only the favored last token differs
    last = [e[-1] for e in encoded]
    assert len(set(last)) == 4
    items = [MCItem("Question: pick one\nAnswer:", letters, gold) for gold in range(4)]
    for favored in range(4):
        result = multiple_choice_accuracy(FavorPolicy(tokenizer, last[favored]), items, progress=False)
        assert isinstance(result, EvalResult) and result.n == 4
        assert [s["pred"] for s in result.samples] == [favored] * 4
        assert result.samples[favored]["pred"] == result.samples[favored]["gold"]
    only = [MCItem("Question: pick one\nAnswer:", letters, 2)] * 3
    result = multiple_choice_accuracy(FavorPolicy(tokenizer, last[2]), only, progress=False)
    assert result.score == 1.0 and result["acc_norm"] == 1.0 and result.ci == (1.0, 1.0)
    result = multiple_choice_accuracy(FavorPolicy(tokenizer, last[0]), only, progress=False)
    assert result.score == 0.0


def test_acc_norm_divides_by_answer_length(tokenizer):
    # a uniform policy: log-likelihood is -(number of tokens) * log V, so acc prefers the shortest
    # answer while acc_norm (per character) prefers the answer with the fewest tokens per character
    item = MCItem("Q:", [" ab", " abcdefghijklmnopqrstuvwxyz"], 1)
    result = multiple_choice_accuracy(FavorPolicy(tokenizer, None), [item], progress=False)
    n_short, n_long = (len(encode(tokenizer, "Q:" + c)) - len(encode(tokenizer, "Q:")) for c in item.continuations)
    assert result.samples[0]["pred"] == (0 if n_short < n_long else 1)
    assert result.samples[0]["pred_norm"] == (0 if n_short / 2 < n_long / 26 else 1)


def test_mmlu_and_arc_data_and_prompts(policy):
    assert len(mmlu_subjects()) == 57
    zero = load_mmlu(0, ["abstract_algebra"])
    five = load_mmlu(5, ["abstract_algebra"])
    assert len(zero) == 100 and zero[0].continuations == [" A", " B", " C", " D"]
    assert zero[0].context.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert zero[0].context.endswith("\nD. 6\nAnswer:") and zero[0].gold == 1
    assert five[0].context.count("Answer:") == 6 and five[0].context.endswith(zero[0].context.split("\n\n", 1)[1])
    arc = load_arc("challenge")
    assert len(arc) == 1172 and arc[0].context.startswith("Question: ") and arc[0].context.endswith("\nAnswer:")
    result = evaluate_mmlu(policy, n_shot=1, subjects=["anatomy", "virology"], limit=6, progress=False)
    assert result.n == 6 and 0.0 <= result.score <= 1.0 and result.ci[0] <= result.score <= result.ci[1]
    assert sum(v["n"] for v in result.extra["per_subject"].values()) == 6
    again = evaluate_mmlu(policy, n_shot=1, subjects=["anatomy", "virology"], limit=6, progress=False)
    assert again.samples == result.samples  # deterministic subsample and scoring
    arc_result = evaluate_arc(policy, subset="easy", limit=4, progress=False)
    assert arc_result.n == 4 and set(arc_result.metrics) == {"acc", "acc_norm"}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
def test_data_dir_override_reads_the_same_files():
    assert load_mmlu(0, ["anatomy"], data_dir=SHARED_DATA)[5].context == load_mmlu(0, ["anatomy"])[5].context
    assert load_general_prompts(SHARED_DATA) == load_general_prompts()
    assert len(load_gsm8k("train", SHARED_DATA)) == 7473 and load_gsm8k("train")[:8] == load_gsm8k("train", SHARED_DATA)[:8]


def test_shipped_data_has_licenses_and_no_dsp():
    for folder in ("mmlu", "arc", "gsm8k", "bbh", "ultrafeedback_prompts"):
        assert any((DATA_DIR / folder).glob("LICENSE*")), folder
    assert (DATA_DIR / "PROVENANCE.md").is_file()
    assert not list(DATA_DIR.rglob("*dsp*"))
    prompts = load_general_prompts()
    assert len(prompts) == 996 and all(isinstance(p, str) and p for p in prompts)


# --------------------------------------------------------------------------- GSM8K / BBH
@pytest.mark.parametrize("text, expected", [
    ("She has 5 + 4 = 9 toys. The answer is 9.", "9"),
    ("The answer is 1,234.", "1234"),
    ("The answer is $18.00.", "18"),
    ("The answer is -3. Then 7 more", "-3"),
    ("So 48 + 24 = 72 clips in total.", "72"),
    ("first 3, then 4.5", "4.5"),
    ("I cannot tell.", None),
])
def test_gsm8k_answer_extraction(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_gsm8k_strict_flexible_and_target():
    assert extract_gsm8k_answer("6 trees. The answer is 6. Also 100", "strict") == "6"
    assert extract_gsm8k_answer("6 trees. The answer is 6. Also 100", "flexible") == "100"
    assert extract_gsm8k_answer("no phrase, 12", "strict") is None
    assert gsm8k_target("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72") == "72"
    assert gsm8k_target("... #### 1,000") == "1000"


def test_gsm8k_evaluator_end_to_end(tokenizer, policy):
    test = load_gsm8k("test")
    assert len(test) == 1319

    class Oracle(FavorPolicy):  # answers every question right, in the CoT format
        def generate(self, prompts, *, max_new_tokens, stop_strings=None, **kwargs):
            answers = {r["question"]: gsm8k_target(r["answer"]) for r in test}
            return [f"Some steps. The answer is {answers[p.rsplit('Q: ', 1)[1][:-len(chr(10) + 'A:')]]}.\n\nQ: next"
                    for p in prompts]

    result = evaluate_gsm8k(Oracle(tokenizer, None), n_shot=8, limit=5, progress=False)
    assert result.score == 1.0 and result["strict_match"] == 1.0 and result.n == 5
    assert all("Q:" not in s["output"] for s in result.samples)  # cut at the stop string
    wrong = evaluate_gsm8k(FavorPolicy(tokenizer, None), n_shot=2, fewshot="train", limit=5, progress=False)
    assert wrong.score == 0.0
    assert evaluate_gsm8k(policy, n_shot=1, limit=2, max_new_tokens=4, progress=False).n == 2


def test_bbh_extraction_and_evaluator(tokenizer):
    assert extract_bbh_answer("Z = True. So the answer is False.") == "False"
    assert extract_bbh_answer("So the answer is (B).") == "(B)"
    assert extract_bbh_answer("no answer here") is None
    assert bbh_match("(B)", "(B)") and bbh_match("B", "(B)") and bbh_match("(B) 12/25/1937", "(B)")
    assert not bbh_match("(C)", "(B)") and not bbh_match(None, "(B)") and bbh_match("yes", "Yes")
    assert not bbh_match("Because", "(B)")
    cot = load_bbh_cot_prompt("boolean_expressions")
    assert cot.startswith("Evaluate the result of a random Boolean expression.") and "canary" not in cot
    examples = load_bbh("boolean_expressions")

    class Oracle(FavorPolicy):
        def generate(self, prompts, *, max_new_tokens, stop_strings=None, **kwargs):
            gold = {e["input"]: e["target"] for e in examples}
            return [f"Work.\nSo the answer is {gold[p.rsplit('Q: ', 1)[1].split(chr(10) + 'A:')[0]]}." for p in prompts]

    result = evaluate_bbh(Oracle(tokenizer, None), tasks=["boolean_expressions"], limit=4, progress=False)
    assert result.score == 1.0 and result.extra["per_task"]["boolean_expressions"]["n"] == 4
    result = evaluate_bbh(FavorPolicy(tokenizer, None), tasks="boolean_expressions,web_of_lies", limit=3, progress=False)
    assert result.score == 0.0 and result.n == 6


# --------------------------------------------------------------------------- KL
def test_kl_is_zero_for_identical_policies_and_positive_otherwise(policy, other_policy):
    prompts = ["What is the capital of France?", "Tell me a joke about trees."]
    same = kl_from_base(policy, policy, prompts=prompts, max_new_tokens=6, progress=False)
    assert same.score == 0.0 and same.extra["kl_token_mean"] == 0.0 and same.ci == (0.0, 0.0)
    responses = same.extra["responses"]
    diff = kl_from_base(other_policy, policy, prompts=prompts, responses=responses, progress=False)
    rev = kl_from_base(other_policy, policy, prompts=prompts, responses=responses, direction="base||policy",
                       progress=False)
    assert diff.score > 0 and rev.score > 0 and diff.score != pytest.approx(rev.score, rel=1e-6)
    default = kl_from_base(policy, policy, limit=2, max_new_tokens=3, progress=False)
    assert default.config["n_prompts"] == 2


# --------------------------------------------------------------------------- preferences
PAIRS = [
    {"chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there!"}],
     "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}]},
    {"prompt": "What is 7 plus 5?", "chosen": "12", "rejected": "75"},
    {"chosen": [{"role": "user", "content": "Name a color"}, {"role": "assistant", "content": "Blue"}],
     "rejected": [{"role": "user", "content": "Name a color"}, {"role": "assistant", "content": "The answer is 6."}]},
]


def test_preference_margins_are_zero_against_itself(policy):
    result = evaluate_preferences(policy, policy, PAIRS, progress=False)
    assert result["mean_margin"] == 0.0 and result["margin_accuracy"] == 0.5
    assert result["likelihood_accuracy"] == result["base_likelihood_accuracy"]


def test_preference_margin_definition(policy, other_policy, tokenizer):
    from qadapter.evaluation.preference import encode_prompt_response, split_pair

    result = evaluate_preferences(other_policy, policy, PAIRS, progress=False)
    for row, sample in zip(PAIRS, result.samples):
        prompt, chosen, rejected = split_pair(row)
        reqs = [encode_prompt_response(tokenizer, prompt, chosen), encode_prompt_response(tokenizer, prompt, rejected)]
        (pw, _), (pl, _) = continuation_logprobs(other_policy, reqs, progress=False)
        (bw, _), (bl, _) = continuation_logprobs(policy, reqs, progress=False)
        assert sample["margin"] == pytest.approx((pw - bw) - (pl - bl), abs=1e-4)
    margins = np.array([s["margin"] for s in result.samples])
    assert result["margin_accuracy"] == pytest.approx(np.mean(np.where(margins > 0, 1, np.where(margins < 0, 0, 0.5))))
    prompt_ids, response_ids = encode_prompt_response(tokenizer, PAIRS[0]["chosen"][:1], "Hi there!")
    assert tokenizer.decode(response_ids) == "Hi there!<|im_end|>\n"
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def test_preferences_reuse_the_base_log_likelihoods_they_are_given(policy, other_policy, monkeypatch):
    """base_logprobs (the base's own samples): the same margins, and only the policy is scored."""
    import qadapter.evaluation.preference as preference

    both = evaluate_preferences(other_policy, policy, PAIRS, progress=False)
    own = evaluate_preferences(policy, policy, PAIRS, progress=False)
    known = {x["index"]: (x["logp_chosen"], x["logp_rejected"]) for x in own.samples}
    scored = []
    real = preference.policies_logprobs
    monkeypatch.setattr(preference, "policies_logprobs", lambda policies, *a, **k: scored.append(len(policies)) or
                        real(policies, *a, **k))
    reused = evaluate_preferences(other_policy, policy, PAIRS, progress=False, base_logprobs=known)
    assert scored == [1]
    assert [x["margin"] for x in reused.samples] == pytest.approx([x["margin"] for x in both.samples], abs=1e-5)
    assert reused["margin_accuracy"] == both["margin_accuracy"]
    # a pair missing from base_logprobs: the base is scored again, for all of them
    evaluate_preferences(other_policy, policy, PAIRS, progress=False, base_logprobs=dict(list(known.items())[1:]))
    assert scored == [1, 2]


# --------------------------------------------------------------------------- win rate
def test_win_rate_with_constant_judges(policy):
    prompts = ["a", "b", "c", "d"]
    answers = dict(policy_answers=["x"] * 4, base_answers=["y"] * 4)
    assert win_rate(policy, policy, ConstantJudge(1.0), prompts=prompts, **answers, progress=False).score == 1.0
    lost = win_rate(policy, policy, ConstantJudge(0.0), prompts=prompts, **answers, progress=False)
    assert lost.score == 0.0 and lost.extra["losses"] == 4
    tie = win_rate(policy, policy, ConstantJudge(0.5), prompts=prompts, **answers, progress=False)
    assert tie.score == 0.5 and tie.extra["ties"] == 4
    # with both orders a constant judge is pure position bias, which cancels to a tie
    assert win_rate(policy, policy, ConstantJudge(1.0), prompts=prompts, both_orders=True, **answers,
                    progress=False).score == 0.5
    # identical answers are a tie whatever the judge says (a reward model's float noise must not pick a winner)
    generated = win_rate(policy, policy, ConstantJudge(1.0), prompts=prompts[:2], max_new_tokens=3, progress=False)
    assert generated.extra["policy_answers"] == generated.extra["base_answers"]
    assert generated.score == 0.5 and generated.extra["ties"] == 2


def test_win_rate_reports_how_much_the_policy_answers_repeat(policy):
    from qadapter.evaluation.repetition import repeated_ngram_fraction, repeated_ngram_fractions

    loop = "I can help you. I can help you. I can help you."  # 12 words, 9 4-grams, 5 of them repeats
    answers = [loop, "a plain answer that never repeats a phrase", "too short"]
    assert repeated_ngram_fractions(answers) == pytest.approx([5 / 9, 0.0, 0.0])
    assert repeated_ngram_fraction(answers) == pytest.approx(5 / (9 + 5))  # pooled over the 4-grams
    result = win_rate(policy, policy, ConstantJudge(1.0), prompts=["a", "b", "c"], policy_answers=answers,
                      base_answers=["x"] * 3, progress=False)
    assert result["repeated_4grams"] == pytest.approx(5 / 27)
    assert [s["repeated_4grams"] for s in result.samples] == pytest.approx([5 / 9, 0.0, 0.0])
    # the base's answers are not the policy's: swapping them moves the measure
    swapped = win_rate(policy, policy, ConstantJudge(1.0), prompts=["a", "b", "c"], policy_answers=["x"] * 3,
                       base_answers=answers, progress=False)
    assert swapped["repeated_4grams"] == 0.0


def test_reward_model_judge(tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)).eval()
    judge = RewardModelJudge(rm, tokenizer)
    r_a, r_b = judge.rewards(["Say hi", "Say hi"], ["Hello!", "Go away."])
    assert r_a != r_b
    assert judge("Say hi", "Hello!", "Go away.") == (1.0 if r_a > r_b else 0.0)
    assert judge("Say hi", "Hello!", "Hello!") == 0.5  # ties count half
    assert judge.judge_batch(["Say hi"] * 2, ["Hello!", "Go away."], ["Go away.", "Hello!"]) in ([1.0, 0.0], [0.0, 1.0])
    soft = RewardModelJudge(rm, tokenizer, soft=True)
    assert soft("Say hi", "Hello!", "Go away.") == pytest.approx(1 / (1 + math.exp(-(r_a - r_b))), rel=1e-4)
    # batched rewards equal one-by-one rewards (right padding is handled)
    batch = judge.rewards(["Say hi", "Name a long list of colors please"], ["Hi", "Red, green, blue and yellow"])
    single = [judge.rewards(["Say hi"], ["Hi"])[0], judge.rewards(["Name a long list of colors please"],
                                                                  ["Red, green, blue and yellow"])[0]]
    assert batch == pytest.approx(single, abs=1e-4)


# --------------------------------------------------------------------------- lm-evaluation-harness
def test_lm_eval_example_task_runs_offline(model_dir, monkeypatch, tokenizer):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from qadapter.evaluation.lm_eval_model import QAdapterLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(model="qadapter", model_args={"pretrained": str(model_dir), "batch_size": 4},
                                  tasks=["qadapter_example_mc", "qadapter_example_gen"],
                                  task_manager=TaskManager(include_path=str(EXAMPLE_TASK), include_defaults=False),
                                  bootstrap_iters=0, log_samples=True)
    mc, gen = out["results"]["qadapter_example_mc"], out["results"]["qadapter_example_gen"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= gen["exact_match,strip"] <= 1.0
    # the harness and multiple_choice_accuracy score the same items identically (one code path)
    rows = [json.loads(l) for l in (EXAMPLE_TASK / "data.jsonl").read_text().splitlines()]
    items = [MCItem(f"Question: {r['question']}\nAnswer:", [f" {c}" for c in r["choices"]], r["gold"]) for r in rows]
    ours = multiple_choice_accuracy(load_policy(model_dir), items, progress=False)
    assert mc["acc,none"] == pytest.approx(ours.score)
    by_doc = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in out["samples"]["qadapter_example_mc"]}
    for i, sample in enumerate(ours.samples):
        assert by_doc[i] == pytest.approx(sample["loglikelihoods"], abs=1e-4)
    # rolling log-likelihood (perplexity tasks): every token scored once, conditioned on the prefix token
    class Req:
        def __init__(self, text):
            self.args = (text,)

    text = "The following are multiple choice questions about anatomy."
    lm = QAdapterLM(policy=load_policy(model_dir), batch_size=2)
    ids = [lm.prefix_token_id] + lm.tok_encode(text)
    logp = torch.log_softmax(lm.policy.logits(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0], -1)
    manual = sum(logp[k, t].item() for k, t in enumerate(ids[1:]))
    [rolled] = lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    assert rolled == pytest.approx(manual, abs=1e-3)
    short = QAdapterLM(policy=lm.policy, batch_size=2, max_length=8)  # several windows
    assert len(ids) > 16 and math.isfinite(short.loglikelihood_rolling([Req(text)], disable_tqdm=True)[0])


def test_lm_eval_cli_entry_point(model_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from qadapter.evaluation.lm_eval_model import cli_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cli_main(["run", "--model", "qadapter", "--model_args", f"pretrained={model_dir}", "--tasks", "qadapter_example",
              "--include_path", str(EXAMPLE_TASK), "--limit", "3", "--batch_size", "2",
              "--output_path", str(tmp_path / "out")])
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert results, "lm-eval wrote no results file"
    data = json.loads(results[0].read_text())
    assert {"qadapter_example_mc", "qadapter_example_gen"} <= set(data["results"])
