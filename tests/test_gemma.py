"""Gemma 3 through every fast path, on tiny random Gemma 3 models built in-process (nothing is downloaded).

Gemma 3 differs from the Llama-shaped models the other tests use where qadapter's fast paths make
assumptions: interleaved sliding-window and global attention layers, tied input and output
embeddings, embeddings scaled by √hidden, a query scale of its own, and (in the architecture, off in
Gemma 3 270M itself) final-logit soft-capping. The same exactness checks as tests/test_train_exact.py,
tests/test_scoring.py and tests/test_generation.py run here on three variants:

* ``gemma3``: as Gemma 3 270M is (no soft-capping) with a window longer than these sequences: every
  fast path is taken (shared prompt, fused head, one-projection decoding head);
* ``window``: a window of 8 tokens, which every training pair, scored row and decoded sequence here
  crosses: the packed layouts fall back to one row per sequence (a 4D mask would be applied to the
  sliding layers as given, without their window), the fused heads are still taken;
* ``window+softcap``: also final-logit soft-capping on: the fused heads fall back to the logits
  (a projection of hidden states would skip the cap).

The real Gemma 3 270M runs the same checks in tests/test_gemma_model.py (marked slow).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import test_generation as gen
import test_scoring as sc
import test_train_exact as tx
from test_train_exact import spy  # noqa: F401  (the fixture counting the fast paths taken)
from conftest import make_tiny_tokenizer, randomize_lora
from qadapter import scoring
from qadapter.backbone import attention_kind, causal_lm_logits, lora_config, projection_head
from qadapter.generation import generate
from qadapter.settings import QAdapterSettings

#: variant -> (sliding window, final-logit soft-capping)
VARIANTS = {"gemma3": (64, None), "window": (8, None), "window+softcap": (8, 30.0)}


def tiny_gemma3(vocab_size: int = 96, seed: int = 0, variant: str = "gemma3", attn: str = "sdpa", eos_token_id: int = 2,
                pad_token_id: int = 0, bos_token_id: int = 1):
    """A 2-layer random Gemma 3: one sliding-window layer, then one global layer, tied embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    window, softcap = VARIANTS[variant]
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                              max_position_embeddings=256, sliding_window=window,
                              layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=softcap,
                              initializer_range=0.2, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                              eos_token_id=eos_token_id, tie_word_embeddings=True)
    config._attn_implementation = attn
    model = Gemma3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    return model


def peft_gemma3(variant="gemma3", attn="sdpa", seed=0, vocab_size=96, **kwargs):
    base = tiny_gemma3(vocab_size, seed=seed, variant=variant, attn=attn, **kwargs)
    model = get_peft_model(base, lora_config(target_modules=("q_proj", "v_proj"), lora_dropout=0.0))
    return randomize_lora(model, seed=seed + 1, scale=0.3).eval()


def test_the_tiny_model_has_what_makes_gemma3_different():
    """The variants really differ where the fast paths make assumptions (else the checks below prove nothing)."""
    seq = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    logits = {v: causal_lm_logits(tiny_gemma3(variant=v), seq) for v in VARIANTS}
    model = tiny_gemma3()
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(32 ** 0.5)  # scaled embeddings
    # the window changes nothing before it is crossed, and everything after
    assert torch.equal(logits["gemma3"][0, :8], logits["window"][0, :8])
    assert (logits["gemma3"][0, 8:] - logits["window"][0, 8:]).abs().max() > 1e-2
    # soft-capping bounds the logits and changes them
    assert logits["window+softcap"].abs().max() < 30.0 < logits["window"].abs().max() * 30
    assert not torch.allclose(logits["window+softcap"], logits["window"])
    # left padding changes nothing, across the window too
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), seq], 1)
    mask = (torch.arange(25) >= 5).long()[None]
    for variant in VARIANTS:
        got = causal_lm_logits(tiny_gemma3(variant=variant), padded, mask)[:, 5:]
        torch.testing.assert_close(got, logits[variant], atol=1e-5, rtol=1e-5)


