"""Training from every supported data format, and the main job (`run_training` / the CLI) on a tiny
model folder: bad data stops with file, row and problem, or is skipped and counted."""

import json

import pytest
import torch

from conftest import make_tiny_tokenizer, tiny_llama
from qadapter.data import PreferenceDataError, load_preference_pairs
from qadapter.evaluation.stats import wilson_interval
from qadapter.recipes.config import JobArguments
from qadapter.recipes.train import answer_held_out_prompts, format_report, run_training
from qadapter.trainer import QAdapterConfig, QAdapterTrainer


def conv(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


FORMATS = {
    "standard_explicit": lambda i: {"prompt": f"w{i} w2 w3", "chosen": f" w4 w{5 + i}", "rejected": " w6"},
    "standard_implicit": lambda i: {"chosen": f"w{i} w2 w3 w4 w{5 + i}", "rejected": f"w{i} w2 w3 w6"},
    "conversational_explicit": lambda i: {"prompt": [{"role": "user", "content": f"w{i} w2"}],
                                          "chosen": [{"role": "assistant", "content": f"w4 w{5 + i}"}],
                                          "rejected": [{"role": "assistant", "content": "w6 w7 w8"}]},
    "conversational_implicit": lambda i: {"chosen": conv(f"w{i} w2", "w4 w5") [:1] + conv("w9", f"w1{i} w3")[1:],
                                          "rejected": conv(f"w{i} w2", "w4 w5")[:1] + conv("w9", "w20")[1:]},
    "hh_rlhf_transcript": lambda i: {"chosen": f"\n\nHuman: w{i} w2\n\nAssistant: w4 w{5 + i}",
                                     "rejected": f"\n\nHuman: w{i} w2\n\nAssistant: w6"},
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_trains_adapter_weights_only(fmt, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(FORMATS[fmt](i)) + "\n" for i in range(4)), encoding="utf-8")
    pairs, report = load_preference_pairs(path)
    assert report.format == fmt and report.n_kept == 4
    args = QAdapterConfig(output_dir=str(tmp_path / "out"), max_steps=3, learning_rate=1e-2, per_device_train_batch_size=2,
                          report_to=[], save_strategy="no", use_cpu=True, lora_dropout=0.0)
    trainer = QAdapterTrainer(tiny_llama(), args, train_dataset=pairs, processing_class=make_tiny_tokenizer())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, f"{n}: trainable={p.requires_grad}"


@pytest.fixture
def tiny_model_dir(tmp_path):
    folder = tmp_path / "tiny-model"
    tiny_llama().save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def write_pairs(path, n, bad_lines=()):
    lines = [json.dumps({"chosen": conv(f"w{i} w{i + 1}", f"w3{i % 10} w4"),
                         "rejected": conv(f"w{i} w{i + 1}", "w50 w51 w52")}) for i in range(n)]
    for index, text in bad_lines:
        lines[index] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def small_job(tmp_path, model, data, **kw):
    job = JobArguments(model=model, data=data, eval_pairs=4, train_eval_pairs=4, show_examples=1,
                       example_new_tokens=3, **kw)
    config = QAdapterConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                            report_to=[], save_strategy="no", use_cpu=True, max_length=64)
    return job, config


def test_main_job_on_a_tiny_model(tiny_model_dir, tmp_path):
    job, config = small_job(tmp_path, tiny_model_dir, write_pairs(tmp_path / "p.jsonl", 20))
    report = run_training(job, config, log=lambda *_: None)
    assert report["steps"] == 2 and report["split"]["n_eval_pairs"] == 4
    for split in ("train", "held_out"):
        for policy in ("base", "customized"):
            acc = report["accuracy"][split][policy]
            assert acc["n"] == 4 and acc["ci_low"] <= acc["accuracy"] <= acc["ci_high"]
        margin = report["accuracy"][split]["margin"]
        assert margin["n"] == 4 and margin["mean_ci_low"] <= margin["mean"] <= margin["mean_ci_high"]
    assert "implicit-reward margin" in format_report(report)
    saved = tmp_path / "run" / "adapter"
    assert (saved / "adapter_config.json").is_file() and (saved / "qadapter_config.json").is_file()
    assert json.loads((saved / "report.json").read_text())["steps"] == 2
    assert len(report["examples"]) == 1 and set(report["examples"][0]) == {"prompt", "base", "customized"}


