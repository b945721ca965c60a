"""The trainer's batched, position-restricted step against per-pair unpadded computation; the
model wrapper; save / load; resume."""

import math

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import TrainerCallback

from conftest import make_tiny_tokenizer, randomize_lora, tiny_llama
from qadapter.modeling import QAdapter
from qadapter.settings import QAdapterSettings
from qadapter.backbone import lora_config
from qadapter.objective import composed_logits
from qadapter.trainer import PreferencePairCollator, QAdapterConfig, QAdapterTrainer, qadapter_step

# Multi-turn prompts of different lengths; chosen and rejected of unequal lengths, ending in eos (2).
PAIRS = [
    dict(prompt_input_ids=[3, 5, 8, 11, 12, 2, 8, 3, 6, 8, 20, 21, 2, 8, 3, 5, 8, 13, 2, 8, 3, 6, 8],
         chosen_input_ids=[30, 31, 32, 2], rejected_input_ids=[40, 2]),
    dict(prompt_input_ids=[3, 5, 8, 14, 2, 8, 3, 6, 8], chosen_input_ids=[33, 2],
         rejected_input_ids=[41, 42, 43, 44, 45, 2]),
    dict(prompt_input_ids=[3, 5, 8, 15, 16, 17, 2, 8, 3, 6, 8], chosen_input_ids=[34, 35, 2],
         rejected_input_ids=[46, 47, 48, 2]),
]


def peft_tiny(seed=0, target=("q_proj", "v_proj")):
    model = get_peft_model(tiny_llama(seed=seed), lora_config(target_modules=target, lora_dropout=0.0))
    return randomize_lora(model, scale=0.3)


def naive_pair_loss(model, pair, args):
    """Each response on its own, unpadded, full logits, a loop over its tokens (method.md eqs. 2-5)."""
    rets, squares, count, lengths = [], 0.0, 0, []
    for key in ("chosen_input_ids", "rejected_input_ids"):
        p, r = pair["prompt_input_ids"], pair[key]
        ids = torch.tensor([p + r])
        q = model(input_ids=ids).logits[0].double()
        with torch.no_grad(), model.disable_adapter():
            z1 = model(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(z1, -1)
        if args.parameterization == "residual":  # Q̂ = α̃·(zθ − z1)
            q = args.alpha_tilde * (q - z1)
        ret = 0.0
        for k in range(len(r)):
            t = len(p) - 1 + k  # the state whose action is the k-th response token
            if k + 1 < len(r):
                z = (q[t + 1] + args.alpha_0 * lp[t + 1]) / args.alpha_tilde
                next_v = args.alpha_tilde * torch.logsumexp(z, -1)
            else:
                next_v = 0.0
            rew = q[t, r[k]] - args.gamma * next_v
            ret = ret + rew
            squares = squares + rew ** 2
        rets.append(ret)
        count += len(r)
        lengths.append(len(p) + len(r))
    n = max(lengths) - 1 if args.normalizer == "longest_sequence" else 1
    pref = -torch.nn.functional.logsigmoid((rets[0] - rets[1]) / n)
    return pref + args.beta * squares / count


def make_args(tmp_path, **kw):
    kw.setdefault("report_to", [])
    kw.setdefault("use_cpu", True)
    return QAdapterConfig(output_dir=str(tmp_path / "out"), alpha_tilde=0.8, alpha_0=0.2, gamma=0.95, beta=0.3, **kw)


@pytest.mark.parametrize("knobs", [{}, {"parameterization": "full", "normalizer": "longest_sequence"}],
                         ids=["residual", "full"])
def test_step_matches_per_pair_unpadded_loop(tmp_path, knobs):
    """Loss and adapter gradients of the batched step == mean over pairs of the naive loop."""
    args = make_args(tmp_path, **knobs)
    model = peft_tiny()
    batch = PreferencePairCollator(pad_token_id=0)(PAIRS)
    loss = qadapter_step(model, batch, args)["loss"]
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    naive = sum(naive_pair_loss(model, pair, args) for pair in PAIRS) / len(PAIRS)
    naive_grads = torch.autograd.grad(naive, [p for p in model.parameters() if p.requires_grad])
    assert loss.item() == pytest.approx(naive.item(), rel=1e-5)
    for g, ng in zip(grads, naive_grads):
        torch.testing.assert_close(g, ng, rtol=1e-4, atol=1e-6)


def test_fresh_adapter_is_scaled_base_policy():
    """With a freshly initialized adapter, π̃'s logits are the base logits scaled by (1+α0)/α̃ (full)
    or by α0/α̃ (residual: Q̂ = 0)."""
    torch.manual_seed(0)
    base = tiny_llama()
    ids = torch.randint(5, 96, (2, 9))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    qa = QAdapter.create(base, make_tiny_tokenizer(), QAdapterSettings(alpha_0=0.3, alpha_tilde=0.6,
                                                                       parameterization="full"))
    with torch.no_grad():
        got = torch.log_softmax(qa.logits(ids), -1)
        qa.settings = QAdapterSettings(alpha_0=0.3, alpha_tilde=0.6)
        got_residual = torch.log_softmax(qa.logits(ids), -1)
    torch.testing.assert_close(got, torch.log_softmax(base_logits * (1 + 0.3) / 0.6, -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_residual, torch.log_softmax(base_logits * 0.3 / 0.6, -1), rtol=0, atol=1e-5)


def test_save_load_identical_logits_and_wrong_base_refused(tmp_path):
    tok = make_tiny_tokenizer()
    base = tiny_llama(seed=0)
    qa = QAdapter.create(base, tok, QAdapterSettings(alpha_0=0.05), peft_config=lora_config(lora_dropout=0.0))
    randomize_lora(qa.model)
    ids = torch.randint(5, 96, (2, 7))
    with torch.no_grad():
        before = qa.logits(ids)
    qa.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "qadapter_config.json").is_file()

    loaded = QAdapter.from_pretrained(tmp_path / "adapter", base_model=tiny_llama(seed=0), tokenizer=tok)
    with torch.no_grad():
        after = loaded.logits(ids)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert loaded.settings.alpha_0 == 0.05

    # PEFT itself can load the folder
    from peft import PeftModel
    plain = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "adapter")
    assert any("lora_B" in n for n, _ in plain.named_parameters())

    with pytest.raises(ValueError, match="fingerprint") as err:
        QAdapter.from_pretrained(tmp_path / "adapter", base_model=tiny_llama(seed=5), tokenizer=tok)
    assert "trained on" in str(err.value)


