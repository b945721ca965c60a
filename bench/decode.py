"""Decoding speed of the customized policy π̃ against the base model's own ``generate()``.

Measures tokens per second of
  (a) the base model's own transformers ``generate()`` (greedy, a plain model without LoRA layers),
  (b) ``qadapter.generation.generate(fast=True)``: one forward per token for both branches,
  (c) ``qadapter.generation.generate(fast=False)``: the two-forward reference,
on the same prompts, with the same number of new tokens (min_new_tokens = max_new_tokens), in the
same process, at batch sizes 1 and 8, for the residual Q̂ at two decode-time strengths: s = 1 (the
trained policy: at the tied α's the fast engine runs the adapter branch alone, docs/generation.md)
and s = 0.5 (both branches in one forward; ``--strengths`` changes the list, ``--alpha-0`` measures
the full parameterization at that α0 instead), on the embedded default model (SmolLM2-135M-Instruct, fp32;
``--model gemma3-270m``: Gemma 3 270M, docs/models.md) on CPU, and on CUDA when available. The adapter has random non-zero lora_B (seeded), so the adapter
branch really differs. Runs are interleaved (a, b, c, a, b, c, ...) after a warm-up, and the median
of the repeats is reported. The last line is

    RESULT decode_fast_vs_base=<fast/base at batch 1> decode_fast_vs_base_b8=<fast/base at batch 8>
           decode_two_branch_vs_base=<…> decode_two_branch_vs_base_b8=<…>

(on the first device measured: CPU; the first pair at the first strength, the second at the last).
The reference engine is run once per configuration, to check that its tokens equal the fast
engine's; ``--time-reference`` times it too. On the CPU the two-branch engine times the two operand
orders of its few-row products and keeps the faster (qadapter.products; the bench prints what it
measured); ``QADAPTER_SMALL_PRODUCTS=linear python bench/decode.py`` measures it without that.
Usage: python bench/decode.py [--new-tokens 64] [--repeats 5] [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in simple terms how a rainbow forms.",
    "Give me three tips for staying focused while studying for an exam.",
    "What are the main differences between a cat and a dog as pets?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I make a cup of green tea?",
    "Why is the sky blue during the day but red at sunset? Please explain it step by step.",
]


def load(path, device, lora_seed: int):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qadapter.backbone import lora_config

    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                lora_config(lora_dropout=0.0)).to(device).eval()
    gen = torch.Generator().manual_seed(lora_seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = (torch.randn(param.shape, generator=gen) * 0.02).to(param.device)
    return tokenizer, base, peft_model


def timed(fn, device) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def bench_device(device, args, tokenizer, base, peft_model, decoding: dict) -> dict[int, float]:
    from qadapter.chat import encode_prompt
    from qadapter.generation import generate, left_pad
    from qadapter.products import small_products

    n = args.new_tokens
    ratios = {}
    for batch in args.batch_sizes:
        rows = [encode_prompt(tokenizer, p) for p in (PROMPTS * 8)[:batch]]
        ids, mask = left_pad(rows, tokenizer.pad_token_id, device)
        common = dict(decoding, max_new_tokens=n, min_new_tokens=n, return_ids=True)

        def hf():
            with torch.inference_mode():
                out = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert out.shape[1] == ids.shape[1] + n
            return out

        results = {}

        def fast():
            results["fast"] = generate(peft_model, tokenizer, rows, fast=True, **common)[1]

        def reference():
            results["reference"] = generate(peft_model, tokenizer, rows, fast=False, **common)[1]

        runs = {"base_hf_generate": hf, "fast": fast, "reference": reference}
        for name, fn in runs.items():  # warm-up, and the reference's tokens for the check
            fn()
        if not args.time_reference:
            del runs["reference"]
        times = {name: [] for name in runs}
        cpu_times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                wall, cpu = timed(fn, device)
                times[name].append(wall)
                cpu_times[name].append(cpu)
        assert all(len(r) == n for r in results["fast"]), "the fast path did not produce the requested tokens"
        same = results["fast"] == results["reference"]
        tps = {name: batch * n / statistics.median(ts) for name, ts in times.items()}
        ratios[batch] = tps["fast"] / tps["base_hf_generate"]
        label = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in decoding.items())
        reference_tps = (f"reference {tps['reference']:.1f} tok/s "
                         f"({tps['reference'] / tps['base_hf_generate']:.2f}x base) | " if "reference" in tps else "")
        print(f"device={device.type} threads={torch.get_num_threads()} {label} batch={batch} new_tokens={n} "
              f"repeats={args.repeats}: "
              f"base_hf_generate {tps['base_hf_generate']:.1f} tok/s | "
              f"fast {tps['fast']:.1f} tok/s ({tps['fast'] / tps['base_hf_generate']:.2f}x base) | "
              + reference_tps + f"fast == reference tokens: {same}", flush=True)
        for name, ts in times.items():
            print(f"  {name:17s} wall seconds per run: " + " ".join(f"{t:.3f}" for t in ts)
                  + " | process CPU seconds: " + " ".join(f"{t:.3f}" for t in cpu_times[name]), flush=True)
        paired = [b / f for b, f in zip(times["base_hf_generate"], times["fast"])]
        print("  fast/base per repeat (base and fast run back to back): "
              + " ".join(f"{r:.2f}" for r in paired) + f" | median {statistics.median(paired):.2f}", flush=True)
        if device.type == "cpu":
            cpu_tps = {name: batch * n / statistics.median(ts) for name, ts in cpu_times.items()}
            print(f"  by median process CPU time (robust to other processes on a shared machine): "
                  f"fast/base {cpu_tps['fast'] / cpu_tps['base_hf_generate']:.2f}x", flush=True)
        products = small_products(peft_model.get_base_model())
        if products is not None and products.timings:  # what the two-branch engine measured and chose
            print("  two-branch few-row products (qadapter.products), seconds per sweep x·Wᵀ / W·xᵀ: "
                  + ", ".join(f"{rows} rows {lin:.4f} / {wf:.4f} -> {'W·xᵀ' if products.choice[rows] else 'x·Wᵀ'}"
                              for rows, (lin, wf) in sorted(products.timings.items())), flush=True)
    return ratios


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (default 5)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="(default: 1 8)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.5],
                        help="residual decode-time strengths (default: 1 0.5; 1 runs one branch, others two)")
    parser.add_argument("--alpha-0", type=float, default=None, dest="alpha_0",
                        help="measure the full parameterization at this α0 (> 0) instead of --strengths")
    parser.add_argument("--alpha-tilde", type=float, default=1.0, dest="alpha_tilde",
                        help="α̃ with --alpha-0 (default 1)")
    parser.add_argument("--time-reference", action="store_true", help="also time the two-forward reference engine")
    parser.add_argument("--model", default=None,
                        help="model folder or embedded model name, e.g. gemma3-270m (default: the embedded default model)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--lora-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's default, one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.alpha_0 is not None and not args.alpha_0 > 0:
        parser.error("with α0 = 0 the fast path skips the base branch; benchmark with α0 > 0")
    if any(not s > 0 for s in args.strengths):
        parser.error("--strengths must be > 0")
    if args.alpha_0 is not None:
        configurations = [dict(parameterization="full", alpha_0=args.alpha_0, alpha_tilde=args.alpha_tilde)]
    else:  # what QAdapterSettings.decoding_alphas(strength=s) gives at the default q_scale = 1
        configurations = [dict(parameterization="residual", q_scale=1.0, alpha_0=1 / s, alpha_tilde=1 / s)
                          for s in args.strengths]

    from qadapter.embedded import resolve_model_path

    path = resolve_model_path(args.model)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    import os

    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"model={path} torch={torch.__version__} cpu_threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()} load_average_before={loadavg}", flush=True)
    first = None
    for name in devices:
        device = torch.device(name)
        tokenizer, base, peft_model = load(path, device, args.lora_seed)
        ratios = [bench_device(device, args, tokenizer, base, peft_model, c) for c in configurations]
        first = first or ratios
        del base, peft_model
    nan = float("nan")
    line = f"RESULT decode_fast_vs_base={first[0].get(1, nan):.3f} decode_fast_vs_base_b8={first[0].get(8, nan):.3f}"
    if len(first) > 1:
        line += (f" decode_two_branch_vs_base={first[-1].get(1, nan):.3f}"
                 f" decode_two_branch_vs_base_b8={first[-1].get(8, nan):.3f}")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
