"""Faults and bad input (docs/reliability.md): clean CLI errors before the model loads, validated
knobs, exact resume after SIGKILL, damaged checkpoints and adapters, a non-finite loss, a failing
save, and what adapter folders may load."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_tokenizer, randomize_lora, tiny_llama
from test_pipeline import conv, write_pairs
from qadapter import cli
from qadapter.data import PreferenceDataError, load_preference_pairs
from qadapter.errors import ConfigError, SaveError, UserError
from qadapter.integrity import MANIFEST_NAME, NonFiniteError
from qadapter.modeling import QAdapter
from qadapter.settings import QAdapterSettings
from qadapter.trainer import QAdapterConfig, QAdapterTrainer

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama().save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any model weights are loaded."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def train_argv(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--data", data, "--output_dir", str(out), "--use_cpu", "--max_steps", "2",
            "--eval_pairs", "4", "--train_eval_pairs", "2", "--show_examples", "0", *extra]


def run_cli(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("qadapter: error:")], err


# ------------------------------------------------------------------ 1. CLI user errors


def test_bad_data_is_one_message_exit_2_before_any_model_loads(model_dir, tmp_path, capsys, no_model_load):
    data = write_pairs(tmp_path / "bad.jsonl", 20, bad_lines=[(6, "{not json")])
    rc, errors, err = run_cli(train_argv(model_dir, data, tmp_path / "run"), capsys)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert "bad.jsonl, line 7" in errors[0] and "--skip_invalid" in errors[0] and "skip_invalid=True" not in errors[0]


def test_debug_shows_the_traceback(model_dir, tmp_path, no_model_load):
    data = write_pairs(tmp_path / "bad.jsonl", 20, bad_lines=[(6, "{not json")])
    with pytest.raises(PreferenceDataError, match="line 7"):
        cli.main(train_argv(model_dir, data, tmp_path / "run", "--debug"))


def test_the_api_spells_options_as_python(tmp_path):
    data = write_pairs(tmp_path / "bad.jsonl", 5, bad_lines=[(2, "{not json")])
    with pytest.raises(PreferenceDataError, match=r"skip_invalid=True"):
        load_preference_pairs(data)
    with pytest.raises(ConfigError, match=r"^beta must be ≥ 0"):
        QAdapterConfig(output_dir=str(tmp_path), beta=-1)


def test_a_real_process_prints_no_traceback(model_dir, tmp_path):
    data = write_pairs(tmp_path / "bad.jsonl", 20, bad_lines=[(6, "{not json")])
    done = subprocess.run([sys.executable, "-m", "qadapter.cli", *train_argv(model_dir, data, tmp_path / "run")],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        line for line in done.stderr.splitlines() if line.startswith("qadapter: error: bad.jsonl, line 7")]


@pytest.mark.parametrize("flag,value,says", [
    ("--beta", "-1", "--beta must be ≥ 0"), ("--alpha_0", "nan", "--alpha_0 must be a finite number"),
    ("--alpha_0", "-0.5", "--alpha_0 must be ≥ 0"), ("--alpha_tilde", "0", "--alpha_tilde must be > 0"),
    ("--alpha_tilde", "inf", "--alpha_tilde must be a finite"), ("--gamma", "1.5", "--gamma must be > 0 and ≤ 1"),
    ("--gamma", "0", "--gamma must be > 0 and ≤ 1"), ("--learning_rate", "0", "--learning_rate must be > 0"),
    ("--learning_rate", "nan", "--learning_rate must be a finite"), ("--max_length", "1", "--max_length must be an integer ≥ 2"),
    ("--max_prompt_length", "600", "--max_prompt_length must be an integer from 1"),
    ("--lora_dropout", "1", "--lora_dropout must be ≥ 0 and < 1"),
])
def test_knobs_out_of_range_are_refused_on_the_cli(flag, value, says, model_dir, tmp_path, capsys, no_model_load):
    rc, errors, _ = run_cli(train_argv(model_dir, write_pairs(tmp_path / "p.jsonl", 20), tmp_path / "run", flag, value), capsys)
    assert rc == 2 and len(errors) == 1 and says in errors[0], errors


@pytest.mark.parametrize("field,value", [("beta", -1.0), ("alpha_0", float("nan")), ("alpha_tilde", 0.0),
                                         ("alpha_tilde", float("inf")), ("gamma", 0.0), ("gamma", 1.01),
                                         ("beta", float("inf")), ("alpha_0", -1e-9)])
def test_knobs_are_validated_by_the_settings_for_the_api_too(field, value, tmp_path):
    with pytest.raises(ConfigError, match=field):
        QAdapterSettings(**{field: value})
    with pytest.raises(ConfigError, match=field):
        QAdapterConfig(output_dir=str(tmp_path), **{field: value})
    with pytest.raises(ConfigError, match="learning_rate"):
        QAdapterConfig(output_dir=str(tmp_path), learning_rate=-1e-3)
    QAdapterSettings(alpha_0=0.0, gamma=1.0, beta=0.0)  # the edges that are allowed


def test_a_max_length_that_cuts_prompts_away_is_refused_with_counts(model_dir, tmp_path, capsys, no_model_load):
    rc, errors, _ = run_cli(train_argv(model_dir, write_pairs(tmp_path / "p.jsonl", 20), tmp_path / "run",
                                       "--max_length", "4"), capsys)
    assert rc == 2 and len(errors) == 1
    # the longer response is "w50", " ", "w51", " ", "w52", end-of-turn: 6 tokens, so 4 leaves no room for any
    # prompt and 7 leaves room for one prompt token; the longest pair (11 prompt tokens) is 17
    assert "--max_length 4 leaves no room for the prompt of 20 of 20 pairs (100%" in errors[0]
    assert "--max_length 7 leaves room for the prompt of at least 50%" in errors[0]
    assert "--max_length 17 fits every pair whole" in errors[0]


def test_max_length_refusal_follows_the_stated_share():
    from datasets import Dataset

    from qadapter.data import tokenize_pairs

    tok = make_tiny_tokenizer()
    long = " ".join(["w9"] * 10)
    rows = [{"prompt": conv("w1 w2", "x")[:1], "chosen": [{"role": "assistant", "content": long if i < 3 else "w3"}],
             "rejected": [{"role": "assistant", "content": "w4"}]} for i in range(10)]
    data = Dataset.from_list(rows)
    _, report = tokenize_pairs(data, tok, max_length=12, max_prompt_cut_share=0.5)  # 3 of 10: allowed
    assert report.n_no_room_for_prompt == 3
    with pytest.raises(ConfigError, match=r"3 of 10 pairs \(30%, more than the 20% allowed\)"):
        tokenize_pairs(data, tok, max_length=12, max_prompt_cut_share=0.2)


def test_a_lora_module_that_does_not_exist_is_named(model_dir, tmp_path, capsys):
    rc, errors, err = run_cli(train_argv(model_dir, write_pairs(tmp_path / "p.jsonl", 20), tmp_path / "run",
                                         "--lora_target_modules", "q_proj,nonexistent_proj"), capsys)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert "no module named nonexistent_proj" in errors[0] and "q_proj" in errors[0] and "all-linear" in errors[0]


@pytest.mark.parametrize("case", ["data", "model", "config", "config_yaml", "resume", "method", "adapter"])
def test_bad_paths_and_names_are_user_errors(case, model_dir, tmp_path, capsys, no_model_load):
    data = write_pairs(tmp_path / "p.jsonl", 20)
    argv = {"data": train_argv(model_dir, str(tmp_path / "missing.jsonl"), tmp_path / "run"),
            "model": train_argv("./no/such/model", data, tmp_path / "run"),
            "config": train_argv(model_dir, data, tmp_path / "run", "--config", str(tmp_path / "missing.yaml")),
            "config_yaml": train_argv(model_dir, data, tmp_path / "run", "--config", data),
            "resume": train_argv(model_dir, data, tmp_path / "run", "--resume_from_checkpoint", str(tmp_path / "nope")),
            "method": train_argv(model_dir, data, tmp_path / "run", "--method", "ppo"),
            "adapter": ["generate", "--adapter", str(tmp_path / "no-adapter"), "hello"]}[case]
    rc, errors, err = run_cli(argv, capsys)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert {"data": "missing.jsonl", "model": "no/such/model", "config": "missing.yaml", "config_yaml": "YAML",
            "resume": "nope", "method": "ppo", "adapter": "no-adapter"}[case] in errors[0]


# ------------------------------------------------------------------ 3. faults during training


def _slow_train(argv, sleep: float):
    env = {**os.environ, "QADAPTER_TEST_STEP_SLEEP": str(sleep), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "scripts" / "slow_train.py"), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def _log_history(out):
    return json.loads((Path(out) / "adapter" / "report.json").read_text())["log_history"]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(model_dir, tmp_path, capsys):
    """`qadapter train` in a subprocess is SIGKILLed right after the checkpoint of a random step;
    `--resume_from_checkpoint auto` (here in-process, through the same CLI) then ends with the adapter
    and the log history of a run that was never interrupted (also in-process)."""
    data = write_pairs(tmp_path / "p.jsonl", 28)
    steps, every = 12, 2

    def argv(out, *extra):
        return ["--model", model_dir, "--data", data, "--output_dir", str(out), "--use_cpu", "--seed", "3",
                "--max_steps", str(steps), "--save_strategy", "steps", "--save_steps", str(every), "--logging_steps", "1",
                "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--lora_dropout", "0.1",
                "--eval_pairs", "4", "--train_eval_pairs", "0", "--measure_held_out", "False", "--show_examples", "0",
                "--max_train_minutes", "30", *extra]

    kill_at = random.SystemRandom().choice(range(every, steps, every))
    cut = _slow_train(argv(tmp_path / "cut"), 0.5)
    assert cli.main(["train", *argv(tmp_path / "whole")]) == 0  # meanwhile, the uninterrupted run
    manifest = tmp_path / "cut" / f"checkpoint-{kill_at}" / MANIFEST_NAME
    deadline = time.monotonic() + 900  # the subprocess may start slowly on a loaded machine
    while not manifest.exists():
        assert cut.poll() is None, cut.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)
    cut.send_signal(signal.SIGKILL)
    assert cut.wait(60) == -signal.SIGKILL
    assert not (tmp_path / "cut" / "adapter").exists(), "the run finished before it was killed"
    newest = max(int(p.name.split("-")[1]) for p in (tmp_path / "cut").glob("checkpoint-*"))
    capsys.readouterr()

    assert cli.main(["train", *argv(tmp_path / "cut", "--resume_from_checkpoint", "auto")]) == 0
    output = capsys.readouterr().out
    with capsys.disabled():
        print(f"\nSIGKILLed after checkpoint-{kill_at} (newest on disk: checkpoint-{newest}); "
              + next(line for line in output.splitlines() if "resuming from" in line))
    assert "qadapter: resuming from" in output
    a, b = _weights(tmp_path / "whole" / "adapter"), _weights(tmp_path / "cut" / "adapter")
    assert a.keys() == b.keys() and a
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k), "nothing was trained"
    full, again = _log_history(tmp_path / "whole"), _log_history(tmp_path / "cut")
    assert [h["step"] for h in full] == list(range(1, steps + 1)) == [h["step"] for h in again]
    for h_full, h_again in zip(full, again):
        assert h_full.keys() == h_again.keys()
        for key, value in h_full.items():
            assert h_again[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (h_full["step"], key)


def _tiny_trainer(tmp_path, data, **kw):
    pairs, _ = load_preference_pairs(data)
    args = QAdapterConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, report_to=[],
                          use_cpu=True, lora_dropout=0.0, learning_rate=1e-2, logging_steps=1, **kw)
    return QAdapterTrainer(tiny_llama(), args, train_dataset=pairs, processing_class=make_tiny_tokenizer())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("name", ["optimizer.pt", "adapter_model.safetensors", "trainer_state.json"])
def test_a_damaged_checkpoint_is_named_and_auto_resume_skips_it(name, damage, tmp_path, capsys):
    data = write_pairs(tmp_path / "p.jsonl", 12)
    _tiny_trainer(tmp_path, data, max_steps=4, save_strategy="steps", save_steps=2).train()
    bad = tmp_path / "run" / "checkpoint-4" / name
    raw = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        bad.write_bytes(raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0x55]) + raw[len(raw) // 2 + 1:])
    else:
        bad.unlink()
    again = _tiny_trainer(tmp_path, data, max_steps=6, save_strategy="steps", save_steps=2)
    with pytest.raises(UserError) as err:
        again.train(resume_from_checkpoint=str(bad.parent))
    assert str(bad) in str(err.value)
    again.train(resume_from_checkpoint="auto")  # skips checkpoint-4, resumes from checkpoint-2
    out = capsys.readouterr().out
    assert f"not resuming from checkpoint-4: {bad}" in out and "checkpoint-2 (step 2)" in out
    assert again.state.global_step == 6


def test_a_checkpoint_cut_short_before_its_state_is_skipped(tmp_path, capsys):
    data = write_pairs(tmp_path / "p.jsonl", 12)
    _tiny_trainer(tmp_path, data, max_steps=4, save_strategy="steps", save_steps=2).train()
    ckpt = tmp_path / "run" / "checkpoint-4"
    (ckpt / MANIFEST_NAME).unlink()
    (ckpt / "trainer_state.json").unlink()  # as when killed while HF wrote the checkpoint
    again = _tiny_trainer(tmp_path, data, max_steps=5, save_strategy="no")
    again.train(resume_from_checkpoint="auto")
    assert "trainer_state.json: missing" in capsys.readouterr().out and again.state.global_step == 5


@pytest.mark.parametrize("damage", ["truncate", "flip", "truncate_no_manifest"])
def test_a_damaged_adapter_file_is_named(damage, tmp_path):
    qa = QAdapter.create(tiny_llama(), make_tiny_tokenizer())
    randomize_lora(qa.model)
    folder = qa.save_pretrained(tmp_path / "adapter")
    file = folder / "adapter_model.safetensors"
    raw = file.read_bytes()
    if damage == "flip":
        file.write_bytes(raw[:-9] + bytes([raw[-9] ^ 0xFF]) + raw[-8:])
    else:
        file.write_bytes(raw[: len(raw) - 100])
        if damage == "truncate_no_manifest":
            (folder / MANIFEST_NAME).unlink()
    with pytest.raises(UserError, match="adapter_model.safetensors: (truncated|corrupted)") as err:
        QAdapter.from_pretrained(folder, base_model=tiny_llama())
    assert str(file) in str(err.value)


def _poisoned_model(token_id: int):
    model = tiny_llama()
    with torch.no_grad():
        model.get_input_embeddings().weight[token_id] = float("nan")
    return model


def test_a_non_finite_loss_stops_with_step_and_rows_and_writes_nothing(tmp_path):
    tok = make_tiny_tokenizer()
    poison = tok.convert_tokens_to_ids("w77")
    data = write_pairs(tmp_path / "p.jsonl", 12, bad_lines=[(8, json.dumps({"chosen": conv("w77 w1", "w3 w4"),
                                                                           "rejected": conv("w77 w1", "w5")}))])
    pairs, _ = load_preference_pairs(data)
    args = QAdapterConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, report_to=[], use_cpu=True,
                          max_steps=12, save_strategy="steps", save_steps=1, logging_steps=1, seed=0)
    trainer = QAdapterTrainer(_poisoned_model(poison), args, train_dataset=pairs, processing_class=tok)
    with pytest.raises(NonFiniteError) as err:
        trainer.train()
    message = str(err.value)
    step = trainer.state.global_step + 1
    assert f"the loss is nan at step {step} " in message and "p.jsonl rows" in message
    assert ", 9" in message or "rows 9" in message  # line 9 of the file holds the poisoned pair
    # no checkpoint of the failing step, and every checkpoint written holds finite weights
    assert not (tmp_path / "run" / f"checkpoint-{step}").exists()
    for ckpt in (tmp_path / "run").glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in _weights(ckpt).values())


def test_a_non_finite_loss_on_the_cli_is_one_message(tmp_path, capsys):
    tok = make_tiny_tokenizer()
    folder = tmp_path / "poisoned"
    _poisoned_model(tok.convert_tokens_to_ids("w77")).save_pretrained(folder)
    tok.save_pretrained(folder)
    lines = [json.dumps({"chosen": conv(f"w77 w{i}", "w3 w4"), "rejected": conv(f"w77 w{i}", "w5")}) for i in range(12)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rc, errors, err = run_cli(train_argv(str(folder), str(tmp_path / "p.jsonl"), tmp_path / "run"), capsys)
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err
    assert "the loss is nan at step 1 " in errors[0] and "p.jsonl rows" in errors[0]
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_nan_adapter_is_never_written(tmp_path):
    qa = QAdapter.create(tiny_llama(), make_tiny_tokenizer())
    randomize_lora(qa.model)
    folder = qa.save_pretrained(tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        next(p for n, p in qa.model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="not finite"):
        qa.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_no_space_left_during_save_keeps_the_previous_adapter(tmp_path, monkeypatch, capsys):
    import peft.peft_model

    qa = QAdapter.create(tiny_llama(), make_tiny_tokenizer())
    folder = qa.save_pretrained(tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    randomize_lora(qa.model)

    def full_disk(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 100)  # a part written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    with pytest.raises(SaveError) as err:
        qa.save_pretrained(folder)
    message = str(err.value)
    assert "No space left on device" in message and "adapter_model.safetensors" in message
    assert f"the previous {folder} is intact" in message
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left behind
    QAdapter.from_pretrained(folder, base_model=tiny_llama())  # still loads


def test_no_space_left_on_the_cli_is_one_message(model_dir, tmp_path, monkeypatch, capsys):
    import peft.peft_model

    def full_disk(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    rc, errors, err = run_cli(train_argv(model_dir, write_pairs(tmp_path / "p.jsonl", 20), tmp_path / "run"), capsys)
    assert rc == 1 and len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err
    assert "nothing was written" in errors[0]


# ------------------------------------------------------------------ 5. loading


def test_a_pickled_adapter_is_refused(tmp_path):
    from safetensors.torch import load_file

    qa = QAdapter.create(tiny_llama(), make_tiny_tokenizer())
    folder = qa.save_pretrained(tmp_path / "adapter")
    torch.save(load_file(str(folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(UserError, match="adapter_model.bin: a pickle file"):
        QAdapter.from_pretrained(folder, base_model=tiny_llama())


def test_remote_code_only_when_asked(tmp_path, capsys):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    make_tiny_tokenizer().save_pretrained(base)
    qa = QAdapter.create(tiny_llama(), make_tiny_tokenizer())
    qa.settings.base_model_name_or_path = str(base)
    folder = qa.save_pretrained(tmp_path / "adapter")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UserError, match="trust_remote_code=True"):
        QAdapter.from_pretrained(folder)
    rc, errors, _ = run_cli(["generate", "--adapter", str(folder), "hi"], capsys)
    assert rc == 2 and "--trust_remote_code" in errors[0]
    rc, errors, _ = run_cli(train_argv(str(base), write_pairs(tmp_path / "p.jsonl", 20), tmp_path / "run"), capsys)
    assert rc == 2 and "auto_map" in errors[0]
