"""Every speed-up of the training step is exact: the optimized ``qadapter_step`` (prompt computed once
per pair, fused chunked head, padding skipped, gradient checkpointing) gives the loss, the returns
and the adapter gradients of the straightforward step on the same batch, to float round-off, in the
default mode and with ``reference_compat=True``.

The straightforward step below is a verbatim copy of ``qadapter_step`` as it was before the speed
work (up to the loss from the returns, ``loss_from_returns``, which both share): 2B rows, the prompt computed once per response, logits at the response states, one adapter
pass with grad and one base pass without.
"""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import get_peft_model

import qadapter.trainer.qadapter_trainer as qt
from conftest import make_tiny_tokenizer, max_relative_grad_error, randomize_lora, tiny_llama
from test_trainer import PAIRS
from qadapter.backbone import causal_lm_logits, lora_config
from qadapter.objective import q_values, soft_values, taken
from qadapter.trainer import PreferencePairCollator, QAdapterConfig, QAdapterTrainer, qadapter_step

PAD = 0
# PAIRS (test_trainer): multi-turn prompts of 23, 9 and 11 tokens; chosen and rejected of unequal
# lengths, the longer one on either side. Two more: a long rejected with a short prompt, and a pair
# whose chosen response is empty (the embedded HH-RLHF data has four).
MORE = [dict(prompt_input_ids=[3, 5, 8, 18, 2, 8, 3, 6, 8, 50, 2, 8, 3, 5, 8, 22, 2, 8, 3, 6, 8],
             chosen_input_ids=[37, 38, 2], rejected_input_ids=[54, 55, 56, 57, 58, 59, 60, 2]),
        dict(prompt_input_ids=[3, 5, 8, 19, 23, 2, 8, 3, 6, 8], chosen_input_ids=[],
             rejected_input_ids=[61, 62, 2])]
BATCH = PAIRS + MORE[:1]
PAPER = dict(alpha_tilde=1.0, alpha_0=0.01, gamma=1.0, beta=0.1)
GENERIC = dict(alpha_tilde=0.8, alpha_0=0.2, gamma=0.95, beta=0.3)
#: the default residual Q̂ = α̃·(zθ − z1), the authors' full Q̂ = zθ (with either value pairing), their exact objective
MODES = {"residual": {}, "full": {"parameterization": "full"},
         "full-same-state": {"parameterization": "full", "value_pairing": "same_state"},
         "reference_compat": {"reference_compat": True}}
FAST = {"shared+fused": dict(share_prompt=True, fused_head=True),
        "shared": dict(share_prompt=True, fused_head=False),
        "fused": dict(share_prompt=False, fused_head=True)}


