"""scripts/equal_retention.py on hand-made cached results: the Q-Adapter's strength curve,
interpolated at a baseline's retention, minus the baseline's preference, with a paired interval;
no number for a baseline outside the curve's range."""

from __future__ import annotations

from script_testing import run_script
from test_paired_differences_script import cache

N = 100


def policy(folder, name, kl, wins):
    """A policy whose KL is ``kl`` on every general prompt (± a spread the bootstrap sees) and whose
    held-out margin is positive on the first ``wins`` of N pairs."""
    cache(folder, name, "kl", [{"index": i, "kl": kl * (1 + 0.2 * ((i % 5) - 2) / 2)} for i in range(40)])
    cache(folder, name, "preferences", [{"index": i, "margin": 1.0 if i < wins else (-1.0 if kl else 0.0)}
                                        for i in range(N)])


def test_the_curve_is_interpolated_at_each_baselines_retention(tmp_path):
    policy(tmp_path, "base", 0.0, 0)  # margin 0 everywhere: accuracy 0.5, ties half
    policy(tmp_path, "qadapter@1", 0.2, 70)
    policy(tmp_path, "qadapter@2", 0.4, 80)
    policy(tmp_path, "dpo", 0.2, 50)   # at the curve's strength-1 point, 0.2 less accurate
    policy(tmp_path, "sft", 0.3, 75)   # halfway between strengths 1 and 2: exactly on the curve
    policy(tmp_path, "sft_kl", 1.0, 90)  # drifts further than the curve reaches
    out = run_script("equal_retention.py", tmp_path, "--curve", "base", "qadapter@1", "qadapter@2",
                     "--against", "dpo", "sft", "sft_kl", "--x", "kl.kl", cwd=tmp_path).splitlines()
    line = {b: next(s for s in out if s.startswith(f"{b} at equal kl.kl") and "margin_accuracy" in s)
            for b in ("dpo", "sft", "sft_kl")}
    assert "= 0.2000" in line["dpo"] and ": +0.2000 [" in line["dpo"] and line["dpo"].endswith("*")
    assert ": +0.0000 [" in line["sft"] and not line["sft"].endswith("*")
    assert "outside the curve" in line["sft_kl"] and "0.0000 .. 0.4000" in line["sft_kl"]
    # the margin itself (nats): dpo's items are +1 on 50 pairs and -1 on 50, the curve's +1 on 70
    margin = next(s for s in out if s.startswith("dpo at equal kl.kl") and s.split(" in ")[1].startswith("preferences.margin:"))
    assert ": +0.4000 [" in margin


def test_a_missing_evaluation_prints_nothing_for_it(tmp_path):
    for name, kl, wins in (("base", 0.0, 0), ("qadapter@1", 0.2, 70), ("dpo", 0.1, 55)):
        policy(tmp_path, name, kl, wins)
    out = run_script("equal_retention.py", tmp_path, "--curve", "base", "qadapter@1", "--against", "dpo",
                     cwd=tmp_path)
    assert "kl.kl" in out and "fluency" not in out and "ifeval" not in out


def test_an_unknown_point_or_a_malformed_measure_is_an_error_naming_it(tmp_path):
    for name, kl, wins in (("base", 0.0, 0), ("qadapter@1", 0.2, 70)):
        policy(tmp_path, name, kl, wins)
    err = run_script("equal_retention.py", tmp_path, "--curve", "base", "qadapter@1", "--against", "dpo",
                     cwd=tmp_path, returncode=2)
    assert "no evaluated policy dpo" in err
    err = run_script("equal_retention.py", tmp_path, "--curve", "base", "qadapter@1", "--against", "qadapter@1",
                     "--x", "kl", cwd=tmp_path, returncode=2)
    assert "'kl': give EVALUATION.FIELD" in err
