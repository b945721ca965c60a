#!/usr/bin/env python3
"""The measured sweep behind Q-Adapter's defaults (docs/results.md, "Choosing the defaults").

Every variant trains the same LoRA (r 8, q_proj/v_proj, same seed and initialization) for the same
fixed number of steps on the same split-by-prompt training pairs, and is measured on the same
held-out pairs:

* margin accuracy: the fraction of held-out pairs with a positive implicit-reward margin
  [log π(y_w|x) − log π1(y_w|x)] − [log π(y_l|x) − log π1(y_l|x)] (Wilson 95% interval), and its mean;
* preference accuracy: the fraction with log π(y_w|x) > log π(y_l|x);
* KL(π‖π1) per response token, teacher-forced on the held-out chosen and rejected responses.

DPO (TRL's DPOTrainer on the same LoRA) runs in the same harness for reference. Results are appended
to a JSONL file, one line per variant; finished variants are skipped, so the sweep resumes.

    python scripts/sweep.py --data hh --out docs/results/sweep_hh.jsonl
    python scripts/sweep.py --data ../shared/data/dsp/dsp_academy_pairs.test.jsonl --out docs/results/sweep_dsp_academy.jsonl
    python scripts/sweep.py --table docs/results/sweep_hh.jsonl docs/results/sweep_dsp_academy.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

#: name -> (method, settings). qadapter settings are QAdapterConfig fields; dpo takes "beta".
VARIANTS: dict[str, tuple[str, dict]] = {
    "full_next_longest": ("qadapter", dict(parameterization="full", value_pairing="next_state",
                                           normalizer="longest_sequence", alpha_0=0.01, alpha_tilde=1.0, beta=0.1)),
    "full_same_longest": ("qadapter", dict(parameterization="full", value_pairing="same_state",
                                           normalizer="longest_sequence", alpha_0=0.01, alpha_tilde=1.0, beta=0.1)),
    "res_a1_b0.1": ("qadapter", dict(alpha_tilde=1.0, beta=0.1)),
    # β = 0 with tied α's is DPO at β = α̃ exactly (tests/test_residual.py), by the same fast step
    "res_a1_b0": ("qadapter", dict(alpha_tilde=1.0, beta=0.0)),
    "res_a0.1_b0": ("qadapter", dict(alpha_tilde=0.1, beta=0.0)),
    "res_a1_b1": ("qadapter", dict(alpha_tilde=1.0, beta=1.0)),
    "res_a1_b0.1_same": ("qadapter", dict(alpha_tilde=1.0, beta=0.1, value_pairing="same_state")),
    "res_a1_b0.1_longest": ("qadapter", dict(alpha_tilde=1.0, beta=0.1, normalizer="longest_sequence")),
    "res_a1_b0.1_resplen": ("qadapter", dict(alpha_tilde=1.0, beta=0.1, normalizer="response_length")),
    "res_a0.3_b0.1": ("qadapter", dict(alpha_tilde=0.3, beta=0.1)),
    "res_a0.1_b0.1": ("qadapter", dict(alpha_tilde=0.1, beta=0.1)),
    "res_a1_a0_0.5_b0.1": ("qadapter", dict(alpha_tilde=1.0, alpha_0=0.5, beta=0.1)),
    "res_a1_b0.1_lr3e-4": ("qadapter", dict(alpha_tilde=1.0, beta=0.1, learning_rate=3e-4)),
    "res_a1_b0.1_lr3e-3": ("qadapter", dict(alpha_tilde=1.0, beta=0.1, learning_rate=3e-3)),
    "dpo_b0.1": ("dpo", dict(beta=0.1)),
    "dpo_b1": ("dpo", dict(beta=1.0)),
}


def load_split(data: str, tokenizer, max_length: int, eval_pairs: int, seed: int):
    from qadapter.data import load_embedded_pairs, load_preference_pairs, split_by_prompt, tokenize_pairs

    pairs, _ = load_embedded_pairs() if data == "hh" else load_preference_pairs(data, skip_invalid=True)
    # pairs longer than max_length are dropped, never cut (DSP at 128 tokens keeps ~40%)
    _, report = tokenize_pairs(pairs, tokenizer, max_length=max_length, drop_longer_than=max_length)
    pairs = pairs.select(report.kept)
    train, held_out, info = split_by_prompt(pairs, eval_size=eval_pairs, seed=seed)
    return train, held_out, info


def measure(peft_model, tokenizer, settings, tokenized, batch_size: int = 4) -> dict:
    """Margin, preference accuracy and per-token KL(π‖π1) on tokenized held-out pairs, by the main
    job's measurement (``qadapter.recipes.train.pair_log_likelihoods``: the one scorer, both
    branches in one forward, each prompt once for its two responses)."""
    from qadapter.evaluation.stats import preference_accuracy
    from qadapter.modeling import QAdapter
    from qadapter.recipes.train import implicit_reward_margins, kl_per_token, pair_log_likelihoods

    ll = pair_log_likelihoods(QAdapter(peft_model, tokenizer, settings), tokenized, batch_size=batch_size,
                              desc="held-out pairs")
    return {"margin": implicit_reward_margins(ll),
            "preference": preference_accuracy(ll["custom_chosen"], ll["custom_rejected"]),
            "base_preference": preference_accuracy(ll["base_chosen"], ll["base_rejected"]),
            "kl_per_token": kl_per_token(ll), "n_tokens": int(sum(ll["n_tokens"]))}


def run_variant(name: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qadapter.data import tokenize_pairs
    from qadapter.embedded import resolve_model_path
    from qadapter.settings import QAdapterSettings
    from qadapter.trainer import QAdapterConfig, QAdapterTrainer

    method, overrides = VARIANTS[name]
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train, held_out, info = load_split(args.data, tokenizer, args.max_length, args.eval_pairs, args.seed)
    held_ids, _ = tokenize_pairs(held_out, tokenizer, max_length=args.max_length)
    common = dict(output_dir=str(Path(args.work) / name), max_steps=args.steps, per_device_train_batch_size=args.batch,
                  learning_rate=args.learning_rate, lr_scheduler_type="linear", logging_steps=5, save_strategy="no",
                  report_to="none", seed=args.seed, max_length=args.max_length, lora_dropout=0.0, use_cpu=True,
                  disable_tqdm=True)
    started = time.monotonic()
    if method == "qadapter":
        config = QAdapterConfig(**{**common, **overrides})
        trainer = QAdapterTrainer(model, config, train_dataset=train, processing_class=tokenizer)
        trainer.train()
        settings = trainer.settings
        peft_model = trainer.model
    else:
        from qadapter.trainer.baselines import train_dpo

        lr = overrides.get("learning_rate", args.learning_rate)
        config = QAdapterConfig(**{**common, "learning_rate": lr})
        trainer = train_dpo(model, tokenizer, train.select_columns(["prompt", "chosen", "rejected"]), config,
                            dpo_beta=overrides["beta"])
        peft_model = trainer.model
        settings = QAdapterSettings(alpha_0=0.0, alpha_tilde=1.0, parameterization="full")
    train_seconds = time.monotonic() - started
    peft_model.eval()
    result = measure(peft_model, tokenizer, settings, held_ids)
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {"variant": name, "method": method, "settings": overrides, "data": args.data, "split": info,
            "steps": args.steps, "batch": args.batch, "learning_rate": overrides.get("learning_rate", args.learning_rate),
            "max_length": args.max_length, "train_seconds": round(train_seconds, 1), **result,
            "last_log": history[-1] if history else None}


def table(paths: list[str]) -> str:
    lines = []
    for path in paths:
        rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
        if not rows:
            continue
        first = rows[0]
        lines += [f"\n{first['data']}: {first['split']['n_train_pairs']} training pairs, {first['split']['n_eval_pairs']} "
                  f"held out by prompt (seed {first['split']['seed']}), {first['steps']} steps of {first['batch']} pairs, "
                  f"pairs ≤ {first['max_length']} tokens\n",
                  "| variant | margin accuracy [95% CI] | mean margin (nats) | preference accuracy (base → policy) | "
                  "KL(π‖π1) per token |", "|---|---|---|---|---|"]
        for r in rows:
            m, p, b = r["margin"], r["preference"], r["base_preference"]
            lines.append(f"| {r['variant']} | {m['accuracy']:.3f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}] | "
                         f"{m['mean']:+.2f} [{m['mean_ci_low']:+.2f}, {m['mean_ci_high']:+.2f}] | "
                         f"{b['accuracy']:.3f} → {p['accuracy']:.3f} | {r['kl_per_token']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="base model folder (default: the embedded default)")
    parser.add_argument("--data", default="hh", help="'hh' (the embedded HH-RLHF harmless pairs) or a pairs file")
    parser.add_argument("--out", help="JSONL file the results are appended to")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--eval-pairs", type=int, default=96)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/qadapter_sweep", help="scratch folder for the trainers")
    parser.add_argument("--table", nargs="*", help="print the markdown table of these result files and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if not args.out:
        parser.error("--out is required")
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    done = set()
    out = Path(args.out)
    if out.is_file():
        done = {json.loads(l)["variant"] for l in out.read_text().splitlines() if l.strip()}
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        if name in done:
            print(f"{name}: done already", flush=True)
            continue
        row = run_variant(name, args)
        with out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        m = row["margin"]
        print(f"{name}: margin acc {m['accuracy']:.3f} mean {m['mean']:+.2f}, pref acc {row['preference']['accuracy']:.3f}, "
              f"KL/token {row['kl_per_token']:.4f}, {row['train_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
