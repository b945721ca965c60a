"""A solved toy problem for the Q-Adapter objective: a tiny token-level MDP with known rewards.

Everything here is exact and enumerable, so the answer the objective should reach is known in
closed form. Equation numbers (1)-(5) refer to ``docs/method.md``; the functions of
:mod:`qadapter.objective` are used as they are, on tensors laid out exactly as the real trainer lays
them out (prompt positions, response mask, right padding).

The MDP (the token-level MDP of an LLM, method.md)
    A prompt x is one or two token ids. State s = (x, tokens generated so far); action a = the next
    token, one of ``vocab_size`` ids, the last of which is the end-of-turn token EOS. The
    transition is deterministic (append the token). The episode ends after EOS, or after
    ``horizon`` tokens (the horizon forces the end: the state after the H-th token is terminal).
    Every non-terminal state allows every token, so the states form a finite tree per prompt and a
    response y is a root-to-leaf path.

Known rewards
    r1(s, a) and r2(s, a) are Gaussian per (state, action) from a seed. r2 is built to *disagree*
    with r1 (r2 = −conflict·r1 + noise): a new preference that conflicts with the old one is the case
    the paper is about, and the one in which retention and the new preference trade off.

The policies (all computed by backward recursion over the tree, i.e. exact soft value iteration)
    π1     = soft-optimal for r1 at temperature α1 (the "RLHF-aligned" pre-trained policy):
             Q1(s,a) = r1(s,a) + V1(s'),  V1(s) = α1·logsumexp_a Q1(s,a)/α1,  π1 = exp((Q1 − V1)/α1).
    target = soft-optimal for λ·r1 + r2 at temperature α̃, with α0 = λ·α1 (the paper's objective).
             Residual Q-learning (Li et al. 2023) says target = softmax((Q̂* + α0·log π1)/α̃), eq. (1),
             with Q̂* = Q* − λ·Q1 the residual Q-function, and r2(s,a) = Q̂*(s,a) − V(s'), eq. (2)-(3)
             (:func:`residual_q` builds Q̂* from r2 and π1; the tests check both identities).
             At the sequence level: target(y|x) ∝ π1(y|x)^(α0/α̃) · exp(R2(y|x)/α̃).

The learner
    Q̂ is tabular: one learnable vector of V logits per non-terminal state, initialised to the base
    logits log π1(·|s) (as a fresh LoRA adapter leaves Q̂ = the base model's logits). It is trained
    on Bradley–Terry preference pairs on r2-returns, P(y1 ≻ y2 | x) = σ(R2(y1|x) − R2(y2|x)), by
    minimising the library's loss (4)+(5) to convergence, with the length normalizer ``"none"``
    (the toy's BT model is exactly on un-normalized returns). The two responses of a pair are drawn
    uniformly from the responses of the prompt by default (full coverage), or from π1.
    The customized policy is the softmax of :func:`qadapter.objective.composed_logits`, eq. (1).
    With infinite data and β = 0 the minimisers are Q̂* (:func:`residual_q`) up to a constant per
    state (which changes neither a return nor π̃), so the learned policy is the target.

The baselines
    * π1 itself (no customization).
    * "r2 only": the same loss and data with α0 = 0. Its optimum is softmax(Q̂/α̃) with
      r2 = Q̂ − V(s'): the soft-optimal policy for r2 *alone*, π(y|x) ∝ exp(R2(y|x)/α̃); π1 enters
      only as the initialization, and r1 is forgotten in the infinite-data limit.
    * For reference only (not trained): DPO with reference π1 and temperature β_DPO is the same loss
      with α̃ = α0 = β_DPO (its return is then β_DPO·log(π̃(y|x)/π1(y|x)) + V(x), method.md's
      identity), so its infinite-data optimum is π1·exp(R2/β_DPO): the target of a different
      (λ, α̃), see :func:`dpo_optimum_kl`.

Distances
    KL(p || q) is the KL divergence between the *response distributions* p(y|x), q(y|x), averaged
    over the prompts (uniform). By the chain rule it equals the expected sum, over the states the
    first policy visits, of the per-state KL of the next-token distributions.

Why one module of ~490 lines: it is a worked example read top to bottom (the MDP, its closed-form
optimum, the objective's tensors laid out as the trainer lays them out), used by tests/test_toy_mdp.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qadapter import objective

DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------
# The MDP
# ----------------------------------------------------------------------------------------------

@dataclass
class ToyMDP:
    """The enumerated tree. Built by :func:`build_mdp`; all tables are indexed by state id."""

    vocab_size: int
    horizon: int
    prompts: tuple[tuple[int, ...], ...]
    eos: int
    states: list[tuple[int, tuple[int, ...]]]            # non-terminal (prompt index, response so far)
    state_id: dict[tuple[int, tuple[int, ...]], int]
    child: torch.Tensor                                  # (S, V) next state id, -1 if terminal
    depth: torch.Tensor                                  # (S,)
    responses: list[tuple[int, tuple[int, ...]]]         # complete (prompt index, response)
    resp_prompt: torch.Tensor                            # (Y,) prompt index of each response
    # The library layout of every response, one row per response: positions 0 .. L-1 are the
    # states s_t = x_0..x_t of the full sequence prompt + response, right-padded.
    row_state: torch.Tensor                              # (Y, L) state id at position t, or S (= dummy)
    row_action: torch.Tensor                             # (Y, L) token x_{t+1} (0 on padding)
    row_mask: torch.Tensor                               # (Y, L) True where x_{t+1} is a response token
    path_state: torch.Tensor = field(repr=False)         # (Y, H) state ids on the path, S-padded
    path_action: torch.Tensor = field(repr=False)        # (Y, H) actions on the path (0-padded)

    @property
    def n_states(self) -> int:
        return len(self.states)

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)


def build_mdp(vocab_size: int = 4, horizon: int = 3,
              prompts: tuple[tuple[int, ...], ...] = ((0,), (1,), (2, 0))) -> ToyMDP:
    """Enumerate every non-terminal state and every complete response of the toy MDP.

    Prompt ids must be < ``vocab_size`` (they are tokens of the same vocabulary). The state id S
    (one past the last) stands for "not an MDP state" (prompt prefixes, the terminal state, padding).
    """
    eos = vocab_size - 1
    states: list[tuple[int, tuple[int, ...]]] = []
    responses: list[tuple[int, tuple[int, ...]]] = []
    for p in range(len(prompts)):
        frontier = [()]
        while frontier:  # breadth first, so parents come before children
            nxt = []
            for resp in frontier:
                states.append((p, resp))
                for a in range(vocab_size):
                    y = resp + (a,)
                    if a == eos or len(y) == horizon:
                        responses.append((p, y))
                    else:
                        nxt.append(y)
            frontier = nxt
    state_id = {s: i for i, s in enumerate(states)}
    S = len(states)
    child = torch.full((S, vocab_size), -1, dtype=torch.long)
    depth = torch.tensor([len(r) for _, r in states])
    for i, (p, resp) in enumerate(states):
        for a in range(vocab_size):
            child[i, a] = state_id.get((p, resp + (a,)), -1)

    L = max(len(x) for x in prompts) + horizon
    Y = len(responses)
    row_state = torch.full((Y, L), S, dtype=torch.long)
    row_action = torch.zeros((Y, L), dtype=torch.long)
    row_mask = torch.zeros((Y, L), dtype=torch.bool)
    path_state = torch.full((Y, horizon), S, dtype=torch.long)
    path_action = torch.zeros((Y, horizon), dtype=torch.long)
    for j, (p, y) in enumerate(responses):
        seq = prompts[p] + y
        P = len(prompts[p])
        for t in range(len(seq) - 1):
            row_action[j, t] = seq[t + 1]
            if t >= P - 1:  # s_t is an MDP state (x, y_<k) and x_{t+1} = y_k a response token
                k = t - (P - 1)
                row_state[j, t] = state_id[(p, y[:k])]
                row_mask[j, t] = True
                path_state[j, k] = state_id[(p, y[:k])]
                path_action[j, k] = y[k]
    return ToyMDP(vocab_size, horizon, tuple(prompts), eos, states, state_id, child, depth,
                  responses, torch.tensor([p for p, _ in responses]), row_state, row_action,
                  row_mask, path_state, path_action)


def make_rewards(mdp: ToyMDP, seed: int = 0, conflict: float = 0.5, noise: float = 0.5,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Known per-(state, action) rewards r1, r2 of shape (S, V).

    r1 = scale·N(0, 1), r2 = −conflict·r1 + scale·noise·N(0, 1), independently per entry: a new
    preference that partly disagrees with the old one.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (mdp.n_states, mdp.vocab_size)
    r1 = scale * torch.randn(shape, generator=g, dtype=DTYPE)
    r2 = -conflict * r1 + scale * noise * torch.randn(shape, generator=g, dtype=DTYPE)
    return r1, r2


# ----------------------------------------------------------------------------------------------
# Exact dynamic programming on the tree
# ----------------------------------------------------------------------------------------------

def _backward(mdp: ToyMDP, step) -> torch.Tensor:
    """Fill a (S, V) table from the leaves up: ``step(ids, next_values)`` returns the rows of the
    states ``ids`` given V(s') of their children (0 where the child is terminal), and the state
    values of those rows. Returns the table."""
    S, V = mdp.n_states, mdp.vocab_size
    table = torch.zeros((S, V), dtype=DTYPE)
    values = torch.zeros(S + 1, dtype=DTYPE)  # values[S] = 0 is the terminal value
    for d in range(mdp.horizon - 1, -1, -1):
        ids = (mdp.depth == d).nonzero().squeeze(-1)
        ch = mdp.child[ids]
        nv = values[torch.where(ch >= 0, ch, torch.full_like(ch, S))]
        rows, v = step(ids, nv)
        table[ids] = rows
        values[ids] = v
    return table


def soft_optimal(mdp: ToyMDP, reward: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft value iteration (max-entropy RL at temperature α) on the tree.

    Q(s,a) = r(s,a) + V(s'),  V(s) = α·logsumexp_a Q(s,a)/α,  V(terminal) = 0,
    log π(a|s) = (Q(s,a) − V(s))/α.   Returns (Q, log π), both (S, V).
    """
    def step(ids, nv):
        q = reward[ids] + nv
        return q, alpha * torch.logsumexp(q / alpha, dim=-1)
    q = _backward(mdp, step)
    return q, torch.log_softmax(q / alpha, dim=-1)


def residual_q(mdp: ToyMDP, r2: torch.Tensor, log_pi1: torch.Tensor, alpha_0: float,
               alpha_tilde: float) -> torch.Tensor:
    """The exact residual Q-function Q̂* for r2 and π1, by backward recursion on eq. (3):

    Q̂*(s,a) = r2(s,a) + V(s'),  V(s') from eq. (2) (:func:`qadapter.objective.soft_values`).

    Its composed policy, eq. (1), is the soft-optimal policy for λ·r1 + r2 at α̃ (α0 = λ·α1), and
    :func:`qadapter.objective.implied_rewards` recovers r2 from it exactly.
    """
    def step(ids, nv):
        q = r2[ids] + nv
        return q, objective.soft_values(q, log_pi1[ids], alpha_0, alpha_tilde)
    return _backward(mdp, step)


def sequence_log_probs(mdp: ToyMDP, log_pi: torch.Tensor) -> torch.Tensor:
    """log π(y|x) of every complete response, (Y,), from a per-state table log π(a|s) (S, V)."""
    padded = torch.cat([log_pi, torch.zeros((1, mdp.vocab_size), dtype=log_pi.dtype)])
    return padded[mdp.path_state, mdp.path_action].sum(-1)


def sequence_returns(mdp: ToyMDP, reward: torch.Tensor) -> torch.Tensor:
    """R(y|x) = Σ_t r(s_t, a_t) of every complete response, (Y,)."""
    return sequence_log_probs(mdp, reward)  # the same path sum


def kl(mdp: ToyMDP, logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p || q) between response distributions, averaged over prompts (uniform); logp, logq (Y,)."""
    terms = logp.exp() * (logp - logq)
    per_prompt = torch.zeros(mdp.n_prompts, dtype=DTYPE).index_add_(0, mdp.resp_prompt, terms)
    return per_prompt.mean().item()


def expected(mdp: ToyMDP, logp: torch.Tensor, values: torch.Tensor) -> float:
    """E_{y~p(.|x)}[values(y)] averaged over prompts (uniform)."""
    per_prompt = torch.zeros(mdp.n_prompts, dtype=DTYPE).index_add_(0, mdp.resp_prompt, logp.exp() * values)
    return per_prompt.mean().item()


# ----------------------------------------------------------------------------------------------
# Preference data
# ----------------------------------------------------------------------------------------------

def uniform_responses(mdp: ToyMDP) -> torch.Tensor:
    """log p(y|x) of the uniform distribution over the complete responses of each prompt, (Y,)."""
    counts = torch.bincount(mdp.resp_prompt, minlength=mdp.n_prompts).to(DTYPE)
    return -counts.log()[mdp.resp_prompt]


def sample_pairs(mdp: ToyMDP, log_p_responses: torch.Tensor, r2: torch.Tensor, n: int,
                 seed: int = 0, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """n Bradley–Terry pairs on r2-returns.

    The prompt x is uniform; y1 and y2 are drawn independently from ``log_p_responses`` (Y,), a
    distribution over the responses of each prompt (:func:`uniform_responses`, or
    ``sequence_log_probs(mdp, log_pi1)`` to sample from π1); draws with y1 = y2 are dropped; y1 is
    the chosen one with probability σ(R2(y1|x) − R2(y2|x)), eq. (4) with n = 1.

    Returns the response ids (n,), (n,) of the chosen and the rejected responses. Candidates come
    from one seeded stream, so the first m pairs of n > m are the m pairs: the data sets are nested.
    """
    g = torch.Generator().manual_seed(seed)
    R2 = sequence_returns(mdp, r2)
    counts = torch.bincount(mdp.resp_prompt, minlength=mdp.n_prompts)
    offsets = torch.cumsum(counts, 0) - counts      # responses of one prompt are contiguous
    cdf = torch.ones((mdp.n_prompts, int(counts.max())), dtype=DTYPE)
    for p in range(mdp.n_prompts):
        probs = log_p_responses[offsets[p]:offsets[p] + counts[p]].exp()
        cdf[p, :counts[p]] = torch.cumsum(probs / probs.sum(), 0)

    def draw(x, u):
        k = torch.searchsorted(cdf[x], u.unsqueeze(-1)).squeeze(-1)
        return offsets[x] + torch.minimum(k, counts[x] - 1)

    chosen, rejected, have = [], [], 0
    while have < n:
        x = torch.randint(mdp.n_prompts, (chunk,), generator=g)
        u = torch.rand((3, chunk), generator=g, dtype=DTYPE)
        y1, y2 = draw(x, u[0].contiguous()), draw(x, u[1].contiguous())
        first = u[2] < torch.sigmoid(R2[y1] - R2[y2])
        keep = y1 != y2
        chosen.append(torch.where(first, y1, y2)[keep])
        rejected.append(torch.where(first, y2, y1)[keep])
        have += int(keep.sum())
    return torch.cat(chosen)[:n], torch.cat(rejected)[:n]


# ----------------------------------------------------------------------------------------------
# The Q-Adapter loss on the toy, through qadapter.objective
# ----------------------------------------------------------------------------------------------

def adapter_loss(mdp: ToyMDP, q_table: torch.Tensor, log_pi1: torch.Tensor, chosen: torch.Tensor,
                 rejected: torch.Tensor, alpha_0: float, alpha_tilde: float, beta: float,
                 gamma: float = 1.0, normalizer: str = "none") -> dict[str, torch.Tensor]:
    """Eqs. (3)-(5) on the pairs, computed by :mod:`qadapter.objective` on the trainer's layout.

    ``q_table`` (S, V) is Q̂. Every response is laid out as the full token sequence prompt +
    response (states s_0 .. s_{L-1}, right-padded); positions that are not MDP states (inside the
    prompt, after the response) read a constant dummy row and are off the mask. The implied
    rewards are computed once per distinct response and gathered per pair.
    """
    dummy = torch.zeros((1, mdp.vocab_size), dtype=q_table.dtype)
    q = torch.cat([q_table, dummy])[mdp.row_state]                 # (Y, L, V)
    lp = torch.cat([log_pi1, dummy])[mdp.row_state]                # (Y, L, V)
    values = objective.soft_values(q, lp, alpha_0, alpha_tilde)    # (Y, L)     eq. (2)
    q_taken = objective.taken(q, mdp.row_action)                   # (Y, L)
    rewards = objective.implied_rewards(q_taken, values, mdp.row_mask, gamma)  # eq. (3)
    m_c, m_r = mdp.row_mask[chosen], mdp.row_mask[rejected]
    n_c, n_r = objective.length_normalizers(normalizer, m_c, m_r)
    return objective.preference_loss(rewards[chosen], m_c, rewards[rejected], m_r, n_c, n_r, beta)


def policy_log_probs(q_table: torch.Tensor, log_pi1: torch.Tensor, alpha_0: float,
                     alpha_tilde: float) -> torch.Tensor:
    """log π̃(a|s), (S, V): log-softmax of :func:`qadapter.objective.composed_logits`, eq. (1)."""
    return torch.log_softmax(objective.composed_logits(q_table, log_pi1, alpha_0, alpha_tilde), dim=-1)


def fit_adapter(mdp: ToyMDP, log_pi1: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                alpha_0: float, alpha_tilde: float, beta: float, init: torch.Tensor | None = None,
                max_iter: int = 500) -> torch.Tensor:
    """Minimise the Q-Adapter loss (4)+(5) over a tabular Q̂, full batch, to convergence (L-BFGS).

    ``init`` defaults to the base logits log π1: a fresh adapter's Q̂ (method.md). Returns Q̂ (S, V).
    Full-batch L-BFGS rather than SGD so that the result is the minimiser of the loss on the data,
    not an artefact of a learning-rate schedule; with β = 0 and few pairs that minimiser does not
    exist (separable pairs drive Q̂ to infinity) and ``max_iter`` bounds the run.
    """
    q = (log_pi1 if init is None else init).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([q], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                            tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = adapter_loss(mdp, q, log_pi1, chosen, rejected, alpha_0, alpha_tilde, beta)["loss"]
        loss.backward()
        return loss

    opt.step(closure)
    return q.detach()


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToyConfig:
    """Everything that defines a run. α0 = λ·α1 is the adapter's reference weight."""

    vocab_size: int = 4                 # 3 content tokens + EOS
    horizon: int = 3                    # at most 3 response tokens
    prompts: tuple[tuple[int, ...], ...] = ((0,), (1,), (2, 0))
    reward_seed: int = 0
    conflict: float = 0.5               # r2 = −conflict·r1 + noise·N(0,1)
    noise: float = 0.5
    alpha_1: float = 1.0                # temperature at which π1 is soft-optimal for r1
    lam: float = 0.5                    # weight λ of r1 in the target λ·r1 + r2
    alpha_tilde: float = 1.0            # temperature α̃ of the customized policy
    beta: float = 0.1                   # χ² weight of eq. (5) (the reference default)
    sampler: str = "uniform"            # responses of the pairs: "uniform" or "pi1"
    data_seed: int = 1

    @property
    def alpha_0(self) -> float:
        return self.lam * self.alpha_1


class ToyProblem:
    """The solved problem: rewards, π1, the target, and the preference data sampler."""

    def __init__(self, cfg: ToyConfig = ToyConfig()):
        self.cfg = cfg
        self.mdp = mdp = build_mdp(cfg.vocab_size, cfg.horizon, cfg.prompts)
        self.r1, self.r2 = make_rewards(mdp, cfg.reward_seed, cfg.conflict, cfg.noise)
        _, self.log_pi1 = soft_optimal(mdp, self.r1, cfg.alpha_1)
        self.R1, self.R2 = sequence_returns(mdp, self.r1), sequence_returns(mdp, self.r2)
        self.seq_pi1 = sequence_log_probs(mdp, self.log_pi1)
        if cfg.sampler == "uniform":
            self.seq_sampler = uniform_responses(mdp)
        elif cfg.sampler == "pi1":
            self.seq_sampler = self.seq_pi1
        else:
            raise ValueError(f"unknown sampler {cfg.sampler!r}")
        self._pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fits: dict[tuple, torch.Tensor] = {}

    def target(self, alpha_0: float | None = None) -> torch.Tensor:
        """log of the target response distribution (Y,): soft-optimal for λ·r1 + r2 at α̃,
        λ = α0/α1 (exact, by soft value iteration)."""
        a0 = self.cfg.alpha_0 if alpha_0 is None else alpha_0
        _, log_pi = soft_optimal(self.mdp, (a0 / self.cfg.alpha_1) * self.r1 + self.r2, self.cfg.alpha_tilde)
        return sequence_log_probs(self.mdp, log_pi)

    def pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n pairs of the seeded stream (nested across n)."""
        big = max([n, *self._pairs])
        if big not in self._pairs:
            self._pairs = {big: sample_pairs(self.mdp, self.seq_sampler, self.r2, big, self.cfg.data_seed)}
        c, r = self._pairs[big]
        return c[:n], r[:n]

    def fit(self, n: int, alpha_0: float, alpha_tilde: float | None = None, beta: float | None = None,
            init: str = "base") -> torch.Tensor:
        """log π̃ of the responses (Y,) after training Q̂ on n pairs (cached)."""
        at = self.cfg.alpha_tilde if alpha_tilde is None else alpha_tilde
        b = self.cfg.beta if beta is None else beta
        key = (n, alpha_0, at, b, init)
        if key not in self._fits:
            c, r = self.pairs(n)
            q0 = self.log_pi1 if init == "base" else torch.zeros_like(self.log_pi1)
            q = fit_adapter(self.mdp, self.log_pi1, c, r, alpha_0, at, b, init=q0)
            self._fits[key] = sequence_log_probs(self.mdp, policy_log_probs(q, self.log_pi1, alpha_0, at))
        return self._fits[key]


def data_size_table(problem: ToyProblem, sizes=(100, 1000, 10000)) -> list[dict]:
    """KL(target ‖ policy) for π1, the r2-only policy (α0 = 0) and Q-Adapter, per data size; and a
    last row ``n = None``: the exact optima (infinite data, β = 0), where Q-Adapter's is the target."""
    cfg, mdp, t = problem.cfg, problem.mdp, problem.target()
    kl_pi1 = kl(mdp, t, problem.seq_pi1)
    rows = [{"n": n, "pi1": kl_pi1, "r2_only": kl(mdp, t, problem.fit(n, 0.0)),
             "q_adapter": kl(mdp, t, problem.fit(n, cfg.alpha_0))} for n in sizes]
    _, log_r2_only = soft_optimal(mdp, problem.r2, cfg.alpha_tilde)
    rows.append({"n": None, "pi1": kl_pi1, "r2_only": kl(mdp, t, sequence_log_probs(mdp, log_r2_only)),
                 "q_adapter": 0.0})
    return rows


def dpo_optimum_kl(problem: ToyProblem, beta_dpo: float = 0.1) -> float:
    """KL(target ‖ DPO's optimum): DPO with reference π1 and temperature β_DPO, infinite data,
    converges to π1(y|x)·exp(R2(y|x)/β_DPO)/Z(x) (the same loss with α̃ = α0 = β_DPO)."""
    logits = problem.seq_pi1 + problem.R2 / beta_dpo
    logz = torch.zeros(problem.mdp.n_prompts, dtype=DTYPE)
    for p in range(problem.mdp.n_prompts):
        logz[p] = torch.logsumexp(logits[problem.mdp.resp_prompt == p], 0)
    return kl(problem.mdp, problem.target(), logits - logz[problem.mdp.resp_prompt])


def alpha0_sweep(problem: ToyProblem, alphas=(0.0, 0.25, 0.5, 0.75, 1.0), n: int = 10000) -> list[dict]:
    """Per α0 (α̃ fixed): the trained policy's KL(π̃ ‖ π1), E[R2], E[R1] and its KL to its own
    target (λ = α0/α1), with the exact target's KL(· ‖ π1) and E[R2] alongside."""
    mdp, rows = problem.mdp, []
    for a0 in alphas:
        pol, tgt = problem.fit(n, a0), problem.target(a0)
        rows.append({"alpha_0": a0, "kl_pi1": kl(mdp, pol, problem.seq_pi1),
                     "r2": expected(mdp, pol, problem.R2), "r1": expected(mdp, pol, problem.R1),
                     "kl_target": kl(mdp, tgt, pol),
                     "exact_kl_pi1": kl(mdp, tgt, problem.seq_pi1), "exact_r2": expected(mdp, tgt, problem.R2)})
    return rows


def beta_table(problem: ToyProblem, betas=(0.0, 0.01, 0.1, 1.0), sizes=(100, 1000, 10000)) -> list[dict]:
    """KL(target ‖ Q-Adapter) per χ² weight β and data size."""
    t = problem.target()
    return [{"beta": b, **{n: kl(problem.mdp, t, problem.fit(n, problem.cfg.alpha_0, beta=b)) for n in sizes}}
            for b in betas]


def format_data_size_table(rows: list[dict]) -> str:
    out = ["| pairs | KL(target ‖ π1) | KL(target ‖ r2-only) | KL(target ‖ Q-Adapter) | Q-Adapter / best baseline |",
           "|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = "∞ (exact optima)" if r["n"] is None else str(r["n"])
        ratio = r["q_adapter"] / min(r["pi1"], r["r2_only"])
        out.append(f"| {n} | {r['pi1']:.4f} | {r['r2_only']:.4f} | {r['q_adapter']:.4f} | {ratio:.3f} |")
    return "\n".join(out)


def format_alpha0_sweep(rows: list[dict]) -> str:
    out = ["| α0 | KL(π̃ ‖ π1) | E[R2] | E[R1] | KL(target_α0 ‖ π̃) | exact: KL(target_α0 ‖ π1) | exact: E[R2] |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['alpha_0']:.2f} | {r['kl_pi1']:.4f} | {r['r2']:+.4f} | {r['r1']:+.4f} | "
                   f"{r['kl_target']:.4f} | {r['exact_kl_pi1']:.4f} | {r['exact_r2']:+.4f} |")
    return "\n".join(out)


def format_beta_table(rows: list[dict]) -> str:
    sizes = [k for k in rows[0] if k != "beta"]
    out = ["| β | " + " | ".join(f"KL, {n} pairs" for n in sizes) + " |",
           "|---:|" + "---:|" * len(sizes)]
    for r in rows:
        out.append(f"| {r['beta']:g} | " + " | ".join(f"{r[n]:.4f}" for n in sizes) + " |")
    return "\n".join(out)
