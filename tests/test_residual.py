"""The residual parameterization (docs/method.md, "How Q̂ is parameterized"): Q̂ = α̃·(zθ − z1).

* before training the customized policy is π1 exactly, every implied reward is 0 and the loss is log 2;
* a per-state constant added to both branches' logits changes neither the loss nor the adapter
  gradients (and does change the authors' ``full`` form with r = Q̂ − γ·V(s_{t+1}));
* a short run moves held-out margins toward the chosen answers;
* folders saved before the option existed load as ``full``.
"""

import json
import math

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model

from conftest import make_tiny_tokenizer, randomize_lora, tiny_llama
from test_trainer import PAIRS
from qadapter.modeling import QAdapter
from qadapter.settings import QAdapterSettings
from qadapter.backbone import lora_config
from qadapter.objective import (implied_rewards, length_normalizers, preference_loss, q_values, soft_values, taken)
from qadapter.trainer import PreferencePairCollator, QAdapterConfig, QAdapterTrainer, qadapter_step

KNOBS = {"residual": {}, "residual-same-state": {"value_pairing": "same_state"},
         "residual-alpha0.3": {"alpha_tilde": 0.3}}


def config(tmp_path, **kw):
    return QAdapterConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, **kw)


def fresh_peft(seed=0):
    return get_peft_model(tiny_llama(seed=seed), lora_config(target_modules=("q_proj", "v_proj"), lora_dropout=0.0))


def test_defaults_are_residual_tied_and_offset_free(tmp_path):
    args = config(tmp_path)
    assert (args.parameterization, args.alpha_0, args.alpha_tilde) == ("residual", 1.0, 1.0)
    settings = QAdapterSettings.from_config(args)
    assert settings.parameterization == "residual" and settings.q_scale == 1.0
    assert config(tmp_path, alpha_tilde=0.3).alpha_0 == 0.3                     # tied by default
    assert config(tmp_path, reference_compat=True).parameterization == "full"   # the authors' Q̂
    assert config(tmp_path, parameterization="full").alpha_0 == 0.01            # and their α0
    with pytest.raises(ValueError, match="parameterization='full'"):
        config(tmp_path, reference_compat=True, parameterization="residual")
    with pytest.raises(ValueError, match="value_pairing"):
        QAdapterSettings(value_pairing="previous")


@pytest.mark.parametrize("knobs", list(KNOBS))
def test_before_training_the_policy_is_pi1_rewards_are_zero_and_the_loss_is_log2(tmp_path, knobs):
    model = fresh_peft()
    args = config(tmp_path, **KNOBS[knobs])
    qa = QAdapter(model, make_tiny_tokenizer(), QAdapterSettings.from_config(args))
    ids = torch.randint(5, 96, (3, 11))
    with torch.no_grad():
        log_custom = torch.log_softmax(qa.logits(ids), -1)
        log_pi1 = torch.log_softmax(qa.base_logits(ids).float(), -1)
    assert (log_custom - log_pi1).abs().max().item() < 1e-6
    for fast in (dict(share_prompt=True, fused_head=True), dict(share_prompt=False, fused_head=False)):
        out = qadapter_step(model, PreferencePairCollator(0)(PAIRS), config(tmp_path, **KNOBS[knobs], **fast))
        # V(s) = α̃·logsumexp(log π1) = 0 up to float32 round-off (~1e-8), so every reward is 0 to that
        assert out["reward_chosen"].abs().max().item() < 1e-6 and out["reward_rejected"].abs().max().item() < 1e-6
        assert out["chi2_loss"].item() < 1e-12
        assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)


def loss_from_logits(adapter_logits, base_logits, mask, half, parameterization, value_pairing, alpha_tilde=0.8,
                     alpha_0=0.8, gamma=1.0, beta=0.3):
    """Eqs. (1)-(5) from raw logits, straight from qadapter.objective (rows: chosen, then rejected)."""
    q = q_values(adapter_logits, base_logits, parameterization, alpha_tilde)
    values = soft_values(q, torch.log_softmax(base_logits, -1), alpha_0, alpha_tilde)
    actions = torch.arange(mask.shape[1]).expand(mask.shape[0], -1) % adapter_logits.shape[-1]
    rewards = implied_rewards(taken(q, actions), values, mask, gamma, value_pairing)
    n_c, n_r = length_normalizers("none", mask[:half], mask[half:])
    return preference_loss(rewards[:half], mask[:half], rewards[half:], mask[half:], n_c, n_r, beta)["loss"]


