"""`qadapter compare` / `run_comparison`: every method trained on one split, the base model and every
method scored by the same evaluators, tables and plot written, and a rerun reusing everything. Tiny
random models and tiny benchmark files only (nothing is downloaded)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np
import pytest

from conftest import byte_bpe_tokenizer, tiny_llama
from qadapter.recipes.compare import (DEFAULT_LIMITS, Comparison, parse_limits, run_comparison, tradeoff,
                              write_results)
from qadapter.evaluation import EvalResult, make_metric
from qadapter.recipes.compare.evaluations import ANSWER_METRICS
from qadapter.recipes.config import JobArguments
from qadapter.trainer import QAdapterConfig

METHODS = ["qadapter", "sft", "replay", "dpo"]


def byte_level_tokenizer():
    return byte_bpe_tokenizer(["Question: Answer: The answer is Q: A: user assistant w1 w2 w3 w4 w50 w51 w52"] * 4)


def conv(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder, 20 preference pairs and a tiny benchmark folder in the shipped layout."""
    root = tmp_path_factory.mktemp("compare")
    tok = byte_level_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_jsonl(root / "pairs.jsonl", [{"chosen": conv(f"w{i} w{i + 1}", f"w3{i % 10} w4"),
                                        "rejected": conv(f"w{i} w{i + 1}", "w50 w51 w52")} for i in range(20)])
    data = root / "bench"
    (data / "mmlu" / "test").mkdir(parents=True)
    (data / "mmlu" / "dev").mkdir(parents=True)
    (data / "mmlu" / "test" / "tiny_test.csv").write_text("".join(f"w{i} w2,w3,w4,w5,w6,{'ABCD'[i % 4]}\n" for i in range(4)))
    (data / "mmlu" / "dev" / "tiny_dev.csv").write_text("".join(f"w{i} w7,w3,w4,w5,w6,A\n" for i in range(5)))
    for subset in ("easy", "challenge"):
        write_jsonl(data / "arc" / f"arc_{subset}.test.jsonl",
                    [{"query": f"Question: w{i} w9", "choices": ["w3", "w4 w5"], "gold": i % 2} for i in range(4)])
    write_jsonl(data / "gsm8k" / "test.jsonl", [{"question": f"w{i} w8", "answer": f"w3 #### {i}"} for i in range(4)])
    (data / "bbh" / "bbh").mkdir(parents=True)
    (data / "bbh" / "cot-prompts").mkdir(parents=True)
    (data / "bbh" / "bbh" / "tiny.json").write_text(json.dumps({"examples": [{"input": f"w{i}", "target": "w2"} for i in range(4)]}))
    (data / "bbh" / "cot-prompts" / "tiny.txt").write_text("Q: w1\nA: Let's think step by step. So the answer is w2.")
    write_jsonl(data / "ultrafeedback_prompts" / "prompts.jsonl", [{"prompt": f"w{i} w12 w13"} for i in range(6)])
    return root


