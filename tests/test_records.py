"""docs/results/records: the per-item evaluation records kept in the repository pair with
scripts/paired_differences.py and give the numbers docs/results.md reports from them."""

from __future__ import annotations

import json
from pathlib import Path

from script_testing import run_script

RECORDS = Path(__file__).resolve().parents[1] / "docs" / "results" / "records"


def test_every_record_pairs_item_by_item_with_its_base():
    folders = [f for f in RECORDS.iterdir() if f.is_dir()]
    assert folders, "no records"
    for folder in folders:
        base = folder / "eval" / "base"
        for path in (folder / "eval").glob("*/*.json"):
            samples = json.loads(path.read_text())["result"]["samples"]
            indices = [s.get("index", i) for i, s in enumerate(samples)]
            base_samples = json.loads((base / path.name).read_text())["result"]["samples"]
            assert indices == [s.get("index", i) for i, s in enumerate(base_samples)], path


def test_sft_kl_at_the_papers_budget_loses_ifeval_on_all_541_prompts(tmp_path):
    # the verdict of docs/results.md's sixth-session section, recomputed from the kept records
    folder = RECORDS / "dsp_paper_budget_ifeval_all"
    out = run_script("paired_differences.py", f"{folder}:sft_kl", f"{folder}:base", cwd=tmp_path).splitlines()
    strict = next(line for line in out if "ifeval.prompt_level_strict_acc" in line)
    assert "-0.0684 [-0.1017, -0.0388] (n=541) *" in strict
    pooled = next(line for line in out if "ifeval.inst_level_strict_acc" in line)
    assert "-0.0779 [-0.1106, -0.0498] (n=541) *" in pooled
    # the n = 60 record against the n = 541 one: IFEval pairs over the 60 prompts both answered (the
    # base's answers are the same there); the n = 541 record holds IFEval alone, so nothing else pairs
    both = run_script("paired_differences.py", f"{RECORDS / 'dsp_paper_budget'}:base", f"{folder}:base",
                      cwd=tmp_path).splitlines()
    assert any("ifeval.prompt_level_strict_acc: +0.0000 [+0.0000, +0.0000] (n=60)" in line for line in both)


def test_matched_dpo_loses_arc_on_ultrafeedback_and_the_qadapter_does_not_even_at_its_drift(tmp_path):
    # the verdict of docs/results.md's seventh-session section, recomputed from the kept records
    folder = RECORDS / "uf_paper_budget"

    def line(a, b, field):
        out = run_script("paired_differences.py", f"{folder}:{a}", f"{folder}:{b}", cwd=tmp_path).splitlines()
        return next(x for x in out if f" {field}:" in x)

    dpo = "qadapter_alpha_tilde=1_beta=0"
    assert "-0.0600 [-0.1033, -0.0200] (n=300) *" in line(dpo, "base", "arc_easy.correct")
    assert "+0.0000 [-0.0267, +0.0267] (n=300)" in line("qadapter", "base", "arc_easy.correct")
    assert "+0.0700 [+0.0300, +0.1133] (n=300) *" in line("qadapter@2", dpo, "arc_easy.correct")
    kl = line("qadapter@2", dpo, "kl.kl")  # strength 2 drifts as far as DPO: not resolved apart
    assert "+0.0788 [-0.3255, +0.3282] (n=20)" in kl and not kl.endswith("*")
