"""The two-branch decoder's few-row products (qadapter.products): W·xᵀ equals F.linear to rounding,
the faster order is chosen by measurement (once per rows bucket), the override, and the decoder with
either order giving the reference engine's tokens while the one-branch decoder never uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qadapter import products as P
from qadapter.errors import ConfigError
from qadapter.generation import FastEngine, generate
from test_generation import PROMPTS, encoded, model, tiny_model, tok  # noqa: F401  (model, tok: fixtures)


@pytest.mark.parametrize("shape", [(2, 576), (16, 1536), (3, 1, 40), (2, 5, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_first_is_f_linear_to_rounding(shape, with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(96, shape[-1], generator=gen, dtype=torch.float64)
    bias = torch.randn(96, generator=gen, dtype=torch.float64) if with_bias else None
    got, want = P.weight_first(x, weight, bias), F.linear(x, weight, bias)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # in float32 it is as accurate as F.linear itself (a different summation order, not an approximation)
    args32 = (x.float(), weight.float(), None if bias is None else bias.float())
    error = (P.weight_first(*args32).double() - want).abs().max()
    assert error <= 4 * (F.linear(*args32).double() - want).abs().max() + 1e-6


def counting(monkeypatch):
    calls = []
    real = P.weight_first

    def spy(x, weight, bias=None):
        calls.append(x.numel() // x.shape[-1])
        return real(x, weight, bias)

    monkeypatch.setattr(P, "weight_first", spy)
    return calls


def test_only_two_to_max_rows_take_the_other_order(monkeypatch):
    calls = counting(monkeypatch)
    weight = torch.randn(8, 4)
    products = P.SmallProducts([(weight, None)], "weight-first")
    for rows in (1, 2, P.MAX_ROWS, P.MAX_ROWS + 1):
        x = torch.randn(rows, 4)
        out = products(x, weight)
        if rows in (1, P.MAX_ROWS + 1):
            assert torch.equal(out, F.linear(x, weight))  # F.linear itself
    assert calls == [2, P.MAX_ROWS]


def scripted(durations):
    """A timer whose consecutive (start, end) readings are ``durations`` apart."""
    readings, now = [], 0.0
    for d in durations:
        readings += [now, now + d]
        now += d + 1.0
    it = iter(readings)
    return lambda: next(it)


@pytest.mark.parametrize("linear_s,transposed_s,chosen", [(1.0, 0.5, True), (1.0, 0.95, False), (0.5, 1.0, False)])
def test_the_measurement_keeps_the_faster_order_once_per_bucket(linear_s, transposed_s, chosen):
    sweeps = 1 + P.SWEEPS  # a warm-up, then the timed sweeps; x·Wᵀ then W·xᵀ each time
    products = P.SmallProducts([(torch.randn(8, 4), None), (torch.randn(6, 8), torch.randn(6))], "auto",
                               timer=scripted([linear_s, transposed_s] * sweeps))
    assert products.faster(3) is chosen  # bucket 4, measured
    assert list(products.timings) == [4] and products.timings[4] == pytest.approx((linear_s, transposed_s))
    assert products.faster(4) is chosen and products.faster(3) is chosen  # the same bucket: no new timing
    with pytest.raises(StopIteration):  # a new bucket measures again (the scripted timer is spent)
        products.faster(5)


def test_the_measurement_leaves_the_random_state_alone():
    products = P.SmallProducts([(torch.randn(8, 4), None)], "auto")
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    products.faster(2)
    assert 2 in products.timings and torch.equal(torch.rand(4), want)


def test_the_override_and_a_bad_value(monkeypatch, tok):
    model = tiny_model(tok)
    inner = model.get_base_model()
    monkeypatch.setenv(P.ENV, "linear")
    assert P.small_products(inner) is None
    monkeypatch.setenv(P.ENV, "weight-first")
    products = P.small_products(inner)
    assert products.mode == "weight-first" and P.small_products(inner) is products  # kept per model
    threads = torch.get_num_threads()
    try:  # measured for one thread count, not reused for another
        torch.set_num_threads(threads + 1)
        assert P.small_products(inner) is not products
    finally:
        torch.set_num_threads(threads)
    names = {id(m) for m in P.body_linears(inner)}
    head = inner.get_output_embeddings()
    assert id(head) not in names and len(names) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    monkeypatch.setenv(P.ENV, "fastest")
    with pytest.raises(ConfigError, match="QADAPTER_SMALL_PRODUCTS='fastest' is not one of auto, linear"):
        P.small_products(inner)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])  # 2 rows a step (head 1), 6 rows (head 3)
@pytest.mark.parametrize("parameterization,q_scale,alpha_0,alpha_tilde", [
    ("residual", 1.0, 2.0, 2.0), ("full", 1.0, 0.5, 0.7)])
def test_two_branch_decoding_in_either_order_gives_the_reference_tokens(monkeypatch, model, tok, prompts,
                                                                        parameterization, q_scale, alpha_0,
                                                                        alpha_tilde):
    kw = dict(alpha_0=alpha_0, alpha_tilde=alpha_tilde, max_new_tokens=12, eos_token_id=[], return_ids=True,
              parameterization=parameterization, q_scale=q_scale)
    _, ref = generate(model, tok, prompts, fast=False, **kw)
    calls = counting(monkeypatch)
    monkeypatch.setenv(P.ENV, "weight-first")
    _, transposed = generate(model, tok, prompts, fast=True, **kw)
    rows = 2 * len(prompts)
    assert calls.count(rows) >= (12 - 1) * 14  # every step after the prefill: 14 body products by W·xᵀ
    assert (len(prompts) in calls) == (len(prompts) >= 2)  # the mixed head too, from 2 rows on
    monkeypatch.setenv(P.ENV, "linear")
    calls.clear()
    _, linear = generate(model, tok, prompts, fast=True, **kw)
    assert calls == [] and transposed == linear == ref
    assert not any("forward" in m.__dict__ for m in model.modules())  # every forward restored

    ids, mask = encoded(tok, prompts)
    logits = {}
    for order in ("weight-first", "linear"):
        monkeypatch.setenv(P.ENV, order)
        engine = FastEngine(model, "customized", alpha_0, alpha_tilde, ids.shape[0], parameterization, q_scale)
        with torch.inference_mode():
            first = engine.prefill(ids, mask, ids.shape[1] + 2)
            logits[order] = torch.stack([first, engine.step(first.argmax(-1))])
        engine.close()
    torch.testing.assert_close(logits["weight-first"], logits["linear"], rtol=1e-5, atol=1e-5)


def test_the_one_branch_decoder_never_uses_it(monkeypatch, model, tok):
    monkeypatch.setenv(P.ENV, "weight-first")
    calls = counting(monkeypatch)
    engine = FastEngine(model, "customized", 1.0, 1.0, 3, "residual", 1.0)
    assert engine.branches == ("adapter",) and engine.products is None
    engine.close()
    generate(model, tok, PROMPTS, fast=True, alpha_0=1.0, alpha_tilde=1.0, parameterization="residual",
             q_scale=1.0, max_new_tokens=4, eos_token_id=[])
    assert calls == []