def straightforward_step(model, batch, args, pad_token_id=0):
    """``qadapter_step`` before the speed work, verbatim (plus Q̂ from both branches' logits, :func:`q_values`)."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    response_mask, seq_lengths = batch["response_mask"], batch["seq_lengths"]
    width_p, width = int(batch["prompt_width"]), input_ids.shape[1]
    if args.reference_compat:
        positions = torch.arange(width_p, width, device=input_ids.device)
        actions = F.pad(input_ids[:, width_p + 1:], (0, 1), value=pad_token_id)
        prompt_lengths = seq_lengths - response_mask.sum(-1)
        index_in_sequence = positions[None, :] - (width_p - prompt_lengths[:, None])
        mask = response_mask[:, width_p:] & (index_in_sequence < int(seq_lengths.max()) - 1)
    else:
        positions = torch.arange(width_p - 1, width - 1, device=input_ids.device)
        actions = input_ids[:, width_p:]
        mask = response_mask[:, width_p:]

    adapter_logits = causal_lm_logits(model, input_ids, attention_mask, positions).float()
    with torch.no_grad(), qt._unwrap(model).disable_adapter():
        base_logits = causal_lm_logits(model, input_ids, attention_mask, positions).float()
    q = q_values(adapter_logits, base_logits, args.parameterization, args.alpha_tilde)
    log_pi1 = F.log_softmax(base_logits, dim=-1)
    values = soft_values(q, log_pi1, args.alpha_0, args.alpha_tilde)
    q_taken = taken(q, actions)
    del q, log_pi1

    # the loss from the returns is one shared function (checked against loops in test_trainer / test_objective)
    return qt.loss_from_returns(q_taken, values, mask, seq_lengths, args)


def peft_model(dtype=torch.float32, attn="sdpa", seed=0):
    base = tiny_llama(seed=seed)
    base.config._attn_implementation = attn
    model = get_peft_model(base, lora_config(target_modules=("q_proj", "v_proj"), lora_dropout=0.0))
    return randomize_lora(model, scale=0.3).to(dtype)


def config(tmp_path, **kw):
    return QAdapterConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, **kw)


@pytest.fixture
def spy(monkeypatch):
    """Counts how often the shared-prompt layout and the fused head are used."""
    calls = {"shared": 0, "fused": 0}
    shared, fused = qt._packed_layout, qt._FusedQHead.apply

    def shared_spy(*a, **k):
        calls["shared"] += 1
        layout = shared(*a, **k)
        calls["rows"] = layout.input_ids.shape[0]
        return layout

    def fused_spy(*a, **k):
        calls["fused"] += 1
        return fused(*a, **k)

    monkeypatch.setattr(qt, "_packed_layout", shared_spy)
    monkeypatch.setattr(qt._FusedQHead, "apply", fused_spy)
    return calls


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def grads_of(loss, model):
    """Adapter gradients through ``backward()`` (reentrant checkpointing does not support autograd.grad)."""
    params = trainable(model)
    for p in params:
        p.grad = None
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def compare(model, pairs, args, grad_rtol, ref_model=None, ref_args=None):
    """Optimized step on ``model`` vs straightforward step on ``ref_model`` (default: the same)."""
    batch = PreferencePairCollator(pad_token_id=PAD)(pairs)
    ref_model = ref_model or model
    ref = straightforward_step(ref_model, batch, ref_args or args, pad_token_id=PAD)
    ref_grads = grads_of(ref["loss"], ref_model)
    out = qadapter_step(model, batch, args, pad_token_id=PAD)
    grads = grads_of(out["loss"], model)
    for key in ("loss", "pref_loss", "chi2_loss", "values_mean", "q_values_mean"):
        assert out[key].item() == pytest.approx(ref[key].item(), rel=1e-6, abs=1e-6), key
    for key in ("reward_chosen", "reward_rejected"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-6, atol=1e-5, msg=key)
    assert len(grads) == len(ref_grads) == 8  # lora_A, lora_B of q_proj, v_proj in 2 layers
    worst = max_relative_grad_error(grads, ref_grads)
    assert worst <= grad_rtol, f"relative gradient mismatch {worst:.2e}"
    return out, ref


@pytest.mark.parametrize("path", list(FAST))
@pytest.mark.parametrize("knobs", [PAPER, GENERIC], ids=["paper", "generic"])
@pytest.mark.parametrize("compat", list(MODES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_optimized_step_equals_straightforward(tmp_path, spy, path, knobs, compat, attn):
    """Float32 model, 4 pairs with multi-turn prompts and unequal responses: same loss, returns and
    adapter gradients (measured: loss bit-identical, gradients within ~1e-6 relative)."""
    model = peft_model(torch.float32, attn)
    compare(model, BATCH, config(tmp_path, **MODES[compat], **knobs, **FAST[path]), grad_rtol=5e-6)
    assert spy["shared"] == (1 if FAST[path]["share_prompt"] else 0)
    assert spy["fused"] == (1 if FAST[path]["fused_head"] else 0)


@pytest.mark.parametrize("compat", list(MODES))
@pytest.mark.parametrize("row_tokens", [1, 1024], ids=["pair-per-row", "pairs-share-rows"])
def test_packing_rows(tmp_path, spy, monkeypatch, compat, row_tokens):
    """Rows of one pair (the longest pair sets the width; shorter ones may share) and rows of many."""
    monkeypatch.setattr(qt, "PACK_ROW_TOKENS", row_tokens)
    compare(peft_model(), PAIRS + MORE, config(tmp_path, **MODES[compat], **GENERIC), grad_rtol=5e-6)
    # pair lengths 29, 17, 18, 32, 13: rows of 32 tokens hold [32], [29], [18, 13], [17]
    assert spy == {"shared": 1, "fused": 1, "rows": 4 if row_tokens == 1 else 1}


@pytest.mark.parametrize("compat", list(MODES))
def test_optimized_step_equals_straightforward_float64(tmp_path, spy, compat):
    """On a float64 model only the float32 cast of the logits (kept, as in the straightforward step)
    leaves round-off: gradients agree to ~1e-7."""
    model = peft_model(torch.float64)
    compare(model, BATCH, config(tmp_path, **MODES[compat], **GENERIC), grad_rtol=1e-6)
    assert (spy["shared"], spy["fused"]) == (1, 1)


@pytest.mark.parametrize("compat", list(MODES))
def test_switches_off_is_the_straightforward_step_bit_for_bit(tmp_path, spy, compat):
    model = peft_model()
    batch = PreferencePairCollator(pad_token_id=PAD)(BATCH)
    args = config(tmp_path, **MODES[compat], share_prompt=False, fused_head=False, **GENERIC)
    ref = straightforward_step(model, batch, args, pad_token_id=PAD)
    ref_grads = grads_of(ref["loss"], model)
    out = qadapter_step(model, batch, args, pad_token_id=PAD)
    grads = grads_of(out["loss"], model)
    for key in ("loss", "reward_chosen", "reward_rejected", "values_mean", "q_values_mean"):
        assert torch.equal(out[key], ref[key]), key
    for g, rg in zip(grads, ref_grads):
        assert torch.equal(g, rg)
    assert spy == {"shared": 0, "fused": 0}


@pytest.mark.parametrize("pairs", [[PAIRS[0]], [MORE[1]], [PAIRS[1], MORE[1]], PAIRS + MORE],
                         ids=["one-pair", "empty-chosen", "two-pairs-one-empty", "five-pairs"])
@pytest.mark.parametrize("compat", list(MODES))
def test_batch_shapes(tmp_path, spy, pairs, compat):
    """One pair, an empty chosen response (no chosen column at all), mixed batches."""
    compare(peft_model(), pairs, config(tmp_path, **MODES[compat], **GENERIC), grad_rtol=5e-6)
    assert (spy["shared"], spy["fused"]) == (1, 1)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("compat", list(MODES))
def test_gradient_checkpointing(tmp_path, spy, reentrant, compat):
    """With activation checkpointing (the model in training mode, LoRA dropout 0) the optimized step
    still equals the straightforward step without checkpointing."""
    model, ref_model = peft_model(), peft_model()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    args = config(tmp_path, **MODES[compat], **GENERIC)
    compare(model, BATCH, args, grad_rtol=5e-6, ref_model=ref_model)
    assert (spy["shared"], spy["fused"]) == (1, 1)


class Wrapper(torch.nn.Module):
    """A model wrapper the fast paths do not know (it could edit the logits): no `.module`, not PEFT."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def disable_adapter(self):
        return self.inner.disable_adapter()

    def forward(self, **kw):
        return self.inner(**kw)


