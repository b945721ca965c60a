"""Knowledge-retention benchmarks: MMLU, ARC (log-likelihood multiple choice), GSM8K and BBH (generated).

The prompts follow lm-evaluation-harness (``mmlu``, ``arc_easy``/``arc_challenge``, ``gsm8k_cot``,
``bbh_cot_fewshot``), so scores are comparable with it, but everything runs through the
:class:`~qadapter.evaluation.policy.Policy` interface: :func:`continuation_logprobs` for the
multiple-choice tasks and :func:`generate_texts` for the generated ones.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from .benchmarks import MCItem, load_arc, load_bbh, load_bbh_cot_prompt, load_gsm8k, load_mmlu, bbh_tasks
from ..chat import as_messages, bos_prefix, render_chat
from .policy import encode
from .scoring import continuation_logprobs, generate_texts
from .stats import EvalResult, make_metric, subsample

__all__ = ["multiple_choice_accuracy", "evaluate_mmlu", "evaluate_arc", "evaluate_gsm8k", "evaluate_bbh",
           "extract_gsm8k_answer", "gsm8k_target", "extract_bbh_answer", "bbh_match", "GSM8K_COT_EXEMPLARS",
           "DEFAULT_BBH_TASKS", "gsm8k_prompt", "bbh_prompt"]


def _chat_or_raw(text: str, chat: bool):
    """A generation prompt: the text as one user turn of the chat template, or raw text."""
    return as_messages(text) if chat else text


# --------------------------------------------------------------------------- multiple choice
def _encode_pair(tokenizer, context: str, continuation: str, prefix: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation, the whole string is
    encoded once and the continuation is what follows the context's tokens. ``prefix`` (the BOS of
    a raw context, :func:`~qadapter.chat.bos_prefix`) goes before the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return list(prefix) + ctx, whole[len(ctx):]


def multiple_choice_accuracy(policy, items: Sequence[MCItem], *, task: str = "multiple_choice", chat: bool = False,
                             batch_size: int = 8, max_length: int | None = None, progress: bool = True,
                             n_boot: int = 1000, seed: int = 0, config: dict | None = None) -> EvalResult:
    """Log-likelihood multiple choice: the predicted answer is the continuation with the highest
    summed log-probability given the context (``acc``), or the highest per-character log-probability
    (``acc_norm``: log-likelihood divided by the character length of the answer text, as lm-eval).

    ``chat=True`` renders each context as a user turn of the chat template (generation prompt
    included) before the continuation; the default scores the raw text, like lm-eval.
    """
    tok = policy.tokenizer
    requests, owners = [], []
    prefix = [] if chat else bos_prefix(tok)  # a rendered chat context carries its own BOS
    for i, item in enumerate(items):
        context = render_chat(tok, as_messages(item.context), add_generation_prompt=True) if chat else item.context
        for continuation in item.continuations:
            requests.append(_encode_pair(tok, context, continuation, prefix))
            owners.append(i)
    scores = continuation_logprobs(policy, requests, batch_size=batch_size, max_length=max_length,
                                   progress=progress, desc=task)
    return multiple_choice_result(items, owners, [ll for ll, _ in scores], task=task, n_boot=n_boot, seed=seed,
                                  config=dict(config or {}, chat=chat))


def multiple_choice_result(items: Sequence[MCItem], owners: Sequence[int], loglikelihoods: Sequence[float], *,
                           task: str, n_boot: int = 1000, seed: int = 0, config: dict | None = None) -> EvalResult:
    """``acc`` / ``acc_norm`` of :func:`multiple_choice_accuracy` from the summed log-likelihood of
    every (question, choice) request; ``owners[k]`` is the question of request k (choices in order)."""
    lls: list[list[float]] = [[] for _ in items]
    for i, ll in zip(owners, loglikelihoods):
        lls[i].append(ll)
    acc, acc_norm, samples = [], [], []
    for item, ll in zip(items, lls):
        ll_arr = np.asarray(ll)
        lengths = np.asarray([max(1, len(c.strip()) or len(c)) for c in item.continuations], dtype=float)
        pred, pred_norm = int(ll_arr.argmax()), int((ll_arr / lengths).argmax())
        acc.append(float(pred == item.gold))
        acc_norm.append(float(pred_norm == item.gold))
        samples.append({**item.meta, "gold": item.gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": ll})
    metrics = {"acc": make_metric(acc, n_boot, seed), "acc_norm": make_metric(acc_norm, n_boot, seed)}
    return EvalResult(task, len(items), metrics, "acc", dict(config or {}), samples=samples)


def evaluate_mmlu(policy, *, n_shot: int = 0, subjects: Sequence[str] | None = None, limit: int | None = None,
                  seed: int = 0, chat: bool = False, batch_size: int = 8, max_length: int | None = None,
                  data_dir=None, progress: bool = True, n_boot: int = 1000) -> EvalResult:
    """MMLU accuracy (lm-eval's ``mmlu`` prompt; ``n_shot`` 0..5 dev exemplars per subject).

    ``limit`` draws that many questions (seeded, across all selected subjects); ``extra["per_subject"]``
    holds each subject's accuracy. The answers are the one-token continuations " A" .. " D", so each
    question costs one forward pass.
    """
    items = subsample(load_mmlu(n_shot, subjects, data_dir), limit, seed)
    config = {"n_shot": n_shot, "subjects": list(subjects) if subjects else "all", "limit": limit, "seed": seed}
    result = multiple_choice_accuracy(policy, items, task=f"mmlu_{n_shot}shot", chat=chat, batch_size=batch_size,
                                      max_length=max_length, progress=progress, n_boot=n_boot, seed=seed, config=config)
    per_subject: dict[str, list[float]] = {}
    for s in result.samples:
        per_subject.setdefault(s["subject"], []).append(float(s["pred"] == s["gold"]))
    result.extra["per_subject"] = {k: {"acc": float(np.mean(v)), "n": len(v)} for k, v in sorted(per_subject.items())}
    return result


def evaluate_arc(policy, *, subset: str = "easy", limit: int | None = None, seed: int = 0, chat: bool = False,
                 batch_size: int = 8, max_length: int | None = None, data_dir=None, progress: bool = True,
                 n_boot: int = 1000) -> EvalResult:
    """ARC-Easy or ARC-Challenge (test) accuracy and acc_norm, zero-shot, lm-eval's prompt."""
    items = subsample(load_arc(subset, data_dir), limit, seed)
    config = {"subset": subset, "limit": limit, "seed": seed}
    return multiple_choice_accuracy(policy, items, task=f"arc_{subset}", chat=chat, batch_size=batch_size,
                                    max_length=max_length, progress=progress, n_boot=n_boot, seed=seed, config=config)


# --------------------------------------------------------------------------- GSM8K
#: the 8 chain-of-thought exemplars of Wei et al. (2022), as in lm-eval's ``gsm8k_cot`` (the paper's GSM8K-CoT 8-shot)
GSM8K_COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8."),
)
GSM8K_STOP = ("Q:", "</s>", "<|im_end|>")
_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def gsm8k_target(answer: str) -> str:
    """The number after ``####`` in a GSM8K answer."""
    return _normalize_number(answer.split("####")[-1])


