"""The math module against a naive loop-over-tokens reference written straight from method.md."""

import math

import pytest
import torch

from qadapter.objective import (composed_logits, implied_rewards, length_normalizers, preference_loss,
                                soft_values, taken)

ALPHA_TILDE, ALPHA_0, GAMMA, BETA = 0.7, 0.3, 0.9, 0.2


def naive_value(q_row, lp_row):
    """V(s) = α̃ log Σ_a exp((Q(s,a) + α0 log π1(a|s)) / α̃), one state, a Python loop over the vocabulary."""
    total = sum(math.exp((q + ALPHA_0 * lp) / ALPHA_TILDE) for q, lp in zip(q_row.tolist(), lp_row.tolist()))
    return ALPHA_TILDE * math.log(total)


def naive_return_and_squares(q, lp, actions, response_states):
    """R = Σ_t [Q(s_t,a_t) − γ V(s_{t+1})] over the response, V after the last response token = 0."""
    ret, squares = 0.0, 0.0
    for k, t in enumerate(response_states):
        next_v = naive_value(q[t + 1], lp[t + 1]) if k + 1 < len(response_states) else 0.0
        r = q[t, actions[t]].item() - GAMMA * next_v
        ret += r
        squares += r * r
    return ret, squares


def make_row(length, response_len, pad_left, pad_right, vocab, gen):
    """Per-state tensors of one padded row: states whose action is a response token form one run."""
    width = pad_left + length + pad_right
    q = torch.randn(width, vocab, generator=gen, dtype=torch.float64) * 2
    lp = torch.log_softmax(torch.randn(width, vocab, generator=gen, dtype=torch.float64), -1)
    actions = torch.randint(vocab, (width,), generator=gen)
    mask = torch.zeros(width, dtype=torch.bool)
    start = pad_left + length - response_len
    mask[start:pad_left + length] = True
    if pad_left:  # garbage at padded states must never leak into the loss
        q[:pad_left] = float("nan")
    return q, lp, actions, mask, list(range(start, pad_left + length))


@pytest.mark.parametrize("normalizer", ["longest_sequence", "response_length", "none"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_loss_matches_naive_loop(normalizer, padding):
    gen = torch.Generator().manual_seed(0)
    vocab, width = 7, 12
    # three pairs: unequal chosen/rejected lengths, (full length, response length)
    specs = [((9, 4), (6, 2)), ((12, 7), (12, 3)), ((5, 1), (10, 6))]
    rows = {"c": [], "r": []}
    for spec in specs:
        for side, (length, resp) in zip("cr", spec):
            pad = width - length
            rows[side].append(make_row(length, resp, pad if padding == "left" else 0,
                                       pad if padding == "right" else 0, vocab, gen))

    def stack(side):
        q, lp, a, m, _ = zip(*rows[side])
        return torch.stack(q), torch.stack(lp), torch.stack(a), torch.stack(m)

    out = {}
    for side in "cr":
        q, lp, a, m = stack(side)
        v = soft_values(q, lp, ALPHA_0, ALPHA_TILDE)
        out[side] = (implied_rewards(taken(q, a), v, m, GAMMA), m)
    seq_c = torch.tensor([s[0][0] for s in specs])
    seq_r = torch.tensor([s[1][0] for s in specs])
    n_c, n_r = length_normalizers(normalizer, out["c"][1], out["r"][1], seq_c, seq_r)
    loss = preference_loss(out["c"][0], out["c"][1], out["r"][0], out["r"][1], n_c, n_r, BETA)

    expected_pref, expected_chi2 = 0.0, 0.0
    for i, ((len_c, resp_c), (len_r, resp_r)) in enumerate(specs):
        ret_c, sq_c = naive_return_and_squares(*[rows["c"][i][k] for k in (0, 1, 2, 4)])
        ret_r, sq_r = naive_return_and_squares(*[rows["r"][i][k] for k in (0, 1, 2, 4)])
        if normalizer == "longest_sequence":
            nc = nr = max(len_c, len_r) - 1
        elif normalizer == "response_length":
            nc, nr = resp_c, resp_r
        else:
            nc = nr = 1
        margin = ret_c / nc - ret_r / nr
        expected_pref += math.log1p(math.exp(-margin)) / len(specs)
        expected_chi2 += BETA * (sq_c + sq_r) / (resp_c + resp_r) / len(specs)
        assert loss["reward_chosen"][i].item() == pytest.approx(ret_c, rel=1e-9, abs=1e-9)
        assert loss["reward_rejected"][i].item() == pytest.approx(ret_r, rel=1e-9, abs=1e-9)
    assert loss["pref_loss"].item() == pytest.approx(expected_pref, rel=1e-9)
    assert loss["chi2_loss"].item() == pytest.approx(expected_chi2, rel=1e-9)
    assert loss["loss"].item() == pytest.approx(expected_pref + expected_chi2, rel=1e-9)


def test_first_response_token_scored_and_padding_not():
    """Correct alignment: changing Q at the state before the first response token changes the loss;
    changing Q at a padded state after the response does not."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 5, generator=gen)
    lp = torch.log_softmax(torch.randn(1, 6, 5, generator=gen), -1)
    a = torch.randint(5, (1, 6), generator=gen)
    m = torch.tensor([[False, True, True, True, False, False]])

    def total(qq):
        return implied_rewards(taken(qq, a), soft_values(qq, lp, ALPHA_0, ALPHA_TILDE), m, GAMMA).sum()

    base = total(q)
    q1 = q.clone(); q1[0, 1, a[0, 1]] += 1.0
    assert total(q1) != base
    q2 = q.clone(); q2[0, 4:] += 5.0
    assert total(q2) == base


def test_composed_logits_fresh_adapter_is_scaled_base():
    """Q = base logits => composed = log π1·(1+α0)/α̃ + const: same softmax as base·(1+α0)/α̃."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(3, 11, generator=gen, dtype=torch.float64)
    lp = torch.log_softmax(base, -1)
    got = torch.log_softmax(composed_logits(base, lp, ALPHA_0, ALPHA_TILDE), -1)
    want = torch.log_softmax(base * (1 + ALPHA_0) / ALPHA_TILDE, -1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_unknown_normalizer_is_refused():
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="longest_sequence"):
        length_normalizers("per_token", m, m)