def job_and_config(root, **config):
    job = JobArguments(model=str(root / "model"), data=str(root / "pairs.jsonl"), eval_pairs=4, train_eval_pairs=4,
                       show_examples=0)
    settings = dict(output_dir=str(root / "unused"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                    save_strategy="no", use_cpu=True, max_length=64, learning_rate=1e-2, seed=0, logging_steps=1)
    settings.update(config)
    return job, QAdapterConfig(**settings)


def comparison_kwargs(root, **kw):
    args = dict(methods=METHODS, limits=2, train_judge=True, judge_steps=2, judge_batch_size=2, bbh_tasks=["tiny"],
                max_new_tokens=4, eval_batch_size=4, data_dir=root / "bench", progress=False, log=lambda *a: None)
    args.update(kw)
    return args


def test_compare_trains_every_method_evaluates_every_policy_and_resumes(setup, monkeypatch):
    out = setup / "out"
    job, config = job_and_config(setup)
    first = run_comparison(out, job, config, **comparison_kwargs(setup))
    assert first.trained == METHODS + ["judge"]
    policies = ["base"] + METHODS
    evaluations = ["mmlu0", "mmlu5", "arc_easy", "arc_challenge", "gsm8k", "bbh", "kl", "preferences", "win_rate"]
    assert sorted(first.computed) == sorted((p, e) for p in policies for e in evaluations)

    # the same split for every method, written by run_training
    splits = {m: (out / m / "split" / "held_out.jsonl").read_text() + (out / m / "split" / "train.jsonl").read_text()
              for m in METHODS}
    assert len(set(splits.values())) == 1
    split = json.loads((out / "qadapter" / "split" / "split.json").read_text())
    assert split["n_eval_pairs"] == 4 and split["n_train_pairs"] == 16
    for m in METHODS:
        assert (out / m / "adapter" / "report.json").is_file()
    assert (out / "qadapter" / "adapter" / "qadapter_config.json").is_file()  # the Q-Adapter, composed at evaluation
    assert (out / "judge" / "judge_report.json").is_file() and (out / "judge" / "config.json").is_file()

    # tables and plot: one row per policy, every column with its interval and n
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["policy"] for r in rows] == policies
    for r in rows:
        for col in ("arc_easy", "kl", "pref_acc", "margin", "win_rate", "repetition"):
            assert float(r[f"{col}_ci_low"]) <= float(r[col]) <= float(r[f"{col}_ci_high"])
            assert int(r[f"{col}_n"]) == 2
    base = rows[0]
    assert float(base["kl"]) == 0.0 and float(base["margin"]) == 0.0 and float(base["win_rate"]) == 0.5
    assert all(float(r["kl"]) > 0 for r in rows[1:])
    md = (out / "results.md").read_text()
    for p in policies:
        assert f"| {p} |" in md or f"| **{p}** |" in md
    assert "seed 0" in md and "16 training pairs" in md and "4 held-out pairs" in md and "RewardTrainer" in md
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # training curves from every method's logged history, linked from the markdown
    for m in METHODS:
        report = json.loads((out / m / "adapter" / "report.json").read_text())
        assert report["log_history"] and all("loss" in h and "step" in h for h in report["log_history"])
        assert report["accuracy"] == {} and "examples" not in report  # the comparison measures the methods itself
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training curves](training_curves.png)" in md

    # a second call trains nothing and evaluates nothing
    stamps = {p: os.stat(p).st_mtime_ns for p in out.rglob("*.json") if "eval" in p.parts}

    def fail(*args, **kwargs):
        raise AssertionError("must not run again")

    monkeypatch.setattr("qadapter.recipes.train.run_training", fail)
    monkeypatch.setattr("qadapter.trainer.reward_judge.train_reward_judge", fail)
    again = run_comparison(out, job, config, **comparison_kwargs(setup))
    assert again.trained == [] and again.computed == []
    assert stamps == {p: os.stat(p).st_mtime_ns for p in stamps}
    assert again.results["dpo"]["arc_easy"] == first.results["dpo"]["arc_easy"]

    # a changed limit recomputes that evaluation only, for every policy
    limits = {**{k: 2 for k in DEFAULT_LIMITS}, "arc_easy": 3}
    changed = run_comparison(out, job, config, **comparison_kwargs(setup, limits=limits))
    assert sorted(changed.computed) == sorted((p, "arc_easy") for p in policies)
    assert changed.results["base"]["arc_easy"]["n"] == 3

    # another judge re-judges the stored answers: nothing is generated again
    from qadapter.evaluation import ConstantJudge

    monkeypatch.setattr("qadapter.evaluation.generate_texts", fail)
    monkeypatch.setattr("qadapter.evaluation.preference.generate_texts", fail)
    rejudged = run_comparison(out, job, config, **comparison_kwargs(setup, limits=limits, train_judge=False,
                                                                        judge=ConstantJudge(1.0)))
    assert sorted(rejudged.computed) == sorted((p, "win_rate") for p in policies)
    assert rejudged.results["dpo"]["win_rate"]["score"] == 1.0
    # so does a new metric of the answers: results stored before it existed are redone from their answers
    monkeypatch.setattr("qadapter.recipes.compare.evaluations.ANSWER_METRICS", ANSWER_METRICS + ("another",))
    remeasured = run_comparison(out, job, config, **comparison_kwargs(setup, limits=limits, train_judge=False,
                                                                          judge=ConstantJudge(1.0)))
    assert sorted(remeasured.computed) == sorted((p, "win_rate") for p in policies)
    assert (remeasured.results["dpo"]["win_rate"]["extra"]["policy_answers"]
            == rejudged.results["dpo"]["win_rate"]["extra"]["policy_answers"])
    monkeypatch.undo()

    # other training settings in the same folder are refused, not silently mixed
    other_job, other_config = job_and_config(setup, learning_rate=5e-3)
    with pytest.raises(ValueError, match="learning_rate"):
        run_comparison(out, other_job, other_config, **comparison_kwargs(setup))


def mc_result(task, correct, n_boot=200):
    samples = [{"index": i, "gold": 0, "pred": 0 if c else 1} for i, c in enumerate(correct)]
    return EvalResult(task, len(correct), {"acc": make_metric(correct, n_boot), "acc_norm": make_metric(correct, n_boot)},
                      "acc", samples=samples).to_dict(samples=True)


def pref_result(chosen_minus_rejected, margins):
    x = np.asarray(chosen_minus_rejected, float)
    acc = np.where(x > 0, 1.0, np.where(x < 0, 0.0, 0.5))
    samples = [{"index": i, "logp_chosen": float(d), "logp_rejected": 0.0, "base_logp_chosen": 0.0,
                "base_logp_rejected": 0.0, "margin": float(m)} for i, (d, m) in enumerate(zip(x, margins))]
    metrics = {"margin_accuracy": make_metric(np.asarray(margins) > 0), "likelihood_accuracy": make_metric(acc),
               "mean_margin": make_metric(margins), "base_likelihood_accuracy": make_metric(acc)}
    return EvalResult("preferences", len(x), metrics, "margin_accuracy", samples=samples).to_dict(samples=True)


def kl_result(values):
    samples = [{"index": i, "kl": v} for i, v in enumerate(values)]
    return EvalResult("kl_from_base", len(values), {"kl": make_metric(values)}, "kl", samples=samples).to_dict(samples=True)


