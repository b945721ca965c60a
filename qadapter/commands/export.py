"""``qadapter export``: write a Q-Adapter or a stack as ONE plain PEFT LoRA folder (vLLM / SGLang /
plain transformers serve it); exact where the policy is one adapter model, else distilled."""

from __future__ import annotations

import argparse
import json

HELP = "write an adapter or stack as one plain PEFT LoRA folder that plain generate() / vLLM sample"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help=HELP, description=HELP + ". Exact (a copy, or one LoRA of rank "
                                   "Σr for a stack) at strength 1; any other strength is distilled: a plain LoRA trained "
                                   "to minimize KL(π̃ ‖ export) on continuations sampled from π̃ for the --data prompts, "
                                   "with the held-out KL and margin accuracy printed next to the original's.")
    parser.add_argument("source", metavar="ADAPTER_OR_STACK", help="a Q-Adapter, plain adapter or stack folder")
    parser.add_argument("--to", required=True, metavar="DIR", help="the PEFT LoRA folder to write")
    parser.add_argument("--strength", default=None, metavar="S[,S2,...]",
                        help="decoding strength (one for all adapters, or one per adapter of a stack; default: saved)")
    parser.add_argument("--base-model", default=None, metavar="PATH", help="the base model (default: the recorded one)")
    parser.add_argument("--data", default=None, metavar="PAIRS", help="preference pairs whose prompts the distillation "
                        "samples from (needed unless the export is exact)")
    parser.add_argument("--steps", type=int, default=200, help="distillation steps (default 200)")
    parser.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate (default 1e-3)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per distillation step (default 4)")
    parser.add_argument("--samples-per-prompt", type=int, default=2, help="continuations sampled per prompt (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of each sampled continuation (default 64)")
    parser.add_argument("--max-prompts", type=int, default=None, help="use at most this many training / held-out prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from ..export import export

    # one value for every adapter or one per adapter: THE strength rule (qadapter.settings.strength_values)
    report = export(args.source, args.to, strengths=args.strength, data=args.data, base_model=args.base_model,
                    field="--strength",
                    **({} if args.data is None else dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                                         samples_per_prompt=args.samples_per_prompt,
                                                         max_new_tokens=args.max_new_tokens,
                                                         max_prompts=args.max_prompts, seed=args.seed)))
    if report["exact"]:
        print(f"exact export ({report['kind']}, LoRA rank {report['rank']}) at strengths {report['strengths']}: "
              f"{report['to']}")
    else:
        print(f"distilled export at strengths {report['strengths']} ({report['steps']} steps on "
              f"{report['train_sequences']} sampled sequences): {report['to']}")
        print(f"held-out KL(π̃ ‖ export), nats per token: {report['held_out_kl_teacher_to_export']:.4f} "
              f"(the strength-1 export it started from: {report['held_out_kl_teacher_to_strength1_export']:.4f})")
        if "margin_accuracy_export" in report:
            o, e = report["margin_accuracy_original"], report["margin_accuracy_export"]
            print(f"held-out margin accuracy (n={o['n']}): original {o['margin_accuracy']:.3f} "
                  f"[{o['ci'][0]:.3f}, {o['ci'][1]:.3f}], export {e['margin_accuracy']:.3f} "
                  f"[{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]")
    print(json.dumps({k: v for k, v in report.items() if k not in ("to",)}, default=str))
    return 0
