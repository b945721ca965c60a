"""The main job as a Python API: load → split by prompt → train → save → measure → show.

``qadapter train`` is a thin shell over :func:`run_training`. With no arguments it customizes the
embedded default model on the embedded HH-RLHF harmless pairs (the ``default`` preset, qadapter/recipes/presets/default.yaml).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..backbone import pad_token_id
from ..embedded import default_data_path, load_model, load_tokenizer, resolve_model_path
from ..evaluation.stats import preference_accuracy
from ..io import write_json, write_jsonl
from .config import JobArguments
from .methods import METHOD_REGISTRY

class StopAfterMinutes(TrainerCallback):
    """Ends training cleanly once a wall-clock budget is spent (checked after every step)."""

    def __init__(self, minutes: float):
        self.deadline = time.monotonic() + 60 * minutes
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() > self.deadline and not control.should_training_stop:
            control.should_training_stop = True
            self.stopped_at = state.global_step


@torch.no_grad()
def pair_log_likelihoods(qadapter, tokenized, batch_size: int = 4, desc: str = "scoring pairs") -> dict[str, list[float]]:
    """log π(y|x) of chosen and rejected responses under both π1 and π̃, by
    :func:`qadapter.scoring.score`: both branches in one forward, each prompt computed once for
    its two responses, ``batch_size`` pairs per forward.

    Returns lists ``base_chosen``, ``base_rejected``, ``custom_chosen``, ``custom_rejected`` and, from the
    same forward, ``kl`` (Σ_t KL(π̃‖π1) over each response's tokens, chosen and rejected alternating) and
    ``n_tokens`` (their token counts).
    """
    from ..scoring import score

    requests = []
    for i in range(len(tokenized)):
        row = tokenized[i]
        requests += [(row["prompt_input_ids"], row["chosen_input_ids"]), (row["prompt_input_ids"], row["rejected_input_ids"])]
    pad = pad_token_id(qadapter.tokenizer)
    scores = score(qadapter.model, requests, settings=qadapter.settings, policies=("base", "customized"),
                   kl="policy||base", pad_token_id=pad, batch_size=batch_size, allow_empty=True, progress=True,
                   desc=desc)
    base, custom = scores.logprobs["base"], scores.logprobs["customized"]
    return {"base_chosen": base[0::2], "base_rejected": base[1::2],
            "custom_chosen": custom[0::2], "custom_rejected": custom[1::2],
            "kl": scores.kl["customized"], "n_tokens": scores.n_tokens}


def kl_per_token(ll: dict[str, list[float]]) -> float:
    """Mean KL(π̃‖π1) per response token, over both responses of the pairs :func:`pair_log_likelihoods` scored."""
    return sum(ll["kl"]) / max(1, sum(ll["n_tokens"]))


def implicit_reward_margins(ll: dict[str, list[float]], seed: int = 0) -> dict[str, Any]:
    """How far training moved each pair toward its chosen answer, relative to the base model:
    margin = [log π̃(y_w|x) − log π1(y_w|x)] − [log π̃(y_l|x) − log π1(y_l|x)] (0 for an untrained
    adapter). Returns the fraction of pairs with a positive margin (ties half, Wilson interval) and the
    mean margin in nats (bootstrap interval) — the same numbers ``qadapter compare`` reports.
    """
    from ..evaluation.stats import make_metric

    chosen_moved = [c - b for c, b in zip(ll["custom_chosen"], ll["base_chosen"])]
    rejected_moved = [c - b for c, b in zip(ll["custom_rejected"], ll["base_rejected"])]
    mean = make_metric([c - r for c, r in zip(chosen_moved, rejected_moved)], seed=seed)
    # margin > 0 exactly when the chosen answer moved more than the rejected one
    return {**preference_accuracy(chosen_moved, rejected_moved),
            "mean": mean.value, "mean_ci_low": mean.ci_low, "mean_ci_high": mean.ci_high}


SPLIT_COLUMNS = ("prompt", "chosen", "rejected", "row")


def save_split(folder, train, held_out, info: dict[str, Any]) -> None:
    """Write ``train.jsonl`` and ``held_out.jsonl`` (the normalized pairs, one per line) and
    ``split.json`` (the split counts and seed) into ``folder``, each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("held_out", held_out)):
        columns = [c for c in SPLIT_COLUMNS if c in rows.column_names]
        write_jsonl(folder / f"{name}.jsonl", rows.select_columns(columns))
    write_json(folder / "split.json", {**info, "n_train_pairs_used": len(train)}, indent=2)


