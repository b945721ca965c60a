"""scripts/sweep.py end to end on a tiny model: three variants (the full form, the residual
default, DPO) train on the same split and are measured on the same held-out pairs by the main
job's scorer; a finished variant is skipped on a rerun; --table prints one row per variant. This
checks the harness (the sweep had never run to the end); tests/test_residual.py checks the method."""

from __future__ import annotations

import json

from script_testing import run_script, save_tiny_chat_model
from test_compare import conv


def run(*args, cwd):
    return run_script("sweep.py", *args, cwd=cwd)


def test_sweep_trains_every_variant_on_one_split_resumes_and_tabulates(tmp_path):
    save_tiny_chat_model(tmp_path / "model")
    rows = [{"chosen": conv(f"w{i} w{i + 1}", f"w3{i % 10} w4"), "rejected": conv(f"w{i} w{i + 1}", "w50 w51 w52")}
            for i in range(24)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    variants = ["full_next_longest", "res_a1_b0.1", "dpo_b0.1"]
    args = ["--model", "model", "--data", "pairs.jsonl", "--out", "sweep.jsonl", "--steps", "2", "--batch", "2",
            "--max-length", "64", "--eval-pairs", "6", "--work", str(tmp_path / "work"), "--variants", *variants]
    run(*args, cwd=tmp_path)
    results = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in results] == variants
    assert len({json.dumps(r["split"], sort_keys=True) for r in results}) == 1  # one split for all
    for r in results:
        assert r["margin"]["n"] == 6 and r["steps"] == 2 and r["kl_per_token"] >= 0
        assert r["base_preference"] == results[0]["base_preference"]  # the same base, the same pairs
    again = run(*args, cwd=tmp_path)
    assert again.count("done already") == 3
    table = run("--table", "sweep.jsonl", cwd=tmp_path)
    assert all(f"| {v} |" in table for v in variants)