def test_tables_and_plot_from_hand_made_results(tmp_path):
    results = {
        "base": {"arc_easy": mc_result("arc_easy", [1, 1, 1, 1, 0, 0, 0, 0]), "mmlu0": mc_result("mmlu0", [1, 1, 0, 0]),
                 "kl": kl_result([0.0, 0.0, 0.0]), "preferences": pref_result([1, -1, -1, -1], [0, 0, 0, 0])},
        "qadapter": {"arc_easy": mc_result("arc_easy", [1, 1, 1, 1, 0, 0, 0, 0]), "mmlu0": mc_result("mmlu0", [1, 1, 0, 0]),
                     "kl": kl_result([0.01, 0.02, 0.03]), "preferences": pref_result([1, 1, 1, -1], [1, 2, 3, -1])},
        "sft": {"arc_easy": mc_result("arc_easy", [0, 0, 1, 1, 0, 0, 0, 0]), "mmlu0": mc_result("mmlu0", [0, 0, 0, 0]),
                "kl": kl_result([0.5, 0.7, 0.9]), "preferences": pref_result([1, 1, -1, -1], [1, 1, -1, 1])},
    }
    trade = tradeoff(results, ["qadapter", "sft"], ["arc_easy", "mmlu0", "kl"])
    assert trade["qadapter"]["retention_lost"]["value"] == 0.0
    # sft: ARC-Easy drops 4/8 → 2/8 (0.25), MMLU 2/4 → 0/4 (0.5): mean drop 0.375, both positive in every resample
    sft = trade["sft"]["retention_lost"]
    assert sft["value"] == pytest.approx(0.375) and 0 < sft["ci_low"] <= 0.375 <= sft["ci_high"] and sft["paired"]
    assert trade["qadapter"]["preference_gained"]["value"] == pytest.approx(0.5)   # 3/4 − 1/4
    assert trade["sft"]["preference_gained"]["value"] == pytest.approx(0.25)       # 2/4 − 1/4
    assert trade["sft"]["kl"]["value"] == pytest.approx(0.7) and trade["sft"]["win_rate"] is None

    comparison = Comparison(tmp_path, ["qadapter", "sft"], ["arc_easy", "mmlu0", "kl"], results,
                            info={"model": "tiny", "data": "pairs.jsonl", "train_seed": 3, "eval_seed": 3,
                                  "split": {"seed": 3, "n_train_pairs": 90, "n_eval_pairs": 10, "n_train_prompts": 80,
                                            "n_eval_prompts": 9},
                                  "commands": ["qadapter compare --output-dir x --data pairs.jsonl"],
                                  "limits": {"arc_easy": 8, "mmlu0": 4, "kl": 3, "preferences": None, "win_rate": 20}})
    paths = write_results(comparison)
    md = paths["md"].read_text()
    assert "ARC-Easy (n=8)" in md and "MMLU 0-shot (n=4)" in md and "KL(π‖π1) (n=3)" in md
    assert "| sft | 0.000 [0.000, 0.000] | 0.250 [" in md and "| **base** | 0.500 [" in md
    assert "0.375 [" in md and "not measured" in md and "qadapter compare --output-dir x" in md
    assert "90 training pairs" in md and "seed 3" in md and "preferences all" in md
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["policy"] for r in rows] == ["base", "qadapter", "sft"]
    assert float(rows[2]["retention_lost"]) == pytest.approx(0.375) and rows[2]["win_rate"] == ""
    assert float(rows[1]["preference_gained"]) == pytest.approx(0.5) and rows[1]["arc_easy_n"] == "8"
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and paths["png"].stat().st_size > 10_000

    # only a KL panel when no retention benchmark is selected
    kl_only = Comparison(tmp_path / "kl", ["qadapter"], ["kl"], {p: {k: v for k, v in r.items() if k != "arc_easy" and
                                                                     k != "mmlu0"} for p, r in results.items()})
    assert write_results(kl_only)["png"].is_file()


def test_frontier_puts_ifeval_and_fluency_on_x_when_measured(tmp_path):
    """The generated-answer retention measures (issue 27) are frontier axes beside KL and ARC-Easy."""
    from qadapter.recipes.compare import REGISTRY
    from qadapter.recipes.compare.frontier import frontier_section, plot_frontier

    def one_metric(task, name, values):
        return EvalResult(task, len(values), {name: make_metric(values, 200)}, name).to_dict()

    results = {p: {"kl": kl_result([kl] * 3), "preferences": pref_result([1, -1, 1, 1], [1, -1, 1, m]),
                   "ifeval": one_metric("ifeval", "prompt_level_strict_acc", [1, 0, acc, 0]),
                   "fluency": one_metric("fluency", "repeated_4grams", [0.1, rep, 0.2])}
               for p, kl, m, acc, rep in (("base", 0.0, -1, 1, 0.1), ("sft", 0.5, 1, 0, 0.9))}
    comparison = Comparison(tmp_path, ["sft"], ["kl", "ifeval", "fluency"], results)
    columns = [c for e in REGISTRY.values() for c in e.columns]
    text = "\n".join(frontier_section(comparison, columns))
    assert "| point | method | setting | KL(π‖π1) | IFEval prompt strict | fluency: repeated 4-grams |" in text
    assert "lower loops less" in text and "ARC-Easy" not in text
    assert "| sft | sft | — | 0.500 [" in text and "0.250 [" in text and "0.400 [" in text
    assert plot_frontier(tmp_path / "f.png", comparison, columns).read_bytes()[:4] == b"\x89PNG"


def test_parse_limits():
    assert parse_limits(None) == DEFAULT_LIMITS
    assert set(parse_limits(7).values()) == {7}
    limits = parse_limits("30,mmlu5=5,preferences=all")
    assert limits["arc_easy"] == 30 and limits["mmlu5"] == 5 and limits["preferences"] is None
    assert parse_limits("gsm8k=3")["arc_easy"] == DEFAULT_LIMITS["arc_easy"]
    with pytest.raises(ValueError, match="unknown"):
        parse_limits("mmlu7=3")
    with pytest.raises(ValueError):
        parse_limits("0")


