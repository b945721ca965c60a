"""The fast decoder's one-projection head (``FastEngine._mixed_head``): π̃'s logits from the mixed
hidden state (a·hθ + c·h1)/α̃ equal the two-branch composition of eq. (1) up to a per-row constant,
at every step, for both parameterizations; callers that give their own ``compose`` get both raw branches."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from qadapter import generation as G
from test_generation import PROMPTS, encoded, model, tiny_model, tok  # noqa: F401  (model, tok: fixtures)


def _steps(engine, ids, mask, n):
    out = []
    with torch.inference_mode():
        logits = engine.prefill(ids, mask, ids.shape[1] + n)
        for _ in range(n):
            out.append(logits)
            logits = engine.step(logits.argmax(-1))
    engine.close()
    return out


@pytest.mark.parametrize("parameterization,q_scale,alpha_0,alpha_tilde", [
    ("full", 1.0, 0.5, 0.7), ("full", 1.0, 0.01, 1.0), ("residual", 0.7, 0.7, 0.7), ("residual", 0.7, 0.5, 0.7),
    ("residual", 0.5, 2.0, 3.0), ("residual", 1.0, 0.0, 1.0)])
def test_mixed_head_is_the_composition_up_to_a_row_constant(model, tok, parameterization, q_scale, alpha_0, alpha_tilde):
    ids, mask = encoded(tok, PROMPTS)
    args = ("customized", alpha_0, alpha_tilde, ids.shape[0])
    if parameterization != "full":
        if "parameterization" not in inspect.signature(G.FastEngine.__init__).parameters:
            pytest.skip("no residual parameterization in this version")
        args += (parameterization, q_scale)
    fast = G.FastEngine(model, *args)
    if parameterization == "residual" and alpha_0 == q_scale:  # one branch suffices: no head to mix
        assert fast.branches == ("adapter",) and fast.mixed_head is None
    else:
        assert fast.mixed_head is not None  # the tiny Llama's head is a plain Linear
    ref = G.ReferenceEngine(model, *args)
    for got, want in zip(_steps(fast, ids, mask, 6), _steps(ref, ids, mask, 6)):
        assert got.shape == want.shape
        torch.testing.assert_close(F.log_softmax(got, -1), F.log_softmax(want, -1), rtol=0, atol=1e-5)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_given_compose_gets_both_raw_branches(model, tok):
    """The server gives its own ``compose`` to compose rows itself: then both branches' logits come
    to it (no mixed head)."""
    ids, mask = encoded(tok, PROMPTS)
    engine = G.FastEngine(model, "customized", 1.0, 1.0, ids.shape[0], compose=lambda q, base: (q, base))
    assert engine.mixed_head is None
    with torch.inference_mode():
        q, base = engine.prefill(ids, mask, ids.shape[1] + 1)
    engine.close()
    ref = G.ReferenceEngine(model, "customized", 1.0, 1.0, ids.shape[0], compose=lambda q, base: (q, base))
    with torch.inference_mode():
        q_ref, base_ref = ref.prefill(ids, mask, ids.shape[1] + 1)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(base, base_ref, rtol=0, atol=1e-5)


def test_post_processed_heads_are_not_mixed(tok):
    model = tiny_model(tok)
    model.get_base_model().config.final_logit_softcapping = 30.0  # a non-linear step after the head
    engine = G.FastEngine(model, "customized", 0.5, 0.7, 1)
    assert engine.mixed_head is None
    engine.close()
