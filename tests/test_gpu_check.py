"""bench/gpu_check.py runs on the CPU with tiny models: its checks pass, can fail, and its deadline
skips what does not fit (the GPU numbers themselves are for a session lent a GPU: bench/NOTES.md)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402


def lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def test_cpu_run_checks_both_fast_paths_in_bf16_and_times_the_big_model_shape(capsys):
    assert gpu_check.main(["--device", "cpu", "--sections", "steps", "big"]) == 0
    out = capsys.readouterr().out
    checks = lines(out, "CHECK bf16_step_")
    assert [c.split()[1] for c in checks] == ["bf16_step_shared_fused", "bf16_step_shared", "bf16_step_fused"]
    assert all(" pass " in c for c in checks), checks
    results = {line.split()[1]: dict(kv.split("=") for kv in line.split()[2:] if "=" in kv)
               for line in lines(out, "RESULT ")}
    for name in ("bf16_step_shared_fused", "bf16_step_shared", "bf16_step_fused"):
        # each step really ran in bf16 (its gradients differ from float32's); against the bf16
        # straightforward step they may be bit-identical (an AVX2 CPU's fallback bf16 kernel)
        assert float(results[name]["grad_rel_vs_f32"]) > 0
        assert float(results[name]["loss_rel"]) <= gpu_check.BF16_TOLERANCE
    assert 0 < float(results["bf16_noise_floor"]["grad_rel"]) < 0.1
    assert float(results["big_model_step_shipped"]["step_s"]) > 0
    assert float(results["big_model_shipped_vs_straightforward"]["speed"]) > 0
    assert lines(out, "CHECK gpu_check pass")


def test_a_gradient_outside_the_tolerance_fails_the_check(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "BF16_TOLERANCE", 1e-9)  # below bf16's own rounding
    assert gpu_check.main(["--device", "cpu", "--sections", "steps"]) == 1
    out = capsys.readouterr().out
    assert len(lines(out, "CHECK bf16_step_")) == 3 and all(" FAIL " in c for c in lines(out, "CHECK bf16_step_"))
    assert lines(out, "CHECK gpu_check FAIL")


def test_the_tolerance_tells_a_lost_pair_from_bf16_rounding():
    device = gpu_check.torch.device("cpu")
    model = gpu_check.random_model(gpu_check.SHAPES[("steps", "cpu")], device)
    spec = gpu_check.BATCHES[("steps", "cpu")]
    args = gpu_check.step_args("unused", "cpu", share_prompt=False, fused_head=False)
    loss, grads, _ = gpu_check.one_step(model, gpu_check.random_batch(spec, 512, device), args, device, bf16=True)
    fewer = gpu_check.random_batch((spec[0] - 1, *spec[1:]), 512, device)  # the same pairs but the last
    lost = gpu_check.one_step(model, fewer, args, device, bf16=True)
    loss_err, grad_err = gpu_check.relative_errors(lost[0], lost[1], loss, grads)
    assert loss_err > gpu_check.BF16_TOLERANCE and grad_err > 10 * gpu_check.BF16_TOLERANCE


def test_the_global_deadline_skips_sections_with_a_reason(capsys):
    assert gpu_check.main(["--device", "cpu", "--budget", "3", "--sections", *gpu_check.SECTIONS]) == 0
    out = capsys.readouterr().out
    skipped = lines(out, "SKIP ")
    assert [s.split()[1] for s in skipped] == list(gpu_check.SECTIONS)
    assert all("reason=global deadline" in s for s in skipped)
    assert not lines(out, "RESULT ")


def test_no_cuda_device_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cuda"])
    assert "use --device cpu" in capsys.readouterr().err


def test_bench_results_are_forwarded_and_a_failing_bench_is_skipped_with_its_error(tmp_path, monkeypatch, capsys):
    # Stand-ins for bench/decode.py and bench/score.py (the real ones need minutes on this CPU;
    # bench/NOTES.md has the real decode run through gpu_check): one prints a RESULT line, one fails.
    (tmp_path / "decode.py").write_text("import sys\nprint('noise')\nprint('RESULT decode_fast_vs_base=1.5', sys.argv[1:])\n")
    (tmp_path / "score.py").write_text("raise ModuleNotFoundError(\"No module named 'datasets'\")\n")
    monkeypatch.setattr(gpu_check, "HERE", tmp_path)
    clock, cpu = gpu_check.Clock(60), gpu_check.torch.device("cpu")
    assert gpu_check.section_bench("decode", cpu, clock, "/some/model")
    assert gpu_check.section_bench("score", cpu, clock, None)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("RESULT gpu_check_decode: decode_fast_vs_base=1.5")
    assert "'--devices', 'cpu', '--model', '/some/model'" in out[0]
    assert out[1].startswith("SKIP score reason=bench/score.py exited 1: ModuleNotFoundError: No module named 'datasets'")
