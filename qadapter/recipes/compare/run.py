"""Run a comparison in four plain steps: :func:`plan` (check the request, record the training
settings), :func:`train` (train or reuse every method spec, all on one split; the judge),
:func:`evaluate` (every policy point through the registry of :mod:`.evaluations`, cached), and
:func:`report` (:mod:`.report`). :func:`run_comparison` calls them in that order."""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from ...io import read_json, read_jsonl, sha256_files, write_json
from .cache import adapter_fingerprint, folder_stamp, method_done, training_fingerprint
from .evaluations import BENCHMARKS, DEFAULT_BENCHMARKS, Context, selected
from .judge import attach_judge, train_judge_model
from .limits import parse_limits
from .plan import Plan, Training
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
    if judge is not None and train_judge:
        raise ValueError("give a judge or train_judge=True, not both")
    the_plan = plan(output_dir, job, config, methods=methods, strengths=strengths, strengths_for=strengths_for,
                    benchmarks=benchmarks, limits=limits, bbh_tasks=bbh_tasks, max_new_tokens=max_new_tokens,
                    eval_batch_size=eval_batch_size, eval_seed=eval_seed, data_dir=data_dir, device=device,
                    dtype=dtype, train_argv=train_argv, command=command, judged=judge is not None or train_judge)
    training = train(the_plan, progress=progress, log=log)
    if train_judge:
        judge = train_judge_model(the_plan, training, steps=judge_steps, learning_rate=judge_learning_rate,
                                  batch_size=judge_batch_size, log=log)
    ctx = the_plan.context(training, progress)
    judge_info = attach_judge(the_plan, training, ctx, judge, trained_here=train_judge, log=log)
    computed = evaluate(the_plan, ctx, progress=progress, log=log)
    return report(the_plan, training, ctx, judge_info, computed, log=log)


def plan(output_dir, job=None, config=None, *, methods, strengths, strengths_for, benchmarks, limits, bbh_tasks,
         max_new_tokens, eval_batch_size, eval_seed, data_dir, device, dtype, train_argv, command, judged) -> Plan:
    """Check the request (specs, strengths, benchmarks) and the output folder's recorded training
    settings (a resumed comparison must train as before); record this call's command."""
    import torch

    from ...evaluation.tasks import DEFAULT_BBH_TASKS
    from ..config import parse_train_args

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
    fingerprint, commands = record_training_settings(out, job, config, command)
    return Plan(out=out, job=job, config=config, specs=specs, points=points, strengths=strengths,
                benchmarks=benchmarks, evaluations=selected(benchmarks, judged), limits=parse_limits(limits),
                eval_seed=config.seed if eval_seed is None else eval_seed,
                bbh_tasks=list(bbh_tasks or DEFAULT_BBH_TASKS), max_new_tokens=max_new_tokens,
                eval_batch_size=eval_batch_size, data_dir=data_dir,
                device=device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=dtype,
                fingerprint=fingerprint, commands=commands, train_argv=train_argv)


def record_training_settings(out: Path, job, config, command: str | None) -> tuple[dict, list[str]]:
    """OUT/comparison.json: the settings every method trains with (a folder made with others is
    refused) and the command lines that ran on it."""
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
    return fingerprint, commands