def test_which_fast_paths_are_taken():
    assert projection_head(peft_gemma3("gemma3")) is not None
    assert projection_head(peft_gemma3("window")) is not None
    assert projection_head(peft_gemma3("window+softcap")) is None
    assert attention_kind(peft_gemma3("gemma3"), 64) == "sdpa" and attention_kind(peft_gemma3("gemma3"), 65) is None
    assert attention_kind(peft_gemma3("window", attn="eager"), 8) == "eager"
    assert attention_kind(peft_gemma3("window", attn="eager"), 9) is None


# ------------------------------------------------------------------------------------------- training
#: (packed layout taken, fused head taken) on tests/test_train_exact.py's pairs (13 to 32 tokens)
TAKEN = {"gemma3": (True, True), "window": (False, True), "window+softcap": (False, False)}


@pytest.mark.parametrize("path", list(tx.FAST))
@pytest.mark.parametrize("compat", list(tx.MODES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_step_equals_straightforward(tmp_path, spy, path, compat, variant):
    """tests/test_train_exact.py's check: the optimized step's loss, returns and adapter gradients are
    the straightforward step's, on every path the switches allow; where a path does not apply the
    step falls back (counted by the spy)."""
    model = peft_gemma3(variant)
    tx.compare(model, tx.BATCH, tx.config(tmp_path, **tx.MODES[compat], **tx.GENERIC, **tx.FAST[path]), grad_rtol=5e-6)
    shared, fused = TAKEN[variant]
    assert spy["shared"] == int(shared and tx.FAST[path]["share_prompt"])
    assert spy["fused"] == int(fused and tx.FAST[path]["fused_head"])


@pytest.mark.parametrize("variant", ["gemma3", "window"])
def test_training_step_eager_attention(tmp_path, spy, variant):
    tx.compare(peft_gemma3(variant, attn="eager"), tx.BATCH, tx.config(tmp_path, **tx.GENERIC), grad_rtol=5e-6)
    assert (spy["shared"], spy["fused"]) == (variant == "gemma3", 1)


# ------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("parameterization", ["residual", "full"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_scoring_equals_the_plain_scorer(monkeypatch, parameterization, variant):
    """tests/test_scoring.py's check; prompts share one row only where the row fits in the window."""
    model = peft_gemma3(variant)
    settings = QAdapterSettings(parameterization=parameterization, alpha_tilde=0.8)
    strengths = sc.STRENGTHS if parameterization == "residual" else ()
    reqs = sc.requests(seed=1)
    assert max(len(c) + len(y) for c, y in reqs) > 8  # the window is crossed
    specs = scoring.policy_specs(settings, ("base", "adapter", "customized"), strengths, sc.ALPHAS)
    rows = []
    inner = model.get_base_model()
    forward = inner.forward
    monkeypatch.setattr(inner, "forward", lambda *a, **k: rows.append(k["input_ids"].shape[0]) or forward(*a, **k))
    got = scoring.score(model, reqs, settings=settings, policies=("base", "adapter", "customized"),
                        strengths=strengths, alphas=sc.ALPHAS, greedy=True, kl="policy||base", batch_size=100,
                        batch_tokens=10**6)
    monkeypatch.undo()
    sc.check(got, sc.plain_score(model, reqs, settings, specs, kl="policy||base"), specs, "policy||base")
    shared = variant == "gemma3"
    assert rows == [2 * (len({tuple(c) for c, _ in reqs}) if shared else len(reqs))]
    assert max(abs(a - b) for a, b in zip(got.logprobs["base"], got.logprobs["customized"])) > 1e-2


# ------------------------------------------------------------------------------------------- decoding
def gemma_for_decoding(tok, variant, attn="sdpa"):
    base = tiny_gemma3(len(tok), variant=variant, attn=attn, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, lora_alpha=8))
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    return model.eval()


@pytest.mark.parametrize("variant, attn", [(v, "sdpa") for v in VARIANTS] + [("window", "eager")])
def test_decoding_equals_reference_full_recompute_and_hf_generate(variant, attn):
    """tests/test_generation.py's checks: the fast engine's tokens equal the two-forward reference's
    and a cache-free recompute of eq. (1) at every step, for one and two branches; the base and the
    adapter policy equal transformers' own ``generate()``. The prompts (9 to 54 tokens) and the 14
    new tokens cross the 8-token window: the sliding layers' KV caches drop what left the window."""
    tok = gen.tiny_tokenizer()
    model = gemma_for_decoding(tok, variant, attn)
    n = 14
    for parameterization, q_scale, alpha_0, alpha_tilde in (("full", 1.0, 0.5, 0.7), ("residual", 0.7, 0.7, 0.35),
                                                            ("residual", 1.0, 0.5, 0.5)):
        kw = dict(alpha_0=alpha_0, alpha_tilde=alpha_tilde, max_new_tokens=n, eos_token_id=[], return_ids=True,
                  parameterization=parameterization, q_scale=q_scale)
        _, fast = generate(model, tok, gen.PROMPTS, fast=True, **kw)
        _, ref = generate(model, tok, gen.PROMPTS, fast=False, **kw)
        naive = gen.naive_greedy(model, tok, gen.PROMPTS, n, alpha_0, alpha_tilde, parameterization, q_scale)
        assert fast == ref == naive, (parameterization, alpha_0, alpha_tilde)
    never = len(tok)  # an id no token has: transformers' generate() then never stops early either
    kw = dict(alpha_0=0.0, alpha_tilde=1.0, max_new_tokens=n, eos_token_id=[], return_ids=True)
    _, adapter = generate(model, tok, gen.PROMPTS, policy="adapter", **kw)
    assert adapter == gen.hf_new_ids(model, tok, gen.PROMPTS, n, eos=never)
    _, base = generate(model, tok, gen.PROMPTS, policy="base", **kw)
    with model.disable_adapter():
        assert base == gen.hf_new_ids(model, tok, gen.PROMPTS, n, eos=never)
    assert adapter != base


# ------------------------------------------------------------------------------------------- the server
def test_server_answers_a_gemma3_adapter_as_qadapter_generate_does(tmp_path):
    """One saved Q-Adapter on a tiny Gemma 3 (window crossed), served: one request, then three at once
    (the sliding-window KV caches cannot be merged into a running batch, so requests that arrive
    while it runs wait for the next one); every answer equals ``QAdapter.generate`` alone."""
    import concurrent.futures

    from server_testing import running_server, server_clients

    openai, _ = server_clients()
    from qadapter.modeling import QAdapter
    from qadapter.server import ServedModels

    tok = make_tiny_tokenizer()
    base_dir = tmp_path / "gemma-base"
    tiny_gemma3(variant="window").save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    qa = QAdapter.create(tiny_gemma3(variant="window"), tok, QAdapterSettings(base_model_name_or_path=str(base_dir)),
                         lora_config(r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_lora(qa.model, seed=1)
    qa.save_pretrained(tmp_path / "gemma")
    alone = QAdapter.from_pretrained(tmp_path / "gemma")
    prompts = [f"w{i} w{i + 1} w{i + 2} w{i + 3} w{i + 4} w{i + 5}" for i in (1, 20, 40)]
    strengths = (1.0, 0.5, 2.0)
    want = [alone.generate([[{"role": "user", "content": p}]], max_new_tokens=16, strength=s)[0]
            for p, s in zip(prompts, strengths)]
    with running_server(ServedModels.load({"gemma": str(tmp_path / "gemma")}), max_tokens_cap=64) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(i):
            return client.chat.completions.create(
                model="gemma", messages=[{"role": "user", "content": prompts[i]}], max_tokens=16, temperature=0,
                extra_body={"strength": strengths[i]}).choices[0].message.content

        assert ask(0) == want[0]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            assert list(pool.map(ask, range(3))) == want
    assert len(set(want)) > 1
