"""Export a Q-Adapter or a stack as ONE plain PEFT LoRA folder, which plain transformers / PEFT
``generate()`` (and vLLM / SGLang ``--enable-lora``) sample as the customized policy.

Exact cases (docs/method.md, "Exporting"; tests/test_export.py checks the logits to 1e-5):

* a residual adapter at strength 1 (tied α0 = α̃ = q_scale): π̃ = softmax(zθ), the adapter model
  itself, so the export is a copy of its LoRA; likewise a plain (SFT / DPO) adapter;
* a stack at all strengths 1: π = softmax(z_k), the base with every LoRA added. A sum of LoRA deltas
  Σ_g s_g·B_g·A_g (s_g = each one's lora_alpha / r scaling) is ONE LoRA of rank Σ r_g:
  A = [A_1; ...; A_k] (rows stacked), B = [s_1·B_1, ..., s_k·B_k] (columns), scaling 1
  (lora_alpha = r = Σ r_g); a module only some adapters target gets zero blocks for the others.

Any other strength is not linear in the LoRA weights (z_g − z_{g−1} passes through the whole
network), so the export is **distilled**: a plain LoRA, started from the strength-1 export above,
trained to minimize KL(π̃ ‖ π_export) over the full vocabulary at every response position of
continuations sampled from π̃ for the training prompts; the held-out KL and margin accuracy of the
export are measured next to the original's.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .backbone import pad_token_id
from .loading import load_base, read_folder
from .stack import PEFT_CONFIG, QAdapterStack

EXPORT_INFO = "qadapter_export.json"
WEIGHTS = "adapter_model.safetensors"

__all__ = ["export", "exact_export", "concatenate_loras", "distill"]


def _is_one(strengths: Sequence[float]) -> bool:
    return all(math.isclose(s, 1.0, rel_tol=0, abs_tol=1e-12) for s in strengths)


def _lora_scaling(cfg: dict) -> float:
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _check_plain(cfg: dict, folder) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: only LoRA adapters can be exported (got {cfg.get('peft_type')})")
    for key, bad in (("use_dora", True), ("rank_pattern", None), ("alpha_pattern", None), ("modules_to_save", None)):
        value = cfg.get(key)
        if (bad is True and value) or (bad is None and value):
            raise ValueError(f"{folder}: cannot concatenate an adapter with {key}={value!r}")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{folder}: cannot concatenate an adapter with bias={cfg['bias']!r}")


def concatenate_loras(folders: Sequence[Path], to: Path) -> dict:
    """Write ONE LoRA of rank Σ r_g equal to the sum of the LoRA deltas in ``folders`` (each scaled
    by its own lora_alpha / r); returns its adapter config."""
    from safetensors.torch import load_file, save_file

    configs = [json.loads((Path(f) / PEFT_CONFIG).read_text(encoding="utf-8")) for f in folders]
    weights = [load_file(str(Path(f) / WEIGHTS)) for f in folders]
    for cfg, f in zip(configs, folders):
        _check_plain(cfg, f)
    modules: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for g, w in enumerate(weights):
        for key in w:
            if key.endswith(".lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                modules.setdefault(module, {})[g] = (w[key], w[module + ".lora_B.weight"])
    ranks = [cfg["r"] for cfg in configs]
    total = sum(ranks)
    out: dict[str, torch.Tensor] = {}
    for module, parts in modules.items():
        some_A, some_B = next(iter(parts.values()))
        d_in, d_out = some_A.shape[1], some_B.shape[0]
        A_blocks, B_blocks = [], []
        for g, r in enumerate(ranks):
            if g in parts:
                A, B = parts[g]
                A_blocks.append(A.float())
                B_blocks.append(B.float() * _lora_scaling(configs[g]))
            else:
                A_blocks.append(torch.zeros(r, d_in))
                B_blocks.append(torch.zeros(d_out, r))
        dtype = some_A.dtype
        out[module + ".lora_A.weight"] = torch.cat(A_blocks, 0).to(dtype).contiguous()
        out[module + ".lora_B.weight"] = torch.cat(B_blocks, 1).to(dtype).contiguous()
    targets = []
    for cfg in configs:
        t = cfg["target_modules"]
        for name in ([t] if isinstance(t, str) else t):
            if name not in targets:
                targets.append(name)
    config = dict(configs[0])
    config.update(r=total, lora_alpha=total, use_rslora=False, rank_pattern={}, alpha_pattern={},
                  target_modules=targets[0] if len(targets) == 1 and targets[0] == "all-linear" else sorted(targets))
    to.mkdir(parents=True, exist_ok=True)
    save_file(out, str(to / WEIGHTS), metadata={"format": "pt"})
    (to / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return config


def _write_settings(to: Path, spec) -> None:
    """A ``qadapter_config.json`` beside the PEFT files (PEFT and vLLM ignore it): the export read as a
    residual Q-Adapter at tied α0 = α̃ = q_scale = 1 is softmax(zθ), its own adapter model, so
    ``qadapter serve --adapter NAME=DIR`` serves exactly the exported policy (and strengths around it)."""
    from .settings import QAdapterSettings

    settings = QAdapterSettings(parameterization="residual", alpha_tilde=1.0, alpha_0=1.0, q_scale=1.0,
                                base_model_name_or_path=spec.base_model_name_or_path,
                                base_model_revision=spec.base_model_revision, base_fingerprint=spec.base_fingerprint)
    settings.save(to)


def _copy_tokenizer(src_dirs: Sequence[Path], to: Path) -> None:
    for src in src_dirs:
        if src is not None and (Path(src) / "tokenizer_config.json").is_file():
            for f in Path(src).iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")) and f.is_file():
                    shutil.copy2(f, to / f.name)
            return


def exact_export(source, to, strengths: Sequence[float] | None = None) -> dict:
    """The exact export (a copy, or the concatenation) where the policy is one adapter model; raises
    ValueError where it is not (some strength ≠ 1)."""
    from .io import save_atomically

    spec, strengths = read_folder(source, strengths, "strength")
    if not _is_one(strengths):
        raise ValueError(f"strengths {strengths}: not an exact case (every strength must be 1)")

    def write(tmp: Path) -> None:
        if len(spec.folders) == 1:
            for name in (PEFT_CONFIG, WEIGHTS):
                shutil.copy2(spec.folders[0] / name, tmp / name)
        else:
            concatenate_loras(spec.folders, tmp)
        _copy_tokenizer([spec.tokenizer_dir, *spec.folders], tmp)
        _write_settings(tmp, spec)
        info = {"source": str(source), "kind": "copy" if len(spec.folders) == 1 else "concatenated",
                "strengths": strengths, "base_model_name_or_path": spec.base_model_name_or_path,
                "base_fingerprint": spec.base_fingerprint, "exact": True}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")

    save_atomically(to, write)
    return {"kind": "copy" if len(spec.folders) == 1 else "concatenated", "exact": True, "strengths": strengths,
            "to": str(to), "rank": json.loads((Path(to) / PEFT_CONFIG).read_text())["r"]}


# --------------------------------------------------------------------------------------- distillation
def _prompt_key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


def _kl_on(teacher, student, seqs: list[list[int]], starts: list[int], pad: int, grad: bool) -> tuple[torch.Tensor, int]:
    """Σ over response positions of KL(π̃ ‖ π_student), and the number of positions; ``teacher`` is
    a logits function (the stacked policy's ``logits``)."""
    from .backbone import causal_lm_logits

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):  # left padding, as every scorer here
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    device = next(student.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    scored = torch.zeros_like(ids, dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts)):  # states that predict a response token
        scored[i, width - len(s) + start - 1: width - 1] = True
    with torch.no_grad():
        teacher_lp = F.log_softmax(teacher(ids, mask), -1)[scored]
    with torch.enable_grad() if grad else torch.no_grad():
        student_lp = F.log_softmax(causal_lm_logits(student, ids, mask).float(), -1)[scored]
        kl = (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1).clamp_min(0).sum()
    return kl, int(scored.sum())


