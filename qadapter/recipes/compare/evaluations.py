"""The evaluations a comparison runs: one :class:`Evaluation` entry each in :data:`REGISTRY`.

An entry declares, once: the evaluator that scores one policy (``run``; with ``strengths=True`` it
also takes ``strengths=[...]`` and scores a Q-Adapter at all of them from the same forwards, through
the scorer's strengths), the per-item score its trade-off statistics resample (``item_score``), what
besides the policy, limit and seed its cache key holds (``key_fields``, ``base_answers``,
``judged``), its table column(s), and whether a drop in it is retention lost. :mod:`.run` loops
over the registry and builds every cache key through :meth:`Evaluation.cache_key`; nothing else
names an evaluation. A new benchmark is one entry here (docs/evaluation.md, "Adding an evaluation").

Why one module: an entry and its evaluator are read and changed together (adding an evaluation is
one function and one entry in one file), so the registry grows with every evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import hashlib
import json

import numpy as np

from ...evaluation.stats import ties_half
from .methods import strength_name


@dataclass(frozen=True)
class Column:
    """One reported number: ``metric`` of the evaluation ``evaluation``."""

    key: str
    evaluation: str
    metric: str
    label: str


@dataclass
class Context:
    """What the evaluators of one comparison share: settings, the held-out split, the base's
    reference answers (``results['base']``), the judge."""

    limits: dict[str, int | None]
    seed: int
    batch_size: int
    max_new_tokens: int
    bbh_tasks: list[str]
    data_dir: Any
    held_out: list[dict]
    held_out_hash: str
    progress: bool = True
    judge: Callable[[], Any] | None = None  # () -> the judge, loaded on first use; None: no judge
    judge_key: dict[str, Any] | None = None  # what identifies the judge in a cache key
    results: dict[str, dict[str, dict]] = field(default_factory=dict)
    #: every user turn of the training pairs: left out of the general prompts (see general_prompts)
    trained_prompts: frozenset[str] = frozenset()
    _win_prompts: list | None = None
    _general: tuple[list | None, int] | None = None

    def common(self, name: str) -> dict[str, Any]:
        return dict(limit=self.limits.get(name), seed=self.seed, progress=self.progress)

    def base_samples(self, name: str) -> list[dict[str, Any]]:
        """The base model's stored per-item samples for evaluation ``name``."""
        return self.results["base"][name]["samples"]

    def base_extra(self, name: str) -> dict[str, Any]:
        """The base model's stored result's ``extra`` for evaluation ``name`` (its reference answers)."""
        return self.results["base"][name]["extra"]

    def general_prompts(self) -> tuple[list | None, int]:
        """(the general prompts none of the policies trained on, how many were left out); (None, 0)
        when the training shared none with them (the evaluators then draw from all of them)."""
        if self._general is None:
            from ...evaluation.benchmarks import load_general_prompts

            every = load_general_prompts(self.data_dir)
            kept = load_general_prompts(self.data_dir, exclude=self.trained_prompts)
            self._general = (kept, len(every) - len(kept)) if len(kept) < len(every) else (None, 0)
        return self._general

    def win_prompts(self) -> list:
        """The held-out prompts the win rate answers: distinct, a seeded subsample."""
        if self._win_prompts is None:
            from ...chat import as_messages
            from ...data import distinct_prompts
            from ...evaluation.stats import subsample

            prompts = [as_messages(row["prompt"] if "prompt" in row else row["chosen"][:-1]) for row in self.held_out]
            self._win_prompts = subsample(distinct_prompts(prompts), self.limits["win_rate"], self.seed)
        return self._win_prompts


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the registry (see the module docstring)."""

    name: str
    columns: tuple[Column, ...]
    #: (ctx, policy, base, policy_name, reuse_answers) -> EvalResult
    run: Callable[..., Any]
    #: one stored sample -> its primary score (what the trade-off intervals resample)
    item_score: Callable[[dict], float]
    #: Context fields its cache key holds besides policy, limit, seed and data_dir
    key_fields: tuple[str, ...] = ()
    #: a drop in it is retention lost (higher is better); KL and the preference side are not
    retention: bool = False
    #: a retention benchmark ``--benchmarks`` can name (the others run in every comparison)
    benchmark: bool = True
    #: ``run`` also takes ``strengths=[...]`` (a Q-Adapter) and returns {strength: EvalResult}
    strengths: bool = False
    #: its default subsample size (None: every item); ``--eval-limit name=N`` changes it
    default_limit: int | None = None
    #: the other policies are measured on the base's answers, which this reads from the base's result
    #: (a hash of them is part of the others' cache keys)
    base_answers: Callable[[dict], Any] | None = None
    #: it needs the judge (run only with one; the judge is part of its cache key)
    judged: bool = False
    #: a stored result's own answers, reusable when only these key fields changed (None: never reused)
    answers: Callable[[dict], Any] | None = None
    answer_only: tuple[str, ...] = ()
    #: run only when ``--benchmarks`` names it (generation-heavy: minutes per policy on a CPU)
    opt_in: bool = False
    #: it draws its items from the general prompts (its key says how many trained-on ones were left out)
    general_prompts: bool = False

    def key(self, ctx: Context) -> dict[str, Any]:
        values = {"max_new_tokens": ctx.max_new_tokens, "bbh_tasks": ctx.bbh_tasks, "held_out": ctx.held_out_hash,
                  "answer_metrics": list(ANSWER_METRICS)}  # a list: the key is compared after a JSON round trip
        return {("tasks" if f == "bbh_tasks" else f): values[f] for f in self.key_fields}

    def cache_key(self, ctx: Context, policy: str, fingerprint: str, strength: float | None = None) -> dict[str, Any]:
        """The key a stored result of ``policy`` is reused under: only while every part matches."""
        k = {"policy": policy, "fingerprint": fingerprint, "evaluation": self.name, "limit": ctx.limits.get(self.name),
             "seed": ctx.seed, "data_dir": str(ctx.data_dir) if ctx.data_dir else None, **self.key(ctx)}
        if self.base_answers is not None and policy != "base":
            k["base_answers"] = ctx.results["base"][self.name]["config"].get("answers_hash")
        if self.judged:
            k["judge"] = ctx.judge_key
        if strength is not None:
            k["strength"] = strength
        if self.general_prompts and ctx.general_prompts()[1]:  # absent when none was left out: older keys hold
            k["trained_prompts_left_out"] = ctx.general_prompts()[1]
        return k

    def stamp(self, policy: str, result: dict) -> dict:
        """``result`` (a stored dict), with the hash of the base's answers where others depend on them."""
        if policy == "base" and self.base_answers is not None:
            answers = json.dumps(self.base_answers(result)).encode()
            result["config"]["answers_hash"] = hashlib.sha256(answers).hexdigest()[:16]
        return result

    def reusable_answers(self, cached: dict | None, key: dict) -> Any:
        """The answers of a stored result whose key differs from ``key`` only in :attr:`answer_only`
        (e.g. only the judge changed: the policy's answers are still valid, the verdicts are redone)."""
        if self.answers is None or not cached:
            return None
        old = cached.get("key", {})
        if {a: b for a, b in old.items() if a not in self.answer_only} != {a: b for a, b in key.items()
                                                                          if a not in self.answer_only}:
            return None
        return self.answers(cached["result"]) or None

    def item_scores(self, result: dict) -> tuple[list, np.ndarray] | None:
        """(item keys, per-item primary scores) of a stored result, or None without samples."""
        samples = result.get("samples")
        if not samples:
            return None
        scores = [self.item_score(s) for s in samples]
        keys = [tuple(s.get(k) for k in ("subject", "task", "index")) for s in samples]
        if all(k == (None, None, None) for k in keys):
            keys = list(range(len(samples)))
        return keys, np.asarray(scores, dtype=np.float64)


