"""A GPU check that fits a lent GPU's few minutes: the untested paths, measured once, under a deadline.

Sections (in this order; each is skipped, with a printed reason, when the time left is shorter
than it needs, so the whole run never exceeds ``--budget`` seconds, 480 by default):

* ``steps``: bf16 training steps (autocast, float32 weights: what ``--bf16 true`` runs) of both fast
  paths, shared prompt and fused head, alone and together, against the straightforward step
  (``share_prompt=False, fused_head=False``, bit-identical to the step before the speed work, see
  bench/NOTES.md) on the same batch: the loss and the adapter gradients must agree within
  ``BF16_TOLERANCE`` relative. On a random model of SmolLM2-135M's shape (tiny on ``--device cpu``).
  Also printed: the bf16 straightforward step against the float32 one (the bf16 noise floor) and
  each step's peak memory (``torch.cuda.max_memory_allocated``).
* ``big``: a random ~1.2B-parameter model of Llama-3.2-1B's shape (bf16 autocast, float32 weights,
  LoRA r=8 on q_proj/v_proj): seconds per optimizer step and peak memory of the shipped step
  against the straightforward one (a small Llama on ``--device cpu``).
* ``decode``, ``score``, ``train``: bench/decode.py, bench/score.py and bench/train.py as
  subprocesses with small settings, each with a timeout inside the deadline; their RESULT lines are
  repeated as ``RESULT gpu_check_<name>: ...``. They need the embedded model (and score/train:
  ``datasets``, ``trl``); where one fails its last line of error is printed as the skip reason.
  decode.py measures CUDA when it is there; score.py and train.py measure the CPU of that machine.
  ``--tokenizer DIR`` (a folder holding SmolLM2's tokenizer files) runs decode.py instead on a
  random model of SmolLM2-135M's shape with that tokenizer: a machine without the embedded model
  (a lent GPU: its package is 93 MB) still gets the decoding ratios (speed does not depend on the
  weights: every run decodes exactly ``--new-tokens`` tokens).

Why ``BF16_TOLERANCE = 2e-2``: bf16 keeps 8 significant bits, a relative rounding step of
2**-8 = 3.9e-3. The fast paths compute the same sums in other orders and layouts (packed rows of
several pairs, a chunked head), so every bf16 matmul rounds differently, and ~30 layers of such
differences add up in the gradients; 2e-2 is about five rounding steps. Real errors are larger: on
the tiny CPU model a lost pair moved the loss by 3.2e-2 and the gradients by 0.85 relative, and
attending to the padding moved them by 3.6e-2 and 0.56 (tests/test_gpu_check.py checks the first).
The noise floor line shows how far bf16 itself is from float32 on the same batch (on the tiny CPU
model: 1.2e-3 loss, 9e-3 gradients); the fast paths should be no further from the bf16
straightforward step than that order.

Every line that matters starts with ``RESULT``, ``CHECK`` (pass/fail) or ``SKIP``; the exit status
is 1 when a CHECK failed. Usage (one command; on a lent GPU, from the repository root):

    PYTHONPATH=. python3 bench/gpu_check.py                 # cuda, 480 s budget
    PYTHONPATH=. python bench/gpu_check.py --device cpu --sections steps big   # the CI check
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

BF16_TOLERANCE = 2e-2
HERE = Path(__file__).resolve().parent
SECTIONS = ("steps", "big", "decode", "score", "train")
#: seconds each section needs on (cuda, cpu): a section starts only when that much time is left
NEEDS = {"steps": (60, 30), "big": (90, 30), "decode": (120, 300), "score": (100, 300), "train": (120, 300)}
#: the bench scripts' small settings
BENCH_ARGS = {"decode": ["--new-tokens", "32", "--repeats", "3", "--batch-sizes", "1", "8"],
              "score": ["--pairs", "16", "--arc", "16", "--repeats", "1"],
              "train": ["--lengths", "256", "--repeats", "2", "--variants", "trl", "qadapter"]}
#: (hidden, intermediate, layers, heads, kv heads, vocabulary) of the random models
SHAPES = {("steps", "cuda"): (576, 1536, 30, 9, 3, 49152),   # SmolLM2-135M
          ("steps", "cpu"): (64, 128, 2, 4, 2, 512),
          ("big", "cuda"): (2048, 8192, 16, 32, 8, 128256),   # Llama-3.2-1B
          ("big", "cpu"): (128, 256, 4, 4, 2, 2048)}
#: (pairs, prompt length range, response length range) of the random batches
BATCHES = {("steps", "cuda"): (4, (32, 256), (16, 192)), ("steps", "cpu"): (3, (6, 24), (2, 12)),
           ("big", "cuda"): (8, (64, 384), (32, 256)), ("big", "cpu"): (2, (6, 24), (2, 12))}


class Clock:
    """The global deadline: ``left()`` seconds remain of the budget."""

    def __init__(self, budget: float):
        self.end = time.monotonic() + budget

    def left(self) -> float:
        return self.end - time.monotonic()


def random_llama(shape, device, seed: int = 0):
    """A random Llama-shaped causal LM, initialized where it runs (a 1B model in seconds on a GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads, vocab = shape
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config)


