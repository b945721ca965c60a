"""scripts/paired_differences.py on hand-made cached results: item-by-item differences with their
bootstrap interval, across two comparison folders, only over the items both policies have."""

from __future__ import annotations

import json

from script_testing import run_script


def cache(folder, policy, evaluation, samples, **key):
    path = folder / "eval" / policy / f"{evaluation}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "result": {"samples": samples}}))


def test_paired_differences_pair_items_and_mark_intervals_that_exclude_zero(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cache(a, "qadapter", "preferences", [{"index": i, "margin": 1.0 + 0.1 * (i % 3)} for i in range(30)])
    cache(b, "base", "preferences", [{"index": i, "margin": 0.0} for i in range(30)] + [{"index": 99, "margin": 50.0}])
    cache(a, "qadapter", "arc_easy", [{"index": i, "pred": 0, "gold": i % 2} for i in range(20)])
    cache(b, "base", "arc_easy", [{"index": i, "pred": 0, "gold": (i + 1) % 2} for i in range(20)])
    out = run_script("paired_differences.py", f"{a}:qadapter", f"{b}:base", cwd=tmp_path).splitlines()
    margin = next(line for line in out if "preferences.margin" in line)
    assert "+1.1000 [" in margin and "(n=30) *" in margin  # item 99 of b alone is left out
    arc = next(line for line in out if "arc_easy.correct" in line)
    assert "+0.0000 [" in arc and "(n=20)" in arc and not arc.endswith("*")  # half +1, half -1
    assert not any("fluency" in line for line in out)  # evaluated by neither


def test_paired_differences_score_every_multiple_choice_evaluation_as_compare_does(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for evaluation in ("mmlu0", "arc_challenge"):
        cache(a, "sft", evaluation, [{"index": i, "pred": 1, "gold": 1} for i in range(25)])
        cache(b, "base", evaluation, [{"index": i, "pred": 2, "gold": 1} for i in range(25)])
    out = run_script("paired_differences.py", f"{a}:sft", f"{b}:base", cwd=tmp_path).splitlines()
    for evaluation in ("mmlu0", "arc_challenge"):
        line = next(line for line in out if f"{evaluation}.correct" in line)
        assert "+1.0000 [+1.0000, +1.0000] (n=25) *" in line


def test_four_policies_give_the_difference_of_differences(tmp_path):
    # (A − B) − (C − D) item by item: A lost 1 to the noise, C lost 3, so A lost 2 less
    margins = {"a": 4.0, "b": 5.0, "c": 2.0, "d": 5.0}
    for name, margin in margins.items():
        cache(tmp_path / name, "p", "preferences", [{"index": i, "margin": margin + 0.01 * i} for i in range(12)])
    out = run_script("paired_differences.py", *(f"{tmp_path / n}:p" for n in "abcd"), cwd=tmp_path)
    line = next(line for line in out.splitlines() if "preferences.margin" in line)
    assert " − (" in line and "+2.0000 [+2.0000, +2.0000] (n=12) *" in line
    accuracy = next(line for line in out.splitlines() if "preferences.margin_accuracy" in line)
    assert "+0.0000 [+0.0000, +0.0000] (n=12)" in accuracy  # every margin stays positive: no item changes sign


def test_instruction_level_ifeval_pools_instructions_over_prompts(tmp_path):
    # 20 prompts: 10 with 1 instruction, 10 with 3. A follows every instruction; B misses all three
    # instructions of the 3-instruction prompts: pooled, A − B = 30 / 40 = 0.75 (a mean over prompts
    # would give 0.5); prompt level, A − B = 10 / 20 = 0.5
    def records(follows_long):
        return [{"index": i, "prompt_level_strict_acc": i % 2 == 0 or follows_long,
                 "inst_level_strict_acc": [True] if i % 2 == 0 else [follows_long] * 3} for i in range(20)]
    cache(tmp_path / "a", "qadapter", "ifeval", records(True))
    cache(tmp_path / "b", "base", "ifeval", records(False))
    out = run_script("paired_differences.py", f"{tmp_path / 'a'}:qadapter", f"{tmp_path / 'b'}:base",
                     cwd=tmp_path).splitlines()
    pooled = next(line for line in out if "ifeval.inst_level_strict_acc" in line)
    assert pooled.startswith(f"{tmp_path / 'a'}:qadapter − ") and "+0.7500 [" in pooled and pooled.endswith("(n=20) *")
    prompt = next(line for line in out if "ifeval.prompt_level_strict_acc" in line)
    assert "+0.5000 [" in prompt and prompt.endswith("(n=20) *")
    assert not any("inst_level_loose_acc" in line for line in out)  # in neither cache


def test_results_that_drew_other_items_are_not_paired_by_their_index(tmp_path):
    # a sample's index is its place in the drawn subsample: ARC n = 300 and n = 1000 (or another
    # seed) put other questions at index 0, so they must not pair; IFEval names its prompts and pairs
    # over the ones both answered
    a, b = tmp_path / "a", tmp_path / "b"
    cache(a, "sft", "arc_easy", [{"index": i, "pred": 0, "gold": 0} for i in range(30)], limit=30, seed=0)
    cache(b, "base", "arc_easy", [{"index": i, "pred": 0, "gold": 1} for i in range(50)], limit=50, seed=0)
    cache(a, "sft", "ifeval", [{"index": i, "key": 1000 + 7 * i, "prompt_level_strict_acc": False} for i in range(10)],
          limit=10, seed=0)
    cache(b, "base", "ifeval", [{"index": i, "key": 1000 + i, "prompt_level_strict_acc": True} for i in range(70)],
          limit=None, seed=0)
    out = run_script("paired_differences.py", f"{a}:sft", f"{b}:base", cwd=tmp_path).splitlines()
    arc = [line for line in out if "arc_easy" in line]
    assert len(arc) == 1 and arc[0].endswith("arc_easy: not paired: they drew different items (limit: 30 vs 50)")
    ifeval = next(line for line in out if "ifeval.prompt_level_strict_acc" in line)
    assert "-1.0000 [-1.0000, -1.0000] (n=10) *" in ifeval  # keys 1000, 1007, ..., 1063: all ten answered by b


def test_general_prompt_draws_that_left_out_training_prompts_are_not_paired_with_others(tmp_path):
    # a comparison trained on UltraFeedback drew its fluency prompts after leaving its 130 training
    # prompts out: index 0 is another prompt than in a DSP comparison's draw of the same limit and seed
    a, b = tmp_path / "a", tmp_path / "b"
    rows = [{"index": i, "repeated_4grams": 0.1} for i in range(10)]
    cache(a, "sft", "fluency", rows, limit=10, seed=0, trained_prompts_left_out=130)
    cache(b, "base", "fluency", rows, limit=10, seed=0)
    out = run_script("paired_differences.py", f"{a}:sft", f"{b}:base", cwd=tmp_path).splitlines()
    fluency = [line for line in out if "fluency" in line]
    assert len(fluency) == 1 and fluency[0].endswith(
        "fluency: not paired: they drew different items (trained_prompts_left_out: 130 vs None)")