#: what the win-rate evaluation computes from the answers it generates; part of its cache key, so a
#: result stored before a metric was added is redone from its stored answers (nothing regenerated)
ANSWER_METRICS = ("win_rate", "repeated_4grams")


# --------------------------------------------------------------------------- the evaluators
# Each takes (ctx, policy, base, name, reuse=None); those of entries with ``strengths=True`` also take
# ``strengths``: then ``policy`` is a Q-Adapter and the result is {strength: EvalResult}, every
# strength scored from the same forwards by qadapter.scoring.score(..., strengths=...).
def _mmlu(n_shot: int):
    def run(ctx, policy, base, name, reuse=None):
        from ...evaluation import evaluate_mmlu

        return evaluate_mmlu(policy, n_shot=n_shot, batch_size=ctx.batch_size, data_dir=ctx.data_dir,
                             **ctx.common(f"mmlu{n_shot}"))
    return run


def _arc(subset: str):
    def run(ctx, policy, base, name, reuse=None, strengths=None):
        from ...evaluation import evaluate_arc

        if strengths is None:
            return evaluate_arc(policy, subset=subset, batch_size=ctx.batch_size, data_dir=ctx.data_dir,
                                **ctx.common(f"arc_{subset}"))
        return _arc_at(ctx, policy, subset, strengths)
    return run