class StopAfter(TrainerCallback):
    """Simulates a crash: stops training after a given step (its checkpoint is written first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _train(tmp_path, name, resume=None, stop_after=None):
    args = QAdapterConfig(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=1,
                          save_steps=2, save_strategy="steps", logging_steps=1, report_to=[],
                          use_cpu=True, seed=7, data_seed=7, lora_dropout=0.1)
    trainer = QAdapterTrainer(tiny_llama(seed=0), args, train_dataset=Dataset.from_list(PAIRS * 2),
                              processing_class=make_tiny_tokenizer(),
                              callbacks=[StopAfter(stop_after)] if stop_after else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_matches_uninterrupted(tmp_path):
    full = _train(tmp_path, "full")
    interrupted = _train(tmp_path, "part", stop_after=2)
    assert interrupted.state.global_step == 2
    resumed = _train(tmp_path, "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (n1, p1), (n2, p2) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        if p1.requires_grad:
            torch.testing.assert_close(p1, p2, rtol=0, atol=1e-7, msg=n1)
    assert (tmp_path / "part" / "checkpoint-4" / "qadapter_config.json").is_file()


def test_training_changes_only_adapter_weights(tmp_path):
    base = tiny_llama(seed=0)
    trainer = QAdapterTrainer(base, make_args(tmp_path, max_steps=3, learning_rate=1e-2, logging_steps=1,
                                              save_strategy="no"),
                              train_dataset=Dataset.from_list(PAIRS), processing_class=make_tiny_tokenizer())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    logged = trainer.state.log_history[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "pref_loss", "chi2_loss", "values/mean"):
        assert key in logged and math.isfinite(logged[key])
