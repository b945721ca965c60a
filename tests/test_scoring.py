"""The one scorer (qadapter.scoring.score) against the plain two-pass, full-vocabulary scorer."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_lora, tiny_llama
from peft import get_peft_model

from qadapter import scoring
from qadapter.settings import QAdapterSettings
from qadapter.backbone import fast_plan, lora_config, position_ids_from_mask
from qadapter.objective import customized_logits

TOL = dict(atol=1e-5, rtol=1e-5)
STRENGTHS = [0.25, 0.5, 1.0, 2.0, 4.0]
ALPHAS = [(0.01, 1.0), (0.5, 0.7)]


def peft_model(attn="sdpa", seed=0, target_modules=("q_proj", "v_proj"), **lora_kwargs):
    base = tiny_llama(seed=seed)
    base.config._attn_implementation = attn
    config = lora_config(target_modules=target_modules, lora_dropout=0.0)
    for key, value in lora_kwargs.items():
        setattr(config, key, value)
    model = get_peft_model(base, config)
    return randomize_lora(model, seed=seed + 1, scale=0.3).eval()


def requests(seed=0, shared=True, n_prompts=5):
    """Prompts of unequal lengths, each with 1 to 4 continuations of unequal lengths (one-token
    ones included, like multiple-choice answers); with ``shared=False`` every context is distinct."""
    rng = random.Random(seed)
    out = []
    for i in range(n_prompts):
        prompt = [1] + [rng.randrange(5, 96) for _ in range(rng.randrange(1, 12))]
        for _ in range(rng.randrange(1, 5) if shared else 1):
            out.append((prompt, [rng.randrange(3, 96) for _ in range(rng.choice([1, 1, 2, 5, 9]))]))
    rng.shuffle(out)
    return out


# ------------------------------------------------------------------- the plain reference scorer
def plain_logits(model, ids, mask, branch):
    """Full-vocabulary logits at every position, one branch, its own pass."""
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    if branch == "base" and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            return model(**kwargs).logits.float()
    return model(**kwargs).logits.float()


@torch.no_grad()
def plain_score(model, reqs, settings, specs, reference=None, kl=None, batch=3):
    """Left-padded batches of whole sequences, two passes (adapter on, adapter off), every
    position projected to the whole vocabulary, then the policy's log-softmax, gathered, summed."""
    out = {name: [] for name in specs}
    greedy = {name: [] for name in specs}
    kls = {name: [] for name in specs}
    for start in range(0, len(reqs), batch):
        chunk = reqs[start:start + batch]
        seqs = [list(c) + list(y) for c, y in chunk]
        width = max(map(len, seqs))
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        base = plain_logits(model, ids, mask, "base")
        adapter = plain_logits(model, ids, mask, "adapter") if hasattr(model, "disable_adapter") else base
        ref = plain_logits(reference[0], ids, mask, reference[1]) if reference else base
        log_ref = F.log_softmax(ref, -1)
        for name, spec in specs.items():
            if spec[0] == "base":
                logits = base
            elif spec[0] == "adapter":
                logits = adapter
            else:
                logits = customized_logits(adapter, base, parameterization=settings.parameterization,
                                           q_scale=settings.q_scale, alpha_0=spec[1], alpha_tilde=spec[2])
            lp = F.log_softmax(logits, -1)
            for i, (c, y) in enumerate(chunk):
                rows = slice(width - len(y) - 1, width - 1)  # the states that predict y
                target = torch.tensor(list(y))
                out[name].append(lp[i, rows].gather(-1, target[:, None]).sum().item())
                greedy[name].append(bool((lp[i, rows].argmax(-1) == target).all()))
                a, b = (lp[i, rows], log_ref[i, rows]) if kl != "base||policy" else (log_ref[i, rows], lp[i, rows])
                kls[name].append((a.exp() * (a - b)).sum(-1).clamp_min(0).sum().item())
    return out, greedy, kls


def check(got: scoring.Scores, want, specs, kl=None):
    logp, greedy, kls = want
    for name in specs:
        torch.testing.assert_close(torch.tensor(got.logprobs[name], dtype=torch.float64),
                                   torch.tensor(logp[name], dtype=torch.float64), **TOL)
        if got.greedy is not None:
            assert got.greedy[name] == greedy[name], name
        if kl is not None:
            torch.testing.assert_close(torch.tensor(got.kl[name], dtype=torch.float64),
                                       torch.tensor(kls[name], dtype=torch.float64), **TOL)


