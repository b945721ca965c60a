"""Run a comparison: train every method spec, evaluate every policy point through the registry
(:mod:`.evaluations`), write the report (:mod:`.report`). See the package docstring."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ...io import read_json, read_jsonl, sha256_files, write_json
from .cache import adapter_fingerprint, folder_stamp, method_done, training_fingerprint
from .evaluations import BENCHMARKS, DEFAULT_BENCHMARKS, REGISTRY, Context, parse_limits
from .methods import METHOD_REGISTRY, METHODS, MethodSpec, PolicyPoint, parse_method_spec, point_record, policy_points
from .report import train_command, write_results
from .results import Comparison

def free_memory():
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


def run_comparison(output_dir: str | Path, job=None, config=None, *,
                   methods: Sequence["str | MethodSpec"] = METHODS, strengths: Sequence[float] | None = None,
                   strengths_for: Sequence[str] | None = None,
                   benchmarks: Sequence[str] = DEFAULT_BENCHMARKS, limits: str | int | dict | None = None,
                   judge=None, train_judge: bool = False, judge_steps: int = 100, judge_learning_rate: float = 5e-5,
                   judge_batch_size: int = 8, bbh_tasks: Sequence[str] | None = None, max_new_tokens: int = 128,
                   eval_batch_size: int = 8, eval_seed: int | None = None, data_dir=None, device: str | None = None,
                   dtype=None, train_argv: Sequence[str] | None = None, command: str | None = None,
                   progress: bool = True, log: Callable[[str], Any] = print) -> Comparison:
    """Train ``methods`` on one dataset and compare them with the base model on both sides of the
    trade-off; write ``results.md``, ``results.csv`` and ``tradeoff.png`` into ``output_dir``.

    Args:
        output_dir: the comparison folder: ``<method>/`` (each method's ``run_training`` output:
            ``adapter/`` with ``report.json``, ``split/``), ``judge/``, ``eval/<policy>/<evaluation>.json``.
        job, config: :class:`~qadapter.pipeline.JobArguments` and :class:`~qadapter.trainer.QAdapterConfig`
            shared by every method (``job.method`` and ``config.output_dir`` are set per method; LoRA
            rank, target modules, seed and split are therefore the same). None: ``qadapter train``'s
            defaults (the ``default`` preset on the embedded model and data).
        methods: method specs (:func:`parse_method_spec`): a method of :data:`METHOD_REGISTRY`
            (``qadapter``, ``sft``, ``replay``, ``dpo``, ``sft_kl``), optionally with settings of its
            own (``dpo:beta=0.3``, ``sft:max_steps=20``, ``sft_kl:kl_weight=1``); each is trained once
            into ``OUT/<method>[_<name>=<value>...]/``.
        strengths: decode-time strengths of every (residual) Q-Adapter spec: each is a policy
            ``qadapter@s`` of the ONE trained adapter (no retraining); preferences, KL and ARC
            score all strengths from the same forwards, the generated ones decode at each. None: the
            Q-Adapter at its trained setting only (policy ``qadapter``).
        strengths_for: the qadapter specs (by name or spec text) ``strengths`` applies to; the other
            qadapter specs are evaluated at their trained setting only. None: every qadapter spec.
        benchmarks: retention evaluations among :data:`BENCHMARKS` (``kl``: KL from the base model;
            default :data:`DEFAULT_BENCHMARKS`: all but the opt-in ``ifeval`` and ``fluency``).
            Held-out preference accuracy and margins are always measured.
        limits: subsample sizes (see :func:`parse_limits`; default :data:`DEFAULT_LIMITS`).
        judge: a reward model folder / hub id (``RewardModelJudge``) or any judge object; with
            ``train_judge=True`` one is trained on the training split (:func:`train_reward_judge`,
            ``judge_*`` settings) and saved to ``output_dir/judge``. Neither: no win rate.
        bbh_tasks: BBH tasks (default ``DEFAULT_BBH_TASKS``); ``max_new_tokens``: per generated answer
            (GSM8K, BBH, the KL's base answers, win-rate answers); ``data_dir``: benchmark files
            (default: the shipped copy); ``eval_seed``: subsample / bootstrap seed (default: ``config.seed``).
        train_argv, command: the ``qadapter train`` flags and the full command line, recorded in results.md.
    """
    import torch

    from ...evaluation import RewardModelJudge, base_policy, load_policy
    from ...evaluation.stats import make_metric, subsample, ties_half
    from ...evaluation.tasks import DEFAULT_BBH_TASKS
    from ...modeling import QAdapter
    from ...stack import QAdapterStack
    from ...trainer.reward_judge import train_reward_judge
    from ..config import parse_train_args
    from ..train import run_training

    if job is None or config is None:
        default_job, default_config = parse_train_args([])
        job = job or default_job
        config = config or default_config
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [parse_method_spec(m) for m in methods]
    if not specs:
        raise ValueError(f"no method to compare; give method specs among {', '.join(METHOD_REGISTRY)}")
    names = [sp.name for sp in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"method specs must be distinct; got {', '.join(names)}")
    if strengths is not None:
        strengths = [float(x) for x in strengths]
        bad = [x for x in strengths if not (x > 0 and math.isfinite(x))]
        if bad or not strengths or len(set(strengths)) != len(strengths):
            raise ValueError(f"strengths must be distinct finite numbers > 0; got {strengths}")
        if not any(sp.method == "qadapter" for sp in specs):
            raise ValueError("strengths apply to a Q-Adapter: add a qadapter spec to the methods")
    strength_specs = None
    if strengths_for is not None:
        if strengths is None:
            raise ValueError("strengths_for needs strengths")
        strength_specs = {parse_method_spec(m).name for m in strengths_for}
        not_qadapter = sorted(strength_specs - {sp.name for sp in specs if sp.method == "qadapter"})
        if not_qadapter:
            raise ValueError(f"strengths_for names {', '.join(not_qadapter)}, which is not a qadapter spec of the methods")
    points = policy_points(specs, strengths, start=bool(getattr(job, "on", None)), strength_specs=strength_specs)
    unknown = sorted(set(benchmarks) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose among {', '.join(BENCHMARKS)}")
    benchmarks = [b for b in BENCHMARKS if b in set(benchmarks)]
    if judge is not None and train_judge:
        raise ValueError("give a judge or train_judge=True, not both")
    limits = parse_limits(limits)
    eval_seed = config.seed if eval_seed is None else eval_seed
    bbh_tasks = list(bbh_tasks or DEFAULT_BBH_TASKS)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    # ---- the manifest: a resumed comparison must train with the same settings
    fingerprint = training_fingerprint(job, config)
    manifest_path = out / "comparison.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    # settings added to the fingerprint after a folder was made (absent there) do not count as changed
    differs = {k: v for k, v in fingerprint.items()
               if k in manifest.get("training", {}) and manifest["training"][k] != v}
    if manifest.get("training") and differs:
        changed = ", ".join(f"{k.removeprefix('job.')}: {manifest['training'].get(k)!r} -> {v!r}"
                            for k, v in differs.items())
        raise ValueError(f"{out} holds a comparison trained with other settings ({changed}); use another output "
                         "folder, or delete it")
    commands = list(manifest.get("commands", []))
    if command and (not commands or commands[-1] != command):
        commands.append(command)
    manifest.update(training=fingerprint, commands=commands)
    write_json(manifest_path, manifest)

    # ---- 1. train (or reuse) every method, all on the same split
    trained: list[str] = []
    reports: dict[str, dict] = {}
    train_commands: dict[str, str] = {}
    for spec in tqdm(specs, desc="training methods", disable=not progress):
        method = spec.name
        folder = out / spec.folder
        spec_record = {"spec": spec.name, "method": spec.method, "params": dict(spec.params)}
        if train_argv is not None:
            train_commands[method] = train_command(train_argv, spec, folder)
        if method_done(folder):
            recorded = read_json(folder / "spec.json") if (folder / "spec.json").is_file() else None
            if recorded is not None and recorded != spec_record:
                raise ValueError(f"{folder} was trained as {recorded.get('spec')!r}, not {spec.name!r}: use another "
                                 "output folder, or delete that one")
            reports[method] = read_json(folder / "adapter" / "report.json")
            log(f"{method}: trained already ({folder / 'adapter'}), reusing it")
            continue
        # the comparison measures every policy itself (section 3), so training measures nothing
        m_job, m_config = spec.apply(job, config)
        m_job = dataclasses.replace(m_job, save_split=True, train_eval_pairs=0, measure_held_out=False,
                                    show_examples=0)
        m_config.output_dir = str(folder)
        if m_config.resume_from_checkpoint is None:
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
            if last:
                log(f"{method}: resuming from {last}")
                m_config.resume_from_checkpoint = last
        log(f"{method}: training into {folder}")
        reports[method] = run_training(m_job, m_config, log=log)
        write_json(folder / "spec.json", spec_record)
        trained.append(method)
        free_memory()
    for spec in specs:
        rep = reports[spec.name]
        if rep.get("model") != job.model or rep.get("seed") != config.seed or rep.get("method") != spec.method:
            raise ValueError(f"{out / spec.folder} was trained as method {rep.get('method')!r} on {rep.get('model')!r} "
                             f"with seed {rep.get('seed')}; this comparison asks for {spec.method!r} on {job.model!r} "
                             f"with seed {config.seed}: use another output folder, or delete that one")
    hashes = {sp.name: sha256_files([out / sp.folder / "split" / "train.jsonl", out / sp.folder / "split" / "held_out.jsonl"])
              for sp in specs}
    if len(set(hashes.values())) != 1:
        raise RuntimeError(f"the methods were trained on different splits ({hashes}); delete {out} and rerun")
    split_dir = out / specs[0].folder / "split"
    train_pairs, held_out = read_jsonl(split_dir / "train.jsonl"), read_jsonl(split_dir / "held_out.jsonl")
    split_info = read_json(split_dir / "split.json") if (split_dir / "split.json").is_file() else reports[specs[0].name]["split"]
    held_out_hash = sha256_files([split_dir / "held_out.jsonl"])

    # ---- 2. the judge
    judge_obj, judge_info, judge_key = None, None, None

    def get_judge():
        nonlocal judge_obj
        if judge_obj is None:
            judge_obj = (RewardModelJudge(str(judge), device=device, batch_size=eval_batch_size)
                         if isinstance(judge, (str, Path)) else judge)
        return judge_obj

    if train_judge:
        judge_dir = out / "judge"
        if (judge_dir / "judge_report.json").is_file():
            log(f"judge: trained already ({judge_dir}), reusing it")
            judge_report = read_json(judge_dir / "judge_report.json")
        else:
            judge_report = train_reward_judge(job.model, train_pairs, judge_dir, max_steps=judge_steps,
                                              learning_rate=judge_learning_rate, batch_size=judge_batch_size,
                                              max_length=config.max_length, seed=config.seed,
                                              use_cpu=bool(getattr(config, "use_cpu", False)) or device == "cpu",
                                              log=log)
            trained.append("judge")
        judge = str(judge_dir)
        judge_info = {"description": f"a reward model trained here from the base model with TRL's RewardTrainer on "
                                     f"the {judge_report['train_pairs']} training pairs ({judge_report['steps']} steps, "
                                     f"batch {judge_report['batch_size']}, learning rate {judge_report['learning_rate']:g}), "
                                     f"saved in `judge/`", "report": judge_report}
    if judge is not None:
        if isinstance(judge, (str, Path)):
            judge_key = {"path": str(Path(judge).resolve()) if Path(judge).exists() else str(judge),
                         "stamp": folder_stamp(Path(judge)) if Path(judge).is_dir() else None}
            judge_info = judge_info or {"description": f"the reward model `{judge}` (sequence classification)"}
        else:
            judge_key = {"object": repr(judge)}
            judge_info = judge_info or {"description": f"`{judge!r}`"}
        # the judge's own held-out accuracy: how far its verdicts can be trusted
        acc_path = out / "eval" / "judge" / "held_out_accuracy.json"
        acc_key = {"judge": judge_key, "held_out": held_out_hash, "limit": limits["preferences"], "seed": eval_seed}
        cached = read_json(acc_path) if acc_path.is_file() else None
        if cached and cached.get("key") == acc_key:
            judge_info["held_out_accuracy"] = cached["result"]
        elif hasattr(get_judge(), "rewards"):
            from ...evaluation.preference import split_pair

            rows = subsample(held_out, limits["preferences"], eval_seed)
            prompts, chosen, rejected = zip(*(split_pair(r) for r in rows))
            rewards = get_judge().rewards(list(prompts) * 2, list(chosen) + list(rejected))
            n = len(rows)
            correct = ties_half(np.asarray(rewards[:n]) - np.asarray(rewards[n:]))
            m = make_metric(correct, seed=eval_seed)
            judge_info["held_out_accuracy"] = {"value": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high, "n": n}
            write_json(acc_path, {"key": acc_key, "result": judge_info["held_out_accuracy"]})
    else:
        log("no judge (give --judge PATH or --train-judge): the win rate is not measured")

    # ---- 3. evaluate the base model and every method through the same evaluators (the registry's)
    ctx = Context(limits=limits, seed=eval_seed, batch_size=eval_batch_size, max_new_tokens=max_new_tokens,
                  bbh_tasks=bbh_tasks, data_dir=data_dir, held_out=held_out, held_out_hash=held_out_hash,
                  progress=progress, judge=get_judge)
    if judge is not None:
        from ...chat import as_messages
        from ...data import distinct_prompts

        prompts = [as_messages(row["prompt"] if "prompt" in row else row["chosen"][:-1]) for row in held_out]
        ctx.win_prompts = subsample(distinct_prompts(prompts), limits["win_rate"], eval_seed)
    evaluations = list(benchmarks) + ["preferences"] + (["win_rate"] if judge is not None else [])
    results = ctx.results
    computed: list[tuple[str, str]] = []

    def key_for(point: PolicyPoint, policy_fp: str, evaluation: str) -> dict:
        """The cache key of one stored result: it is reused only while every part matches."""
        k = {"policy": point.name, "fingerprint": policy_fp, "evaluation": evaluation,
             "limit": limits.get(evaluation), "seed": eval_seed, "data_dir": str(data_dir) if data_dir else None,
             **REGISTRY[evaluation].key(ctx)}
        # a policy's KL and win rate are measured on the base's answers: they are part of its key
        if evaluation in ("kl", "win_rate") and point.name != "base":
            k["base_answers"] = results["base"][evaluation]["config"].get("answers_hash")
        if evaluation == "win_rate":
            k["judge"] = judge_key
        if point.strength is not None:
            k["strength"] = point.strength
        return k

    # the points of one trained folder share one loaded model: a Q-Adapter's strengths are decoded
    # from the same weights (its settings' α's set per point), and scored from the same forwards
    groups: list[tuple[MethodSpec | None, list[PolicyPoint]]] = []
    for point in points:
        if groups and point.spec is not None and groups[-1][0] == point.spec:
            groups[-1][1].append(point)
        else:
            groups.append((point.spec, [point]))
    for spec, group in groups:
        start = group[0].start
        if start:  # the earlier customization (a Q-Adapter or a stack folder) every spec was trained on
            policy_fp = f"on:{Path(job.on).resolve()}:{folder_stamp(Path(job.on))}"
        elif spec is None:
            policy_fp = f"model:{job.model}"
        else:
            policy_fp = adapter_fingerprint(out / spec.folder / "adapter")
        todos: dict[str, list] = {}
        for point in group:
            folder = out / "eval" / point.folder
            results[point.name] = {}
            todo = []
            for evaluation in evaluations:
                k = key_for(point, policy_fp, evaluation)
                path = folder / f"{evaluation}.json"
                cached = read_json(path) if path.is_file() else None
                if cached and cached.get("key") == k:
                    results[point.name][evaluation] = cached["result"]
                else:
                    todo.append((evaluation, k, path, cached))
            if todo:
                todos[point.name] = todo
            else:
                log(f"{point.name}: every evaluation cached in {folder}")
        if not todos:
            continue
        if spec is None and not start:
            policy = load_policy(job.model, device=device, dtype=dtype)
            base = policy
        else:  # trained on --on: a stack, whose base view is the ORIGINAL base (margins and KL against it)
            folder = Path(job.on) if start else out / spec.folder / "adapter"
            policy = load_policy(folder, base_model=job.model, device=device, dtype=dtype)
            base = base_policy(policy)
        stack = isinstance(policy, QAdapterStack)
        saved_alphas = (policy.settings.alpha_0, policy.settings.alpha_tilde) if isinstance(policy, QAdapter) else None
        saved_strengths = list(policy.strengths) if stack else None
        alphas: dict[str, tuple[float, float]] = {}
        for point in group:
            if point.strength is not None:
                try:
                    if stack:  # the strength of the level this spec trained; the earlier ones as saved
                        if policy.settings[-1].parameterization != "residual":
                            raise ValueError("strength applies to a residual Q-Adapter level")
                        alphas[point.name] = tuple(saved_strengths[:-1]) + (float(point.strength),)
                    else:
                        alphas[point.name] = policy.settings.decoding_alphas(strength=point.strength)
                except (AttributeError, ValueError) as e:
                    raise ValueError(f"{spec.name} at strength {point.strength:g}: {e}") from None
        # the scorer-based evaluations of every strength still to do: one scorer call for them all
        precomputed: dict[tuple[str, str], dict] = {}
        for evaluation in evaluations:
            entry = REGISTRY[evaluation]
            wanted = [pt for pt in group if pt.strength is not None and evaluation in
                      {e for e, *_ in todos.get(pt.name, [])}]
            if entry.at_strengths is None or len(wanted) < 2 or stack:  # a stack: each strength by itself
                continue
            log(f"{spec.name}: {evaluation} at strengths {', '.join(f'{pt.strength:g}' for pt in wanted)} "
                "from the same forwards")
            by_strength = entry.at_strengths(ctx, policy, [pt.strength for pt in wanted])
            for pt in wanted:
                precomputed[(pt.name, evaluation)] = by_strength[pt.strength].to_dict(samples=True)
        try:
            for point in group:
                policy_name = point.name
                if policy_name not in todos:
                    continue
                if stack:
                    policy.strengths = list(alphas.get(policy_name, saved_strengths))
                elif policy_name in alphas:
                    policy.settings.alpha_0, policy.settings.alpha_tilde = alphas[policy_name]
                elif saved_alphas is not None:
                    policy.settings.alpha_0, policy.settings.alpha_tilde = saved_alphas
                log(f"{policy_name}: evaluating {', '.join(e for e, *_ in todos[policy_name])}")
                for evaluation, k, path, cached in tqdm(todos[policy_name], desc=f"evaluating {policy_name}",
                                                        disable=not progress):
                    reuse = None
                    if evaluation == "win_rate" and cached:
                        # only the judge (or what is computed from the answers) changed: the policy's answers are
                        # still valid, only the verdicts and metrics are redone
                        old, answer_only = cached.get("key", {}), ("judge", "answer_metrics")
                        if ({a: b for a, b in old.items() if a not in answer_only}
                                == {a: b for a, b in k.items() if a not in answer_only}):
                            reuse = cached["result"]["extra"].get("policy_answers") or None
                    result = precomputed.get((policy_name, evaluation))
                    if result is None:
                        result = REGISTRY[evaluation].run(ctx, policy, base, policy_name, reuse).to_dict(samples=True)
                    if policy_name == "base" and evaluation in ("kl", "win_rate"):
                        answers = result["extra"]["responses" if evaluation == "kl" else "base_answers"]
                        result["config"]["answers_hash"] = hashlib.sha256(json.dumps(answers).encode()).hexdigest()[:16]
                    write_json(path, {"key": k, "result": result})
                    results[policy_name][evaluation] = result
                    computed.append((policy_name, evaluation))
        finally:
            if saved_alphas is not None:
                policy.settings.alpha_0, policy.settings.alpha_tilde = saved_alphas
            if saved_strengths is not None:
                policy.strengths = saved_strengths
        del policy, base
        free_memory()

    # ---- 4. write the tables and the plot
    lora = (f"LoRA r={config.lora_r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}, "
            f"target modules {config.lora_target_modules}")
    info = {"model": job.model, "on": getattr(job, "on", None), "data": reports[specs[0].name].get("data", job.data), "split": split_info,
            "train_seed": config.seed, "eval_seed": eval_seed, "lora": lora, "commands": commands,
            "train_commands": train_commands, "training_settings": fingerprint, "reports": reports,
            "judge": judge_info, "limits": limits, "bbh_tasks": bbh_tasks, "max_new_tokens": max_new_tokens,
            "specs": [sp.name for sp in specs], "strengths": strengths,
            "points": [point_record(pt) for pt in points]}
    comparison = Comparison(out, [pt.name for pt in points[1:]], benchmarks, results, info, trained, computed)
    comparison.paths = write_results(comparison)
    log(f"results: {comparison.paths['md']}, {comparison.paths['csv']}, {comparison.paths['png']}")
    return comparison