def _arc_at(ctx, qa, subset: str, strengths: Sequence[float], n_boot: int = 1000) -> dict[float, Any]:
    # evaluate_arc's items, requests (the BOS of a raw context included) and metrics (checked in
    # tests/test_compare.py), each question's context computed once for all its choices and strengths
    from ...chat import bos_prefix
    from ...evaluation.benchmarks import load_arc
    from ...evaluation.policy import pad_token_id
    from ...evaluation.scoring import _prepare_requests
    from ...evaluation.stats import subsample
    from ...evaluation.tasks import _encode_pair, multiple_choice_result
    from ...scoring import score

    limit = ctx.limits.get(f"arc_{subset}")
    items = subsample(load_arc(subset, ctx.data_dir), limit, ctx.seed)
    requests, owners = [], []
    prefix = bos_prefix(qa.tokenizer)
    for i, item in enumerate(items):
        for continuation in item.continuations:
            requests.append(_encode_pair(qa.tokenizer, item.context, continuation, prefix))
            owners.append(i)
    scores = score(qa.model, _prepare_requests(requests, None), settings=qa.settings, policies=(),
                   strengths=list(strengths), pad_token_id=pad_token_id(qa.tokenizer), batch_size=ctx.batch_size,
                   progress=ctx.progress, desc=f"arc_{subset} at every strength")
    return {strength: multiple_choice_result(items, owners, scores.logprobs[strength_name(strength)],
                                             task=f"arc_{subset}", n_boot=n_boot, seed=ctx.seed,
                                             config={"subset": subset, "limit": limit, "seed": ctx.seed, "chat": False})
            for strength in strengths}


def _gsm8k(ctx, policy, base, name, reuse=None):
    from ...evaluation import evaluate_gsm8k

    return evaluate_gsm8k(policy, max_new_tokens=ctx.max_new_tokens, batch_size=ctx.batch_size, data_dir=ctx.data_dir,
                          **ctx.common("gsm8k"))


def _bbh(ctx, policy, base, name, reuse=None):
    from ...evaluation import evaluate_bbh

    return evaluate_bbh(policy, tasks=ctx.bbh_tasks, max_new_tokens=ctx.max_new_tokens, batch_size=ctx.batch_size,
                        data_dir=ctx.data_dir, **ctx.common("bbh"))


def _kl(ctx, policy, base, name, reuse=None, strengths=None):
    """KL(π‖π1) on general prompts: the base model answers them once; every policy is scored on those answers."""
    from ...evaluation import kl_from_base

    if name == "base":
        return kl_from_base(policy, base, prompts=ctx.general_prompts()[0], max_new_tokens=ctx.max_new_tokens,
                            data_dir=ctx.data_dir, batch_size=ctx.batch_size, **ctx.common("kl"))
    ref = ctx.base_extra("kl")
    if strengths is not None:
        return _kl_at(ctx, policy, strengths, ref["prompts"], ref["responses"])
    common = ctx.common("kl")
    common.pop("limit")
    return kl_from_base(policy, base, prompts=ref["prompts"], responses=ref["responses"],
                        max_new_tokens=ctx.max_new_tokens, batch_size=ctx.batch_size, **common)