def test_cli_passes_training_flags_through(tmp_path, monkeypatch, capsys):
    from qadapter import cli

    seen = {}

    def fake(output_dir, job, config, **kw):
        seen.update(output_dir=output_dir, job=job, config=config, **kw)
        (tmp_path / "results.md").write_text("# fake results\n")
        return Comparison(tmp_path, kw["methods"], kw["benchmarks"], {}, paths={"md": tmp_path / "results.md"})

    monkeypatch.setattr("qadapter.recipes.compare.run_comparison", fake)
    argv = ["compare", "--output-dir", str(tmp_path / "cmp"), "--model", "my-model", "--data", "p.jsonl",
            "--methods", "qadapter,dpo", "--learning_rate", "0.01", "--max_steps", "3", "--lora_r", "4",
            "--seed", "5", "--eval-limit", "3,kl=2", "--benchmarks", "arc_easy,kl", "--train-judge",
            "--judge-steps", "7"]
    assert cli.main(argv) == 0
    assert "# fake results" in capsys.readouterr().out
    job, config = seen["job"], seen["config"]
    assert job.model == "my-model" and job.data == "p.jsonl"
    assert config.learning_rate == 0.01 and config.max_steps == 3 and config.lora_r == 4 and config.seed == 5
    assert config.max_length == 128  # the default preset still applies to what was not given
    assert seen["methods"] == ["qadapter", "dpo"] and seen["benchmarks"] == ["arc_easy", "kl"]
    assert seen["limits"] == "3,kl=2" and seen["train_judge"] and seen["judge_steps"] == 7
    assert "--learning_rate 0.01" in seen["command"] and seen["command"].startswith("qadapter compare --output-dir")
    assert "--lora_r" in seen["train_argv"]
    # compare owns --method / --output_dir of each run
    assert cli.main(["compare", "--output-dir", str(tmp_path), "--method", "sft"]) == 2


# --------------------------------------------------------------------------- the frontier
def test_method_specs_parse_apply_and_name_their_errors():
    from qadapter.commands.compare import method_specs
    from qadapter.recipes.compare import parse_method_spec

    spec = parse_method_spec("dpo:beta=0.3")
    assert (spec.method, spec.params, spec.name, spec.folder) == ("dpo", (("beta", 0.3),), "dpo:beta=0.3", "dpo_beta=0.3")
    assert parse_method_spec("dpo").folder == "dpo" and parse_method_spec("sft_kl:kl_weight=1").params == (("kl_weight", 1.0),)
    job, config = JobArguments(), QAdapterConfig(output_dir="x", max_steps=5, report_to=[])
    j2, c2 = parse_method_spec("sft:max_steps=20,learning_rate=1e-4").apply(job, config)
    assert (j2.method, c2.max_steps, c2.learning_rate, config.max_steps) == ("sft", 20, 1e-4, 5)
    assert parse_method_spec("dpo:beta=1").apply(job, config)[0].dpo_beta == 1.0
    assert parse_method_spec("sft_kl:kl_weight=2").apply(job, config)[0].kl_weight == 2.0
    # DPO at β = B through the residual objective: the χ² term off (β = 0 is allowed there), α̃ = B
    _, c3 = parse_method_spec("qadapter:beta=0,alpha_tilde=0.3").apply(job, config)
    assert (c3.beta, c3.alpha_tilde, c3.alpha_0, c3.parameterization) == (0.0, 0.3, 0.3, "residual")
    for bad, words in [("dpo:bta=1", ["'dpo:bta=1'", "no setting 'bta'", "beta"]),
                       ("ppo:beta=1", ["'ppo:beta=1'", "unknown method 'ppo'", "sft_kl"]),
                       ("sft:max_steps=many", ["'sft:max_steps=many'", "not a int"]),
                       ("dpo:beta", ["'dpo:beta'", "NAME=VALUE"]), ("dpo:beta=-1", ["must be > 0"]),
                       ("dpo:beta=0", ["must be > 0"]), ("qadapter:beta=-1", ["must be >= 0"])]:
        with pytest.raises(ValueError) as e:
            parse_method_spec(bad)
        assert all(w in str(e.value) for w in words), str(e.value)
    assert method_specs(["qadapter,sft", "dpo:beta=0.1,max_steps=20", "dpo:beta=1"]) == [
        "qadapter", "sft", "dpo:beta=0.1,max_steps=20", "dpo:beta=1"]


def test_strengths_apply_to_the_named_qadapter_specs_only(setup):
    """--strengths-for: the named Q-Adapter specs get one point per strength, the other qadapter
    specs (e.g. DPO through the residual objective) one point at their trained setting; a name that
    is not a qadapter spec of the methods is an error, before anything is trained."""
    from qadapter.recipes.compare import parse_method_spec
    from qadapter.recipes.compare.methods import policy_points

    specs = [parse_method_spec(m) for m in ("qadapter", "qadapter:beta=0,alpha_tilde=0.3", "sft")]
    names = [p.name for p in policy_points(specs, [0.5, 1], strength_specs={"qadapter"})]
    assert names == ["base", "qadapter@0.5", "qadapter@1", "qadapter:alpha_tilde=0.3,beta=0", "sft"]
    assert [p.name for p in policy_points(specs, [0.5, 1])][3:5] == ["qadapter:alpha_tilde=0.3,beta=0@0.5",
                                                                      "qadapter:alpha_tilde=0.3,beta=0@1"]
    job, config = job_and_config(setup)
    for bad, words in ((["sft"], "not a qadapter spec"), (["qadapter:beta=0.5"], "not a qadapter spec")):
        with pytest.raises(ValueError, match=words):
            run_comparison(setup / "never", job, config, **comparison_kwargs(
                setup, methods=["qadapter", "sft"], strengths=[1, 2], strengths_for=bad))
    assert not (setup / "never" / "qadapter").exists()