def test_main_job_logs_and_plots_its_training_curves(tiny_model_dir, tmp_path):
    job, config = small_job(tmp_path, tiny_model_dir, write_pairs(tmp_path / "p.jsonl", 20))
    config.logging_steps = 1
    report = run_training(job, config, log=lambda *_: None)
    assert [h["step"] for h in report["log_history"]] == [1, 2]
    assert all(k in h for h in report["log_history"] for k in ("loss", "rewards/accuracies", "pref_loss", "chi2_loss"))
    curves = tmp_path / "run" / "training_curves.png"
    assert report["training_curves"] == str(curves.resolve()) and curves.read_bytes()[:4] == b"\x89PNG"
    assert f"training curves: {curves.resolve()}" in format_report(report)


class ScriptedPolicy:
    """Answers each prompt with a scripted text per policy (what `measure` sees of a QAdapter)."""

    def __init__(self, base, customized):
        self.answers = {"base": base, "customized": customized}

    def generate(self, prompts, *, policy, max_new_tokens):
        return [self.answers[policy](i) for i in range(len(prompts))]


def test_held_out_repetition_resolves_a_loop_the_customization_introduced():
    prompts = {"prompt": [f"question {i}" for i in range(40)] + ["question 0"]}  # a repeated prompt counts once
    fresh = lambda i: " ".join(f"w{i}_{k}" for k in range(30))
    loop = lambda i: " ".join(["I can help with that."] * 8)
    job = JobArguments(show_examples=2, repetition_prompts=40, example_new_tokens=64)
    looping = answer_held_out_prompts(job, ScriptedPolicy(fresh, loop), prompts)
    rep = looping["repetition"]
    assert rep["n"] == 40 and len(looping["examples"]) == 2
    assert rep["base"]["value"] == 0.0 and rep["customized"]["value"] > 0.8
    assert rep["difference"]["ci_low"] > 0
    text = format_report({"steps": 1, "train_pairs": 1, "train_seconds": 1, "pairs_per_second": 1,
                          "adapter_dir": "x", **looping})
    assert "40 held-out prompts" in text and "repeat more than the base's" in text

    same = answer_held_out_prompts(job, ScriptedPolicy(loop, loop), prompts)["repetition"]
    assert same["difference"]["value"] == 0 and same["difference"]["ci_low"] <= 0 <= same["difference"]["ci_high"]
    assert "repetition" not in answer_held_out_prompts(JobArguments(show_examples=2, repetition_prompts=0),
                                                       ScriptedPolicy(fresh, loop), prompts)


