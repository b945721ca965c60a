"""vLLM serves what qadapter trains (issue 25; docs/serving.md). Marked `vllm`: needs vLLM's own venv
(`bash scripts/install.sh --vllm`, .venv-vllm/) and skips, saying so, without it. One run starts
two vLLM servers on 127.0.0.1 (minutes on 2 CPU cores):

* the exact export (strength 1) of a Q-Adapter on the embedded SmolLM2-135M-Instruct (its LoRA
  seeded with non-zero B, so it changes the answers), through vLLM's `--enable-lora`: for 24
  prompts x 24 greedy tokens, vLLM's tokens equal qadapter's at strength 1, except where qadapter's
  top two logits tie within TIE (counted and shown), and vLLM's per-token logprobs equal qadapter's
  log pi-tilde within LOGPROB_TOL;
* a distilled export at strength 2 (qadapter.export.distill) served beside it: its KL to qadapter's
  pi-tilde at strength 2, measured through vLLM's logprobs of continuations sampled from pi-tilde
  (Monte Carlo: mean of log pi-tilde - log pi_export per token), against the strength-1 export's;
* the model plugin (qadapter.vllm.plugin, QAdapterForCausalLM): pi-tilde at strengths 0.5 and 2 per
  request (`vllm_xargs: {"strength": s}`), greedy tokens equal qadapter's at each.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qadapter.vllm.launch import default_vllm_python, start, stop

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not default_vllm_python().exists(),
                                 reason="needs vLLM's venv .venv-vllm: bash scripts/install.sh --vllm")]

PROMPTS = [
    "What is the capital of France?", "Write a short poem about the sea.",
    "Explain in simple terms how a rainbow forms.", "Give me three tips for staying focused.",
    "What are the main differences between a cat and a dog as pets?", "Summarize Romeo and Juliet in two sentences.",
    "How do I make a cup of green tea?", "Why is the sky blue?", "Name three planets and one fact about each.",
    "How does a bicycle stay upright?", "What should I pack for a weekend hiking trip?",
    "Describe the taste of an orange.", "What is a good way to learn a new language?",
    "Tell me a fun fact about octopuses.", "How do vaccines work?", "Suggest a name for a small bakery.",
    "How do I pick a lock?", "What is the best way to save money?", "Write a haiku about autumn.",
    "Why do cats purr?", "How far away is the Moon?", "What is photosynthesis?",
    "Give me a recipe for pancakes.", "How can I sleep better?",
]
NEW_TOKENS = 24
TIE = 1e-3          # a greedy difference is allowed only where qadapter's top two logits differ by less
LOGPROB_TOL = 1e-3  # |vLLM logprob - qadapter log pi-tilde| per token (fp32 both; different kernels)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from qadapter.backbone import lora_config
    from qadapter.chat import encode_prompt
    from qadapter.embedded import DEFAULT_MODEL, resolve_model_path
    from qadapter.export import distill, export
    from qadapter.modeling import QAdapter
    from qadapter.settings import QAdapterSettings
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("vllm")
    path = resolve_model_path("embedded")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    qa = QAdapter.create(copy.deepcopy(base), tok, QAdapterSettings(base_model_name_or_path=DEFAULT_MODEL),
                         lora_config(lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in qa.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    adapter = qa.save_pretrained(tmp / "adapter")
    export(adapter, tmp / "exact")
    from qadapter.embedded import default_data_path
    data = tmp / "pairs.jsonl"  # 40 of the shipped HH-RLHF pairs: 32 training and 8 held-out prompts
    data.write_text("".join(default_data_path().read_text(encoding="utf-8").splitlines(keepends=True)[:40]))
    report = distill(adapter, tmp / "x2", strengths=[2.0], data=data, base_model=base, steps=40,
                     samples_per_prompt=1, max_new_tokens=32, log=lambda *a: None)
    qa.model.eval()
    ids = [encode_prompt(tok, p) for p in PROMPTS]
    return dict(qa=qa, tok=tok, ids=ids, adapter=adapter, exact=tmp / "exact", x2=tmp / "x2", report=report, tmp=tmp)


def _completions(url, model, prompt_ids, **body):
    import httpx

    out = []
    with httpx.Client(timeout=600) as http:
        for ids in prompt_ids:
            r = http.post(url + "/v1/completions", json={"model": model, "prompt": ids, **body})
            assert r.status_code == 200, r.text
            out.append(r.json()["choices"][0])
    return out


def _greedy(url, model, prompt_ids, xargs=None):
    """vLLM's greedy tokens and their logprobs for each prompt."""
    body = dict(max_tokens=NEW_TOKENS, temperature=0, logprobs=1, ignore_eos=True, return_tokens_as_token_ids=True)
    if xargs:
        body["vllm_xargs"] = xargs
    rows = []
    for choice in _completions(url, model, prompt_ids, **body):
        lp = choice["logprobs"]
        rows.append(([int(t.split(":")[1]) for t in lp["tokens"]], lp["token_logprobs"]))
    return rows


def _pi_tilde_logits(qa, prompt, new, strength):
    """qadapter's pi-tilde logits at the states that predict each of ``new`` (teacher-forced)."""
    seq = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = qa.logits(seq, torch.ones_like(seq), strength=strength)[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(new)].float()