def _margin_accuracy(policy, base, pairs) -> dict:
    from .evaluation.preference import evaluate_preferences

    r = evaluate_preferences(policy, base, pairs, progress=False, batch_size=4)
    m = r.metrics["margin_accuracy"]
    return {"margin_accuracy": m.value, "ci": [m.ci_low, m.ci_high], "n": r.n,
            "mean_margin": r.metrics["mean_margin"].value}


def distill(source, to, *, strengths: Sequence[float], data, base_model=None, steps: int = 100, lr: float = 1e-3,
            batch_size: int = 4, samples_per_prompt: int = 2, max_new_tokens: int = 64, held_out_fraction: float = 0.2,
            max_prompts: int | None = None, seed: int = 0, log=print) -> dict:
    """Distill the policy of ``source`` at ``strengths`` into one plain LoRA (module docstring).

    ``data``: preference pairs (any format :func:`qadapter.data.load_preference_pairs` reads): their
    distinct prompts, split into training and held-out prompts (seeded), are the prompts; the
    held-out pairs also measure the margin accuracy of the export next to the original's.
    """
    from peft import PeftModel

    from .data import load_preference_pairs
    from .evaluation.policy import HFPolicy, QAdapterBaseView
    from .io import save_atomically

    started = time.monotonic()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    student_base = copy.deepcopy(base_model) if isinstance(base_model, torch.nn.Module) else base_model
    teacher = QAdapterStack.from_pretrained(source, base_model=base_model, strengths=strengths)
    tok = teacher.tokenizer
    pad = pad_token_id(tok)
    pairs, _ = load_preference_pairs(data, skip_invalid=True)
    rows = [dict(prompt=p, chosen=c, rejected=r) for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]
    keys = sorted({_prompt_key(r["prompt"]) for r in rows})
    rng.shuffle(keys)
    n_held = max(1, int(round(held_out_fraction * len(keys)))) if len(keys) > 1 else 0
    held_keys = set(keys[:n_held])
    train_prompts = [json.loads(k) for k in keys[n_held:]][:max_prompts]
    held_prompts = [json.loads(k) for k in keys[:n_held]][:max_prompts]
    held_pairs = [r for r in rows if _prompt_key(r["prompt"]) in held_keys]

    def sample(prompts, tag):
        seqs, starts = [], []
        from .chat import encode_prompt
        for rep in range(samples_per_prompt):
            for start in range(0, len(prompts), 8):
                chunk = prompts[start:start + 8]
                _, new = teacher.generate(chunk, do_sample=True, max_new_tokens=max_new_tokens, return_ids=True,
                                          seed=seed * 1000 + rep * 100 + start + (7 if tag == "held" else 0))
                for prompt, ids in zip(chunk, new):
                    p = encode_prompt(tok, prompt)
                    if ids:
                        seqs.append(p + ids)
                        starts.append(len(p))
        return seqs, starts

    log(f"export: sampling {samples_per_prompt} continuation(s) of ≤{max_new_tokens} tokens from the customized "
        f"policy for {len(train_prompts)} training and {len(held_prompts)} held-out prompts")
    train_seqs, train_starts = sample(train_prompts, "train")
    held_seqs, held_starts = sample(held_prompts, "held")

    # the student: the strength-1 export (an exact one-LoRA network) on its own copy of the base
    init_dir = Path(to).with_name(Path(to).name + ".init")
    exact_export(source, init_dir, [1.0] * len(teacher))
    student_base, _ = load_base(read_folder(source)[0], student_base, tok, next(teacher.model.parameters()).dtype)
    student = PeftModel.from_pretrained(student_base.to(teacher.device), str(init_dir), is_trainable=True)

    def held_kl():
        total, n = 0.0, 0
        for i in range(0, len(held_seqs), batch_size):
            kl, k = _kl_on(teacher.logits, student, held_seqs[i:i + batch_size], held_starts[i:i + batch_size], pad, False)
            total, n = total + float(kl), n + k
        return total / max(n, 1)

    student.eval()
    kl_before = held_kl() if held_seqs else float("nan")
    params = [p for n, p in student.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = list(range(len(train_seqs)))
    history = []
    student.train()
    for step in range(steps):
        if step % max(1, len(order) // batch_size) == 0:
            rng.shuffle(order)
        pick = [order[(step * batch_size + j) % len(order)] for j in range(batch_size)]
        kl, n = _kl_on(teacher.logits, student, [train_seqs[i] for i in pick], [train_starts[i] for i in pick], pad, True)
        loss = kl / max(n, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    student.eval()
    kl_after = held_kl() if held_seqs else float("nan")

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_settings(tmp, read_folder(source)[0])

    save_atomically(to, write)
    shutil.rmtree(init_dir, ignore_errors=True)
    report: dict[str, Any] = {
        "kind": "distilled", "exact": False, "strengths": list(strengths), "to": str(to), "steps": steps,
        "train_sequences": len(train_seqs), "held_out_sequences": len(held_seqs),
        "held_out_kl_teacher_to_export": kl_after, "held_out_kl_teacher_to_strength1_export": kl_before,
        "first_losses": history[:3], "last_losses": history[-3:],
    }
    if held_pairs:
        base = QAdapterBaseView(teacher)
        report["margin_accuracy_original"] = _margin_accuracy(teacher, base, held_pairs)
        report["margin_accuracy_export"] = _margin_accuracy(HFPolicy(student, tok), base, held_pairs)
    report["seconds"] = round(time.monotonic() - started, 1)
    (Path(to) / EXPORT_INFO).write_text(json.dumps({"source": str(source), **report}, indent=2), encoding="utf-8")
    log(f"export: distilled in {report['seconds']:.0f} s")
    return report


def export(source, to, *, strengths: Sequence[float] | float | str | None = None, data=None, base_model=None,
           log=print, field: str = "strength", **distill_kwargs) -> dict:
    """Write ``source`` (a Q-Adapter, plain adapter or stack folder) as one plain PEFT LoRA folder at
    ``to``: exactly where the policy at ``strengths`` is one adapter model, else distilled (needs ``data``)."""
    _, strengths = read_folder(source, strengths, field)  # THE strength rule (qadapter.settings.strength_values)
    if _is_one(strengths):
        return exact_export(source, to, strengths)
    if data is None:
        raise ValueError(f"strengths {strengths} are not an exact case (all 1): distillation needs data= "
                         "(preference pairs whose prompts it samples from; --data on the command line)")
    return distill(source, to, strengths=strengths, data=data, base_model=base_model, log=log, **distill_kwargs)