def _normalize_number(text: str) -> str:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text.lower()
    return str(int(value)) if value == int(value) else repr(value)


def extract_gsm8k_answer(text: str, mode: str = "auto") -> str | None:
    """The number a GSM8K generation answers, normalized (commas, ``$`` and a final period removed,
    ``"18.0"`` → ``"18"``), or None.

    ``mode="strict"``: the first number after "The answer is" (lm-eval's strict-match);
    ``"flexible"``: the last number in the text (lm-eval's flexible-extract); ``"auto"`` (default):
    strict when the phrase is there, else flexible.
    """
    if mode not in ("auto", "strict", "flexible"):
        raise ValueError(f"mode must be 'auto', 'strict' or 'flexible', got {mode!r}")
    if mode in ("auto", "strict"):
        found = _STRICT.search(text)
        if found:
            normalized = _normalize_number(found.group(1))
            if normalized:
                return normalized
        if mode == "strict":
            return None
    numbers = [m.group(0) for m in _NUMBER.finditer(text)]
    numbers = [n for n in (_normalize_number(x) for x in numbers) if re.fullmatch(r"-?[0-9.]+(e[-+]?[0-9]+)?", n)]
    return numbers[-1] if numbers else None


def _gsm8k_train_exemplar(row: dict[str, str]) -> tuple[str, str]:
    reasoning, _, number = row["answer"].rpartition("####")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    return row["question"], f"{reasoning} The answer is {number.strip()}."


