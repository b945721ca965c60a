"""scripts/stacking_experiment.py end to end on a tiny model and four made-up domains (the DSP
layout: one file per domain, pairs with a shared ``query_index``): both chains run their four
steps, every step measures every domain customized so far against the original base, the chains
are stacks of 1..4 levels, and the report prints the table and draws the plot."""

from __future__ import annotations

import json

from script_testing import run_script, save_tiny_chat_model
from test_compare import conv

from qadapter.stack import STACK_CONFIG

DOMAINS = ("academy", "business", "entertainment", "literature")


def run(*args, cwd):
    return run_script("stacking_experiment.py", *args, cwd=cwd)


def test_four_step_chains_measure_every_earlier_domain_and_report(tmp_path):
    save_tiny_chat_model(tmp_path / "model")
    dsp = tmp_path / "dsp"
    dsp.mkdir()
    for k, d in enumerate(DOMAINS):
        rows = [{"chosen": conv(f"w{i} w{i + 1}", f"w3{k} w4"), "rejected": conv(f"w{i} w{i + 1}", "w50 w51"),
                 "query_index": i} for i in range(20)]
        (dsp / f"dsp_{d}_pairs.test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--out", "out", "--model", "model", "--arc-items", "4"]
    for method in ("qadapter", "dpo"):
        run("--dsp", "dsp", "--method", method, "--steps", "2", "--batch", "2", "--eval-pairs", "4",
            "--eval-pairs-used", "4", "--kl-prompts", "2", "--kl-new-tokens", "4", "--arc-at-steps", "4", *common,
            cwd=tmp_path)
    run("--arc-base", *common, cwd=tmp_path)
    report = run("--out", "out", "--report", "out/stacking.png", cwd=tmp_path)

    split = json.loads((tmp_path / "out" / "split.json").read_text())
    held = split["n_held_out_queries"]
    assert held == 4 and all(d["n_held_out_pairs"] == 4 for d in split["domains"].values())
    for method in ("qadapter", "dpo"):
        res = json.loads((tmp_path / "out" / f"{method}.json").read_text())
        assert [s["domain"] for s in res["steps"]] == list(DOMAINS)
        for step in res["steps"]:
            assert list(step["margins"]) == list(DOMAINS[:step["step"]])  # every domain so far
            assert all(m["n"] == 4 for m in step["margins"].values())
            assert step["kl"]["value"] >= 0 and step["train_steps"] == 2
            assert len(step["kl"]["per_prompt"]) == 2
            assert abs(sum(step["kl"]["per_prompt"]) / 2 - step["kl"]["value"]) < 1e-9
        stack = json.loads((tmp_path / res["steps"][-1]["folder"] / STACK_CONFIG).read_text())
        assert len(stack["adapters"]) == 4
        assert res["steps"][-1]["arc_easy"]["n"] == 4
    assert (tmp_path / "out" / "stacking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.count("| qadapter |") == 5 and report.count("| dpo β=0.1 |") == 5  # 4 steps + the kept-gain row; the β named
    assert "| base | — |" in report
    assert report.count("paired over 2 prompts") == 4  # one per step: the chains' KL, prompt by prompt