def test_cli_frontier_flags_and_bad_spec(tmp_path, monkeypatch, capsys):
    from qadapter import cli

    seen = {}

    def fake(output_dir, job, config, **kw):
        seen.update(kw)
        (tmp_path / "results.md").write_text("# fake\n")
        return Comparison(tmp_path, [], [], {}, paths={"md": tmp_path / "results.md"})

    monkeypatch.setattr("qadapter.recipes.compare.run_comparison", fake)
    assert cli.main(["compare", "--output-dir", str(tmp_path), "--methods", "qadapter", "dpo:beta=0.1", "dpo:beta=1",
                     "sft:max_steps=20", "sft_kl:kl_weight=1", "--strengths", "0.25,0.5,1,2,4", "--max_steps", "3"]) == 0
    assert seen["methods"] == ["qadapter", "dpo:beta=0.1", "dpo:beta=1", "sft:max_steps=20", "sft_kl:kl_weight=1"]
    assert seen["strengths"] == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert "--methods qadapter dpo:beta=0.1" in seen["command"] and "--strengths 0.25,0.5,1,2,4" in seen["command"]
    capsys.readouterr()
    assert cli.main(["compare", "--output-dir", str(tmp_path), "--methods", "qadapter", "dpo:bta=1"]) == 2
    assert "dpo:bta=1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'knn'"):
        run_comparison(tmp_path / "never", *job_and_config(tmp_path), methods=["qadapter", "knn"])


def test_frontier_trains_each_spec_once_and_evaluates_every_strength_of_one_adapter(setup, monkeypatch):
    from qadapter.evaluation import ConstantJudge, base_policy, evaluate_arc, evaluate_preferences, kl_from_base

    out = setup / "frontier"
    job, config = job_and_config(setup)
    specs = ["qadapter", "dpo:beta=0.1", "dpo:beta=1", "sft:max_steps=1", "sft:max_steps=3", "sft_kl:kl_weight=0.5"]
    strengths = [0.25, 0.5, 1, 2, 4]
    loads, decoded = [], []
    real_load = __import__("qadapter.evaluation", fromlist=["load_policy"]).load_policy

    def counting_load(path, **kw):
        loads.append(str(path))
        return real_load(path, **kw)

    import qadapter.generation as generation
    real_generate = generation.generate

    def spying_generate(model, tokenizer, prompts, **kw):
        decoded.append((kw.get("alpha_0"), kw.get("alpha_tilde")))
        return real_generate(model, tokenizer, prompts, **kw)

    monkeypatch.setattr("qadapter.evaluation.load_policy", counting_load)
    monkeypatch.setattr(generation, "generate", spying_generate)
    kw = comparison_kwargs(setup, methods=specs, strengths=strengths, benchmarks=["arc_easy", "kl"], train_judge=False,
                           judge=ConstantJudge(0.7), limits={"arc_easy": 2, "kl": 3, "preferences": 4, "win_rate": 2},
                           train_argv=[])
    first = run_comparison(out, job, config, **kw)
    assert first.trained == specs  # each spec once; the strengths retrain nothing
    points = ["base"] + [f"qadapter@{s:g}" for s in strengths] + specs[1:]
    assert first.policies == points
    evaluations = ["arc_easy", "kl", "preferences", "win_rate"]
    assert sorted(first.computed) == sorted((p, e) for p in points for e in evaluations)
    assert sum("qadapter" in p for p in loads) == 1  # the one adapter, loaded once for its five strengths
    for folder in ("qadapter", "dpo_beta=0.1", "dpo_beta=1", "sft_max_steps=1", "sft_max_steps=3",
                   "sft_kl_kl_weight=0.5"):
        assert (out / folder / "adapter" / "report.json").is_file()
    assert json.loads((out / "sft_max_steps=3" / "adapter" / "report.json").read_text())["steps"] == 3
    assert json.loads((out / "sft_max_steps=1" / "adapter" / "report.json").read_text())["steps"] == 1
    assert json.loads((out / "dpo_beta=1" / "spec.json").read_text())["params"] == {"beta": 1.0}

    # every strength is its own policy: different numbers, decoded at its own α's
    margins = [first.results[f"qadapter@{s:g}"]["preferences"]["metrics"]["mean_margin"]["value"] for s in strengths]
    assert len(set(np.round(margins, 9))) == len(strengths)
    kls = [first.results[f"qadapter@{s:g}"]["kl"]["metrics"]["kl"]["value"] for s in strengths]
    assert kls == sorted(kls) and kls[0] < kls[-1]  # farther from the base as the strength grows
    qa = real_load(out / "qadapter" / "adapter", base_model=job.model)
    assert {qa.settings.decoding_alphas(strength=s) for s in strengths} <= set(decoded)
    # the one-forward scoring of all strengths equals the evaluators at each strength
    ref = first.results["base"]["kl"]["extra"]
    held_out = [json.loads(line) for line in (out / "qadapter" / "split" / "held_out.jsonl").open()]
    for s in (0.25, 4):
        qa.settings.alpha_0, qa.settings.alpha_tilde = qa.settings.decoding_alphas(strength=s)
        pref = evaluate_preferences(qa, base_policy(qa), held_out, limit=4, seed=0, batch_size=4, progress=False)
        got = first.results[f"qadapter@{s:g}"]["preferences"]
        assert [x["margin"] for x in got["samples"]] == pytest.approx([x["margin"] for x in pref.samples], abs=1e-6)
        assert got["metrics"]["likelihood_accuracy"]["value"] == pref.metrics["likelihood_accuracy"].value
        kl = kl_from_base(qa, base_policy(qa), prompts=ref["prompts"], responses=ref["responses"], batch_size=4,
                          progress=False)
        assert first.results[f"qadapter@{s:g}"]["kl"]["metrics"]["kl"]["value"] == pytest.approx(kl.score, abs=1e-6)
        arc = evaluate_arc(qa, subset="easy", limit=2, seed=0, batch_size=4, data_dir=setup / "bench", progress=False)
        got = first.results[f"qadapter@{s:g}"]["arc_easy"]
        assert [x["loglikelihoods"] for x in got["samples"]] == [
            pytest.approx(x["loglikelihoods"], abs=1e-5) for x in arc.samples]
        assert [x["pred"] for x in got["samples"]] == [x["pred"] for x in arc.samples]

    # one frontier plot, one table row per point with its n and intervals
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "frontier.png").stat().st_size > 20_000
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["policy"] for r in rows] == points
    by = {r["policy"]: r for r in rows}
    assert by["qadapter@0.5"]["setting"] == "strength=0.5" and by["dpo:beta=1"]["setting"] == "β=1"
    assert by["sft_kl:kl_weight=0.5"]["method"] == "sft_kl"
    for r in rows:
        for col, n in (("kl", 3), ("arc_easy", 2), ("margin_acc", 4), ("pref_acc", 4), ("win_rate", 2)):
            assert float(r[f"{col}_ci_low"]) <= float(r[col]) <= float(r[f"{col}_ci_high"]) and int(r[f"{col}_n"]) == n
    md = (out / "results.md").read_text()
    assert "## Frontier" in md and "![frontier](frontier.png)" in md
    for p in points[1:]:
        assert f"| {p} |" in md
    assert "qadapter train --method dpo --dpo_beta 1 --output_dir" in md  # how to train that point alone
    assert "--method sft_kl --kl_weight 0.5" in md and "--method sft --max_steps 3" in md

    # a rerun trains nothing and evaluates nothing; one more strength evaluates only that point
    monkeypatch.setattr("qadapter.recipes.train.run_training", lambda *a, **k: pytest.fail("must not train again"))
    again = run_comparison(out, job, config, **kw)
    assert again.trained == [] and again.computed == []
    more = run_comparison(out, job, config, **{**kw, "strengths": strengths + [8]})
    assert sorted(more.computed) == sorted(("qadapter@8", e) for e in evaluations)