def gsm8k_prompt(question: str, exemplars: Sequence[tuple[str, str]]) -> str:
    """``"Q: {q}\\nA: {worked answer}\\n\\n"`` per exemplar, then ``"Q: {question}\\nA:"`` (lm-eval's gsm8k_cot)."""
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in exemplars)
    return f"{shots}Q: {question}\nA:"


def evaluate_gsm8k(policy, *, n_shot: int = 8, fewshot: str = "cot", limit: int | None = None, seed: int = 0,
                   max_new_tokens: int = 256, stop_strings: Sequence[str] = GSM8K_STOP, chat: bool = False,
                   batch_size: int = 8, data_dir=None, progress: bool = True, n_boot: int = 1000) -> EvalResult:
    """GSM8K (test) exact match of greedily generated chain-of-thought answers.

    ``fewshot="cot"`` (default): the first ``n_shot`` of the 8 exemplars of lm-eval's ``gsm8k_cot`` (the
    paper's "GSM8K-CoT (8-shot)"); ``"train"``: the first ``n_shot`` rows of the train split, their
    calculator annotations removed and ``#### N`` rewritten as "The answer is N.". The answer is
    :func:`extract_gsm8k_answer` (``exact_match``, primary); ``strict_match`` / ``flexible_match`` are
    lm-eval's two filters.
    """
    if fewshot == "cot":
        if not 0 <= n_shot <= len(GSM8K_COT_EXEMPLARS):
            raise ValueError(f"fewshot='cot' has {len(GSM8K_COT_EXEMPLARS)} exemplars; n_shot={n_shot}")
        exemplars = list(GSM8K_COT_EXEMPLARS[:n_shot])
    elif fewshot == "train":
        train = load_gsm8k("train", data_dir)
        if n_shot > len(train):
            raise ValueError(f"n_shot={n_shot} but only {len(train)} train rows are available")
        exemplars = [_gsm8k_train_exemplar(r) for r in train[:n_shot]]
    else:
        raise ValueError(f"fewshot must be 'cot' or 'train', got {fewshot!r}")
    rows = subsample(list(enumerate(load_gsm8k("test", data_dir))), limit, seed)
    prompts = [_chat_or_raw(gsm8k_prompt(r["question"], exemplars), chat) for _, r in rows]
    outputs = generate_texts(policy, prompts, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                             batch_size=batch_size, progress=progress, desc=f"gsm8k_{n_shot}shot")
    em, strict, flexible, samples = [], [], [], []
    for (index, row), out in zip(rows, outputs):
        target = gsm8k_target(row["answer"])
        pred = extract_gsm8k_answer(out)
        em.append(float(pred == target))
        strict.append(float(extract_gsm8k_answer(out, "strict") == target))
        flexible.append(float(extract_gsm8k_answer(out, "flexible") == target))
        samples.append({"index": index, "target": target, "pred": pred, "output": out})
    metrics = {"exact_match": make_metric(em, n_boot, seed), "strict_match": make_metric(strict, n_boot, seed),
               "flexible_match": make_metric(flexible, n_boot, seed)}
    config = {"n_shot": n_shot, "fewshot": fewshot, "limit": limit, "seed": seed, "max_new_tokens": max_new_tokens,
              "chat": chat}
    return EvalResult(f"gsm8k_{n_shot}shot", len(rows), metrics, "exact_match", config, samples=samples)