def run_training(job: JobArguments, config, log=print) -> dict[str, Any]:
    """Train a Q-Adapter as ``job`` and ``config`` (a :class:`QAdapterConfig`) say; return a report.

    The report (also saved as ``report.json`` beside the adapter) holds the data split, the load
    and tokenization reports, training time and steps, and the preference accuracy of the base
    and the customized policy on training and held-out pairs.
    """
    started = time.monotonic()
    torch.manual_seed(config.seed)
    data = prepare_data(job, config, log)
    trained = train_policy(job, config, data, log)
    report = {
        "method": job.method, "model": job.model, "data": data.name, "preset": job.preset, "seed": config.seed,
        "split": data.split_info, "dropped_as_longer": data.n_dropped, "load": data.load_report.summary(),
        "tokenize": data.tok_report.summary(), "train_pairs": len(data.train), **trained.report}
    if not trained.trainer.is_world_process_zero():
        return report
    report.update(measure(job, config, trained.qadapter, data))
    from ..plots import plot_training_curves

    curves = plot_training_curves({job.method: report["log_history"]}, Path(config.output_dir) / "training_curves.png",
                                  title=f"{job.method} on {Path(data.name).name if job.data else data.name}")
    report["training_curves"] = str(curves.resolve()) if curves else None
    report["total_seconds"] = round(time.monotonic() - started, 1)
    write_json(trained.out_dir / "report.json", report, indent=2)
    return report


@dataclass
class PreparedData:
    """The pairs of a job, loaded, tokenized, filtered and split by prompt (see :func:`prepare_data`)."""
    name: str
    tokenizer: Any
    model_path: str
    train: Any
    held_out: Any
    split_info: dict[str, Any]
    load_report: Any
    tok_report: Any
    n_dropped: int


def prepare_data(job: JobArguments, config, log=print) -> PreparedData:
    """Read and validate the pairs (before any model is loaded: a bad file fails in seconds),
    tokenize them once, drop the over-long ones, split by prompt; save the split when asked."""
    from ..data import (flip_labels, load_embedded_pairs, load_preference_pairs, select_pairs, split_by_prompt,
                        tokenize_pairs)

    if job.data is None:
        pairs, load_report = load_embedded_pairs()
        data_name = f"embedded HH-RLHF harmless ({default_data_path().name})"
    else:
        pairs, load_report = load_preference_pairs(job.data, skip_invalid=job.skip_invalid,
                                                   allow_empty_response=job.allow_empty_response)
        data_name = job.data
    log(f"data: {load_report.summary()}")
    model_path = resolve_model_path(job.model)
    tokenizer = load_tokenizer(model_path, pad_with_eos=True)

    # Tokenize once, before the split, so that length filtering cannot unbalance train and eval. A pair
    # longer than --drop_longer_than is dropped whole (and counted), never cut; the check that too many
    # pairs would lose their prompt to truncation looks at the kept pairs only (UltraFeedback at 256
    # tokens: most pairs are longer, and are dropped rather than refused).
    ids, tok_report = tokenize_pairs(pairs, tokenizer, max_length=config.max_length,
                                     max_prompt_length=config.max_prompt_length,
                                     drop_longer_than=job.drop_longer_than or None)
    log(f"tokens: {tok_report.summary()}")
    n_read, n_dropped = len(pairs), tok_report.n_dropped
    pairs = pairs.select(tok_report.kept)
    for column in ids.column_names:
        if column not in pairs.column_names:
            pairs = pairs.add_column(column, ids[column])
    if job.drop_longer_than:
        log(f"kept the {len(pairs)} pairs of at most {job.drop_longer_than} tokens; dropped {n_dropped} longer ones")
    if job.data is not None:
        notice = length_notice(job, config, n_read, n_dropped, tok_report.n_response_truncated)
        if notice:
            log(notice)
    eval_size = int(job.eval_pairs) if job.eval_pairs >= 1 else float(job.eval_pairs)
    train_ids, eval_ids, split_info = split_by_prompt(pairs, eval_size=eval_size, seed=config.seed)
    if job.train_pairs:
        train_ids = select_pairs(train_ids, job.train_pairs, seed=config.seed)
    if job.label_noise:
        train_ids, flipped = flip_labels(train_ids, job.label_noise, seed=config.seed)
        split_info = {**split_info, "label_noise": job.label_noise, "n_flipped": len(flipped)}
        log(f"label noise: swapped chosen and rejected on {len(flipped)} of {len(train_ids)} training pairs "
            f"(seed {config.seed}); held-out pairs are clean")
    log(f"split by prompt (seed {config.seed}): {len(train_ids)} training pairs, {len(eval_ids)} held-out pairs "
        f"({split_info['n_train_prompts']} / {split_info['n_eval_prompts']} prompts)")
    if job.save_split and config.process_index == 0:
        save_split(Path(config.output_dir) / "split", train_ids, eval_ids, split_info)
    return PreparedData(data_name, tokenizer, model_path, train_ids, eval_ids, split_info, load_report, tok_report,
                        n_dropped)


