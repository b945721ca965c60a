"""Four customizations in sequence (DSP academy → business → entertainment → literature), stacked
Q-Adapters beside DPO runs that each start from the previous result, merged (docs/results.md,
"Stacking four customizations").

    python scripts/stacking_experiment.py --dsp ../shared/data/dsp --out runs/stacking --method qadapter
    python scripts/stacking_experiment.py --dsp ../shared/data/dsp --out runs/stacking --method dpo
    python scripts/stacking_experiment.py --out runs/stacking --arc-base       # ARC-Easy of the base
    python scripts/stacking_experiment.py --out runs/stacking --report docs/results/stacking.png

Each step trains through the library's own job (``run_training`` with ``on=`` the previous step's
folder: the earlier policy merged into the base is the new π1 / the DPO reference), the same budget
for every step and method. After each step it measures, on the same held-out pairs and prompts:
the held-out margin accuracy of every domain customized so far (margin = [log π(y_w|x) − log
π0(y_w|x)] − [log π(y_l|x) − log π0(y_l|x)] against the ORIGINAL base π0; 0.5 for π0 itself), the
KL from the original base on general prompts (UltraFeedback, none trained on), and after the steps
of ``--arc-at-steps`` ARC-Easy. The split is by ``query_index``: the same held-out queries for all four domains (DSP's
four files hold the same 661 queries), none of them trained on in any step. DSP (CC BY-NC) is read
from ``--dsp`` and the per-domain training files are written under ``--out`` (never into the
repository). Results are written after every measurement to ``OUT/{method}.json`` (the KL per
prompt too); ``--report`` prints the tables and, where both chains stored per-prompt KL, their KL
difference after each step paired prompt by prompt, with a bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

DOMAINS = ("academy", "business", "entertainment", "literature")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def _write(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(path)


def prepare_split(args, tokenizer) -> dict:
    """Held-out query indices (shared by all domains), per-domain training files and held-out pairs."""
    out = Path(args.out)
    split_path = out / "split.json"
    if split_path.is_file():
        return json.loads(split_path.read_text())
    rows = {}
    for d in DOMAINS:
        with open(Path(args.dsp) / f"dsp_{d}_pairs.test.jsonl", encoding="utf-8") as fh:
            rows[d] = [json.loads(line) for line in fh if line.strip()]
    queries = sorted({r["query_index"] for r in rows[DOMAINS[0]]})
    rng = random.Random(args.seed)
    held = set(rng.sample(queries, int(round(args.held_out_fraction * len(queries)))))

    def n_tokens(messages):
        out = tokenizer.apply_chat_template(messages, tokenize=True)
        return len(out["input_ids"] if hasattr(out, "keys") else out)

    def length(r):
        return max(n_tokens(r["chosen"]), n_tokens(r["rejected"]))

    split = {"seed": args.seed, "max_length": args.max_length, "n_queries": len(queries), "n_held_out_queries": len(held),
             "domains": {}}
    (out / "data").mkdir(parents=True, exist_ok=True)
    for d in DOMAINS:
        # a few DSP rows have identical chosen and rejected answers (no preference): dropped
        short = [r for r in rows[d] if r["chosen"] != r["rejected"] and length(r) <= args.max_length]
        train = [r for r in short if r["query_index"] not in held]
        held_out = [r for r in short if r["query_index"] in held]
        random.Random(args.seed).shuffle(held_out)
        held_out = held_out[:args.eval_pairs]
        path = out / "data" / f"{d}.train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
        (out / "data" / f"{d}.held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out), encoding="utf-8")
        split["domains"][d] = {"train_file": str(path), "n_train_pairs_available": len(train),
                               "n_held_out_pairs": len(held_out), "n_pairs_short_enough": len(short)}
    _write(split_path, split)
    return split


def held_out_requests(args, tokenizer, domain):
    from qadapter.evaluation.preference import encode_prompt_response, split_pair

    rows = [json.loads(line) for line in open(Path(args.out) / "data" / f"{domain}.held_out.jsonl", encoding="utf-8")]
    rows = rows[:args.eval_pairs_used]
    requests = []
    for row in rows:
        prompt, chosen, rejected = split_pair(row)
        requests += [encode_prompt_response(tokenizer, prompt, chosen), encode_prompt_response(tokenizer, prompt, rejected)]
    return requests


def logprobs(policy, requests):
    """log π(continuation | context) per request, by the one-forward scorer (qadapter.scoring: each
    prompt computed once for all its continuations). A stack at strengths 1 is one branch: the
    network with every LoRA (z_k); the base model is a plain model."""
    from qadapter.scoring import score
    from qadapter.stack import QAdapterStack

    pad = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else 0
    if isinstance(policy, QAdapterStack):
        assert all(x == 1.0 for x in policy.strengths)
        return score(policy.model, requests, policies=("adapter",), pad_token_id=pad, batch_size=8).logprobs["adapter"]
    return score(policy.model, requests, policies=("base",), pad_token_id=pad, batch_size=8).logprobs["base"]


def arc_easy(policy, n, seed):
    """ARC-Easy accuracy exactly as qadapter.evaluation.evaluate_arc defines it (lm-eval's prompt,
    the summed log-likelihood's argmax), through the one-forward scorer above."""
    import numpy as np

    from qadapter.evaluation.benchmarks import load_arc
    from qadapter.evaluation.stats import make_metric, subsample
    from qadapter.evaluation.tasks import _encode_pair

    items = subsample(load_arc("easy"), n, seed)
    requests, owners = [], []
    for i, item in enumerate(items):
        for continuation in item.continuations:
            requests.append(_encode_pair(policy.tokenizer, item.context, continuation))
            owners.append(i)
    lls = [[] for _ in items]
    for i, ll in zip(owners, logprobs(policy, requests)):
        lls[i].append(ll)
    acc = [float(int(np.argmax(ll)) == item.gold) for item, ll in zip(items, lls)]
    m = make_metric(acc, 1000, seed)
    return {"value": m.value, "ci": [m.ci_low, m.ci_high], "n": len(acc)}


def margin_accuracy(lp, lb):
    from qadapter.evaluation.stats import make_metric

    margins = [(lp[i] - lb[i]) - (lp[i + 1] - lb[i + 1]) for i in range(0, len(lp), 2)]
    acc = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    a, m = make_metric(acc, 1000, 0), make_metric(margins, 1000, 0)
    return {"margin_accuracy": a.value, "ci": [a.ci_low, a.ci_high], "mean_margin": m.value, "n": len(acc)}


def base_measurements(args, base, tokenizer):
    """Base log-likelihoods of every held-out pair and the base's greedy answers for the KL."""
    from qadapter.evaluation import kl_from_base

    path = Path(args.out) / "base.json"
    if path.is_file():
        return json.loads(path.read_text())
    if args.method != "qadapter":  # the qadapter chain measures the base; the others wait for it
        while not path.is_file():
            time.sleep(20)
        return json.loads(path.read_text())
    t = time.monotonic()
    out = {"logprobs": {d: logprobs(base, held_out_requests(args, tokenizer, d)) for d in DOMAINS}}
    log(f"base log-likelihoods in {time.monotonic() - t:.0f} s")
    kl = kl_from_base(base, base, limit=args.kl_prompts, seed=args.seed, max_new_tokens=args.kl_new_tokens,
                      progress=False)
    out["kl_prompts"], out["kl_responses"] = kl.extra["prompts"], kl.extra["responses"]
    _write(path, out)
    return out


def run_step(args, step, domain, previous, split):
    from qadapter.recipes.config import JobArguments
    from qadapter.recipes.train import run_training
    from qadapter.trainer import QAdapterConfig

    out_dir = Path(args.out) / args.method / f"{step}_{domain}"
    if (out_dir / "adapter" / "report.json").is_file():
        return out_dir / "adapter", json.loads((out_dir / "adapter" / "report.json").read_text())
    job = JobArguments(method=args.method, model=args.model, data=split["domains"][domain]["train_file"], on=previous,
                       eval_pairs=0, train_pairs=args.steps * args.batch, train_eval_pairs=0, measure_held_out=False,
                       show_examples=0, drop_longer_than=args.max_length, skip_invalid=True, dpo_beta=args.dpo_beta)
    config = QAdapterConfig(output_dir=str(out_dir), max_steps=args.steps, per_device_train_batch_size=args.batch,
                            gradient_accumulation_steps=1, learning_rate=args.lr, max_length=args.max_length,
                            lora_r=8, lora_alpha=16, lora_target_modules="q_proj,v_proj", logging_steps=1,
                            save_strategy="no", report_to="none", seed=args.seed, use_cpu=True,
                            disable_tqdm=True)
    report = run_training(job, config, log=log)
    return out_dir / "adapter", report


def measure(args, policy, base, base_meas, tokenizer, domains, arc: bool):
    from qadapter.evaluation import evaluate_arc, kl_from_base

    row = {"margins": {}}
    for d in domains:
        t = time.monotonic()
        row["margins"][d] = margin_accuracy(logprobs(policy, held_out_requests(args, tokenizer, d)), base_meas["logprobs"][d])
        log(f"  {d}: margin accuracy {row['margins'][d]['margin_accuracy']:.3f} ({time.monotonic() - t:.0f} s)")
    kl = kl_from_base(policy, base, prompts=base_meas["kl_prompts"], responses=base_meas["kl_responses"], progress=False)
    # per prompt too: two chains measured on the same prompts can then be compared pair by pair
    row["kl"] = {"value": kl.score, "ci": list(kl.ci), "n": kl.n, "per_prompt": [s["kl"] for s in kl.samples]}
    log(f"  KL from base {kl.score:.4f}")
    if arc:
        t = time.monotonic()
        r = row["arc_easy"] = arc_easy(policy, args.arc_items, args.seed)
        log(f"  ARC-Easy {r['value']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] n={r['n']} ({time.monotonic() - t:.0f} s)")
    return row


def run_chain(args):
    from transformers import AutoTokenizer

    from qadapter.embedded import resolve_model_path
    from qadapter.evaluation import load_policy
    from qadapter.stack import QAdapterStack

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    split = prepare_split(args, tokenizer)
    base = load_policy(args.model)
    if args.method == "qadapter":
        base_meas = base_measurements(args, base, tokenizer)
    else:  # train the first step while the qadapter chain measures the base
        run_step(args, 1, DOMAINS[0], None, split)
        base_meas = base_measurements(args, base, tokenizer)
    results_path = Path(args.out) / f"{args.method}.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {
        "method": args.method, "settings": vars(args), "split": split, "steps": []}
    previous = None
    for step, domain in enumerate(DOMAINS, start=1):
        t = time.monotonic()
        folder, report = run_step(args, step, domain, previous, split)
        previous = str(folder)
        if step <= len(results["steps"]):
            continue
        log(f"step {step} ({domain}): trained {report['steps']} steps on {report['train_pairs']} pairs in "
            f"{report['train_seconds']:.0f} s")
        policy = QAdapterStack.from_pretrained(folder, base_model=args.model)
        row = measure(args, policy, base, base_meas, tokenizer, DOMAINS[:step],
                      arc=step in args.arc_at_steps)
        row.update(step=step, domain=domain, train_seconds=report["train_seconds"], train_steps=report["steps"],
                   train_pairs=report["train_pairs"], folder=str(folder), seconds=round(time.monotonic() - t, 1),
                   final_loss=next((h["loss"] for h in reversed(report["log_history"]) if "loss" in h), None))
        results["steps"].append(row)
        _write(results_path, results)
        del policy
    return results