def _kl_at(ctx, qa, strengths, prompts, responses, n_boot: int = 1000) -> dict[float, Any]:
    # kl_from_base of the Q-Adapter at every strength from its own base branch, on the base model's
    # fixed answers (checked in tests/test_compare.py against the evaluator at each strength)
    from ...chat import as_messages, encode_prompt
    from ...evaluation.policy import encode, pad_token_id
    from ...evaluation.stats import EvalResult, make_metric
    from ...scoring import score

    tok = qa.tokenizer
    messages = [as_messages(p) for p in prompts]
    rows = []
    for i, (prompt, response) in enumerate(zip(messages, responses)):
        resp = encode(tok, response)
        if resp:
            rows.append((i, encode_prompt(tok, prompt), resp))
    kls = {}
    if rows:
        kls = score(qa.model, [(pr, r) for _, pr, r in rows], settings=qa.settings, policies=(),
                    strengths=list(strengths), kl="policy||base", pad_token_id=pad_token_id(tok),
                    batch_size=ctx.batch_size, progress=ctx.progress, desc="KL at every strength").kl
    out = {}
    n_tokens = sum(len(r[2]) for r in rows)
    for strength in strengths:
        sums = kls.get(strength_name(strength), [])
        per_prompt = {i: v / len(resp) for (i, _, resp), v in zip(rows, sums)}
        order = sorted(per_prompt)
        values = [per_prompt[i] for i in order]
        result = EvalResult("kl_from_base", len(values), {"kl": make_metric(values, n_boot, ctx.seed)}, "kl",
                            {"direction": "policy||base", "limit": None, "seed": ctx.seed,
                             "max_new_tokens": ctx.max_new_tokens, "n_prompts": len(messages)},
                            samples=[{"index": i, "kl": per_prompt[i]} for i in order])
        result.extra.update(kl_token_mean=float(sum(sums)) / n_tokens if n_tokens else float("nan"), n_tokens=n_tokens,
                            skipped_empty=len(messages) - len(values), prompts=messages, responses=list(responses),
                            kl_max_prompt=float(np.max(values)) if values else float("nan"))
        out[strength] = result
    return out


def _preferences(ctx, policy, base, name, reuse=None, strengths=None):
    """Every point's margins against the base's own log-likelihoods (scored once, by the base's entry)."""
    from ...evaluation import evaluate_preferences

    if strengths is not None:
        return _preferences_at(ctx, policy, strengths)
    known = None
    if name != "base" and "preferences" in ctx.results.get("base", {}):
        known = {x["index"]: (x["logp_chosen"], x["logp_rejected"]) for x in ctx.base_samples("preferences")}
    return evaluate_preferences(policy, base, ctx.held_out, batch_size=ctx.batch_size, base_logprobs=known,
                                **ctx.common("preferences"))


def _preferences_at(ctx, qa, strengths, n_boot: int = 1000) -> dict[float, Any]:
    # evaluate_preferences of the Q-Adapter at every strength (against its own base view): π1 and π̃ at
    # each strength share every forward; the same items, requests and metrics (tests/test_compare.py)
    from ...evaluation.policy import pad_token_id
    from ...evaluation.preference import encode_prompt_response, split_pair
    from ...evaluation.stats import EvalResult, make_metric, subsample
    from ...scoring import score

    limit, seed = ctx.limits.get("preferences"), ctx.seed
    rows = subsample(list(enumerate(ctx.held_out)), limit, seed)
    requests = []
    for _, row in rows:
        prompt, chosen, rejected = split_pair(row)
        requests.append(encode_prompt_response(qa.tokenizer, prompt, chosen))
        requests.append(encode_prompt_response(qa.tokenizer, prompt, rejected))
    scores = score(qa.model, requests, settings=qa.settings, policies=("base",), strengths=list(strengths),
                   pad_token_id=pad_token_id(qa.tokenizer), batch_size=ctx.batch_size, progress=ctx.progress,
                   desc="preferences at every strength")
    lb = np.asarray(scores.logprobs["base"]).reshape(-1, 2)
    out = {}
    for strength in strengths:
        lp = np.asarray(scores.logprobs[strength_name(strength)]).reshape(-1, 2)
        margin = (lp[:, 0] - lb[:, 0]) - (lp[:, 1] - lb[:, 1])
        metrics = {"margin_accuracy": make_metric(ties_half(margin), n_boot, seed),
                   "likelihood_accuracy": make_metric(ties_half(lp[:, 0] - lp[:, 1]), n_boot, seed),
                   "mean_margin": make_metric(margin, n_boot, seed),
                   "base_likelihood_accuracy": make_metric(ties_half(lb[:, 0] - lb[:, 1]), n_boot, seed)}
        samples = [{"index": i, "logp_chosen": float(a[0]), "logp_rejected": float(a[1]),
                    "base_logp_chosen": float(b[0]), "base_logp_rejected": float(b[1]), "margin": float(m)}
                   for (i, _), a, b, m in zip(rows, lp, lb, margin)]
        out[strength] = EvalResult("preferences", len(rows), metrics, "margin_accuracy", {"limit": limit, "seed": seed},
                                   samples=samples)
    return out