def test_unknown_models_take_the_straightforward_step(tmp_path, spy):
    model = peft_model()
    out, ref = compare(Wrapper(model), BATCH, config(tmp_path, **GENERIC), grad_rtol=0.0, ref_model=model)
    assert torch.equal(out["loss"], ref["loss"])
    assert spy == {"shared": 0, "fused": 0}


def test_sliding_window_shorter_than_the_row_is_not_packed(tmp_path, spy):
    model = peft_model()
    model.get_base_model().config.sliding_window = 8  # shorter than every packed row here
    compare(model, BATCH, config(tmp_path, **GENERIC), grad_rtol=5e-6)
    assert spy == {"shared": 0, "fused": 1}


def test_small_tiles_chunk_the_fused_head(tmp_path, spy, monkeypatch):
    """Tiles of a few rows: the chunked forward and the recomputing backward agree across chunks."""
    monkeypatch.setattr(qt, "FUSED_HEAD_TILE_BYTES", 3 * 4 * 96)  # 3 rows of the 96-token vocabulary
    compare(peft_model(), BATCH, config(tmp_path, **GENERIC), grad_rtol=5e-6)
    assert spy["fused"] == 1


def test_trainer_runs_end_to_end_identically(tmp_path):
    """Three optimizer steps of QAdapterTrainer with the fast paths end where the straightforward
    step ends (same data order, LoRA dropout 0)."""
    def train(**speed):
        args = QAdapterConfig(output_dir=str(tmp_path / str(speed)), max_steps=3, per_device_train_batch_size=2,
                              learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                              use_cpu=True, seed=5, data_seed=5, lora_dropout=0.0, **GENERIC, **speed)
        trainer = QAdapterTrainer(tiny_llama(seed=0), args, train_dataset=Dataset.from_list(BATCH + MORE),
                                  processing_class=make_tiny_tokenizer())
        trainer.train()
        return {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}

    fast, plain = train(), train(share_prompt=False, fused_head=False)
    assert any("lora_B" in n and w.abs().sum() > 0 for n, w in fast.items())
    for name, weight in fast.items():
        torch.testing.assert_close(weight, plain[name], rtol=1e-4, atol=1e-6, msg=name)


