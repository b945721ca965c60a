"""Q-Adapter on a solved toy problem: a tiny token-level MDP whose answer is known exactly.

    python examples/toy_mdp.py                  # the tables of docs/toy_problem.md (5-10 s on one core)
    python examples/toy_mdp.py --sampler pi1    # preference pairs on responses sampled from π1

What it does (details and the equations: ``qadapter/toy.py``, ``docs/toy_problem.md``):

1. Builds the MDP (3 prompts, 3 content tokens + EOS, at most 3 response tokens: 39 states,
   120 complete responses) and known per-token rewards r1, r2 (r2 partly opposes r1).
2. π1 = the exact soft-optimal policy for r1 at α1 = 1 (soft value iteration on the tree).
3. Target = the exact soft-optimal policy for λ·r1 + r2 at α̃ = 1, λ = 0.5, so α0 = λ·α1 = 0.5.
4. Samples Bradley–Terry pairs on r2-returns (responses uniform over the 40 of each prompt by
   default), trains a tabular Q̂ (initialized to the base logits log π1) with the library's loss
   (``qadapter.objective``, normalizer "none", β = 0.1) to convergence, and compares
   KL(target ‖ ·) for π1, an r2-only policy (the same loss with α0 = 0) and Q-Adapter.
5. Sweeps α0 (retention vs. the new preference), and β (the χ² weight).
"""

from __future__ import annotations

import argparse
import time

import torch

from qadapter import toy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward-seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--sampler", choices=("uniform", "pi1"), default="uniform",
                        help="how the two responses of a pair are drawn (default: uniform over responses)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000], help="numbers of pairs")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # tensors of a few hundred numbers: threads only add overhead
    start = time.perf_counter()
    cfg = toy.ToyConfig(reward_seed=args.reward_seed, data_seed=args.data_seed, sampler=args.sampler)
    problem = toy.ToyProblem(cfg)
    mdp = problem.mdp
    print(f"toy MDP: {len(mdp.prompts)} prompts, vocabulary {mdp.vocab_size} (EOS = {mdp.eos}), horizon "
          f"{mdp.horizon}: {mdp.n_states} states, {len(mdp.responses)} responses")
    print(f"α1 = {cfg.alpha_1}, λ = {cfg.lam}, α0 = λ·α1 = {cfg.alpha_0}, α̃ = {cfg.alpha_tilde}, γ = 1, "
          f"β = {cfg.beta}, normalizer 'none'; pairs: responses {cfg.sampler}, seed {cfg.data_seed}; "
          f"rewards seed {cfg.reward_seed}")
    print("KL(p ‖ q) = KL between response distributions, averaged over the prompts.\n")

    print("Q-Adapter vs. baselines, by number of preference pairs:")
    print(toy.format_data_size_table(toy.data_size_table(problem, tuple(args.sizes))))
    print(f"(for reference: DPO with reference π1 and β_DPO = 0.1 converges to π1·exp(R2/0.1); "
          f"KL(target ‖ it) = {toy.dpo_optimum_kl(problem, 0.1):.4f})\n")

    n = max(args.sizes)
    print(f"α0 sweep ({n} pairs, α̃ = {cfg.alpha_tilde}; target_α0 = soft-optimal for (α0/α1)·r1 + r2):")
    print(toy.format_alpha0_sweep(toy.alpha0_sweep(problem, n=n)))
    beyond = ", ".join(f"α0 = {a:g}: {toy.kl(mdp, problem.target(a), problem.seq_pi1):.4f}" for a in (1, 2, 4, 8))
    print(f"(exact KL(target_α0 ‖ π1) for larger α0: {beyond}.\n"
          f" Not monotone for large α0: the target, ∝ π1^(α0/α̃)·exp(R2/α̃), becomes sharper than π1\n"
          f" and moves away from it again)\n")

    print("χ² weight β (Q-Adapter, KL(target ‖ π̃)):")
    print(toy.format_beta_table(toy.beta_table(problem, sizes=tuple(args.sizes))))
    print(f"\nruntime: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