def arc_base(args):
    """ARC-Easy of the base (or, with --arc-of METHOD, of that chain's final policy) into OUT/arc_*.json."""
    from qadapter.evaluation import load_policy
    from qadapter.stack import QAdapterStack

    t = time.monotonic()
    if args.arc_of:
        folder = Path(args.out) / args.arc_of / f"{len(DOMAINS)}_{DOMAINS[-1]}" / "adapter"
        while not (folder / "report.json").is_file():  # wait for the chain's last step
            time.sleep(30)
        policy = QAdapterStack.from_pretrained(folder, base_model=args.model)
    else:
        policy = load_policy(args.model)
    out = arc_easy(policy, args.arc_items, args.seed)
    out["seconds"] = round(time.monotonic() - t, 1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    _write(Path(args.out) / f"arc_{args.arc_of or 'base'}.json", out)
    log(f"{args.arc_of or 'base'} ARC-Easy {out['value']:.3f} [{out['ci'][0]:.3f}, {out['ci'][1]:.3f}] n={out['n']}")


def paired_kl_lines(methods: dict, names: dict) -> list[str]:
    """KL(Q-Adapter chain) − KL(DPO chain) after each step, paired prompt by prompt (both chains
    answer the base's same KL prompts), with its bootstrap interval; chains measured before the
    per-prompt values were stored give none."""
    from qadapter.evaluation.stats import bootstrap_ci

    if set(methods) != {"qadapter", "dpo"}:
        return []
    lines = []
    for q, d in zip(methods["qadapter"]["steps"], methods["dpo"]["steps"]):
        a, b = q["kl"].get("per_prompt"), d["kl"].get("per_prompt")
        if not a or not b or len(a) != len(b):
            continue
        diff = [x - y for x, y in zip(a, b)]
        low, high = bootstrap_ci(diff, n_boot=2000, seed=0)
        mark = " (interval excludes 0)" if low > 0 or high < 0 else ""
        lines.append(f"KL {names['qadapter']} − {names['dpo']} after step {q['step']}: {sum(diff) / len(diff):+.4f} "
                     f"[{low:+.4f}, {high:+.4f}], paired over {len(diff)} prompts{mark}")
    return ([""] + lines) if lines else []


def report(args):
    """The markdown table and the plot of docs/results.md from OUT/{qadapter,dpo}.json."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    methods = {m: json.loads((out / f"{m}.json").read_text()) for m in ("qadapter", "dpo") if (out / f"{m}.json").is_file()}
    # which β a DPO chain ran at is the point of a matched comparison: every label says it
    names = {m: m if m == "qadapter" else f"{m} β={res['settings']['dpo_beta']:g}" for m, res in methods.items()}
    arc0 = json.loads((out / "arc_base.json").read_text()) if (out / "arc_base.json").is_file() else None
    lines = ["| method | after step | " + " | ".join(f"{d} margin acc." for d in DOMAINS) + " | KL from base | ARC-Easy |",
             "|---|---|" + "---|" * (len(DOMAINS) + 2)]
    if arc0:
        lines.append("| base | — | " + " | ".join("0.500" for _ in DOMAINS) +
                     f" | 0 | {arc0['value']:.3f} [{arc0['ci'][0]:.3f}, {arc0['ci'][1]:.3f}] (n={arc0['n']}) |")
    retention = {}
    for m, res in methods.items():
        own = {}
        for row in res["steps"]:
            cells = []
            for d in DOMAINS:
                c = row["margins"].get(d)
                cells.append(f"{c['margin_accuracy']:.3f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]" if c else "")
            arc = row.get("arc_easy")
            arc_cell = f"{arc['value']:.3f} [{arc['ci'][0]:.3f}, {arc['ci'][1]:.3f}] (n={arc['n']})" if arc else "—"
            lines.append(f"| {names[m]} | {row['step']} {row['domain']} | " + " | ".join(cells) +
                         f" | {row['kl']['value']:.4f} | {arc_cell} |")
            own[row["domain"]] = row["margins"][row["domain"]]
        last = res["steps"][-1] if res["steps"] else None
        if last:  # a fraction of the own gain only where that gain was resolved (its interval above 0.5)
            retention[m] = {d: ((last["margins"][d]["margin_accuracy"] - 0.5) / (own[d]["margin_accuracy"] - 0.5)
                                if own[d]["ci"][0] > 0.5 else None)
                            for d in own if d in last["margins"]}
    lines.append("")
    lines.append("| method | " + " | ".join(f"{d}: kept of own gain" for d in DOMAINS[:-1]) + " |")
    lines.append("|---|" + "---|" * (len(DOMAINS) - 1))
    for m, r in retention.items():
        lines.append(f"| {names[m]} | " + " | ".join("" if d not in r else "own gain not resolved" if r[d] is None
                                              else f"{r[d]:.0%}" for d in DOMAINS[:-1]) + " |")
    lines += paired_kl_lines(methods, names)
    print("\n".join(lines))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m, res in methods.items():
        style = "-" if m == "qadapter" else "--"
        for j, d in enumerate(DOMAINS):
            xs = [row["step"] for row in res["steps"] if d in row["margins"]]
            ys = [row["margins"][d]["margin_accuracy"] for row in res["steps"] if d in row["margins"]]
            axes[0].plot(xs, ys, style, marker="o", color=f"C{j}", label=f"{names[m]}: {d}")
        axes[1].plot([0] + [r["step"] for r in res["steps"]], [0] + [r["kl"]["value"] for r in res["steps"]], style,
                     marker="o", color="k", label=names[m])
        pts = [(0, arc0)] if arc0 else []
        pts += [(r["step"], r["arc_easy"]) for r in res["steps"] if r.get("arc_easy")]
        if pts:
            axes[2].errorbar([p[0] + (0.05 if m == "dpo" else 0) for p in pts], [p[1]["value"] for p in pts],
                             yerr=[[p[1]["value"] - p[1]["ci"][0] for p in pts], [p[1]["ci"][1] - p[1]["value"] for p in pts]],
                             fmt="o" + style, capsize=3, label=names[m])
    axes[0].axhline(0.5, color="grey", lw=0.8)
    axes[0].set(title="held-out margin accuracy vs the original base", xlabel="after step", xticks=[1, 2, 3, 4])
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].set(title="KL(π ‖ base) on general prompts", xlabel="after step", xticks=[0, 1, 2, 3, 4])
    axes[1].legend()
    axes[2].set(title="ARC-Easy accuracy (95% interval)", xlabel="after step", xticks=[0, 1, 2, 3, 4])
    axes[2].legend()
    fig.tight_layout()
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.report, dpi=110)
    print(f"\nplot: {args.report}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsp", default="../shared/data/dsp", help="folder with dsp_{domain}_pairs.test.jsonl (CC BY-NC; not copied)")
    p.add_argument("--out", default="runs/stacking")
    p.add_argument("--method", choices=("qadapter", "dpo"), default="qadapter")
    p.add_argument("--model", default="embedded")
    p.add_argument("--steps", type=int, default=4, help="training steps per domain (the same for every step and method)")
    p.add_argument("--batch", type=int, default=2, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=128, help="only pairs of at most this many tokens")
    p.add_argument("--eval-pairs", type=int, default=32, help="held-out pairs per domain")
    p.add_argument("--eval-pairs-used", type=int, default=12, help="of those, measured after every step")
    p.add_argument("--held-out-fraction", type=float, default=0.2, help="of the queries (query_index)")
    p.add_argument("--kl-prompts", type=int, default=8)
    p.add_argument("--kl-new-tokens", type=int, default=32)
    p.add_argument("--arc-items", type=int, default=1000)
    p.add_argument("--arc-at-steps", type=int, nargs="*", default=[],
                   help="measure ARC-Easy within the chain after these steps (default: none; see --arc-of)")
    p.add_argument("--arc-base", action="store_true", help="only measure the base model's ARC-Easy")
    p.add_argument("--arc-of", default=None, choices=("qadapter", "dpo"),
                   help="only measure ARC-Easy of this chain's final policy (waits for it)")
    p.add_argument("--report", default=None, metavar="PLOT.png", help="print the table and write the plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.report:
        return report(args)
    import torch

    torch.set_num_threads(args.threads)
    if args.arc_base or args.arc_of:
        return arc_base(args)
    run_chain(args)


if __name__ == "__main__":
    sys.exit(main())