def test_compare_on_an_earlier_customization_trains_stacks_and_measures_against_the_original_base(setup):
    """`qadapter compare --on DIR`: every spec trains the next level on the earlier customization
    (saved as a stack), the earlier one is a point of its own ("start"), margins and KL are against
    the ORIGINAL base, and a Q-Adapter's strengths scale its own level only."""
    import dataclasses

    from qadapter.evaluation import base_policy, evaluate_preferences, load_policy
    from qadapter.recipes.train import run_training
    from qadapter.stack import QAdapterStack

    job, config = job_and_config(setup, output_dir=str(setup / "on_first"))
    run_training(job, config, log=lambda *a: None)
    first = setup / "on_first" / "adapter"
    job, config = job_and_config(setup)
    job = dataclasses.replace(job, on=str(first))
    out = setup / "on_out"
    kw = comparison_kwargs(setup, methods=["qadapter", "dpo"], strengths=[0.5, 1], benchmarks=["kl"],
                           train_judge=False, limits={"kl": 3, "preferences": 4})
    res = run_comparison(out, job, config, **kw)
    assert res.policies == ["base", "start", "qadapter@0.5", "qadapter@1", "dpo"]
    held_out = [json.loads(line) for line in (out / "qadapter" / "split" / "held_out.jsonl").open()]
    for name, folder, strengths in (("qadapter@0.5", out / "qadapter" / "adapter", [1.0, 0.5]),
                                    ("dpo", out / "dpo" / "adapter", None), ("start", first, None)):
        policy = load_policy(folder, base_model=job.model)
        if name != "start":
            assert isinstance(policy, QAdapterStack) and len(policy) == 2
        if strengths:
            policy.strengths = strengths
        direct = evaluate_preferences(policy, base_policy(policy), held_out, limit=4, seed=0, batch_size=4,
                                      progress=False)
        got = res.results[name]["preferences"]["samples"]
        assert [x["margin"] for x in got] == pytest.approx([x["margin"] for x in direct.samples], abs=1e-5)
        assert [x["base_logp_chosen"] for x in got] == pytest.approx(  # the original base, for every point
            [x["base_logp_chosen"] for x in res.results["start"]["preferences"]["samples"]], abs=1e-5)
    margins = {p: res.results[p]["preferences"]["metrics"]["mean_margin"]["value"] for p in res.policies[1:4]}
    assert len(set(np.round(list(margins.values()), 9))) == 3  # start, and the new level at two strengths
    assert res.results["start"]["kl"]["metrics"]["kl"]["value"] > 0  # the earlier customization drifted already
    md = (out / "results.md").read_text()
    assert "| start |" in md
    again = run_comparison(out, job, config, **kw)
    assert again.trained == [] and again.computed == []
    with pytest.raises(ValueError, match="other settings"):  # another starting point is another comparison
        run_comparison(out, dataclasses.replace(job, on=str(setup / "elsewhere")), config, **kw)


