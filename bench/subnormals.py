"""Training steps once the preference margins saturate: subnormal floats, as IEEE keeps them and flushed.

Why: DPO at beta = 1 (and the Q-Adapter's Bradley-Terry term) drives margins to tens of nats; then
sigmoid(-margin) is below float32's smallest normal number (1.2e-38) and the backward pass carries
subnormals through every layer. x86 CPUs handle subnormals in microcode, many times slower than
normal numbers. ``qadapter.recipes.train.subnormals_flushed`` (around every training run) flushes
them to zero; their values are far below anything an optimizer step resolves.

Workload: the embedded SmolLM2-135M-Instruct (fp32, CPU, one torch thread), every weight trainable,
``--batch`` sequences of ``--length`` random tokens; one step is a forward and a backward of a loss
whose gradient has the size of a saturated sigmoid(-margin) (``--grad-scale``, default 1e-40), and,
as a control, of an unsaturated one (1.0). Each condition: a warm-up step, then ``--repeats`` steps
in rotating order; medians. The last lines are

    RESULT subnormal_flush_speedup=<seconds per saturated step kept / flushed>
    RESULT normal_flush_ratio=<seconds per normal step kept / flushed (about 1: flushing costs nothing)>

Usage: python bench/subnormals.py [--batch 1] [--length 32] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qadapter.embedded import default_model_path, load_model


def step_seconds(model, tokens, grad_scale: float, flush: bool) -> float:
    torch.set_flush_denormal(flush)
    try:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        logits = model(input_ids=tokens).logits
        (logits.float().logsumexp(-1).mean() * grad_scale).backward()
        return time.perf_counter() - start
    finally:
        torch.set_flush_denormal(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grad-scale", type=float, default=1e-40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(str(default_model_path()), dtype=torch.float32)
    model.train()
    tokens = torch.randint(0, model.config.vocab_size, (args.batch, args.length))
    conditions = [(scale, flush) for scale in (args.grad_scale, 1.0) for flush in (False, True)]
    times: dict[tuple[float, bool], list[float]] = {c: [] for c in conditions}
    for c in conditions:
        step_seconds(model, tokens, *c)  # warm-up
    for r in range(args.repeats):
        for c in conditions[r % len(conditions):] + conditions[:r % len(conditions)]:
            times[c].append(step_seconds(model, tokens, *c))
    median = {c: statistics.median(t) for c, t in times.items()}
    for (scale, flush), seconds in median.items():
        print(f"gradient scale {scale:g}, subnormals {'flushed' if flush else 'kept   '}: "
              f"{seconds:.2f} s per step (median of {args.repeats})")
    print(f"RESULT subnormal_flush_speedup={median[(args.grad_scale, False)] / median[(args.grad_scale, True)]:.3f}")
    print(f"RESULT normal_flush_ratio={median[(1.0, False)] / median[(1.0, True)]:.3f}")


if __name__ == "__main__":
    main()