def test_training_curves_need_something_logged(tmp_path):
    from qadapter.plots import plot_training_curves

    assert plot_training_curves({"sft": [{"train_loss": 1.0, "step": 2}]}, tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


def test_bad_row_stops_the_job_with_file_row_and_problem(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "bad.jsonl", 20, bad_lines=[(6, "{not json")])
    job, config = small_job(tmp_path, tiny_model_dir, data)
    with pytest.raises(PreferenceDataError) as err:
        run_training(job, config, log=lambda *_: None)
    assert "bad.jsonl" in str(err.value) and "line 7" in str(err.value) and "JSON" in str(err.value)


def test_skip_invalid_counts_what_it_skipped(tiny_model_dir, tmp_path):
    same = json.dumps({"chosen": conv("w1", "w2"), "rejected": conv("w1", "w2")})
    data = write_pairs(tmp_path / "bad.jsonl", 20, bad_lines=[(6, "{not json"), (9, same)])
    job, config = small_job(tmp_path, tiny_model_dir, data, skip_invalid=True)
    lines = []
    report = run_training(job, config, log=lines.append)
    assert "kept 18, skipped 2" in report["load"]
    assert any("skipped 2" in line for line in lines)
    assert report["split"]["n_train_pairs"] + report["split"]["n_eval_pairs"] == 18


def test_wilson_interval():
    low, high = wilson_interval(54, 100)
    assert low < 0.54 < high and high - low == pytest.approx(0.19, abs=0.01)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", ["sft", "replay", "dpo"])
def test_baselines_train_and_save_plain_peft_adapters(method, tiny_model_dir, tmp_path):
    job, config = small_job(tmp_path, tiny_model_dir, write_pairs(tmp_path / "p.jsonl", 12), method=method)
    config.learning_rate = 1e-2
    report = run_training(job, config, log=lambda *_: None)
    saved = tmp_path / "run" / "adapter"
    assert report["method"] == method and report["steps"] == 2
    assert (saved / "adapter_config.json").is_file()
    assert not (saved / "qadapter_config.json").exists()  # a plain PEFT adapter: its policy is the adapter model
    from peft import PeftModel
    loaded = PeftModel.from_pretrained(tiny_llama(), saved)
    lora_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "the baseline did not train its adapter"
    acc = report["accuracy"]["held_out"]
    assert acc["base"]["n"] == acc["customized"]["n"] == 4


def test_replay_answers_each_distinct_prompt_once():
    from datasets import Dataset

    from qadapter.trainer.baselines import replay_dataset

    q1, q2 = [{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    pairs = Dataset.from_list([{"prompt": q1, "chosen": reply("a"), "rejected": reply("b")},
                               {"prompt": q1, "chosen": reply("a"), "rejected": reply("c")},
                               {"prompt": q2, "chosen": reply("d"), "rejected": reply("e")}])
    data = replay_dataset(pairs, ["base1", "base2"], prompts=[q1, q2])
    assert len(data) == 5  # 3 chosen rows + one replayed base answer per distinct prompt
    assert data[3] == {"prompt": q1, "completion": reply("base1")}
    assert data[4] == {"prompt": q2, "completion": reply("base2")}
    with pytest.raises(ValueError, match="2 base answers for 3 prompts"):
        replay_dataset(pairs, ["base1", "base2"])


def test_replay_draws_its_budget_rows_before_answering_them():
    from qadapter.trainer.baselines import draw_replay_rows

    chosen, prompts = draw_replay_rows(30, 10, 12, seed=3)
    assert len(chosen) + len(prompts) == 12 and all(0 <= i < 30 for i in chosen) and all(0 <= i < 10 for i in prompts)
    assert len(set(chosen)) == len(chosen) and len(set(prompts)) == len(prompts)
    assert draw_replay_rows(30, 10, 12, seed=3) == (chosen, prompts)  # seeded
    assert draw_replay_rows(30, 10, 12, seed=4) != (chosen, prompts)
    assert draw_replay_rows(30, 10, 40, seed=3) == (list(range(30)), list(range(10)))  # a whole epoch: every row
    # over many draws the mixture is the set's own (a quarter of the rows are replayed answers)
    replayed = sum(len(draw_replay_rows(30, 10, 12, seed=s)[1]) for s in range(400)) / (400 * 12)
    assert replayed == pytest.approx(0.25, abs=0.02)


def test_replay_answers_only_the_prompts_its_steps_read(tiny_model_dir, tmp_path, monkeypatch):
    import qadapter.generation as generation
    from qadapter.trainer.baselines import draw_replay_rows

    asked = []
    real_generate = generation.generate
    monkeypatch.setattr(generation, "generate",
                        lambda model, tok, prompts, **kw: asked.append(list(prompts)) or real_generate(model, tok, prompts, **kw))
    job, config = small_job(tmp_path, tiny_model_dir, write_pairs(tmp_path / "p.jsonl", 40), method="replay")
    job.show_examples = 0  # the only generation left is the replay's
    config.seed = 0  # a draw of 4 rows with replayed ones among them (seed 42 draws 4 chosen rows)
    lines = []
    report = run_training(job, config, log=lines.append)
    assert report["steps"] == 2
    # 36 training pairs with 36 distinct prompts make 72 rows; 2 steps of 2 read 4 of them
    said = next(line for line in lines if line.startswith("replay:"))
    assert "4 training rows of 72" in said
    assert len(asked) == 1 and len(asked[0]) == len(draw_replay_rows(36, 36, 4, seed=0)[1]) == 2


def test_no_training_pairs_measured_when_train_eval_pairs_is_zero(tiny_model_dir, tmp_path):
    job, config = small_job(tmp_path, tiny_model_dir, write_pairs(tmp_path / "p.jsonl", 12))
    job.train_eval_pairs, job.show_examples = 0, 0
    report = run_training(job, config, log=lambda *_: None)
    assert list(report["accuracy"]) == ["held_out"] and report["accuracy"]["held_out"]["base"]["n"] == 4
    assert "held_out" in format_report(report)


def test_implicit_reward_margins_on_hand_made_log_likelihoods():
    from qadapter.recipes.train import implicit_reward_margins

    ll = {"base_chosen": [-10.0, -10.0, -10.0], "base_rejected": [-12.0, -8.0, -9.0],
          "custom_chosen": [-9.0, -10.0, -11.0], "custom_rejected": [-12.0, -8.0, -8.0]}
    m = implicit_reward_margins(ll)
    # margins: (1 - 0) = 1, (0 - 0) = 0 (a tie: half), (-1 - 1) = -2
    assert m["n"] == 3 and m["accuracy"] == 0.5 and m["mean"] == -1 / 3
    assert m["mean_ci_low"] <= m["mean"] <= m["mean_ci_high"] and m["ci_low"] < 0.5 < m["ci_high"]


def test_examples_answer_distinct_prompts(tiny_model_dir, tmp_path):
    # two pairs per prompt (as in DSP): the examples must still be two different prompts
    lines = [json.dumps({"chosen": conv(f"w{i // 2} w9", f"w3{i % 10} w4"), "rejected": conv(f"w{i // 2} w9", "w50 w51")})
             for i in range(24)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    job, config = small_job(tmp_path, tiny_model_dir, str(tmp_path / "p.jsonl"))
    job.show_examples, job.train_eval_pairs = 2, 0
    report = run_training(job, config, log=lambda *_: None)
    prompts = [ex["prompt"] for ex in report["examples"]]
    assert len(prompts) == 2 and prompts[0] != prompts[1]


def test_a_user_file_cut_by_the_preset_is_announced_before_training(tiny_model_dir, tmp_path):
    """`qadapter train --data FILE` with a preset whose token budget drops pairs says so in one line,
    with the counts and the flags that keep more; a file that fits gets no such line."""
    from qadapter.recipes.train import prepare_data

    rows = [{"chosen": conv(f"w{i} w2", " ".join(["w4"] * (40 if i % 4 == 0 else 2))),
             "rejected": conv(f"w{i} w2", "w6")} for i in range(20)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    job, config = small_job(tmp_path, tiny_model_dir, str(tmp_path / "long.jsonl"), drop_longer_than=40)
    lines = []
    data = prepare_data(job, config, log=lines.append)
    notes = [line for line in lines if line.startswith("note:")]
    assert data.n_dropped == 5 and len(notes) == 1, lines
    assert "15 of 20 pairs" in notes[0] and "(75%)" in notes[0] and "--drop_longer_than" in notes[0] \
        and "--max_length" in notes[0] and str(tmp_path / "long.jsonl") in notes[0]

    job, config = small_job(tmp_path, tiny_model_dir, str(tmp_path / "long.jsonl"), drop_longer_than=None)
    config.max_length = 30  # no dropping: the long responses are cut instead, and that is said too
    lines = []
    prepare_data(job, config, log=lines.append)
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and "5 of 20 pairs" in notes[0] and "--max_length" in notes[0], lines

    job, config = small_job(tmp_path, tiny_model_dir, write_pairs(tmp_path / "short.jsonl", 20), drop_longer_than=40)
    lines = []
    prepare_data(job, config, log=lines.append)
    assert not [line for line in lines if line.startswith("note:")], lines


def test_saved_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """save_split and the training curves write through qadapter.io: no temporary file is left, and
    a write that fails halfway leaves the previous file as it was."""
    from datasets import Dataset
    from matplotlib.figure import Figure

    from qadapter.io import save_figure
    from qadapter.plots import plot_training_curves
    from qadapter.recipes.train import save_split

    pairs = Dataset.from_list([{"prompt": f"w{i}", "chosen": "w2", "rejected": "w3", "row": i} for i in range(3)])
    save_split(tmp_path / "split", pairs.select([0, 1]), pairs.select([2]), {"seed": 0})
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["held_out.jsonl", "split.json", "train.jsonl"]
    assert [json.loads(line)["row"] for line in (tmp_path / "split" / "train.jsonl").read_text().splitlines()] == [0, 1]

    path = plot_training_curves({"sft": [{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}]}, tmp_path / "c.png")
    before = path.read_bytes()
    assert before[:4] == b"\x89PNG"

    def half_then_fail(self, fh, **kw):
        fh.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(OSError):
        save_figure(Figure(), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir() if p.is_file()] == ["c.png"]


def subnormal_survives():
    return torch.tensor([1e-40]).item() != 0.0  # 1e-40 < float32's smallest normal (1.2e-38)


def test_training_flushes_subnormals_and_restores_the_setting_after(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    import qadapter.recipes.methods as methods

    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(subnormal_survives())

    entry = methods.METHOD_REGISTRY["dpo"]
    monkeypatch.setitem(methods.METHOD_REGISTRY, "dpo", methods.Method(
        train=lambda model, tok, pairs, config, job, callbacks, log: entry.train(
            model, tok, pairs, config, job, [*callbacks, Probe()], log),
        policy=entry.policy, params=entry.params))
    job, config = small_job(tmp_path, tiny_model_dir, write_pairs(tmp_path / "p.jsonl", 12), method="dpo")
    assert subnormal_survives()
    run_training(job, config, log=lambda *_: None)
    assert seen == [False, False]  # every step ran with subnormals flushed to zero
    assert subnormal_survives()  # and the process's setting is back to IEEE's after training


def test_subnormal_flushing_restores_what_the_process_had_before():
    from qadapter.recipes.train import subnormals_flushed

    assert torch.set_flush_denormal(True)  # a caller that flushes already (x86 CPU: supported)
    try:
        with subnormals_flushed():
            assert not subnormal_survives()
        assert not subnormal_survives()  # still flushed: the caller's setting, not IEEE's, comes back
    finally:
        torch.set_flush_denormal(False)
    with subnormals_flushed():
        assert not subnormal_survives()
    assert subnormal_survives()


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_units_is_warned_about(tiny_model_dir, tmp_path, monkeypatch, native_bf16):
    # an AVX2-only CPU ran bf16 autocast training 8-13x slower than float32 (docs/results.md)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    job, config = small_job(tmp_path, tiny_model_dir, write_pairs(tmp_path / "p.jsonl", 12))
    config.bf16 = True
    lines = []
    run_training(job, config, log=lines.append)
    warned = [line for line in lines if "bf16 matrix units" in line]
    assert len(warned) == (0 if native_bf16 else 1)
    config.bf16 = False
    from qadapter.recipes.train import slow_bf16_warning

    assert slow_bf16_warning(config) is None


def test_pairs_dropped_for_length_are_not_refused_for_the_prompts_they_would_lose(tiny_model_dir, tmp_path):
    """--drop_longer_than N drops (and counts) the long pairs before the refusal of a max_length that
    cuts most prompts away is checked, so that refusal looks at the kept pairs only (UltraFeedback at
    256 tokens: 563 of 994 pairs too long), whether N is below max_length or above it. Without
    dropping, the same file and max_length are still refused."""
    from qadapter.errors import ConfigError
    from qadapter.recipes.train import prepare_data

    # 15 of 20 pairs have a 40-token response: at max_length 30 their prompts would be cut away
    rows = [{"chosen": conv(f"w{i} w2", " ".join(["w4"] * (2 if i % 4 == 0 else 40))),
             "rejected": conv(f"w{i} w2", "w6")} for i in range(20)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    job, config = small_job(tmp_path, tiny_model_dir, str(tmp_path / "long.jsonl"), drop_longer_than=30)
    config.max_length = 30
    data = prepare_data(job, config, log=lambda *_: None)
    assert data.n_dropped == 15
    # dropping at more than max_length: the check looks at the kept pairs, which all fit
    job, config = small_job(tmp_path, tiny_model_dir, str(tmp_path / "long.jsonl"), drop_longer_than=38)
    config.max_length = 30
    lines = []
    data = prepare_data(job, config, log=lines.append)
    assert data.n_dropped == 15 and len(data.train) + len(data.held_out) == 5
    assert any("0 pairs with a response cut" in line and "15 pairs longer than 38 tokens dropped" in line
               for line in lines), lines

    job, config = small_job(tmp_path, tiny_model_dir, str(tmp_path / "long.jsonl"), drop_longer_than=None)
    config.max_length = 30
    with pytest.raises(ConfigError, match="leaves no room for the prompt of 15 of 20 pairs"):
        prepare_data(job, config, log=lambda *_: None)