def length_notice(job: JobArguments, config, n_read: int, n_dropped: int, n_cut: int) -> str | None:
    """One line, before training on a user's file, when the token budget drops or cuts pairs: how
    many, and the flags that keep more (the presets' budgets suit their embedded data, not every file)."""
    if n_dropped:
        kept = n_read - n_dropped
        return (f"note: --drop_longer_than {job.drop_longer_than} (from the '{job.preset}' preset unless given) "
                f"trains on pairs of at most {job.drop_longer_than} tokens: "
                f"{kept} of {n_read} pairs of {job.data} kept ({100 * kept / max(n_read, 1):.0f}%); "
                f"--drop_longer_than N --max_length N (or --preset paper: 512, nothing dropped) keeps more")
    if n_cut:
        return (f"note: --max_length {config.max_length} (from the '{job.preset}' preset unless given) cuts "
                f"responses to fit {config.max_length} tokens: {n_cut} of "
                f"{n_read} pairs of {job.data} cut; --max_length N keeps more of each")
    return None


@contextmanager
def subnormals_flushed():
    """Flush subnormal floats to zero while training. Once a preference objective's margins saturate
    (DPO at beta = 1 after a few hundred steps), sigmoid(-margin) is ~1e-40 and the backward pass fills
    with subnormals, which x86 CPUs process many times slower (bench/subnormals.py); their values are
    below anything an optimizer step can resolve, so flushing them changes no result. Restores what
    the process had before (torch has no getter for it: a subnormal either survives or not)."""
    flushed_before = torch.tensor([1e-40]).item() == 0.0  # 1e-40 < float32's smallest normal
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        torch.set_flush_denormal(flushed_before)


def slow_bf16_warning(config) -> str | None:
    """What to tell a user who asks for bf16 autocast on a CPU without bf16 matrix units (no
    AVX512-BF16, no AMX): there PyTorch runs bf16 matrix products through a fallback kernel, measured
    here 8x slower than float32 (an AVX2 CPU: a 1024x576 by 576x1536 product took 0.19 s against
    0.024 s), where an AMX CPU trains ~2x faster in bf16. None when nothing is wrong or torch cannot say."""
    if not getattr(config, "bf16", False) or config.device.type != "cpu":
        return None
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is None for check in checks) or any(check() for check in checks):
        return None
    return ("bf16 was asked for on a CPU without bf16 matrix units (no AVX512-BF16 or AMX): its matrix "
            "products run several times slower than in float32 here; drop --bf16 to train faster")


@dataclass
class TrainedPolicy:
    trainer: Any
    qadapter: Any
    out_dir: Path
    report: dict[str, Any]