def train(plan: Plan, *, progress: bool = True, log=print) -> Training:
    """Train (or reuse, from OUT/<spec>/) every method spec, all on the same split."""
    from ..train import run_training

    out, job, config = plan.out, plan.job, plan.config
    reports, train_commands, trained = {}, {}, []
    for spec in tqdm(plan.specs, desc="training methods", disable=not progress):
        folder = out / spec.folder
        spec_record = {"spec": spec.name, "method": spec.method, "params": dict(spec.params)}
        if plan.train_argv is not None:
            train_commands[spec.name] = train_command(plan.train_argv, spec, folder)
        if method_done(folder):
            recorded = read_json(folder / "spec.json") if (folder / "spec.json").is_file() else None
            if recorded is not None and recorded != spec_record:
                raise ValueError(f"{folder} was trained as {recorded.get('spec')!r}, not {spec.name!r}: use another "
                                 "output folder, or delete that one")
            reports[spec.name] = read_json(folder / "adapter" / "report.json")
            log(f"{spec.name}: trained already ({folder / 'adapter'}), reusing it")
            continue
        # the comparison measures every policy itself (the evaluate step), so training measures nothing
        m_job, m_config = spec.apply(job, config)
        m_job = dataclasses.replace(m_job, save_split=True, train_eval_pairs=0, measure_held_out=False,
                                    show_examples=0, repetition_prompts=0)
        m_config.output_dir = str(folder)
        if m_config.resume_from_checkpoint is None:
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
            if last:
                log(f"{spec.name}: resuming from {last}")
                m_config.resume_from_checkpoint = last
        log(f"{spec.name}: training into {folder}")
        reports[spec.name] = run_training(m_job, m_config, log=log)
        write_json(folder / "spec.json", spec_record)
        trained.append(spec.name)
        free_memory()
    for spec in plan.specs:
        rep = reports[spec.name]
        if rep.get("model") != job.model or rep.get("seed") != config.seed or rep.get("method") != spec.method:
            raise ValueError(f"{out / spec.folder} was trained as method {rep.get('method')!r} on {rep.get('model')!r} "
                             f"with seed {rep.get('seed')}; this comparison asks for {spec.method!r} on {job.model!r} "
                             f"with seed {config.seed}: use another output folder, or delete that one")
    split_files = {sp.name: [out / sp.folder / "split" / "train.jsonl", out / sp.folder / "split" / "held_out.jsonl"]
                   for sp in plan.specs}
    hashes = {name: sha256_files(files) for name, files in split_files.items()}
    if len(set(hashes.values())) != 1:
        raise RuntimeError(f"the methods were trained on different splits ({hashes}); delete {out} and rerun")
    split_dir = out / plan.specs[0].folder / "split"
    split_info = (read_json(split_dir / "split.json") if (split_dir / "split.json").is_file()
                  else reports[plan.specs[0].name]["split"])
    return Training(reports, train_commands, trained, read_jsonl(split_dir / "train.jsonl"),
                    read_jsonl(split_dir / "held_out.jsonl"), sha256_files([split_dir / "held_out.jsonl"]), split_info)


# --------------------------------------------------------------------------- evaluate
def policy_at(policy, strength: float | None):
    """``policy`` decoded at ``strength`` (None: as saved): a view sharing its model, the policy
    itself unchanged. A stack: the strength of its last level (the one the spec trained)."""
    from ...stack import QAdapterStack

    if strength is None:
        return policy
    view = copy.copy(policy)
    if isinstance(policy, QAdapterStack):
        if policy.settings[-1].parameterization != "residual":
            raise ValueError("strength applies to a residual Q-Adapter level")
        view.strengths = list(policy.strengths[:-1]) + [float(strength)]
    else:
        alpha_0, alpha_tilde = policy.settings.decoding_alphas(strength=strength)
        view.settings = dataclasses.replace(policy.settings, alpha_0=alpha_0, alpha_tilde=alpha_tilde)
    return view


def policy_fingerprint(plan: Plan, point: PolicyPoint) -> str:
    if point.start:  # the earlier customization (a Q-Adapter or a stack folder) every spec was trained on
        return f"on:{Path(plan.job.on).resolve()}:{folder_stamp(Path(plan.job.on))}"
    if point.spec is None:
        return f"model:{plan.job.model}"
    return adapter_fingerprint(plan.out / point.spec.folder / "adapter")


def load(plan: Plan, point: PolicyPoint):
    """(policy, its base view) of a point's folder; trained on --on: a stack, whose base view is the
    ORIGINAL base (margins and KL against it)."""
    from ...evaluation import base_policy, load_policy

    if point.spec is None and not point.start:
        policy = load_policy(plan.job.model, device=plan.device, dtype=plan.dtype)
        return policy, policy
    folder = Path(plan.job.on) if point.start else plan.out / point.spec.folder / "adapter"
    policy = load_policy(folder, base_model=plan.job.model, device=plan.device, dtype=plan.dtype)
    return policy, base_policy(policy)


def stored_result(path: Path, key: dict) -> tuple[dict | None, dict | None]:
    """(what ``path`` stores, or None; its result when stored under ``key``, else None): a result
    computed with other settings is not reused, though its answers may be (``reusable_answers``)."""
    stored = read_json(path) if path.is_file() else None
    return stored, (stored["result"] if stored and stored.get("key") == key else None)


def evaluate(plan: Plan, ctx: Context, *, progress: bool = True, log=print) -> list[tuple[str, str]]:
    """Score every point with every selected evaluation, reusing each stored result whose cache key
    matches; the points of one trained folder share one loaded model. Fills ``ctx.results``;
    returns the (point, evaluation) pairs computed now."""
    computed: list[tuple[str, str]] = []
    groups: list[list[PolicyPoint]] = []
    for point in plan.points:  # a Q-Adapter's strengths: one folder, one load, one group
        if groups and point.spec is not None and groups[-1][0].spec == point.spec:
            groups[-1].append(point)
        else:
            groups.append([point])
    for group in groups:
        fingerprint = policy_fingerprint(plan, group[0])
        todo = {}  # point name -> [(evaluation, key, path, cached)]
        for point in group:
            ctx.results[point.name] = {}
            for entry in plan.evaluations:
                key = entry.cache_key(ctx, point.name, fingerprint, point.strength)
                path = plan.out / "eval" / point.folder / f"{entry.name}.json"
                cached, result = stored_result(path, key)
                if result is not None:
                    ctx.results[point.name][entry.name] = result
                else:
                    todo.setdefault(point.name, []).append((entry, key, path, cached))
            if point.name not in todo:
                log(f"{point.name}: every evaluation cached in {plan.out / 'eval' / point.folder}")
        if todo:
            computed += evaluate_group(plan, ctx, group, todo, progress=progress, log=log)
    return computed