# --------------------------------------------------------------------------- BBH
#: a quick default subset: short prompts, varied answer formats (boolean, option letter, number, yes/no)
DEFAULT_BBH_TASKS = ("boolean_expressions", "date_understanding", "logical_deduction_three_objects",
                     "object_counting", "web_of_lies")
BBH_STOP = ("\n\n", "Q:", "</s>", "<|im_end|>")
_BBH_ANSWER = re.compile(r"[Tt]he answer is (.*)")
_OPTION = re.compile(r"^\(?([A-R])\)?(?=$|[\s.,:)])")


def extract_bbh_answer(text: str) -> str | None:
    """What follows the first "the answer is" in a BBH chain of thought (to the end of that line,
    final period removed), or None (lm-eval's ``get-answer`` filter)."""
    found = _BBH_ANSWER.search(text)
    if not found:
        return None
    return found.group(1).strip().rstrip(".").strip()


def bbh_match(prediction: str | None, target: str) -> bool:
    """Exact match, case-insensitive; for option targets like ``"(B)"``, ``"B"`` and ``"(B) 12/25/1937"``
    also count."""
    if prediction is None:
        return False
    pred, gold = prediction.strip().lower(), target.strip().lower()
    if pred == gold:
        return True
    option = re.fullmatch(r"\(([a-r])\)", gold)
    if option:
        found = _OPTION.match(prediction.strip())
        return bool(found) and found.group(1).lower() == option.group(1)
    return False


def bbh_prompt(cot_prompt: str, question: str) -> str:
    """The task's 3-shot CoT prompt, then ``"Q: {input}\\nA: Let's think step by step.\\n"``."""
    return f"{cot_prompt}\n\nQ: {question}\nA: Let's think step by step.\n"


def evaluate_bbh(policy, *, tasks: Sequence[str] | str = DEFAULT_BBH_TASKS, limit: int | None = None, seed: int = 0,
                 max_new_tokens: int = 256, stop_strings: Sequence[str] = BBH_STOP, chat: bool = False,
                 batch_size: int = 8, data_dir=None, progress: bool = True, n_boot: int = 1000) -> EvalResult:
    """BIG-Bench Hard, 3-shot chain of thought (``cot-prompts/{task}.txt``), exact match of the
    extracted answer. ``tasks="all"`` runs all 27; ``limit`` applies per task. The primary score
    pools every scored example (lm-eval's ``bbh`` group does the same); ``extra["per_task"]`` has each
    task's score. lm-eval allows 1024 new tokens; the default 256 covers the exemplars' chains."""
    if isinstance(tasks, str):
        tasks = bbh_tasks(data_dir) if tasks == "all" else [t for t in tasks.split(",") if t]
    prompts, records = [], []
    for task in tasks:
        cot = load_bbh_cot_prompt(task, data_dir)
        for index, ex in subsample(list(enumerate(load_bbh(task, data_dir))), limit, seed):
            prompts.append(_chat_or_raw(bbh_prompt(cot, ex["input"]), chat))
            records.append({"task": task, "index": index, "target": ex["target"]})
    outputs = generate_texts(policy, prompts, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                             batch_size=batch_size, progress=progress, desc="bbh")
    em, per_task = [], {}
    for record, out in zip(records, outputs):
        pred = extract_bbh_answer(out)
        hit = float(bbh_match(pred, record["target"]))
        record.update(pred=pred, output=out, exact_match=hit)
        em.append(hit)
        per_task.setdefault(record["task"], []).append(hit)
    config = {"tasks": list(tasks), "limit": limit, "seed": seed, "max_new_tokens": max_new_tokens, "chat": chat}
    result = EvalResult("bbh_cot_3shot", len(records), {"exact_match": make_metric(em, n_boot, seed)}, "exact_match",
                        config, samples=records)
    result.extra["per_task"] = {t: {"exact_match": float(np.mean(v)), "n": len(v)} for t, v in per_task.items()}
    return result