def train_policy(job: JobArguments, config, data: PreparedData, log=print) -> TrainedPolicy:
    """Train ``job.method`` on ``data.train`` and save the adapter (main process only) into
    ``OUTPUT_DIR/adapter``; the policy is a :class:`QAdapter` whatever the method."""
    model = load_model(data.model_path, dtype=torch.float32)
    tokenizer, train_ids = data.tokenizer, data.train
    if job.on:
        from ..stack import merge_into

        model, earlier = merge_into(model, job.on)  # π1 = the earlier customized policy, exactly
        log(f"on {job.on}: merged its {len(earlier.folders)} adapter(s) into the base; training the next level")
    warning = slow_bf16_warning(config)
    if warning:
        log(f"warning: {warning}")
    callbacks = []
    timer = None
    if job.max_train_minutes:
        timer = StopAfterMinutes(job.max_train_minutes)
        callbacks.append(timer)
    out_dir = Path(config.output_dir) / "adapter"
    train_start = time.monotonic()
    method = METHOD_REGISTRY[job.method]
    with subnormals_flushed():
        trainer = method.train(model, tokenizer, train_ids, config, job, callbacks, log)
    qadapter, save = method.policy(trainer, tokenizer)
    train_seconds = time.monotonic() - train_start
    if job.on:
        from ..stack import save_extended

        save = (lambda write_new: lambda folder: save_extended(folder, job.on, write_new, tokenizer))(save)
    if trainer.is_world_process_zero():
        save(out_dir)
    report = {
        "steps": trainer.state.global_step, "train_seconds": round(train_seconds, 1),
        "stopped_by_time_limit_at_step": timer.stopped_at if timer else None,
        "pairs_per_second": round(trainer.state.global_step * config.per_device_train_batch_size
                                  * config.gradient_accumulation_steps * max(1, config.world_size) / max(train_seconds, 1e-9), 4),
        "settings": asdict(qadapter.settings) if job.method == "qadapter" else None,
        "adapter_dir": str(out_dir.resolve()),
        # what the trainer logged every `logging_steps` (loss, rewards/*, ...): the training curves
        "log_history": [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h],
    }
    return TrainedPolicy(trainer, qadapter, out_dir, report)


def measure(job: JobArguments, config, qadapter, data: PreparedData) -> dict[str, Any]:
    """Preference accuracy, margins and KL on training and held-out pairs, and example answers."""
    from ..data import distinct_prompts, select_pairs

    train_ids, eval_ids = data.train, data.held_out
    out: dict[str, Any] = {"accuracy": {}}
    seen = min(job.train_eval_pairs, len(train_ids))
    # train_eval_pairs=0: held-out pairs only (a comparison measures its methods itself)
    measured = {"train": select_pairs(train_ids, seen, seed=config.seed)} if seen > 0 else {}
    if job.measure_held_out:
        measured["held_out"] = eval_ids
    for split, ids in measured.items():
        ll = pair_log_likelihoods(qadapter, ids, desc=f"measuring {split} pairs")
        out["accuracy"][split] = {
            "base": preference_accuracy(ll["base_chosen"], ll["base_rejected"]),
            "customized": preference_accuracy(ll["custom_chosen"], ll["custom_rejected"]),
            "margin": implicit_reward_margins(ll, seed=config.seed),
            "kl_per_token": kl_per_token(ll),
        }
    if job.show_examples or job.repetition_prompts:
        out.update(answer_held_out_prompts(job, qadapter, eval_ids, seed=config.seed))
    return out