@pytest.mark.parametrize("parameterization,value_pairing,invariant", [
    ("residual", "next_state", True), ("residual", "same_state", True),
    ("full", "same_state", True),      # the authors' pairing cancels the offsets too (method.md, difference 1)
    ("full", "next_state", False)])    # the math's pairing with Q̂ = logits does not: the failure mode
def test_per_state_offsets_of_the_logits_objective_level(parameterization, value_pairing, invariant):
    """Loss and dL/dzθ (hence every adapter gradient, by the chain rule) with and without an arbitrary
    per-state constant c(s) added to both branches' logits."""
    gen = torch.Generator().manual_seed(0)
    rows, width, vocab = 4, 6, 11
    z_theta = torch.randn(rows, width, vocab, generator=gen, dtype=torch.float64)
    z_1 = z_theta + 0.3 * torch.randn(rows, width, vocab, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]).bool()
    offsets = 20 * torch.randn(rows, width, 1, generator=gen, dtype=torch.float64)  # ~ SmolLM2's scale

    def loss_and_grad(shift):
        z = (z_theta + shift).requires_grad_(True)
        loss = loss_from_logits(z, z_1 + shift, mask, 2, parameterization, value_pairing)
        return loss.item(), torch.autograd.grad(loss, z)[0]

    (loss, grad), (loss_shifted, grad_shifted) = loss_and_grad(0.0), loss_and_grad(offsets)
    # q_values works in float32: an offset of ~20 leaves ~1e-6 of round-off, 1e6 times less than the failure mode
    if invariant:
        assert loss_shifted == pytest.approx(loss, rel=1e-5, abs=1e-5)
        torch.testing.assert_close(grad_shifted, grad, rtol=1e-4, atol=1e-6)
    else:
        assert abs(loss_shifted - loss) > 1.0


class _OffsetHead(torch.nn.Module):
    """The model's lm_head plus a fixed constant per (row, position): a per-state offset that both
    branches see (the straightforward step calls it with the same (rows, positions) in both passes)."""

    def __init__(self, head, offsets):
        super().__init__()
        self.head, self.offsets = head, offsets

    def forward(self, hidden):
        return self.head(hidden) + self.offsets[:, -hidden.shape[1]:]


@pytest.mark.parametrize("parameterization,invariant", [("residual", True), ("full", False)])
def test_per_state_offsets_of_the_logits_through_the_model(tmp_path, parameterization, invariant):
    model = randomize_lora(fresh_peft(), scale=0.3)
    batch = PreferencePairCollator(0)(PAIRS)
    args = config(tmp_path, parameterization=parameterization, alpha_tilde=0.8, alpha_0=0.8, beta=0.3,
                  share_prompt=False, fused_head=False)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        loss = qadapter_step(model, batch, args)["loss"]
        return loss.item(), torch.autograd.grad(loss, params)

    loss, grads = loss_and_grads()
    inner = model.get_base_model()
    head = inner.lm_head
    gen = torch.Generator().manual_seed(3)
    inner.lm_head = _OffsetHead(head, 20 * torch.randn(batch["input_ids"].shape[0], batch["input_ids"].shape[1], 1,
                                                       generator=gen))
    try:
        loss_shifted, grads_shifted = loss_and_grads()
    finally:
        inner.lm_head = head
    if invariant:
        assert loss_shifted == pytest.approx(loss, rel=1e-5, abs=1e-5)
        for g, gs in zip(grads, grads_shifted):
            torch.testing.assert_close(gs, g, rtol=1e-3, atol=1e-5)
    else:
        assert abs(loss_shifted - loss) > 1.0


def synthetic_pairs(n, seed, prompt_words=range(20, 40)):
    """Prompts of random words; the chosen answer always uses words 50-54, the rejected words 60-64."""
    gen = torch.Generator().manual_seed(seed)
    words = list(prompt_words)
    rows = []
    for _ in range(n):
        prompt = [words[i] for i in torch.randint(0, len(words), (4,), generator=gen).tolist()]
        chosen = [50 + i for i in torch.randint(0, 5, (3,), generator=gen).tolist()]
        rejected = [60 + i for i in torch.randint(0, 5, (3,), generator=gen).tolist()]
        rows.append(dict(prompt_input_ids=[3, 5, 8] + prompt + [2, 8, 3, 6, 8], chosen_input_ids=chosen + [2],
                         rejected_input_ids=rejected + [2]))
    return rows


