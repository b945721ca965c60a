"""Scoring speed and memory: the one scorer (``qadapter.scoring.score``) against the plain scorer.

Same items, same process, same model: the embedded SmolLM2-135M-Instruct (fp32, CPU) with a LoRA
adapter on q_proj/v_proj whose lora_B is random and non-zero (seeded, so the adapter branch really
differs), residual parameterization. Workloads:

* ``pairs``: held-out preference pairs of the embedded HH-RLHF harmless data (split by prompt as
  the main job splits, tokenized with its chat template, at most ``--max-length`` tokens), scored
  under π1 and π̃ (what the main job and ``evaluate_preferences`` need);
* ``arc``: ARC-Easy questions (the shipped test file, a seeded sample), every answer choice scored
  under π̃ (what ``evaluate_arc`` needs);
* ``frontier`` (reported, not in the headline): the pairs under π1 and π̃ at 5 residual strengths
  (0.25, 0.5, 1, 2, 4), what the trade-off frontier needs.

Scorers:

* ``new``: ``qadapter.scoring.score`` (both branches in one forward, each prompt once for all its
  continuations, the vocabulary projected at the scored states only);
* ``plain``: the straightforward scorer, written here: left-padded whole sequences, an adapter pass
  and a base pass, every position projected to the whole vocabulary, then each policy's
  log-softmax gathered at the continuation tokens (the two passes serve every policy requested);
* ``previous``: the code this replaced (the main job's old pair scorer: collated pairs, two passes,
  logits at response columns only; the evaluators' old ``continuation_logprobs``: two passes, logits
  at the last positions), for reference.

Timing: one torch thread (``--threads``), a warm-up call of each, then ``--repeats`` rounds in which
every scorer runs every workload (order rotating); medians. Memory: a thread samples the process
RSS every 1 ms; a scorer's peak working memory is its peak RSS minus the RSS just before the call
(after ``gc.collect()`` and ``malloc_trim(0)``), median over rounds; the weights are not included.
The last lines are

    RESULT score_vs_plain=<plain seconds / new seconds, pairs + arc>
    RESULT score_peak_memory_ratio=<new peak RSS delta / plain peak RSS delta, max over pairs and arc>

Usage: python bench/score.py [--pairs 64] [--arc 64] [--repeats 3] [--max-length 256] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
import warnings

import torch
import torch.nn.functional as F

STRENGTHS = (0.25, 0.5, 1.0, 2.0, 4.0)
from memory import rss_bytes, trim  # noqa: E402  (bench/ is on sys.path when run as a script)


class PeakSampler:
    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self.active = interval, 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            if self.active:
                self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def measure(self, fn):
        """(result, seconds, peak RSS delta in bytes) of one call."""
        trim()
        before = rss_bytes()
        self.peak, self.active = before, True
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        self.active = False
        return out, seconds, max(0, max(self.peak, rss_bytes()) - before)

    def close(self):
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- items
def load_model(lora_seed: int):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qadapter.embedded import DEFAULT_MODEL, resolve_model_path
    from qadapter.modeling import QAdapter
    from qadapter.settings import QAdapterSettings
    from qadapter.backbone import lora_config

    path = resolve_model_path(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), lora_config(lora_dropout=0.0))
    gen = torch.Generator().manual_seed(lora_seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.02
    model.eval()
    return QAdapter(model, tokenizer, QAdapterSettings())


def pair_rows(tokenizer, n: int, max_length: int, seed: int):
    from qadapter.data import load_embedded_pairs, split_by_prompt, tokenize_pairs

    pairs, _ = load_embedded_pairs()
    _, held_out, _ = split_by_prompt(pairs, eval_size=4 * n, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, _ = tokenize_pairs(held_out, tokenizer, max_length=max_length)
    rows = [ids[i] for i in range(len(ids)) if ids[i]["chosen_input_ids"] and ids[i]["rejected_input_ids"]]
    return [{k: list(r[k]) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")} for r in rows[:n]]


def arc_requests(tokenizer, n: int, seed: int):
    from qadapter.evaluation.benchmarks import load_arc
    from qadapter.evaluation.tasks import _encode_pair

    items = load_arc("easy")
    items = [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]
    return [_encode_pair(tokenizer, item.context, c) for item in items for c in item.continuations]


# --------------------------------------------------------------------------- scorers
def policy_list(qa, strengths):
    from qadapter.scoring import policy_specs

    return policy_specs(qa.settings, ("base", "customized") if strengths is None else ("base",), strengths or ())


@torch.no_grad()
def plain_scorer(qa, requests, specs, batch_size: int):
    """Two passes over left-padded whole sequences, the whole vocabulary at every position."""
    from qadapter.backbone import position_ids_from_mask
    from qadapter.objective import customized_logits

    model, settings = qa.model, qa.settings
    pad = qa.tokenizer.pad_token_id or 0
    out = {name: [] for name in specs}
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        seqs = [list(c) + list(y) for c, y in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
        adapter = model(**kwargs).logits.float()
        with model.disable_adapter():
            base = model(**kwargs).logits.float()
        for name, spec in specs.items():
            if spec[0] == "base":
                logits = base
            else:
                logits = customized_logits(adapter, base, parameterization=settings.parameterization,
                                           q_scale=settings.q_scale, alpha_0=spec[1], alpha_tilde=spec[2])
            lp = F.log_softmax(logits, -1)
            for i, (_, y) in enumerate(chunk):
                rows = slice(width - len(y) - 1, width - 1)
                out[name].append(lp[i, rows].gather(-1, torch.tensor(list(y))[:, None]).sum().item())
            del lp, logits
        del adapter, base
    return out


def new_scorer(qa, requests, specs, batch_size: int):
    from qadapter.scoring import score

    strengths = [float(n.split("=")[1]) for n in specs if n.startswith("strength=")]
    policies = [n for n in specs if not n.startswith("strength=")]
    return score(qa.model, requests, settings=qa.settings, policies=policies, strengths=strengths,
                 pad_token_id=qa.tokenizer.pad_token_id or 0, batch_size=batch_size).logprobs


@torch.no_grad()
def previous_pair_scorer(qa, rows, batch_size: int):
    """The main job's pair scorer before the one scorer (collated pairs, logits at response columns)."""
    from qadapter.objective import composed_logits, taken
    from qadapter.trainer import PreferencePairCollator

    collate = PreferencePairCollator(qa.tokenizer.pad_token_id)
    out = {"base": [], "customized": []}
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size])
        width_p, width = int(batch["prompt_width"]), batch["input_ids"].shape[1]
        positions = torch.arange(width_p - 1, width - 1)
        q, log_pi1 = qa.q_and_base_logprobs(batch["input_ids"], batch["attention_mask"], positions)
        actions, mask = batch["input_ids"][:, width_p:], batch["response_mask"][:, width_p:]
        custom = torch.log_softmax(composed_logits(q, log_pi1, qa.settings.alpha_0, qa.settings.alpha_tilde), -1)
        for name, lp in (("base", log_pi1), ("customized", custom)):
            ll = (taken(lp, actions) * mask).sum(-1).tolist()
            half = len(ll) // 2  # chosen rows, then rejected rows: back to request order
            out[name] += [v for pair in zip(ll[:half], ll[half:]) for v in pair]
    return out