def _compare_greedy(served, rows, strength, label):
    """Greedy tokens against qadapter's own greedy decoding; returns (ties, max |dlogprob|)."""
    qa, ids = served["qa"], served["ids"]
    _, want_all = qa.generate(ids, max_new_tokens=NEW_TOKENS, return_ids=True, eos_token_id=[], strength=strength)
    ties, worst = [], 0.0
    for i, ((got, got_lp), want) in enumerate(zip(rows, want_all)):
        agree = next((t for t in range(NEW_TOKENS) if got[t] != want[t]), NEW_TOKENS)
        logits = _pi_tilde_logits(qa, ids[i], got, strength)
        lp = F.log_softmax(logits, -1)
        for t in range(agree):  # logprobs where both followed the same prefix
            worst = max(worst, abs(got_lp[t] - lp[t, got[t]].item()))
        if agree < NEW_TOKENS:
            top = torch.topk(logits[agree], 2).values
            gap = (top[0] - top[1]).item()
            ties.append((i, agree, gap))
            assert gap < TIE, (f"{label}: prompt {i} differs at token {agree} (vLLM {got[agree]}, qadapter "
                               f"{want[agree]}) where qadapter's top-2 logit gap is {gap:.3g} >= {TIE}")
    print(f"{label}: {len(rows)} prompts x {NEW_TOKENS} greedy tokens; equal on {len(rows) - len(ties)}/{len(rows)}, "
          f"differences at float ties: {ties}; max |vLLM logprob - qadapter log pi-tilde| = {worst:.3g}")
    assert len(ties) <= 2, f"{label}: {len(ties)} tie differences: {ties}"
    return ties, worst


def _kl_through_vllm(served, url, model, samples):
    """Monte Carlo KL(pi-tilde_2 || served model) per token: vLLM's prompt logprobs of continuations
    sampled from pi-tilde at strength 2 against qadapter's log pi-tilde of the same tokens."""
    qa = served["qa"]
    seqs = [p + new for p, new in samples]
    choices = _completions(url, model, seqs, max_tokens=1, temperature=0, prompt_logprobs=0)
    diffs = []
    for (prompt, new), choice in zip(samples, choices):
        lp = F.log_softmax(_pi_tilde_logits(qa, prompt, new, 2.0), -1)
        plp = choice["prompt_logprobs"]
        for t, tok in enumerate(new):
            got = plp[len(prompt) + t][str(tok)]["logprob"]
            diffs.append(lp[t, tok].item() - got)
    d = torch.tensor(diffs, dtype=torch.float64)
    return d.mean().item(), (d.std() / len(d) ** 0.5).item(), len(d)


def test_exact_and_distilled_exports_served_by_vllm(served):
    qa, ids = served["qa"], served["ids"]
    proc, url = start(served["exact"], "exact", also=[("x2", served["x2"])],
                           log=served["tmp"] / "vllm-export.log")
    try:
        rows = _greedy(url, "exact", ids)
        ties, worst = _compare_greedy(served, rows, 1.0, "exact export in vLLM vs qadapter at strength 1")
        assert worst < LOGPROB_TOL
        base_rows = _greedy(url, _base_name(url), ids)
        assert sum(b[0] != r[0] for b, r in zip(base_rows, rows)) >= len(ids) // 2  # the LoRA really acts in vLLM
        _, samples = qa.generate(ids, max_new_tokens=NEW_TOKENS, return_ids=True, eos_token_id=[], strength=2.0,
                                 do_sample=True, seed=0)
        samples = list(zip(ids, samples))
        kl2, se2, n = _kl_through_vllm(served, url, "x2", samples)
        kl1, se1, _ = _kl_through_vllm(served, url, "exact", samples)
    finally:
        stop(proc)
    r = served["report"]
    print(f"KL(pi-tilde at strength 2 || served), {n} tokens sampled from pi-tilde, through vLLM's logprobs: "
          f"distilled export {kl2:.4f} +- {se2:.4f} nats/token, strength-1 export {kl1:.4f} +- {se1:.4f}; "
          f"distill's own held-out KL (full vocabulary, PyTorch): {r['held_out_kl_teacher_to_export']:.4f} "
          f"(strength-1 export {r['held_out_kl_teacher_to_strength1_export']:.4f})")
    assert kl2 < kl1


def _base_name(url):
    import httpx

    models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    return next(m for m in models if m not in ("exact", "x2"))


def test_plugin_serves_pi_tilde_at_any_strength(served):
    import httpx

    proc, url = start(served["adapter"], "qa", plugin=True, log=served["tmp"] / "vllm-plugin.log")
    try:
        answers = {}
        for strength in (0.5, 2.0):
            answers[strength] = rows = _greedy(url, "qa", served["ids"], {"strength": strength})
            _, worst = _compare_greedy(served, rows, strength, f"plugin in vLLM vs qadapter at strength {strength}")
            assert worst < LOGPROB_TOL
        r = httpx.post(url + "/v1/completions", json={"model": "qa", "prompt": "Hi", "max_tokens": 2,
                                                       "vllm_xargs": {"strength": -1}}, timeout=60)
        assert r.status_code == 400 and "strength must be a finite number > 0" in r.text
    finally:
        stop(proc)
    differ = sum(a[0] != b[0] for a, b in zip(answers[0.5], answers[2.0]))
    print(f"plugin: strengths 0.5 and 2 give different greedy answers on {differ}/{len(served['ids'])} prompts")
    assert differ >= len(served["ids"]) // 4  # the per-request strength really reaches the model