FSDP2_SCRIPT = r'''
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from test_train_exact import BATCH, GENERIC, MODES, grads_of, peft_model, straightforward_step
import qadapter.trainer.qadapter_trainer as qt
from qadapter.trainer import PreferencePairCollator, QAdapterConfig, qadapter_step
from torch.distributed.fsdp import fully_shard

dist.init_process_group("gloo")
calls = {"shared": 0, "fused": 0}
packed, fused = qt._packed_layout, qt._FusedQHead.apply
def packed_spy(*a, **k):
    calls["shared"] += 1
    return packed(*a, **k)
def fused_spy(*a, **k):
    calls["fused"] += 1
    return fused(*a, **k)
qt._packed_layout, qt._FusedQHead.apply = packed_spy, fused_spy

ref, model = peft_model(), peft_model()
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
batch = PreferencePairCollator(pad_token_id=0)(BATCH)
report = {}
for compat in MODES:
    args = QAdapterConfig(output_dir=sys.argv[2], report_to=[], use_cpu=True, **MODES[compat], **GENERIC)
    calls.update(shared=0, fused=0)
    out = qadapter_step(model, batch, args)
    grads = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads_of(out["loss"], model)]
    want = straightforward_step(ref, batch, args)
    want_grads = grads_of(want["loss"], ref)
    worst = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(grads, want_grads))
    report[str(compat)] = dict(calls=dict(calls), loss=out["loss"].item(), want=want["loss"].item(), worst=worst,
                               sharded=type(model.base_model.model.lm_head.weight).__name__)
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as fh:  # not stdout: the ranks' lines interleave
    json.dump(report, fh)
dist.destroy_process_group()
'''


def test_fsdp2_two_cpu_processes(tmp_path):
    """Under FSDP2 (``fully_shard`` per decoder layer and at the root; 2 CPU processes over gloo) both
    fast paths run (the fused head inside the output embedding's forward, where FSDP has gathered its
    weight) and give the unsharded straightforward step's loss and gradients."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2; torch >= 2.6)

    script = tmp_path / "fsdp2_step.py"
    script.write_text(FSDP2_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(Path(__file__).parent), str(tmp_path / "out")]
    (tmp_path / "out").mkdir()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((tmp_path / "out" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        for mode in report.values():
            assert mode["sharded"] == "DTensor"  # the model really is sharded
            assert mode["calls"] == {"shared": 1, "fused": 1}
            assert mode["loss"] == pytest.approx(mode["want"], rel=1e-6, abs=1e-6)
            assert mode["worst"] <= 5e-6
