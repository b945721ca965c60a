"""The Q-Adapter objective: the math of Li et al. (ICLR 2025), and nothing else.

Every function here is a pure torch function of tensors; nothing knows about models, tokenizers or
trainers. Equation numbers refer to ``docs/method.md`` (the project's reading of the paper).

Notation, for one sequence of tokens x_0 .. x_{T-1}:

* state ``s_t`` = the tokens x_0 .. x_t, so the logits a causal LM emits at position t are the
  action values of ``s_t``; action ``a_t`` = x_{t+1}, the token that follows.
* ``q``        (..., V)  the residual Q-function Q̂(s, ·), from the logits of the model with the adapter
                         (zθ) and without it (z1) by :func:`q_values`: ``residual`` Q̂ = c·(zθ − z1)
                         (the default: zero before training), ``full`` Q̂ = zθ (the authors' code).
* ``log_pi1``  (..., V)  log π1(· | s): log-softmax of the same model with the adapter disabled (z1).
* ``mask``     (B, L)    True where the action a_t is a response token (the only actions scored).

With those, for α̃ (``alpha_tilde``), α0 (``alpha_0``), γ (``gamma``) and β (``beta``):

    (1) π̃(a|s)   = softmax_a((Q̂(s,a) + α0·log π1(a|s)) / α̃)
    (2) V(s)      = α̃ · logsumexp_a((Q̂(s,a) + α0·log π1(a|s)) / α̃)
    (3) r(s_t,a_t) = Q̂(s_t,a_t) − γ·V(s_{t+1}),   V after the last response token = 0
        (``value_pairing="same_state"``: Q̂(s_t,a_t) − γ·V(s_t), the authors' code's pairing)
    (4) L_BT      = −log σ(R(y_w|x)/n_w − R(y_l|x)/n_l),   R(y|x) = Σ_t r(s_t,a_t)
    (5) L         = L_BT + β · mean over the response tokens of both responses of r²

Vocabulary-wide work happens only in :func:`composed_logits` and :func:`soft_values`; both keep at
most one extra (..., V) float tensor alive beyond their inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Length normalizers n of (4). ``longest_sequence``: n_w = n_l = (length of the longer of the two
#: full sequences, prompt included) − 1, i.e. its number of next-token predictions; this equals the
#: authors' code at its documented micro-batch of one pair, but does not depend on what else is in
#: the batch. ``response_length``: each return divided by its own number of response tokens.
#: ``none``: n = 1.
NORMALIZERS = ("longest_sequence", "response_length", "none")

#: How Q̂ is made from the adapter (docs/method.md, "How Q̂ is parameterized"). ``residual``:
#: Q̂ = c·(zθ − z1) with c = ``q_scale`` (the training α̃), zero before training, so that with
#: α0 = α̃ the customized policy starts at π1 exactly and no term sees the base logits' per-state
#: offsets; at α0 = α̃ = c, π̃ = softmax(zθ), the adapter model itself. ``full``: Q̂ = zθ, the
#: authors' code, whose implied rewards hold the base model's own (offset-laden) reward.
PARAMETERIZATIONS = ("residual", "full")

#: Which soft value the implied reward pairs with Q̂(s_t, a_t): ``next_state`` V(s_{t+1}) (the
#: math, eq. 3) or ``same_state`` V(s_t) (the authors' code). Under Bradley-Terry with γ = 1 they
#: give the same loss (the prompt's value cancels within a pair); the χ² term differs per token:
#: with ``same_state`` it bounds (α̃·log π̃ − α0·log π1)(a_t|s_t), with ``next_state`` the reward itself.
VALUE_PAIRINGS = ("next_state", "same_state")


def q_values(adapter_logits: torch.Tensor, base_logits: torch.Tensor | None, parameterization: str,
             q_scale: float = 1.0) -> torch.Tensor:
    """Q̂(s, ·) from the raw logits of both branches: (..., V), (..., V) -> (..., V) float32.

    ``full``: the adapter logits zθ (``base_logits`` unused, may be None). ``residual``:
    q_scale·(zθ − z1), exactly 0 for an untrained LoRA (its B matrix is 0, so zθ = z1 bitwise).
    """
    if parameterization == "full":
        return adapter_logits.float()
    if parameterization != "residual":
        raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {', '.join(PARAMETERIZATIONS)}")
    q = adapter_logits.float() - base_logits.float()
    return q if q_scale == 1.0 else q * q_scale


def composed_logits(q: torch.Tensor, log_pi1: torch.Tensor, alpha_0: float, alpha_tilde: float) -> torch.Tensor:
    """Logits of the customized policy π̃, eq. (1).

    Args:
        q: (..., V) residual Q-values Q̂(s, ·), i.e. the adapter model's logits.
        log_pi1: (..., V) log-probabilities of the pre-trained policy π1 (no gradient needed).
    Returns:
        (..., V) logits whose softmax is π̃. Residual and fresh (q = 0): log π1 · α0/α̃, so π1 itself
        at α0 = α̃. Full and fresh (q = base logits = log π1 + c): log π1 · (1 + α0)/α̃ + const.
    """
    z = torch.add(q, log_pi1, alpha=alpha_0)  # one (..., V) tensor, no α0·log_pi1 temporary
    return z if alpha_tilde == 1.0 else z / alpha_tilde


def soft_values(q: torch.Tensor, log_pi1: torch.Tensor, alpha_0: float, alpha_tilde: float) -> torch.Tensor:
    """Soft state values V(s), eq. (2).

    Args:
        q, log_pi1: (..., V) as in :func:`composed_logits`.
    Returns:
        (...) α̃ · logsumexp over the vocabulary of the composed logits.
    """
    return alpha_tilde * torch.logsumexp(composed_logits(q, log_pi1, alpha_0, alpha_tilde), dim=-1)


def customized_logits(adapter_logits: torch.Tensor, base_logits: torch.Tensor, *, parameterization: str,
                      q_scale: float, alpha_0: float, alpha_tilde: float) -> torch.Tensor:
    """Logits of π̃, eq. (1), from the raw logits of both branches: (..., V), (..., V) -> (..., V)."""
    q = q_values(adapter_logits, base_logits, parameterization, q_scale)
    return composed_logits(q, F.log_softmax(base_logits.float(), dim=-1), alpha_0, alpha_tilde)


def adapter_only_logits(q: torch.Tensor, parameterization: str, q_scale: float, alpha_tilde: float) -> torch.Tensor:
    """π̃'s logits, up to a per-row constant, from the adapter logits alone, where they suffice
    (:func:`qadapter.generation.one_branch`): zθ/α̃ (a full Q̂ with α0 = 0) or (q_scale/α̃)·zθ (a
    residual Q̂ with α0 = q_scale). (..., V) -> (..., V)."""
    if parameterization == "full":
        return q if alpha_tilde == 1.0 else q / alpha_tilde
    return q if q_scale == alpha_tilde else q * (q_scale / alpha_tilde)


def taken(values_per_action: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Pick the entry of the action taken: (B, L, V), (B, L) int -> (B, L)."""
    return values_per_action.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def implied_rewards(q_taken: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                    value_pairing: str = "next_state") -> torch.Tensor:
    """Per-token implied rewards r2(s_t, a_t), eq. (3), with the correct causal alignment.

    Args:
        q_taken: (B, L) Q̂(s_t, a_t) for consecutive states s_0 .. s_{L-1} of each row.
        values:  (B, L) V(s_t) for the same states.
        mask:    (B, L) bool, True where a_t is a response token. A response is one contiguous run
                 of True; the state after its last token is terminal (V = 0).
    Returns:
        (B, L) r_t = Q̂(s_t,a_t) − γ·V(s_{t+1}) on the mask (``same_state``: − γ·V(s_t)), exactly 0
        elsewhere. The first response token is scored; nothing after the end of a response (padding) is.
    """
    mask = mask.bool()
    if value_pairing == "same_state":
        return torch.where(mask, q_taken - gamma * values, torch.zeros_like(q_taken))
    if value_pairing != "next_state":
        raise ValueError(f"unknown value_pairing {value_pairing!r}; choose one of {', '.join(VALUE_PAIRINGS)}")
    # V(s_{t+1}) counts only where a_{t+1} is still a response action; torch.where (not a product)
    # so that non-finite values at unscored positions cannot leak in.
    next_values = torch.where(mask[:, 1:], values[:, 1:], torch.zeros_like(values[:, 1:]))
    next_values = F.pad(next_values, (0, 1))
    rewards = q_taken - gamma * next_values
    return torch.where(mask, rewards, torch.zeros_like(rewards))