# ------------------------------------------------------------------- tests
@pytest.mark.parametrize("parameterization", ["residual", "full"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("kl", [None, "policy||base", "base||policy"])
def test_matches_plain_two_pass_scorer(parameterization, shared, kl):
    model = peft_model()
    settings = QAdapterSettings(parameterization=parameterization, alpha_tilde=0.8)
    strengths = STRENGTHS if parameterization == "residual" else ()
    reqs = requests(seed=1, shared=shared)
    specs = scoring.policy_specs(settings, ("base", "adapter", "customized"), strengths, ALPHAS)
    assert len(specs) == 3 + len(strengths) + len(ALPHAS)
    got = scoring.score(model, reqs, settings=settings, policies=("base", "adapter", "customized"),
                        strengths=strengths, alphas=ALPHAS, greedy=True, kl=kl, batch_size=5)
    check(got, plain_score(model, reqs, settings, specs, kl=kl), specs, kl)
    assert got.n_tokens == [len(y) for _, y in reqs]
    assert got.alphas["customized"] == settings.decoding_alphas()
    # the adapter really moves the numbers (a test that could not fail would be worthless)
    assert max(abs(a - b) for a, b in zip(got.logprobs["base"], got.logprobs["customized"])) > 1e-2


def test_one_forward_uses_split_rows_and_shares_prompts(monkeypatch):
    """Both branches in one forward (base rows then adapter rows), each prompt once per group."""
    model = peft_model()
    settings = QAdapterSettings()
    reqs = requests(seed=2)
    calls = []
    inner = model.get_base_model()
    original = inner.forward

    def spy(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape, kwargs.get("logits_to_keep")))
        return original(*args, **kwargs)

    monkeypatch.setattr(inner, "forward", spy)
    got = scoring.score(model, reqs, settings=settings, policies=("base", "customized"), batch_size=100,
                        batch_tokens=10**6)
    monkeypatch.undo()
    n_prompts = len({tuple(c) for c, _ in reqs})
    assert len(calls) == 1
    (rows, width), kept = calls[0]
    assert rows == 2 * n_prompts  # base rows + adapter rows, one row per distinct prompt
    longest = max(len(c) + sum(len(y) - 1 for c2, y in reqs if c2 == c) for c, _ in reqs)
    assert width == longest
    assert isinstance(kept, torch.Tensor) and kept.numel() < width  # only the scored states' columns
    specs = scoring.policy_specs(settings, ("base", "customized"))
    check(got, plain_score(model, reqs, settings, specs), specs)


@pytest.mark.parametrize("one_forward,share_prompt", [(False, True), (True, False), (False, False)])
def test_switches_give_the_same_numbers(one_forward, share_prompt):
    model = peft_model()
    settings = QAdapterSettings()
    reqs = requests(seed=3)
    specs = scoring.policy_specs(settings, ("base", "customized"), STRENGTHS)
    got = scoring.score(model, reqs, settings=settings, policies=("base", "customized"), strengths=STRENGTHS,
                        one_forward=one_forward, share_prompt=share_prompt, batch_size=4, greedy=True)
    check(got, plain_score(model, reqs, settings, specs), specs)


def test_eager_attention():
    model = peft_model(attn="eager")
    settings = QAdapterSettings(parameterization="full", alpha_0=0.3)
    reqs = requests(seed=4)
    specs = scoring.policy_specs(settings, ("base", "adapter", "customized"))
    got = scoring.score(model, reqs, settings=settings, policies=("base", "adapter", "customized"), kl="policy||base")
    check(got, plain_score(model, reqs, settings, specs, kl="policy||base"), specs, "policy||base")


def test_peft_mixed_batch_fallback():
    """LoRA on the embeddings: not a plain Linear, so PEFT's mixed-adapter batch runs both branches."""
    model = peft_model(target_modules=("q_proj", "v_proj", "embed_tokens"))
    assert fast_plan(model, "default")[0] == "peft"  # PEFT's mixed batch
    settings = QAdapterSettings()
    reqs = requests(seed=5)
    specs = scoring.policy_specs(settings, ("base", "customized"), STRENGTHS)
    got = scoring.score(model, reqs, settings=settings, policies=("base", "customized"), strengths=STRENGTHS)
    check(got, plain_score(model, reqs, settings, specs), specs)


def test_dora_falls_back_to_two_passes():
    model = peft_model(use_dora=True)
    assert fast_plan(model, "default")[0] == "reference"  # two passes
    settings = QAdapterSettings()
    reqs = requests(seed=6)
    specs = scoring.policy_specs(settings, ("base", "customized"))
    got = scoring.score(model, reqs, settings=settings, policies=("base", "customized"))
    check(got, plain_score(model, reqs, settings, specs), specs)


@pytest.mark.parametrize("shared", [True, False])
def test_plain_hf_model(shared):
    model = tiny_llama(seed=7)
    reqs = requests(seed=7, shared=shared)
    specs = scoring.policy_specs(None, ("base",))
    with pytest.raises(ValueError, match="settings"):
        scoring.score(model, reqs)  # "customized" is the default policy
    got = scoring.score(model, reqs, policies=("base",), greedy=True, batch_size=3)
    check(got, plain_score(model, reqs, None, specs), specs)
    with pytest.raises(ValueError, match="PEFT"):
        scoring.score(model, reqs, settings=QAdapterSettings(), policies=("customized",))


def test_kl_against_a_separate_reference_model():
    model = peft_model(seed=0)
    other = tiny_llama(seed=8)  # a different base: KL from it is far from 0
    settings = QAdapterSettings()
    reqs = requests(seed=8)
    specs = scoring.policy_specs(settings, ("base", "customized"))
    got = scoring.score(model, reqs, settings=settings, policies=("base", "customized"), kl="policy||base",
                        reference=(other, "base"))
    check(got, plain_score(model, reqs, settings, specs, reference=(other, "base"), kl="policy||base"), specs,
          "policy||base")
    assert min(got.kl["base"]) > 1e-3
    # the same weights as the reference: KL exactly 0 up to round-off
    same = scoring.score(model, reqs, settings=settings, policies=("base",), kl="policy||base",
                         reference=(model, "base"))
    assert max(same.kl["base"]) < 1e-6


def test_max_length_cuts_the_context_on_the_left():
    model = peft_model()
    settings = QAdapterSettings()
    reqs = requests(seed=9)
    cut = []
    for c, y in reqs:
        seq = (list(c) + list(y))[-(10 + 1):]
        cut.append((seq[:len(seq) - len(y)], y))
    reqs = [(c, y) for (c, y), (c2, _) in zip(reqs, cut) if c2]  # keep those with context left
    cut = [(c, y) for c, y in cut if c]
    assert sum(len(c2) < len(c) for (c, _), (c2, _) in zip(reqs, cut)) >= 3  # some were really cut
    got = scoring.score(model, reqs, settings=settings, policies=("customized",), max_length=10)
    want = scoring.score(model, cut, settings=settings, policies=("customized",))
    assert got.logprobs.keys() == want.logprobs.keys()
    for name in want.logprobs:
        assert got.logprobs[name] == pytest.approx(want.logprobs[name]), name
    with pytest.raises(ValueError, match="exceeds max_length"):
        scoring.score(model, [([1, 2], [3] * 9)], settings=settings, max_length=8)
    with pytest.raises(ValueError, match="empty context"):
        scoring.score(model, [([], [3, 4])], settings=settings)


def test_full_parameterization_refuses_strengths():
    with pytest.raises(ValueError, match="strength"):
        scoring.policy_specs(QAdapterSettings(parameterization="full"), (), [1.0])


@pytest.mark.parametrize("parameterization", ["residual", "full"])
def test_pair_log_likelihoods_and_qadapter_score_use_it(parameterization, tiny_tokenizer):
    """The main job's pair scorer and QAdapter.score give the plain scorer's numbers."""
    from qadapter.modeling import QAdapter
    from qadapter.recipes.train import pair_log_likelihoods

    model = peft_model()
    settings = QAdapterSettings(parameterization=parameterization, alpha_tilde=0.9)
    qa = QAdapter(model, tiny_tokenizer, settings)
    rng = random.Random(10)
    rows = []
    for _ in range(5):
        prompt = [1] + [rng.randrange(5, 96) for _ in range(rng.randrange(1, 9))]
        rows.append({"prompt_input_ids": prompt, "chosen_input_ids": [rng.randrange(3, 96) for _ in range(rng.randrange(1, 7))],
                     "rejected_input_ids": [rng.randrange(3, 96) for _ in range(rng.randrange(1, 7))]})
    model.train()
    ll = pair_log_likelihoods(qa, rows, batch_size=2)
    assert model.training  # the mode is restored
    model.eval()
    reqs = [(r["prompt_input_ids"], r[k]) for r in rows for k in ("chosen_input_ids", "rejected_input_ids")]
    specs = scoring.policy_specs(settings, ("base", "customized"))
    want, _, _ = plain_score(model, reqs, settings, specs)
    for key, name, part in (("base_chosen", "base", 0), ("base_rejected", "base", 1),
                            ("custom_chosen", "customized", 0), ("custom_rejected", "customized", 1)):
        torch.testing.assert_close(torch.tensor(ll[key], dtype=torch.float64),
                                   torch.tensor(want[name][part::2], dtype=torch.float64), **TOL)
    for policy in ("customized", "base", "adapter"):
        got = qa._score_ids([(r["prompt_input_ids"], r["chosen_input_ids"]) for r in rows], policy, batch_size=3)
        spec = scoring.policy_specs(settings, (policy,))
        ref, _, _ = plain_score(model, reqs[0::2], settings, spec)
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(ref[policy], dtype=torch.float64), **TOL)
    texts = qa.score(["w1 w2", "w3"], ["w4 w5 w6", "w7"], policy="base")
    assert len(texts) == 2 and all(t < 0 for t in texts)