def test_cache_keys_keep_their_layout_so_old_folders_are_reused(setup, monkeypatch):
    """Every stored result is OUT/eval/<point>/<evaluation>.json = {"key", "result"}, its key built as
    earlier versions built it (written out here field by field): an output folder made before is
    reused as it is, nothing retrained or re-evaluated."""
    import hashlib

    from qadapter.evaluation import ConstantJudge
    from qadapter.recipes.compare.cache import adapter_fingerprint

    out = setup / "layout"
    job, config = job_and_config(setup)
    kw = comparison_kwargs(setup, methods=["qadapter", "sft"], strengths=[0.5, 1], benchmarks=["arc_easy", "kl"],
                           train_judge=False, judge=ConstantJudge(0.7))
    first = run_comparison(out, job, config, **kw)
    held_out = hashlib.sha256(b"held_out.jsonl" + (out / "qadapter" / "split" / "held_out.jsonl").read_bytes())
    common = {"limit": 2, "seed": 0, "data_dir": str(setup / "bench")}
    base_answers = {}
    for point, fingerprint, strength in (("base", f"model:{job.model}", None),
                                         ("qadapter@0.5", adapter_fingerprint(out / "qadapter" / "adapter"), 0.5),
                                         ("qadapter@1", adapter_fingerprint(out / "qadapter" / "adapter"), 1.0),
                                         ("sft", adapter_fingerprint(out / "sft" / "adapter"), None)):
        stored = {p.stem: json.loads(p.read_text()) for p in (out / "eval" / point).glob("*.json")}
        assert sorted(stored) == ["arc_easy", "kl", "preferences", "win_rate"]
        own = {"policy": point, "fingerprint": fingerprint, **({} if strength is None else {"strength": strength})}
        extra = {"arc_easy": {}, "kl": {"max_new_tokens": 4}, "preferences": {"held_out": held_out.hexdigest()[:16]},
                 "win_rate": {"max_new_tokens": 4, "held_out": held_out.hexdigest()[:16],
                              "answer_metrics": list(ANSWER_METRICS), "judge": {"object": repr(ConstantJudge(0.7))}}}
        for evaluation, fields in extra.items():
            want = {**own, "evaluation": evaluation, **common, **fields}
            if evaluation in ("kl", "win_rate"):
                if point == "base":
                    answers = stored[evaluation]["result"]["extra"]["responses" if evaluation == "kl" else "base_answers"]
                    base_answers[evaluation] = hashlib.sha256(json.dumps(answers).encode()).hexdigest()[:16]
                    assert stored[evaluation]["result"]["config"]["answers_hash"] == base_answers[evaluation]
                else:
                    want["base_answers"] = base_answers[evaluation]
            assert stored[evaluation]["key"] == want, (point, evaluation)
    assert sorted(first.computed) == sorted((p, e) for p in ("base", "qadapter@0.5", "qadapter@1", "sft")
                                            for e in ("arc_easy", "kl", "preferences", "win_rate"))

    monkeypatch.setattr("qadapter.recipes.train.run_training", lambda *a, **k: pytest.fail("must not train again"))
    again = run_comparison(out, job, config, **kw)
    assert again.trained == [] and again.computed == []


def test_scoring_several_strengths_at_once_equals_the_evaluator_at_each(setup):
    """An evaluation that scores strengths (one scorer call for all of them) gives, at each strength,
    what its evaluator gives on the policy decoded at that strength, also with a tokenizer that
    starts raw text with <bos> (as Gemma's does; the strengths path once left that BOS out)."""
    from conftest import gemma_like_tokenizer, randomize_lora
    from qadapter.chat import bos_prefix
    from qadapter.evaluation import base_policy, evaluate_arc
    from qadapter.modeling import QAdapter
    from qadapter.recipes.compare.evaluations import REGISTRY, Context
    from qadapter.recipes.compare.run import policy_at
    from qadapter.settings import QAdapterSettings

    tok = gemma_like_tokenizer(adds_bos=True)
    assert bos_prefix(tok) == [tok.bos_token_id]
    qa = QAdapter.create(tiny_llama(tokenizer=tok), tok, QAdapterSettings())
    randomize_lora(qa.model)
    ctx = Context(limits={"arc_easy": 4}, seed=0, batch_size=4, max_new_tokens=4, bbh_tasks=[],
                  data_dir=setup / "bench", held_out=[], held_out_hash="", progress=False)
    strengths = [0.5, 2.0]
    got = REGISTRY["arc_easy"].run(ctx, qa, base_policy(qa), "qadapter", strengths=strengths)
    before = (qa.settings.alpha_0, qa.settings.alpha_tilde)
    for s in strengths:
        want = evaluate_arc(policy_at(qa, s), subset="easy", limit=4, seed=0, batch_size=4, data_dir=setup / "bench",
                            progress=False)
        assert [x["loglikelihoods"] for x in got[s].samples] == [
            pytest.approx(x["loglikelihoods"], abs=1e-5) for x in want.samples]
    assert (qa.settings.alpha_0, qa.settings.alpha_tilde) == before  # a view at each strength, the policy unchanged
    # the strengths really differ
    assert got[0.5].samples[0]["loglikelihoods"] != pytest.approx(got[2.0].samples[0]["loglikelihoods"], abs=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_judge_trains_in_the_precision_asked_not_trls_bf16_default(setup, tmp_path, monkeypatch, bf16):
    # TRL's RewardConfig defaults to bf16: on an AVX2-only CPU that ran the judge's steps ~8x slower
    import trl

    from qadapter.trainer.reward_judge import train_reward_judge

    seen = []

    class Recording(trl.RewardTrainer):
        def __init__(self, *a, args=None, **kw):
            seen.append(args.bf16)
            super().__init__(*a, args=args, **kw)

    monkeypatch.setattr(trl, "RewardTrainer", Recording)
    rows = [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]}
            for r in map(json.loads, (setup / "pairs.jsonl").read_text().splitlines()[:4])]
    if bf16:
        report = train_reward_judge(str(setup / "model"), rows, tmp_path / "judge", max_steps=1, batch_size=2,
                                    max_length=64, use_cpu=True, bf16=True, log=lambda *a: None)
    else:  # not asked: float32, whatever TRL's default
        report = train_reward_judge(str(setup / "model"), rows, tmp_path / "judge", max_steps=1, batch_size=2,
                                    max_length=64, use_cpu=True, log=lambda *a: None)
    assert seen == [bf16] and report["bf16"] is bf16 and report["steps"] == 1