def length_normalizers(
    kind: str, mask_chosen: torch.Tensor, mask_rejected: torch.Tensor,
    seq_len_chosen: torch.Tensor | None = None, seq_len_rejected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The n_w, n_l of eq. (4), one per pair: (B,), (B,). See :data:`NORMALIZERS`.

    ``seq_len_*`` (B,) are the unpadded full lengths (prompt + response) and are needed for
    ``longest_sequence`` only.
    """
    if kind == "longest_sequence":
        if seq_len_chosen is None or seq_len_rejected is None:
            raise ValueError("normalizer 'longest_sequence' needs the full sequence lengths")
        n = (torch.maximum(seq_len_chosen, seq_len_rejected) - 1).clamp(min=1).to(mask_chosen.device)
        return n.float(), n.float()
    if kind == "response_length":
        return mask_chosen.sum(-1).clamp(min=1).float(), mask_rejected.sum(-1).clamp(min=1).float()
    if kind == "none":
        ones = torch.ones(mask_chosen.shape[0], device=mask_chosen.device)
        return ones, ones
    raise ValueError(f"unknown length normalizer {kind!r}; choose one of {', '.join(NORMALIZERS)}")


def preference_loss(
    rewards_chosen: torch.Tensor, mask_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor, mask_rejected: torch.Tensor,
    n_chosen: torch.Tensor, n_rejected: torch.Tensor, beta: float,
) -> dict[str, torch.Tensor]:
    """The Q-Adapter loss, eqs. (4) + (5), averaged over pairs.

    Args:
        rewards_*: (B, L_*) per-token rewards from :func:`implied_rewards` (0 off the mask).
        mask_*:    (B, L_*) bool response masks.
        n_*:       (B,) length normalizers from :func:`length_normalizers`.
    Returns:
        dict of scalars ``loss``, ``pref_loss``, ``chi2_loss`` (β already applied) and per-pair
        (B,) ``reward_chosen``, ``reward_rejected`` (the un-normalized returns R(y|x)).
    """
    ret_c, ret_r = rewards_chosen.sum(-1), rewards_rejected.sum(-1)
    pref_loss = -F.logsigmoid(ret_c / n_chosen - ret_r / n_rejected).mean()
    squares = rewards_chosen.pow(2).sum(-1) + rewards_rejected.pow(2).sum(-1)
    count = (mask_chosen.sum(-1) + mask_rejected.sum(-1)).clamp(min=1)
    chi2_loss = beta * (squares / count).mean()
    return {"loss": pref_loss + chi2_loss, "pref_loss": pref_loss, "chi2_loss": chi2_loss,
            "reward_chosen": ret_c, "reward_rejected": ret_r}


def reference_compat_loss(
    q_taken: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, beta: float,
    padded_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """The authors' training objective, quirks included (``reference_compat=True``).

    Their rows are full sequences right-padded to a common length T, chosen rows first, then the
    rejected rows in the same order. Every tensor here covers the states s_0 .. s_{T-2}:

    Args:
        q_taken: (2B, T-1) Q̂(s_t, x_{t+1}), the padding token included as an action.
        values:  (2B, T-1) V(s_t) of the *same* state (method.md, difference 1).
        mask:    (2B, T-1) True where the token x_t itself is a response token: shifted by one from
                 the action mask, so the first response token is never scored and the padding
                 token after a shorter response is (difference 2).
        padded_length: T; defaults to the width of the tensors + 1. Pass it when the tensors cover
                 only the response columns of a differently laid-out batch.
    Differences 3 and the χ² mean: both returns are divided by T − 1, and the χ² term averages r²
    over every masked token of the micro-batch rather than per pair.
    """
    divisor = (padded_length - 1) if padded_length is not None else q_taken.shape[1]
    mask = mask.bool()
    rewards = torch.where(mask, q_taken - gamma * values, torch.zeros_like(q_taken))
    returns = rewards.sum(-1)
    half = returns.shape[0] // 2
    ret_c, ret_r = returns[:half], returns[half:]
    pref_loss = -F.logsigmoid((ret_c - ret_r) / divisor).mean()
    chi2_loss = beta * rewards.pow(2).sum() / mask.sum().clamp(min=1)
    return {"loss": pref_loss + chi2_loss, "pref_loss": pref_loss, "chi2_loss": chi2_loss,
            "reward_chosen": ret_c, "reward_rejected": ret_r}
