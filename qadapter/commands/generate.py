"""``qadapter generate``: answer prompts with a trained Q-Adapter (the customized policy π̃ of eq. 1)."""

from __future__ import annotations

import argparse
import sys

HELP = "answer prompts with a trained Q-Adapter (optionally beside the base model's answers)"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` and ``chat``: which adapter, and how to decode."""
    parser.add_argument("--adapter", required=True, metavar="DIR",
                        help="folder saved by qadapter: one Q-Adapter, or a stack (qadapter train --on ...)")
    parser.add_argument("--strengths", default=None, metavar="S1,S2,...", help=argparse.SUPPRESS)  # old name of --strength
    parser.add_argument("--base-model", default=None, metavar="PATH",
                        help="base model folder or hub id (default: the one the adapter was trained on)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--trust-remote-code", "--trust_remote_code", action="store_true", dest="trust_remote_code",
                        help="allow a base model that ships its own Python code to run it (off: such a model is refused)")
    parser.add_argument("--strength", default=None, metavar="S[,S2,...]",
                        help="decode-time strength: π̃ ∝ π1·exp(s·(zθ − z1)); 1 (default) is the trained policy, towards 0 "
                             "the base model, above 1 an amplified customization. On a stack: one value sets every "
                             "adapter, S1,S2,... one per adapter (the count must match)")
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


def strength_arg(args):
    """``--strength`` (or its older name ``--strengths``): the raw value for THE strength rule."""
    strength, old = getattr(args, "strength", None), getattr(args, "strengths", None)
    if strength is not None and old is not None:
        raise SystemExit("qadapter: give --strength (one value, or one per adapter of a stack), not also --strengths")
    return strength if strength is not None else old


def load(args):
    """The QAdapter or QAdapterStack named by ``args``, on ``args.device``, at the decoding settings
    of ``--strength`` / ``--alpha-0`` / ``--alpha-tilde`` (one loader: :func:`qadapter.loading.load`)."""
    import torch

    from ..errors import UserError
    from ..loading import load as load_folder

    field = "--strength" if getattr(args, "strength", None) is not None else "--strengths"
    try:
        loaded = load_folder(args.adapter, base_model=args.base_model,
                             device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                             trust_remote_code=getattr(args, "trust_remote_code", False), strength=strength_arg(args),
                             alpha_0=args.alpha_0, alpha_tilde=args.alpha_tilde, field=field,
                             kinds=("stack", "qadapter"))
    except UserError:
        raise  # the CLI prints it (qadapter: error: ...)
    except ValueError as e:
        raise SystemExit(f"qadapter: {e}") from None
    return loaded.policy


def decoding_kwargs(args, qa) -> dict:
    """How to decode; the strength and α's are already the loaded policy's own (:func:`load`)."""
    return dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=args.do_sample,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                stop_strings=args.stop, fast=not args.reference)


def label(qa, policy: str) -> str:
    if policy == "base":
        return "base model (adapter disabled)"
    if policy == "adapter":
        return "adapter alone (softmax Q)"
    if hasattr(qa, "strengths"):  # a QAdapterStack
        return f"stack of {len(qa.strengths)} (strengths {', '.join(f'{s:g}' for s in qa.strengths)})"
    return f"Q-Adapter (alpha_0={qa.settings.alpha_0:g}, alpha_tilde={qa.settings.alpha_tilde:g})"


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
                print(f"=== {label(qa, policy)} ===")
            print(answers[policy][i].strip() if labeled else answers[policy][i])
        if labeled and i + 1 < len(prompts):
            print()
    return 0