def _win_rate(ctx, policy, base, name, reuse=None):
    """The judged win rate against the base's answers (generated once, by the base's own entry)."""
    from ...evaluation import generate_texts, win_rate

    common = ctx.common("win_rate")
    common.pop("limit")
    prompts = ctx.win_prompts()
    if name == "base":
        answers = reuse or generate_texts(policy, prompts, max_new_tokens=ctx.max_new_tokens,
                                          batch_size=ctx.batch_size, progress=ctx.progress,
                                          desc="win_rate: base answers")
        return win_rate(policy, base, ctx.judge(), prompts=prompts, policy_answers=answers,
                        base_answers=answers, max_new_tokens=ctx.max_new_tokens, **common)
    return win_rate(policy, base, ctx.judge(), prompts=prompts, base_answers=ctx.base_extra("win_rate")["base_answers"],
                    policy_answers=reuse, max_new_tokens=ctx.max_new_tokens, batch_size=ctx.batch_size, **common)


def _ifeval(ctx, policy, base, name, reuse=None):
    from ...evaluation.ifeval import evaluate_ifeval

    return evaluate_ifeval(policy, max_new_tokens=ctx.max_new_tokens, batch_size=ctx.batch_size, data_dir=ctx.data_dir,
                           **ctx.common("ifeval"))


def _fluency(ctx, policy, base, name, reuse=None):
    from ...evaluation.fluency import evaluate_fluency

    return evaluate_fluency(policy, base, prompts=ctx.general_prompts()[0], max_new_tokens=ctx.max_new_tokens,
                            batch_size=ctx.batch_size, data_dir=ctx.data_dir, **ctx.common("fluency"))


def _correct(sample: dict) -> float:
    return float(sample["pred"] == sample["gold"])