def random_model(shape, device, seed: int = 0):
    """:func:`random_llama` with a LoRA adapter (r=8, q_proj/v_proj, no dropout) whose lora_B is
    random and non-zero, so the adapter branch really differs from the base."""
    from peft import get_peft_model

    from qadapter.backbone import lora_config

    model = get_peft_model(random_llama(shape, device, seed), lora_config(8, 16, 0.0, ["q_proj", "v_proj"]))
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen).to(param.device) * 0.02)
    return model


def random_batch(spec, vocab: int, device, seed: int = 0):
    """Collated random preference pairs of unequal prompt and response lengths, ending in EOS (2)."""
    from qadapter.trainer import PreferencePairCollator

    pairs, (p_lo, p_hi), (r_lo, r_hi) = spec
    gen = torch.Generator().manual_seed(seed)

    def tokens(lo, hi):
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return torch.randint(3, vocab, (n - 1,), generator=gen).tolist() + [2]

    features = [dict(prompt_input_ids=tokens(p_lo, p_hi), chosen_input_ids=tokens(r_lo, r_hi),
                     rejected_input_ids=tokens(r_lo, r_hi)) for _ in range(pairs)]
    return {k: v.to(device) for k, v in PreferencePairCollator(pad_token_id=0)(features).items()}


def step_args(out_dir: str, device: str, **switches):
    from qadapter.trainer import QAdapterConfig

    return QAdapterConfig(output_dir=out_dir, report_to=[], use_cpu=device == "cpu", lora_dropout=0.0, **switches)


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float:
    if device.type != "cuda":
        return float("nan")  # torch keeps no CPU allocator statistics
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def one_step(model, batch, args, device, bf16: bool):
    """Loss, adapter gradients (float32, by name) and peak memory of one forward + backward."""
    from qadapter.trainer import qadapter_step

    model.zero_grad(set_to_none=True)
    reset_peak(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = qadapter_step(model, batch, args, pad_token_id=0)
    out["loss"].backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(out["loss"].detach()), grads, peak_gb(device)


def relative_errors(loss, grads, ref_loss, ref_grads) -> tuple[float, float]:
    """|loss − ref| / |ref|, and the max over weights of max |g − g_ref| / max |g_ref|."""
    assert grads.keys() == ref_grads.keys() and ref_grads, "the steps trained different weights"
    grad_err = max(float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in ref_grads.items())
    return abs(loss - ref_loss) / max(abs(ref_loss), 1e-30), grad_err


def section_steps(device, out_dir: str) -> bool:
    shape = SHAPES[("steps", device.type)]
    model = random_model(shape, device)
    batch = random_batch(BATCHES[("steps", device.type)], shape[-1], device)
    plain = step_args(out_dir, device.type, share_prompt=False, fused_head=False)
    ref_loss, ref_grads, ref_peak = one_step(model, batch, plain, device, bf16=True)
    f32_loss, f32_grads, _ = one_step(model, batch, plain, device, bf16=False)
    floor = relative_errors(ref_loss, ref_grads, f32_loss, f32_grads)
    print(f"RESULT bf16_noise_floor loss_rel={floor[0]:.2e} grad_rel={floor[1]:.2e} (bf16 vs float32, straightforward step)")
    print(f"RESULT bf16_step_straightforward loss={ref_loss:.6f} peak_gb={ref_peak:.3f}")
    ok = True
    for name, switches in {"shared_fused": dict(share_prompt=True, fused_head=True),
                           "shared": dict(share_prompt=True, fused_head=False),
                           "fused": dict(share_prompt=False, fused_head=True)}.items():
        loss, grads, peak = one_step(model, batch, step_args(out_dir, device.type, **switches), device, bf16=True)
        loss_err, grad_err = relative_errors(loss, grads, ref_loss, ref_grads)
        # against float32: > 0 shows the step really ran in bf16 (against the bf16 straightforward
        # step it can be exactly 0: an AVX2 CPU's bf16 fallback kernel gives both paths the same bits)
        vs_f32 = relative_errors(loss, grads, f32_loss, f32_grads)[1]
        passed = loss_err <= BF16_TOLERANCE and grad_err <= BF16_TOLERANCE
        ok &= passed
        print(f"RESULT bf16_step_{name} loss={loss:.6f} loss_rel={loss_err:.2e} grad_rel={grad_err:.2e} "
              f"grad_rel_vs_f32={vs_f32:.2e} peak_gb={peak:.3f} peak_vs_straightforward={peak / ref_peak:.3f}")
        print(f"CHECK bf16_step_{name} {'pass' if passed else 'FAIL'} (tolerance {BF16_TOLERANCE:g} relative)")
    return ok


def timed_steps(model, batch, args, device, steps: int) -> tuple[float, float]:
    """Median seconds of an optimizer step (forward, backward, AdamW on the adapter) after one
    untimed step, and the peak memory over the timed ones."""
    from qadapter.trainer import qadapter_step

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(steps + 1):
        if i == 1:
            reset_peak(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = qadapter_step(model, batch, args, pad_token_id=0)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2], peak_gb(device)


def section_big(device, out_dir: str) -> bool:
    shape = SHAPES[("big", device.type)]
    model = random_model(shape, device)
    n_params = sum(p.numel() for p in model.parameters())
    spec = BATCHES[("big", device.type)]
    batch = random_batch(spec, shape[-1], device)
    tokens = int(batch["attention_mask"].sum()) // 2 + int(batch["response_mask"].sum()) // 2  # pairs' own tokens, about
    results = {}
    for name, switches in {"straightforward": dict(share_prompt=False, fused_head=False),
                           "shipped": dict(share_prompt=True, fused_head=True)}.items():
        seconds, peak = timed_steps(model, batch, step_args(out_dir, device.type, **switches), device, steps=3)
        results[name] = (seconds, peak)
        print(f"RESULT big_model_step_{name} params={n_params / 1e9:.3f}B pairs={spec[0]} tokens~{tokens} "
              f"step_s={seconds:.4f} pairs_per_s={spec[0] / seconds:.2f} peak_gb={peak:.3f}")
    (s0, m0), (s1, m1) = results["straightforward"], results["shipped"]
    print(f"RESULT big_model_shipped_vs_straightforward speed={s0 / s1:.3f} memory={m1 / m0:.3f}")
    return True


def random_model_folder(tokenizer_dir: str, out_dir: str) -> str:
    """A folder with a random model of SmolLM2-135M's shape and the tokenizer of ``tokenizer_dir``."""
    from transformers import AutoTokenizer

    folder = os.path.join(out_dir, "random_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = random_llama(SHAPES[("steps", "cuda")], "cpu")
    model.config.update({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                         "pad_token_id": tokenizer.pad_token_id})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def section_bench(name: str, device, clock: Clock, model_folder: str | None) -> bool:
    """Run bench/<name>.py with small settings inside the time left; repeat its RESULT lines."""
    cmd = [sys.executable, str(HERE / f"{name}.py"), *BENCH_ARGS[name]]
    if name == "decode":
        cmd += ["--devices", device.type] + (["--model", model_folder] if model_folder else [])
    timeout = max(1.0, clock.left() - 5)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        print(f"SKIP {name} reason=stopped at the global deadline after {timeout:.0f} s")
        return True
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode != 0 or not results:
        error = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
        print(f"SKIP {name} reason=bench/{name}.py exited {done.returncode}: {error[:300]}")
        return True
    for line in results:
        print(f"RESULT gpu_check_{name}: {line[len('RESULT '):]}")
    return True


def hard_stop() -> None:
    print("SKIP rest reason=hard deadline: the budget ran out inside a section", flush=True)
    print("CHECK gpu_check FAIL (incomplete)", flush=True)
    os._exit(2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny models)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--tokenizer", default=None,
                        help="decode on a random SmolLM2-shaped model with this tokenizer folder (no embedded model)")
    args = parser.parse_args(argv)
    clock = Clock(args.budget)
    # An in-process section cannot be interrupted cleanly; past the budget (+10 s) the process ends.
    watchdog = threading.Timer(args.budget + 10, hard_stop)
    watchdog.daemon = True
    watchdog.start()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check device={name} torch={torch.__version__} budget_s={args.budget:g} "
          f"sections={','.join(args.sections)}", flush=True)
    ok = True
    with tempfile.TemporaryDirectory() as out_dir:
        for section in args.sections:
            need = NEEDS[section][device.type == "cpu"]
            if clock.left() < need:
                print(f"SKIP {section} reason=global deadline: {clock.left():.0f} s left, it needs ~{need} s", flush=True)
                continue
            start = time.monotonic()
            if section == "steps":
                ok &= section_steps(device, out_dir)
            elif section == "big":
                ok &= section_big(device, out_dir)
            else:
                folder = random_model_folder(args.tokenizer, out_dir) if args.tokenizer and section == "decode" else None
                ok &= section_bench(section, device, clock, folder)
            print(f"RESULT section_seconds {section}={time.monotonic() - start:.1f}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    watchdog.cancel()
    print(f"CHECK gpu_check {'pass' if ok else 'FAIL'} total_s={args.budget - clock.left():.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