def evaluate_group(plan: Plan, ctx: Context, group: list[PolicyPoint], todo: dict, *, progress: bool,
                   log=print) -> list[tuple[str, str]]:
    """The missing results of one folder's points: the evaluations that score strengths do all of a
    Q-Adapter's strengths in one scorer call; everything else one point at a time."""
    from ...modeling import QAdapter

    policy, base = load(plan, group[0])
    try:
        for point in group:  # an impossible strength fails before anything is computed
            policy_at(policy, point.strength)
    except (AttributeError, ValueError) as e:
        raise ValueError(f"{group[0].spec.name} at strength {point.strength:g}: {e}") from None
    done: dict[tuple[str, str], dict] = {}
    for entry in plan.evaluations:
        wanted = [pt for pt in group if pt.strength is not None and any(e is entry for e, *_ in todo.get(pt.name, []))]
        if not entry.strengths or len(wanted) < 2 or not isinstance(policy, QAdapter):  # a stack: one at a time
            continue
        log(f"{group[0].spec.name}: {entry.name} at strengths {', '.join(f'{pt.strength:g}' for pt in wanted)} "
            "from the same forwards")
        by_strength = entry.run(ctx, policy, base, wanted[0].name, strengths=[pt.strength for pt in wanted])
        for pt in wanted:
            done[(pt.name, entry.name)] = by_strength[pt.strength].to_dict(samples=True)
    computed = []
    for point in group:
        if point.name not in todo:
            continue
        view = policy_at(policy, point.strength)
        log(f"{point.name}: evaluating {', '.join(e.name for e, *_ in todo[point.name])}")
        for entry, key, path, cached in tqdm(todo[point.name], desc=f"evaluating {point.name}", disable=not progress):
            result = done.get((point.name, entry.name))
            if result is None:
                # another process of the same comparison (e.g. one per --benchmarks subset) may have
                # stored it since this group started: read it rather than compute it twice
                _, stored = stored_result(path, key)
                if stored is not None:
                    log(f"{point.name}: {entry.name} stored meanwhile in {path}, reusing it")
                    ctx.results[point.name][entry.name] = stored
                    continue
                reuse = entry.reusable_answers(cached, key)
                result = entry.run(ctx, view, base, point.name, reuse).to_dict(samples=True)
            write_json(path, {"key": key, "result": entry.stamp(point.name, result)})
            ctx.results[point.name][entry.name] = result
            computed.append((point.name, entry.name))
    del policy, base
    free_memory()
    return computed


def report(plan: Plan, training: Training, ctx: Context, judge_info: dict | None, computed, log=print) -> Comparison:
    """Write results.md, results.csv and the plots; return the :class:`Comparison`."""
    config, job = plan.config, plan.job
    lora = (f"LoRA r={config.lora_r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}, "
            f"target modules {config.lora_target_modules}")
    info = {"model": job.model, "on": getattr(job, "on", None),
            "data": training.reports[plan.specs[0].name].get("data", job.data), "split": training.split_info,
            "train_seed": config.seed, "eval_seed": plan.eval_seed, "lora": lora, "commands": plan.commands,
            "train_commands": training.train_commands, "training_settings": plan.fingerprint,
            "reports": training.reports, "judge": judge_info, "limits": plan.limits, "bbh_tasks": plan.bbh_tasks,
            "max_new_tokens": plan.max_new_tokens, "specs": [sp.name for sp in plan.specs],
            "strengths": plan.strengths, "points": [point_record(pt) for pt in plan.points],
            "general_prompts_left_out": (ctx.general_prompts()[1] if any(e.general_prompts for e in plan.evaluations)
                                         else 0)}  # a --eval-data-dir without general prompts is fine otherwise
    comparison = Comparison(plan.out, [pt.name for pt in plan.points[1:]], plan.benchmarks, ctx.results, info,
                            training.trained, computed)
    comparison.paths = write_results(comparison)
    log(f"results: {comparison.paths['md']}, {comparison.paths['csv']}, {comparison.paths['png']}")
    return comparison