def previous_arc_scorer(qa, requests, batch_size: int):
    """The evaluators' continuation_logprobs before the one scorer (qa.logits at the last positions)."""
    from qadapter.evaluation.scoring import _logits_continuation_logprobs

    return {"customized": [s for s, _ in _logits_continuation_logprobs(qa, requests, batch_size=batch_size,
                                                                        progress=False)]}


def max_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for k in b for x, y in zip(a[k], b[k]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--arc", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences (plain, previous) or prompts (new) per forward")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-frontier", action="store_true")
    parser.add_argument("--no-previous", action="store_true")
    parser.add_argument("--frontier-plain", action="store_true", help="also time the plain scorer on the frontier")
    parser.add_argument("--warmup-items", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    qa = load_model(args.seed + 1)
    tok = qa.tokenizer
    rows = pair_rows(tok, args.pairs, args.max_length, args.seed)
    pair_reqs = [(r["prompt_input_ids"], r[k]) for r in rows for k in ("chosen_input_ids", "rejected_input_ids")]
    arc_reqs = arc_requests(tok, args.arc, args.seed)
    n_tok = lambda reqs: sum(len(c) + len(y) for c, y in reqs)  # noqa: E731
    print(f"items: {len(rows)} pairs ({len(pair_reqs)} sequences, {n_tok(pair_reqs)} tokens), "
          f"{args.arc} ARC-Easy questions ({len(arc_reqs)} sequences, {n_tok(arc_reqs)} tokens); "
          f"threads={args.threads} batch_size={args.batch_size}", flush=True)

    two = policy_list(qa, None)
    custom_only = {"customized": two["customized"]}
    frontier = policy_list(qa, STRENGTHS)
    bs = args.batch_size
    jobs = {  # (workload, scorer) -> callable
        ("pairs", "plain"): lambda: plain_scorer(qa, pair_reqs, two, bs),
        ("pairs", "new"): lambda: new_scorer(qa, pair_reqs, two, bs),
        ("arc", "plain"): lambda: plain_scorer(qa, arc_reqs, custom_only, bs),
        ("arc", "new"): lambda: new_scorer(qa, arc_reqs, custom_only, bs),
    }
    if not args.no_previous:
        jobs[("pairs", "previous")] = lambda: previous_pair_scorer(qa, rows, bs // 2 or 1)
        jobs[("arc", "previous")] = lambda: previous_arc_scorer(qa, arc_reqs, bs)
    if not args.no_frontier:
        if args.frontier_plain:
            jobs[("frontier", "plain")] = lambda: plain_scorer(qa, pair_reqs, frontier, bs)
        jobs[("frontier", "new")] = lambda: new_scorer(qa, pair_reqs, frontier, bs)

    # warm-up: every scorer once on a few items (kernels, allocator, lazy imports)
    w = args.warmup_items
    plain_scorer(qa, pair_reqs[:2 * w], two, bs), new_scorer(qa, pair_reqs[:2 * w], frontier, bs)
    plain_scorer(qa, arc_reqs[:4 * w], custom_only, bs), new_scorer(qa, arc_reqs[:4 * w], custom_only, bs)
    if not args.no_previous:
        previous_pair_scorer(qa, rows[:w], bs), previous_arc_scorer(qa, arc_reqs[:4 * w], bs)

    sampler = PeakSampler()
    times = {k: [] for k in jobs}
    peaks = {k: [] for k in jobs}
    results = {}
    keys = list(jobs)
    for r in range(args.repeats):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            out, seconds, peak = sampler.measure(jobs[key])
            results.setdefault(key, out)
            times[key].append(seconds)
            peaks[key].append(peak)
            print(f"round {r}: {key[0]:8s} {key[1]:8s} {seconds:7.2f} s  peak +{peak / 2**20:7.1f} MB", flush=True)
    sampler.close()
    if ("frontier", "new") in results:  # the frontier's plain is the pairs' plain with more compositions
        results.setdefault(("frontier", "plain"), None)
    for workload in ("pairs", "arc", "frontier"):
        if (workload, "plain") not in results:
            continue
        ref = results[(workload, "plain")]
        if ref is None:
            continue
        for scorer in ("new", "previous"):
            got = results.get((workload, scorer))
            if got is None:
                continue
            print(f"check {workload}/{scorer}: max |logp - plain| = {max_diff(got, ref):.2e} "
                  f"over {sum(len(v) for v in ref.values())} scores", flush=True)

    med_t = {k: statistics.median(v) for k, v in times.items()}
    med_m = {k: statistics.median(v) for k, v in peaks.items()}
    print("\nmedians (s, peak RSS delta MB):")
    for k in keys:
        print(f"  {k[0]:8s} {k[1]:8s} {med_t[k]:7.2f} s  {med_m[k] / 2**20:7.1f} MB  (all: "
              + ", ".join(f"{t:.2f}" for t in times[k]) + ")")
    if ("frontier", "new") in med_t:
        print(f"  frontier: new scorer, pi1 + 5 strengths {med_t[('frontier', 'new')]:.2f} s vs pi1 + pi~ "
              f"{med_t[('pairs', 'new')]:.2f} s ({med_t[('frontier', 'new')] / med_t[('pairs', 'new')]:.2f}x)")
    for w in ("pairs", "arc", "frontier"):
        if (w, "plain") in med_t:
            line = f"  {w}: new {med_t[(w, 'plain')] / med_t[(w, 'new')]:.2f}x plain"
            if (w, "previous") in med_t:
                line += (f", previous {med_t[(w, 'plain')] / med_t[(w, 'previous')]:.2f}x plain, "
                         f"new {med_t[(w, 'previous')] / med_t[(w, 'new')]:.2f}x previous")
            line += f"; memory new/plain {med_m[(w, 'new')] / max(med_m[(w, 'plain')], 1):.3f}"
            print(line)
    plain_s = med_t[("pairs", "plain")] + med_t[("arc", "plain")]
    new_s = med_t[("pairs", "new")] + med_t[("arc", "new")]
    mem = max(med_m[("pairs", "new")], med_m[("arc", "new")]) / max(med_m[("pairs", "plain")], med_m[("arc", "plain")], 1)
    extra = ""
    if ("pairs", "previous") in med_t:
        prev_s = med_t[("pairs", "previous")] + med_t[("arc", "previous")]
        extra = f" score_vs_previous={prev_s / new_s:.2f}"
    print(f"RESULT score_vs_plain={plain_s / new_s:.2f}{extra}")
    print(f"RESULT score_peak_memory_ratio={mem:.3f} (peak RSS delta, new/plain)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