def test_evaluators_score_through_it(tiny_tokenizer, monkeypatch):
    """continuation_logprobs (MMLU/ARC/lm-eval), preference scoring and the KL go through the one
    scorer for every known policy, and give what each policy's own logits give."""
    from qadapter.evaluation import divergence
    from qadapter.evaluation import scoring as ev
    from qadapter.evaluation.policy import HFPolicy, base_policy
    from qadapter.modeling import QAdapter

    model = peft_model()
    qa = QAdapter(model, tiny_tokenizer, QAdapterSettings(alpha_tilde=0.8))
    other = HFPolicy(tiny_llama(seed=12), tiny_tokenizer)
    peft_policy = HFPolicy(model, tiny_tokenizer)
    policies = [qa, base_policy(qa), peft_policy, base_policy(peft_policy), other]
    reqs = requests(seed=11)
    calls = []
    real = ev.score
    monkeypatch.setattr(ev, "score", lambda *a, **k: calls.append(k["policies"]) or real(*a, **k))
    for policy in policies:
        got = ev.continuation_logprobs(policy, reqs, progress=False)
        want = ev._logits_continuation_logprobs(policy, reqs, progress=False)  # through policy.logits
        torch.testing.assert_close(torch.tensor([s for s, _ in got], dtype=torch.float64),
                                   torch.tensor([s for s, _ in want], dtype=torch.float64), **TOL)
        assert [g for _, g in got] == [g for _, g in want]
    assert len(calls) == len(policies)
    calls.clear()
    both = ev.policies_logprobs([qa, base_policy(qa)], reqs, progress=False)  # π̃ and π1: one scorer call
    assert calls == [["customized", "base"]]
    assert both[1] == ev.continuation_logprobs(base_policy(qa), reqs, progress=False)

    rows = [(i, list(c), list(y)) for i, (c, y) in enumerate(reqs)]
    monkeypatch.setattr(divergence, "score", lambda *a, **k: calls.append(("kl", k["reference"] is None)) or real(*a, **k))
    for policy, base in ((qa, base_policy(qa)), (qa, other), (peft_policy, base_policy(peft_policy)), (other, other)):
        for direction in ("policy||base", "base||policy"):
            calls.clear()
            got = divergence._kl_sums(policy, base, rows, direction, 4, False)
            assert calls == [("kl", base is not other or policy is other)]  # own base branch: no second model
            want = divergence._logits_kl_sums(policy, base, rows, direction, 4, False)
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                       **TOL)