def test_a_short_run_moves_held_out_margins_toward_the_chosen_answers(tmp_path):
    from qadapter.recipes.train import implicit_reward_margins, pair_log_likelihoods

    tok = make_tiny_tokenizer()
    train = synthetic_pairs(32, seed=0)
    held_out = synthetic_pairs(16, seed=1, prompt_words=range(70, 90))  # prompts never seen in training
    args = config(tmp_path, max_steps=12, per_device_train_batch_size=4, learning_rate=5e-3, lora_dropout=0.0,
                  logging_steps=4, save_strategy="no", seed=0)
    trainer = QAdapterTrainer(tiny_llama(seed=0), args, train_dataset=Dataset.from_list(train), processing_class=tok)
    qa = trainer.qadapter()
    before = implicit_reward_margins(pair_log_likelihoods(qa, Dataset.from_list(held_out)))
    assert abs(before["mean"]) < 1e-5  # π̃ = π1 before training (to float32 round-off)
    trainer.train()
    qa.model.eval()
    after = implicit_reward_margins(pair_log_likelihoods(qa, Dataset.from_list(held_out)))
    assert after["accuracy"] >= 0.8 and after["mean"] > 0.2, after  # measured: 0.94, +0.44 nats


def test_old_folders_load_as_full(tmp_path):
    model = randomize_lora(fresh_peft(), scale=0.3)
    tok = make_tiny_tokenizer()
    qa = QAdapter(model, tok, QAdapterSettings(alpha_0=0.01, parameterization="full"))
    qa.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "qadapter_config.json"
    old = json.loads(path.read_text())
    for key in ("parameterization", "value_pairing", "q_scale", "normalizer"):
        old.pop(key)  # what qadapter 0.1 wrote before the option existed (with no integrity manifest)
    path.write_text(json.dumps(old))
    from qadapter.integrity import MANIFEST_NAME

    (tmp_path / "a" / MANIFEST_NAME).unlink(missing_ok=True)
    loaded = QAdapter.from_pretrained(tmp_path / "a", base_model=tiny_llama(seed=0), tokenizer=tok)
    assert (loaded.settings.parameterization, loaded.settings.normalizer) == ("full", "longest_sequence")
    ids = torch.randint(5, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(ids), qa.logits(ids), rtol=0, atol=0)


def test_beta_zero_is_dpo_with_beta_equal_to_alpha_tilde(tmp_path):
    """With the χ² term off (β = 0) and tied α's, the residual objective IS DPO's loss at β = α̃ on the
    adapter model: −log σ(α̃·([log πθ(y_w) − log π1(y_w)] − [log πθ(y_l) − log π1(y_l)])), averaged
    over pairs (method.md, "How Q̂ is parameterized"). qadapter compare's DPO points at several β
    (`qadapter:beta=0,alpha_tilde=B`) rest on this identity; checked here with a random LoRA, in the
    optimized and the straightforward step, loss and adapter gradients."""
    model = randomize_lora(fresh_peft(seed=3), scale=0.3)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]

    def response_logprob(pair, key):
        ids = torch.tensor([pair["prompt_input_ids"] + pair[key]])
        p = len(pair["prompt_input_ids"])
        targets = ids[0, p:]
        logp = torch.log_softmax(model(input_ids=ids).logits[0, p - 1:-1].float(), -1)
        return logp.gather(-1, targets[:, None]).sum()

    for beta_dpo in (1.0, 0.3):
        terms = []
        for pair in PAIRS:
            lw, ll = response_logprob(pair, "chosen_input_ids"), response_logprob(pair, "rejected_input_ids")
            with torch.no_grad(), model.disable_adapter():
                rw, rl = response_logprob(pair, "chosen_input_ids"), response_logprob(pair, "rejected_input_ids")
            terms.append(-torch.nn.functional.logsigmoid(beta_dpo * ((lw - rw) - (ll - rl))))
        dpo = torch.stack(terms).mean()
        want = torch.autograd.grad(dpo, lora)
        for fast in (dict(share_prompt=True, fused_head=True), dict(share_prompt=False, fused_head=False)):
            args = config(tmp_path, beta=0.0, alpha_tilde=beta_dpo, **fast)
            loss = qadapter_step(model, PreferencePairCollator(0)(PAIRS), args)["loss"]
            assert loss.item() == pytest.approx(dpo.item(), rel=1e-5, abs=1e-6)
            for g, w in zip(torch.autograd.grad(loss, lora), want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