#: every evaluation, in table order. The default limits are small enough that a 135M model on a
#: 2-core CPU scores one policy in a few minutes (docs/evaluation.md "Cost on a CPU"); ``bbh`` is
#: per task, ``preferences`` counts held-out pairs, ``win_rate`` held-out prompts, ``kl`` general prompts.
REGISTRY: dict[str, Evaluation] = {e.name: e for e in (
    Evaluation("mmlu0", (Column("mmlu0", "mmlu0", "acc", "MMLU 0-shot"),), _mmlu(0), _correct,
               retention=True, default_limit=50),
    Evaluation("mmlu5", (Column("mmlu5", "mmlu5", "acc", "MMLU 5-shot"),), _mmlu(5), _correct,
               retention=True, default_limit=10),
    Evaluation("arc_easy", (Column("arc_easy", "arc_easy", "acc", "ARC-Easy"),), _arc("easy"), _correct,
               retention=True, strengths=True, default_limit=50),
    Evaluation("arc_challenge", (Column("arc_challenge", "arc_challenge", "acc", "ARC-Challenge"),), _arc("challenge"),
               _correct, retention=True, strengths=True, default_limit=50),
    Evaluation("gsm8k", (Column("gsm8k", "gsm8k", "exact_match", "GSM8K-CoT 8-shot"),), _gsm8k,
               lambda s: float(s["pred"] == s["target"]), key_fields=("max_new_tokens",), retention=True,
               default_limit=5),
    Evaluation("bbh", (Column("bbh", "bbh", "exact_match", "BBH 3-shot CoT"),), _bbh,
               lambda s: float(s["exact_match"]), key_fields=("max_new_tokens", "bbh_tasks"), retention=True,
               default_limit=1),
    Evaluation("kl", (Column("kl", "kl", "kl", "KL(π‖π1)"),), _kl, lambda s: float(s["kl"]),
               key_fields=("max_new_tokens",), strengths=True, default_limit=20, general_prompts=True,
               base_answers=lambda result: result["extra"]["responses"]),
    Evaluation("preferences", (Column("pref_acc", "preferences", "likelihood_accuracy", "pref. accuracy"),
                               Column("margin_acc", "preferences", "margin_accuracy", "margin accuracy"),
                               Column("margin", "preferences", "mean_margin", "margin")),
               _preferences, lambda s: float(ties_half(np.asarray(s["logp_chosen"] - s["logp_rejected"]))),
               key_fields=("held_out",), benchmark=False, strengths=True),
    Evaluation("win_rate", (Column("win_rate", "win_rate", "win_rate", "win rate vs base"),
                            Column("repetition", "win_rate", "repeated_4grams", "repeated 4-grams")), _win_rate,
               lambda s: float(s["p"]), key_fields=("max_new_tokens", "held_out", "answer_metrics"), benchmark=False,
               default_limit=20, base_answers=lambda result: result["extra"]["base_answers"], judged=True,
               answers=lambda result: result["extra"].get("policy_answers"), answer_only=("judge", "answer_metrics")),
    Evaluation("ifeval", (Column("ifeval", "ifeval", "prompt_level_strict_acc", "IFEval prompt strict"),
                          Column("ifeval_loose", "ifeval", "prompt_level_loose_acc", "IFEval prompt loose"),
                          Column("ifeval_inst", "ifeval", "inst_level_strict_acc", "IFEval instruction strict"),
                          Column("ifeval_inst_loose", "ifeval", "inst_level_loose_acc", "IFEval instruction loose")),
               _ifeval, lambda s: float(s["prompt_level_strict_acc"]), key_fields=("max_new_tokens",), retention=True,
               default_limit=50, opt_in=True),
    Evaluation("fluency", (Column("fluency", "fluency", "repeated_4grams", "fluency: repeated 4-grams"),
                           Column("distinct_2", "fluency", "distinct_2", "fluency: distinct-2"),
                           Column("answer_length", "fluency", "length", "fluency: tokens"),
                           Column("base_nll", "fluency", "base_nll", "fluency: base NLL/token")),
               _fluency, lambda s: float(s["repeated_4grams"]), key_fields=("max_new_tokens",), default_limit=100,
               opt_in=True, general_prompts=True),
)}

#: the retention benchmarks, by the name ``--benchmarks`` takes (``kl`` is the KL from the base model)
BENCHMARKS: dict[str, Column] = {e.name: e.columns[0] for e in REGISTRY.values() if e.benchmark}
#: what ``--benchmarks`` measures when not given: every benchmark but the opt-in ones
DEFAULT_BENCHMARKS = tuple(e.name for e in REGISTRY.values() if e.benchmark and not e.opt_in)
#: the benchmarks whose score drop is "retention lost" (higher is better for each)
RETENTION_BENCHMARKS = tuple(e.name for e in REGISTRY.values() if e.retention)
PREFERENCE_COLUMNS = REGISTRY["preferences"].columns
WIN_RATE_COLUMN, REPETITION_COLUMN = REGISTRY["win_rate"].columns
EVALUATIONS = tuple(REGISTRY)
DEFAULT_LIMITS: dict[str, int | None] = {e.name: e.default_limit for e in REGISTRY.values()}


def selected(benchmarks, judged: bool) -> list[Evaluation]:
    """The evaluations a comparison runs, in table order: the named ``benchmarks``, every entry that
    is not a benchmark, and the judged ones only with a judge (``judged``)."""
    return [e for e in REGISTRY.values()
            if (e.name in benchmarks if e.benchmark else True) and (judged or not e.judged)]


def item_scores(evaluation: str, result: dict) -> tuple[list, np.ndarray] | None:
    """(item keys, per-item primary scores) of a stored result of ``evaluation``, or None."""
    entry = REGISTRY.get(evaluation)
    return entry.item_scores(result) if entry else None
