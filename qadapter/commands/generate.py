"""``qadapter generate``: answer prompts with a trained Q-Adapter (the customized policy π̃ of eq. 1)."""

from __future__ import annotations

import argparse
import sys

HELP = "answer prompts with a trained Q-Adapter (optionally beside the base model's answers)"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` and ``chat``: which adapter, and how to decode."""
    parser.add_argument("--adapter", required=True, metavar="DIR",
                        help="folder saved by qadapter: one Q-Adapter, or a stack (qadapter train --on ...)")
    parser.add_argument("--strengths", default=None, metavar="S1,S2,...",
                        help="a stack's per-adapter decoding strengths (default: the saved ones, 1 as trained)")
    parser.add_argument("--base-model", default=None, metavar="PATH",
                        help="base model folder or hub id (default: the one the adapter was trained on)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--trust-remote-code", "--trust_remote_code", action="store_true", dest="trust_remote_code",
                        help="allow a base model that ships its own Python code to run it (off: such a model is refused)")
    parser.add_argument("--strength", type=float, default=None,
                        help="decode-time strength s of a residual Q-Adapter: π̃ ∝ π1·exp(s·(zθ − z1)); 1 (default) is "
                             "the trained policy, towards 0 the base model, above 1 an amplified customization")
    parser.add_argument("--alpha-0", type=float, default=None, dest="alpha_0",
                        help="α0 of eq. (1), the weight of log π1 (default: the adapter's setting)")
    parser.add_argument("--alpha-tilde", type=float, default=None, dest="alpha_tilde",
                        help="α̃ of eq. (1), the temperature of the customized policy (default: the adapter's setting)")
    parser.add_argument("--policy", choices=("customized", "base", "adapter"), default="customized",
                        help="which logits to decode: π̃ (default), the base π1, or the adapter alone")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="at most this many new tokens (default 256)")
    parser.add_argument("--min-new-tokens", type=int, default=0, help="suppress the end-of-turn token until this many")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, on top of α̃ (default 1)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible answers)")
    parser.add_argument("--stop", action="append", default=None, metavar="STRING",
                        help="stop when this string has been generated (repeatable)")
    parser.add_argument("--reference", action="store_true",
                        help="use the two-forward reference decoder instead of the fast one (same tokens, slower)")
    parser.add_argument("--compare", action="store_true", help="also show the base model's answer, clearly labeled")


def load(args):
    """The QAdapter named by ``args``, on ``args.device``."""
    import torch

    from pathlib import Path

    from ..modeling import QAdapter
    from ..stack import STACK_CONFIG, QAdapterStack

    if (Path(args.adapter) / STACK_CONFIG).is_file():
        strengths = [float(x) for x in args.strengths.split(",")] if getattr(args, "strengths", None) else None
        stack = QAdapterStack.from_pretrained(args.adapter, base_model=args.base_model, strengths=strengths)
        stack.model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return stack
    qa = QAdapter.from_pretrained(args.adapter, base_model=args.base_model,
                                  trust_remote_code=getattr(args, "trust_remote_code", False))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    qa.model.to(device)
    qa.model.eval()
    return qa


def decoding_kwargs(args, qa) -> dict:
    common = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=args.do_sample,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  stop_strings=args.stop, fast=not args.reference)
    if hasattr(qa, "strengths"):  # a QAdapterStack
        if args.alpha_0 is not None or args.alpha_tilde is not None:
            raise SystemExit("--alpha-0 / --alpha-tilde do not apply to a stack: use --strengths")
        return dict(strengths=qa.strengths, **common)
    try:  # the saved α's unless overridden, or the strength: one rule, QAdapterSettings.decoding_alphas
        alpha_0, alpha_tilde = qa.settings.decoding_alphas(args.alpha_0, args.alpha_tilde, getattr(args, "strength", None))
    except ValueError as e:
        raise SystemExit(f"qadapter: {e}") from None
    return dict(alpha_0=alpha_0, alpha_tilde=alpha_tilde, **common)


def label(kwargs: dict, policy: str) -> str:
    if policy == "base":
        return "base model (adapter disabled)"
    if policy == "adapter":
        return "adapter alone (softmax Q)"
    if "strengths" in kwargs:
        return f"stack of {len(kwargs['strengths'])} (strengths {', '.join(f'{s:g}' for s in kwargs['strengths'])})"
    return f"Q-Adapter (alpha_0={kwargs['alpha_0']:g}, alpha_tilde={kwargs['alpha_tilde']:g})"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("generate", help=HELP, description=HELP + ". Each prompt is one user turn "
                                   "(chat template with the generation prompt); '-' reads one prompt from stdin.")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts ('-': read stdin)")
    add_model_args(parser)
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    prompts = [sys.stdin.read().strip() if p == "-" else p for p in args.prompts]
    qa = load(args)
    kwargs = decoding_kwargs(args, qa)
    policies = [args.policy] + (["base"] if args.compare and args.policy != "base" else [])
    # through the adapter's own generate: it knows how Q̂ is parameterized (residual or full)
    answers = {policy: qa.generate(prompts, policy=policy, **kwargs) for policy in policies}
    labeled = len(prompts) > 1 or len(policies) > 1
    for i, prompt in enumerate(prompts):
        if len(prompts) > 1:
            print(f"### prompt {i + 1}: {prompt}")
        for policy in policies:
            if labeled:
                print(f"=== {label(kwargs, policy)} ===")
            print(answers[policy][i].strip() if labeled else answers[policy][i])
        if labeled and i + 1 < len(prompts):
            print()
    return 0