def test_a_result_another_process_stored_meanwhile_is_read_not_computed_again(setup, monkeypatch):
    """Two processes of one comparison (say one per --benchmarks subset) share OUT/eval: a result the
    other stored after this one's policy group began is read from disk, not computed again."""
    import shutil

    from qadapter.recipes.compare import evaluations

    out = setup / "concurrent"
    job, config = job_and_config(setup)
    kw = comparison_kwargs(setup, methods=["sft"], benchmarks=["kl"], train_judge=False, limits={"kl": 3, "preferences": 4})
    first = run_comparison(out, job, config, **kw)
    stored = out / "eval" / "sft" / "preferences.json"
    shutil.copy(stored, setup / "preferences.json")
    (out / "eval" / "sft" / "kl.json").unlink()
    stored.unlink()
    calls = []
    kl, preferences = evaluations.REGISTRY["kl"], evaluations.REGISTRY["preferences"]

    def kl_then_the_other_process_stores_preferences(*a, **k):
        calls.append("kl")
        shutil.copy(setup / "preferences.json", stored)  # the other process, while this one runs kl
        return kl.run(*a, **k)

    def preferences_run(*a, **k):
        calls.append("preferences")
        return preferences.run(*a, **k)

    monkeypatch.setitem(evaluations.REGISTRY, "kl", dataclasses.replace(kl, run=kl_then_the_other_process_stores_preferences))
    monkeypatch.setitem(evaluations.REGISTRY, "preferences", dataclasses.replace(preferences, run=preferences_run))
    again = run_comparison(out, job, config, **kw)
    assert calls == ["kl"]
    assert again.computed == [("sft", "kl")]
    assert again.results["sft"]["preferences"] == first.results["sft"]["preferences"]


def test_general_prompts_a_method_trained_on_are_left_out_of_kl_and_fluency(setup, tmp_path):
    """Training on the general prompts' own source (UltraFeedback) must not let KL and fluency ask
    what a method trained on: those prompts are left out before the draw, the cache key and
    results.md say how many, and the prompts measured are exactly the seeded draw from the rest."""
    import shutil

    from qadapter.evaluation import load_general_prompts, subsample

    bench = tmp_path / "bench"
    shutil.copytree(setup / "bench", bench)
    general = [f"w{i} w12 w13" for i in range(12)]
    write_jsonl(bench / "ultrafeedback_prompts" / "prompts.jsonl", [{"prompt": p} for p in general])
    # 20 pairs on the first 10 general prompts (two each): the split trains on some, holds out others
    write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": conv(general[i // 2], f"w3{i % 10} w4"),
                                            "rejected": conv(general[i // 2], "w50 w51 w52")} for i in range(20)])
    job, config = job_and_config(setup)
    job.data = str(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    run_comparison(out, job, config, **comparison_kwargs(setup, methods=["sft"], benchmarks=["kl", "fluency"],
                                                         limits={"kl": 3, "fluency": 3}, train_judge=False,
                                                         data_dir=bench))
    trained = {r["prompt"][0]["content"] for r in map(json.loads, (out / "sft" / "split" / "train.jsonl").open())}
    assert 0 < len(trained) < 10
    kept = [p for p in general if p not in trained]
    for evaluation in ("kl", "fluency"):
        for point in ("base", "sft"):
            stored = json.loads((out / "eval" / point / f"{evaluation}.json").read_text())
            assert stored["key"]["trained_prompts_left_out"] == len(trained), (point, evaluation)
            asked = [m[0]["content"] for m in stored["result"]["extra"]["prompts"]]
            assert asked == subsample(kept, 3, 0) and not set(asked) & trained, (point, evaluation)
    assert kept == load_general_prompts(bench, exclude=trained)
    preferences = json.loads((out / "eval" / "base" / "preferences.json").read_text())
    assert "trained_prompts_left_out" not in preferences["key"]  # it draws nothing from the general prompts
    assert f"the {len(trained)} that are also training prompts were left out" in (out / "results.md").read_text()


def test_a_benchmark_folder_without_general_prompts_serves_evaluations_that_need_none(setup, tmp_path):
    # only KL and fluency read the general prompts: ARC alone runs from a folder that lacks them
    import shutil

    bench = tmp_path / "bench"
    shutil.copytree(setup / "bench", bench)
    shutil.rmtree(bench / "ultrafeedback_prompts")
    job, config = job_and_config(setup)
    done = run_comparison(tmp_path / "out", job, config, **comparison_kwargs(
        setup, methods=["sft"], benchmarks=["arc_easy"], train_judge=False, data_dir=bench))
    assert sorted(done.computed) == [(p, e) for p in ("base", "sft") for e in ("arc_easy", "preferences")]
