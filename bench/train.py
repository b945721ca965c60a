"""Training speed and memory of ``QAdapterTrainer`` against TRL's ``DPOTrainer`` on the same work.

Same model (the embedded default, SmolLM2-135M-Instruct, fp32, CPU), same preference pairs (HH-RLHF
harmless, tokenized once by ``qadapter.data.tokenize_pairs`` at each length cap and fed as the same
token ids to both trainers, in the same order), same LoRA configuration (r=8, alpha 16, q_proj and
v_proj, dropout 0.05 -- TRL's ``disable_dropout`` is turned off so both apply it), same batch size,
same precision (fp32: TRL's bf16 default is turned off) and the same gradient-checkpointing
setting (``--grad-ckpt``; TRL defaults to on, TrainingArguments to off).

All trainers live in ONE process. Each first runs ``--warmup`` untimed steps. Then come
``--repeats`` rounds; in round k every trainer runs ``--steps`` timed optimizer steps (a fresh
``train()`` call) on the same k-th slice of the pairs, so within a round every trainer does exactly
the same work, and rounds cover different pairs. The order alternates (A B, then B A, ...). The
machine this was written on has 2 CPU cores shared with other jobs, and a single run can be slowed
several-fold by them; comparing the trainers round by round (adjacent in time, same data) and taking
the median over rounds is what keeps the ratios usable. Reported per trainer: the median over rounds
of pairs/s, of CPU seconds per pair and of the peak working set; and per variant the median over
rounds of the ratio to the first trainer (the RESULT line uses those paired ratios).

Threads: ``--threads 1`` by default. On a machine whose cores are shared with other jobs, two
OpenMP threads stall at every op's barrier whenever the other job holds one core; with ~5000 ops
per step that overhead is the same for every trainer and squeezes every ratio towards 1 (measured
here: 1.5x with two threads under load against 2.4x with two threads on a quiet machine and 2.5-3x
with one thread under load). One thread is time-sliced instead, which slows every trainer alike.
On a dedicated machine, ``--threads 2`` (or more) measures the same ratios at full speed.

Throughput: pairs per second of wall time from the start of the first timed step to the end of the
last (data collation, the optimizer and the trainer's logging included). Process CPU seconds per
pair over the same span are printed too.

Memory: ``ru_maxrss`` cannot be reset, and torch has no CPU allocator statistics, so a thread samples
the process RSS (``/proc/self/statm``) every millisecond; before each run the process is trimmed
(``gc.collect()`` + glibc ``malloc_trim(0)``) and its RSS taken as the baseline. The reported peak is
max RSS during the timed steps minus that baseline: the training working set (activations, logits,
gradients, optimizer state), without the models' weights, which are the same for every trainer.
The tensors that matter are far larger than glibc's mmap threshold, so they go back to the OS when
freed and the sampled RSS tracks live memory. ``--isolate`` instead runs every (trainer, round) in a
fresh subprocess of this script, which also reports the absolute ru_maxrss of that process.

The last line is ``RESULT train_vs_trl_dpo=<pairs/s ratio> mem_vs_trl_dpo=<peak memory ratio>``
(second trainer / first, default qadapter / TRL, at the first length, 256 by default).

Usage: python bench/train.py [--lengths 256 512] [--steps 1] [--warmup 1] [--batch-size 2]
       [--repeats 6] [--grad-ckpt off|on] [--variants trl qadapter qadapter_plain ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

#: QAdapterTrainer variants: name -> QAdapterConfig overrides. ``qadapter`` is the shipped default.
QADAPTER_VARIANTS = {
    "qadapter": {},
    "qadapter_plain": {"share_prompt": False, "fused_head": False},   # the straightforward step
    "qadapter_share": {"share_prompt": True, "fused_head": False},
    "qadapter_fused": {"share_prompt": False, "fused_head": True},
    "qadapter_pair_rows": {"_pack_row_tokens": 1},  # shared prompt, fused, but one pair per row
    "qadapter_compat": {"reference_compat": True},
}
VARIANTS = ("trl", *QADAPTER_VARIANTS)
KEYS = ("pairs_per_s", "cpu_s_per_pair", "peak_delta_mb", "peak_mb")

from memory import rss_bytes, trim  # noqa: E402  (bench/ is on sys.path when run as a script)


class PeakSampler:
    """Samples the process RSS every ``interval`` seconds; ``window_peak`` covers the timed steps."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.window_peak, self.in_window = interval, 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            if self.in_window:
                self.window_peak = max(self.window_peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_timer_callback(sampler: PeakSampler):
    """Wall and process CPU time from the start of the first step to the end of the last one; the
    sampler's window covers the same span."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start = self.end = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.start is None:
                sampler.window_peak, sampler.in_window = rss_bytes(), True
                self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.end = (time.perf_counter(), time.process_time())

    return StepTimer()


def load_data(tokenizer, length: int, n_pairs: int, seed: int):
    """(raw pairs, our tokenized dataset, the same ids in TRL's columns) for ``n_pairs`` random pairs."""
    from datasets import Dataset

    from qadapter.data import load_embedded_pairs, tokenize_pairs

    pairs, _ = load_embedded_pairs()
    index = random.Random(seed).sample(range(len(pairs)), n_pairs)
    raw = pairs.select(index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenized, _ = tokenize_pairs(raw, tokenizer, max_length=length)
    cols = {k: tokenized[k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
    ours = Dataset.from_dict(cols)
    trl = Dataset.from_dict({"prompt_ids": cols["prompt_input_ids"], "chosen_ids": cols["chosen_input_ids"],
                             "rejected_ids": cols["rejected_input_ids"]})
    return raw, ours, trl


def build(variant: str, path: str, tokenizer, data, length: int, args, out_dir: str):
    """A trainer of ``variant`` whose ``_bench_data`` holds the pairs; batches come in order."""
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM

    from qadapter.backbone import lora_config

    raw, ours, trl_ds = data
    common = dict(output_dir=os.path.join(out_dir, variant), per_device_train_batch_size=args.batch_size,
                  max_steps=1, learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=10**6,
                  save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, seed=0,
                  dataloader_num_workers=0, gradient_checkpointing=args.grad_ckpt == "on",
                  disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if variant == "trl":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(beta=0.1, max_length=length, bf16=False, disable_dropout=False, **common)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPOTrainer(model=model, args=config, train_dataset=raw.select(range(args.batch_size)),
                                 processing_class=tokenizer, peft_config=lora_config())
        trainer._bench_data = trl_ds  # the very token ids the Q-Adapter trainers get
    else:
        from qadapter.trainer import QAdapterConfig, QAdapterTrainer

        overrides = dict(QADAPTER_VARIANTS[variant])
        row_tokens = overrides.pop("_pack_row_tokens", None)
        config = QAdapterConfig(max_length=length, **common, **overrides)
        trainer = QAdapterTrainer(model, config, train_dataset=ours, processing_class=tokenizer)
        trainer._bench_data = ours
        if row_tokens is not None:  # a module constant: set it around this trainer's steps only
            import qadapter.trainer.qadapter_trainer as qt

            compute_loss = trainer.compute_loss

            def with_row_tokens(*a, **k):
                saved, qt.PACK_ROW_TOKENS = qt.PACK_ROW_TOKENS, row_tokens
                try:
                    return compute_loss(*a, **k)
                finally:
                    qt.PACK_ROW_TOKENS = saved

            trainer.compute_loss = with_row_tokens
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
    return trainer


def run_once(trainer, args, steps: int, first_pair: int) -> dict:
    """``steps`` optimizer steps (a fresh ``train()`` call) on the pairs from ``first_pair`` on,
    timed and memory-sampled."""
    trainer.args.max_steps = steps
    trainer.train_dataset = trainer._bench_data.select(range(first_pair, first_pair + steps * args.batch_size))
    sampler = PeakSampler()
    timer = make_timer_callback(sampler)
    trainer.add_callback(timer)
    trim()
    base = rss_bytes()
    try:
        with sampler:
            trainer.train()
    finally:
        trainer.remove_callback(timer)
    seconds, cpu = (e - s for e, s in zip(timer.end, timer.start))
    pairs = steps * args.batch_size
    return {"pairs_per_s": pairs / seconds, "seconds": seconds, "cpu_s_per_pair": cpu / pairs,
            "peak_delta_mb": (sampler.window_peak - base) / 2**20, "base_mb": base / 2**20,
            "peak_mb": sampler.window_peak / 2**20}


def n_pairs_needed(args) -> int:
    return (args.warmup + args.repeats * args.steps) * args.batch_size


def first_pair_of_round(args, k: int) -> int:
    return (args.warmup + k * args.steps) * args.batch_size


def worker(args) -> int:
    """--isolate: warm-up and round ``args.round`` of one trainer in this fresh process; one JSON line."""
    import resource

    from transformers import AutoTokenizer

    from qadapter.embedded import default_model_path

    torch.set_num_threads(args.threads)
    path = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    length = args.lengths[0]
    data = load_data(tokenizer, length, n_pairs_needed(args), args.data_seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(args.worker, path, tokenizer, data, length, args, tmp)
        if args.warmup:
            run_once(trainer, args, args.warmup, 0)
        result = run_once(trainer, args, args.steps, first_pair_of_round(args, args.round))
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("WORKER " + json.dumps(result), flush=True)
    return 0


def run_isolated(variant, length, k, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--round", str(k), "--lengths", str(length),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--batch-size", str(args.batch_size), "--grad-ckpt", args.grad_ckpt, "--threads", str(args.threads),
           "--data-seed", str(args.data_seed)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("WORKER ")]
    if done.returncode or not lines:
        raise RuntimeError(f"worker {variant} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("WORKER "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512], help="length caps (default 256 512)")
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps per run (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer first (default 1)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step, every trainer (default 2)")
    parser.add_argument("--repeats", type=int, default=6, help="rounds, each on new pairs (default 6)")
    parser.add_argument("--grad-ckpt", choices=("off", "on"), default="off",
                        help="gradient checkpointing for every trainer (default off)")
    parser.add_argument("--variants", nargs="+", default=["trl", "qadapter"], choices=VARIANTS,
                        help="trainers to run; the first two give the RESULT ratio (default: trl qadapter)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: see the module docstring on shared cores)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--isolate", action="store_true", help="one fresh subprocess per run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from qadapter.embedded import default_model_path

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    path = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    print(f"model={path} torch={torch.__version__} threads={args.threads} cpus={os.cpu_count()} "
          f"batch={args.batch_size} steps={args.steps} warmup={args.warmup} repeats={args.repeats} "
          f"grad_ckpt={args.grad_ckpt} isolate={args.isolate}", flush=True)
    summary = {}
    ref_name = args.variants[0]
    for length in args.lengths:
        data = load_data(tokenizer, length, n_pairs_needed(args), args.data_seed)
        timed = data[1].select(range(first_pair_of_round(args, 0), n_pairs_needed(args)))
        n_tok = sum(len(p) + len(c) + len(r) for p, c, r in zip(timed["prompt_input_ids"],
                                                                 timed["chosen_input_ids"], timed["rejected_input_ids"]))
        print(f"length={length}: {len(timed)} timed pairs per trainer, {n_tok} prompt+chosen+rejected tokens",
              flush=True)
        results = {v: [] for v in args.variants}
        with tempfile.TemporaryDirectory() as tmp:
            trainers = {} if args.isolate else {v: build(v, path, tokenizer, data, length, args, tmp)
                                                for v in args.variants}
            if args.warmup and not args.isolate:
                for v in args.variants:
                    run_once(trainers[v], args, args.warmup, 0)
            for k in range(args.repeats):
                order = args.variants if k % 2 == 0 else args.variants[::-1]
                for v in order:
                    r = (run_isolated(v, length, k, args) if args.isolate
                         else run_once(trainers[v], args, args.steps, first_pair_of_round(args, k)))
                    results[v].append(r)
                    extra = f" ru_maxrss={r['ru_maxrss_mb']:.0f}MB" if "ru_maxrss_mb" in r else ""
                    print(f"  round={k} {v:18s} {r['pairs_per_s']:.3f} pairs/s ({r['seconds']:.1f}s, "
                          f"{r['cpu_s_per_pair']:.1f} cpu-s/pair) peak working set {r['peak_delta_mb']:.0f}MB "
                          f"(rss {r['peak_mb']:.0f}MB){extra}", flush=True)
            del trainers
        med = {}
        for v, rs in results.items():
            med[v] = {key: statistics.median(x[key] for x in rs) for key in KEYS}
            paired = list(zip(rs, results[ref_name]))
            med[v]["speed_ratio"] = statistics.median(a["pairs_per_s"] / b["pairs_per_s"] for a, b in paired)
            med[v]["cpu_ratio"] = statistics.median(a["cpu_s_per_pair"] / b["cpu_s_per_pair"] for a, b in paired)
            med[v]["mem_ratio"] = statistics.median(a["peak_delta_mb"] / b["peak_delta_mb"] for a, b in paired)
        for v, m in med.items():
            print(f"length={length} {v:18s} median {m['pairs_per_s']:.3f} pairs/s, {m['cpu_s_per_pair']:.1f} "
                  f"cpu-s/pair, peak working set {m['peak_delta_mb']:.0f}MB | median of round ratios to "
                  f"{ref_name}: pairs/s x{m['speed_ratio']:.2f}, cpu-s/pair x{m['cpu_ratio']:.2f}, "
                  f"memory x{m['mem_ratio']:.2f}", flush=True)
        summary[length] = med
        trim()
    second = args.variants[1] if len(args.variants) > 1 else ref_name
    first = summary[args.lengths[0]][second]
    print(f"RESULT train_vs_trl_dpo={first['speed_ratio']:.3f} mem_vs_trl_dpo={first['mem_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