def answer_held_out_prompts(job: JobArguments, qadapter, eval_ids, seed: int = 0) -> dict[str, Any]:
    """Greedy answers of the base and the customized policy to distinct held-out prompts: the first
    ``show_examples`` are shown, and over ``repetition_prompts`` of them each answer's fraction of
    repeated word 4-grams is averaged, with bootstrap intervals over prompts for each policy and for
    the paired difference (customized − base): a loop the customization introduced shows as a
    difference whose interval lies above 0."""
    from ..data import distinct_prompts
    from ..evaluation.repetition import repeated_ngram_fractions
    from ..evaluation.stats import make_metric

    # distinct prompts: DSP-style data hold several pairs per prompt; greedy, one batch per policy
    prompts = distinct_prompts(eval_ids["prompt"])[:max(job.show_examples, job.repetition_prompts)]
    answers = {policy: qadapter.generate(prompts, policy=policy, max_new_tokens=job.example_new_tokens)
               for policy in tqdm(("base", "customized"), desc="held-out answers", leave=False)}
    out: dict[str, Any] = {"examples": [{"prompt": p[-1]["content"] if isinstance(p, list) else p, "base": b,
                                         "customized": c} for p, b, c in
                                        list(zip(prompts, answers["base"], answers["customized"]))[:job.show_examples]]}
    if job.repetition_prompts:
        per_prompt = {policy: repeated_ngram_fractions(texts, n=4) for policy, texts in answers.items()}
        difference = [c - b for b, c in zip(per_prompt["base"], per_prompt["customized"])]
        out["repetition"] = {"n": len(prompts), "max_new_tokens": job.example_new_tokens,
                             **{k: asdict(make_metric(v, seed=seed)) for k, v in
                                (("base", per_prompt["base"]), ("customized", per_prompt["customized"]),
                                 ("difference", difference))}}
    return out


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary ``qadapter train`` prints."""
    lines = [f"\ntrained {report['steps']} steps on {report['train_pairs']} pairs in {report['train_seconds']:.0f} s "
             f"({report['pairs_per_second']:.3f} pairs/s)"
             + (f"; stopped by the time limit at step {report['stopped_by_time_limit_at_step']}"
                if report.get("stopped_by_time_limit_at_step") else "")]
    lines.append("\npreference accuracy: fraction of pairs where log π(chosen|x) > log π(rejected|x), 95% Wilson interval")
    trained = "customized π̃" if report.get("method", "qadapter") == "qadapter" else report["method"]
    lines.append(f"{'pairs':<10} {'n':>4}  {'base π1':>22}  {trained:>22}")
    for split, acc in report.get("accuracy", {}).items():
        cells = [f"{a['accuracy']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]" for a in (acc["base"], acc["customized"])]
        lines.append(f"{split:<10} {acc['base']['n']:>4}  {cells[0]:>22}  {cells[1]:>22}")
    if any("margin" in acc for acc in report.get("accuracy", {}).values()):
        lines.append("\nimplicit-reward margin [log π(y_w|x) − log π1(y_w|x)] − [log π(y_l|x) − log π1(y_l|x)]: "
                     "> 0 when training moved the pair toward its chosen answer (0 before training)")
        lines.append(f"{'pairs':<10} {'n':>4}  {'fraction > 0':>22}  {'mean margin (nats)':>22}")
        for split, acc in report.get("accuracy", {}).items():
            m = acc.get("margin")
            if m:
                lines.append(f"{split:<10} {m['n']:>4}  {m['accuracy']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
                             f"  {m['mean']:>+7.2f} [{m['mean_ci_low']:+.2f}, {m['mean_ci_high']:+.2f}]")
    kls = {split: acc["kl_per_token"] for split, acc in report.get("accuracy", {}).items() if "kl_per_token" in acc}
    if kls:
        lines.append("\nKL(π‖π1) per response token (teacher-forced on the measured pairs' responses): "
                     + ", ".join(f"{split} {kl:.4f}" for split, kl in kls.items()))
    held = report.get("accuracy", {}).get("held_out", {}).get("margin")
    if held:
        excluded = held["mean_ci_low"] > 0 or held["mean_ci_high"] < 0
        lines.append(f"held-out preference gain (mean margin): {held['mean']:+.2f} nats "
                     f"[{held['mean_ci_low']:+.2f}, {held['mean_ci_high']:+.2f}] — the 95% interval "
                     + ("excludes 0" if excluded else "includes 0: no gain resolved at this budget"))
    for ex in report.get("examples", []):
        lines.append(f"\nprompt: {ex['prompt']!r}\n  base:       {ex['base']!r}\n  customized: {ex['customized']!r}")
    if report.get("repetition"):
        rep = report["repetition"]
        cells = {k: f"{rep[k]['value']:.3f} [{rep[k]['ci_low']:.3f}, {rep[k]['ci_high']:.3f}]"
                 for k in ("base", "customized")}
        diff = rep["difference"]
        verdict = ("the customized answers repeat more than the base's (interval above 0)" if diff["ci_low"] > 0 else
                   "repeat less (interval below 0)" if diff["ci_high"] < 0 else
                   "no difference resolved (interval includes 0)")
        lines.append(f"\nrepeated word 4-grams per answer, {rep['n']} held-out prompts, greedy, {rep['max_new_tokens']} "
                     f"new tokens (mean, 95% bootstrap interval): base {cells['base']}, customized "
                     f"{cells['customized']}; difference {diff['value']:+.3f} [{diff['ci_low']:+.3f}, "
                     f"{diff['ci_high']:+.3f}]: {verdict}")
    lines.append(f"\nadapter saved to {report['adapter_dir']} (with report.json)")
    if report.get("training_curves"):
        lines.append(f"training curves: {report['training_curves']}")
    return "\n".join(lines)
