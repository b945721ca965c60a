"""``QAdapterTrainer``: a thin ``transformers.Trainer`` subclass that optimizes the Q-Adapter loss.

Everything a ``Trainer`` does (resume, logging, evaluation, ``accelerate launch`` with DDP / FSDP /
DeepSpeed) is inherited; this file adds only the batch layout (:class:`PreferencePairCollator`),
the loss step (:func:`qadapter_step`), metric logging with TRL's names, and the adapter's config.

Why one module of ~520 lines: the optimized step (packed layout, fused head) sits next to the
straightforward step it must equal (tests/test_train_exact.py compares the two).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..backbone import (attention_kind, base_fingerprint, check_target_modules, lora_config, position_ids_from_mask,
                        projection_head, replaced_forward)
from ..integrity import check_finite_weights
from ..settings import QAdapterSettings
from ..objective import (implied_rewards, length_normalizers, preference_loss, q_values,
                         reference_compat_loss, soft_values)
from .faults import ChecksumCheckpoints, WithRows, check_loss
from .qadapter_config import QAdapterConfig


class PreferencePairCollator:
    """Pads tokenized pairs into one batch of 2B rows: the B chosen rows, then the B rejected rows.

    Prompts are left-padded to a common width P and responses right-padded after them, so every
    response starts at column P: the states that score response tokens are the columns P-1 .. T-2
    of every row, and the model can project to the vocabulary there only. Position ids are derived
    from the attention mask (see ``causal_lm_logits``), so padding changes nothing.

    Output: ``input_ids``, ``attention_mask``, ``response_mask`` (2B, T); ``seq_lengths`` (2B,)
    unpadded prompt + response lengths; ``prompt_width`` P (a 0-d tensor).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [list(f["prompt_input_ids"]) for f in features]
        responses = [list(f["chosen_input_ids"]) for f in features] + [list(f["rejected_input_ids"]) for f in features]
        prompts = prompts + prompts
        width_p = max(len(p) for p in prompts)
        width = width_p + max(len(r) for r in responses)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            start, end = width_p - len(p), width_p + len(r)
            input_ids[i, start:end] = torch.tensor(p + r, dtype=torch.long)
            attention_mask[i, start:end] = 1
            response_mask[i, width_p:end] = True
        seq_lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
                "seq_lengths": seq_lengths, "prompt_width": torch.tensor(width_p)}


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / FSDP (FSDP1) / DeepSpeed engines
        model = model.module
    return model


# ----------------------------------------------------------------------------------------------
# The step. It asks three questions the straightforward step never had to:
#
# * which states to score: only those of real response tokens (``needed``), the same set in
#   every path, so every path computes the same loss;
# * how to lay the batch out (``_Layout``): the collated 2B rows as they are (``_plain_layout``),
#   or every pair once as [prompt | chosen | rejected], several pairs to a row, with a block
#   attention mask that keeps pairs apart and hides the chosen block from the rejected one
#   (``_packed_layout``): each prompt runs once per pair instead of twice, in both passes
#   (gradients reach it from both responses), and no padding is computed inside a row;
# * how to go from the hidden states to Q̂(s, a) and V(s) (``_q_and_values``): through the
#   model's logits, or through a fused, row-chunked head (``_FusedQHead``) that never holds a
#   (rows, positions, vocabulary) tensor and skips padded positions.
#
# Every pass goes through the (possibly DDP/FSDP/DeepSpeed-wrapped) model's own forward; the fused
# head runs inside it, in place of the output embedding's forward, so wrappers that gather sharded
# weights around a module's forward see it. The fast paths are taken only for models whose forward
# they understand (a PEFT model with a LoRA-style adapter, SDPA or eager attention, a plain Linear
# head); anything else, e.g. a custom wrapper module that edits the logits, gets the
# straightforward step. tests/test_train_exact.py checks that each path gives the straightforward
# step's loss and adapter gradients.
# ----------------------------------------------------------------------------------------------

#: Bytes of one float32 (rows, vocabulary) tile of the fused head; about three are alive at once.
FUSED_HEAD_TILE_BYTES = 64 * 2**20
#: Rows of the shared-prompt layout hold several pairs up to this many tokens (or the longest pair).
#: Longer rows waste less on padding but spend more on attention between pairs (masked, yet computed).
PACK_ROW_TOKENS = 1024

def _peft_model(model):
    """The PEFT model inside ``model`` when the fast paths know its forward, else None."""
    from peft import PeftModel

    inner = _unwrap(model)
    if not isinstance(inner, PeftModel) or not isinstance(inner.active_adapter, str):
        return None
    config = inner.peft_config.get(inner.active_adapter)
    if config is None or config.is_prompt_learning:  # virtual tokens would shift every column
        return None
    return inner


def _full(tensor):
    """A plain tensor: an FSDP2 parameter still sharded when the head runs (a DTensor) is gathered."""
    return tensor.full_tensor() if tensor is not None and hasattr(tensor, "full_tensor") else tensor


class _FusedQHead(torch.autograd.Function):
    """V(s) = α̃·logsumexp((Q̂(s,·) + α0·log π1(·|s))/α̃) and Q̂(s, a) for given actions, from the hidden
    states of the adapter pass (``hidden`` hθ, with grad) and of the base pass (``base_hidden`` h1), in
    row chunks: at most a few (chunk, vocabulary) float32 tiles are alive, and the backward recomputes
    the one tile it needs instead of keeping it.

    The head is linear (z = W·h + b) and eq. (1) is linear in the branches' logits up to a per-state
    constant: (Q̂ + α0·log π1)/α̃ = y − (α0/α̃)·logsumexp(z1) with y = W·m + (a + c)·b/α̃ and the mixed
    state m = (a·hθ + c·h1)/α̃, where (a, c) = (1, α0) for a full Q̂ = zθ and (q_scale, α0 − q_scale)
    for a residual Q̂ = q_scale·(zθ − z1). So V = α̃·logsumexp(y) − α0·logsumexp(z1): two vocabulary
    projections per state forward (z1 and y, as before: z1 and zθ) but ONE in the backward (y: z1 is
    constant), and no (chunk, V) log π1, Q̂ or composed tiles. Q̂(s, a) needs zθ only at the action:
    the dot product W[a]·hθ + b[a] (and z1[a] from the base tile), through :func:`q_values`. The
    gradient: dV/dhθ = a·softmax(y)·W, dQ̂(s, a)/dhθ = a·W[a]."""

    @staticmethod
    def forward(ctx, hidden, base_hidden, weight, bias, actions, alpha_0, alpha_tilde, chunk, parameterization="full",
                q_scale=1.0):
        n = hidden.shape[0]
        a, c = (1.0, alpha_0) if parameterization == "full" else (q_scale, alpha_0 - q_scale)
        mixed = torch.mul(hidden.detach().float(), a / alpha_tilde)  # m = (a·hθ + c·h1)/α̃, (n, H)
        if c != 0.0:
            mixed.add_(base_hidden.float(), alpha=c / alpha_tilde)
        mixed = mixed.to(hidden.dtype)
        mixed_bias = None if bias is None else bias * ((a + c) / alpha_tilde)
        values = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        q_taken = torch.empty(actions.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            base = F.linear(base_hidden[rows], weight, bias).float()
            lse_base = torch.logsumexp(base, dim=-1)
            base_taken = base.gather(-1, actions[rows])
            del base
            lse[rows] = torch.logsumexp(F.linear(mixed[rows], weight, mixed_bias).float(), dim=-1)
            values[rows] = alpha_tilde * lse[rows] - alpha_0 * lse_base
            # zθ at the actions only: (rows, A, H) · (rows, H)
            taken_w = weight[actions[rows]]
            adapter_taken = torch.einsum("rah,rh->ra", taken_w, hidden[rows].detach().to(taken_w.dtype))
            if bias is not None:
                adapter_taken = adapter_taken + bias[actions[rows]]
            q_taken[rows] = q_values(adapter_taken, base_taken, parameterization, q_scale)
            del taken_w, adapter_taken, base_taken
        device_type = hidden.device.type
        ctx.autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        ctx.save_for_backward(mixed, weight, mixed_bias, actions, lse)
        ctx.chunk, ctx.scale, ctx.hidden_dtype = chunk, a, hidden.dtype
        return values, q_taken

    @staticmethod
    def backward(ctx, grad_values, grad_q_taken):
        mixed, weight, mixed_bias, actions, lse = ctx.saved_tensors
        n_inputs = len(ctx.needs_input_grad)  # 8 or 10: parameterization and q_scale are optional
        if not ctx.needs_input_grad[0]:
            return (None,) * n_inputs
        n = mixed.shape[0]
        grad_hidden = torch.empty(mixed.shape, dtype=ctx.hidden_dtype, device=mixed.device)
        device_type = mixed.device.type
        with torch.autocast(device_type, enabled=ctx.autocast is not None, **({"dtype": ctx.autocast} if ctx.autocast else {})):
            for start in range(0, n, ctx.chunk):
                rows = slice(start, min(start + ctx.chunk, n))
                # dV/dy = α̃·softmax(y), dy/dhθ = (a/α̃)·W: the α̃'s cancel
                grad_q = F.linear(mixed[rows], weight, mixed_bias).float()
                grad_q = grad_q.sub_(lse[rows, None]).exp_().mul_(grad_values[rows, None])
                grad_q.scatter_add_(-1, actions[rows], grad_q_taken[rows])
                if ctx.scale != 1.0:  # dQ̂/dzθ: 1 (full) or q_scale (residual)
                    grad_q.mul_(ctx.scale)
                grad_hidden[rows] = (grad_q.to(weight.dtype if ctx.autocast is None else ctx.autocast)
                                     @ weight.to(ctx.autocast or weight.dtype)).to(ctx.hidden_dtype)
                del grad_q
        return (grad_hidden,) + (None,) * (n_inputs - 1)


@dataclass
class _Layout:
    """Model inputs, the states to project (``kept`` columns, ``valid`` per row) and their actions,
    and where each (row, response column) of the collated batch finds its state: ``row_of`` (2B, 1)
    or (2B, L) into the layout's rows, ``col`` (2B, L) into ``kept``, ``slot`` (2B, L) into the last
    axis of ``actions``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    kept: torch.Tensor
    valid: torch.Tensor
    actions: torch.Tensor
    row_of: torch.Tensor
    col: torch.Tensor
    slot: torch.Tensor


def _plain_layout(input_ids, attention_mask, actions, needed, first_state) -> _Layout:
    """The collated 2B rows as they are: response column j of every row is scored from column
    ``first_state + j``."""
    rows, width_l = actions.shape
    device = input_ids.device
    return _Layout(input_ids, attention_mask, position_ids_from_mask(attention_mask),
                   kept=torch.arange(first_state, first_state + width_l, device=device), valid=needed,
                   actions=actions.unsqueeze(-1), row_of=torch.arange(rows, device=device)[:, None],
                   col=torch.arange(width_l, device=device).expand(rows, width_l),
                   slot=torch.zeros((rows, width_l), dtype=torch.long, device=device))


def _packed_layout(input_ids, attention_mask, actions, needed, width_p, first_state, pad_token_id,
                   attention_kind, mask_dtype) -> _Layout:
    """Pairs packed into rows, each pair once as [prompt | chosen | rejected], no padding inside.

    Pairs go into rows of ``max(longest pair, PACK_ROW_TOKENS)`` tokens, longest first, each into
    the first row it fits (first-fit decreasing); rows are right-padded to the fullest one. Position
    ids restart after the prompt for each response, and the 4D mask lets a token see only earlier
    tokens of its own pair, a rejected token not the chosen ones, so every token computes exactly
    what it computes in its own row of the plain layout. With ``first_state = width_p - 1`` the last
    prompt state scores the first token of both responses (two action slots).
    """
    half, width_l = input_ids.shape[0] // 2, actions.shape[1]
    width_c, device = input_ids.shape[1], input_ids.device
    plen = attention_mask[:half, :width_p].sum(-1).tolist()
    resp = needed.sum(-1).tolist()
    len_c, len_r = resp[:half], resp[half:]
    sizes = [plen[i] + len_c[i] + len_r[i] for i in range(half)]
    capacity = max(max(sizes), PACK_ROW_TOKENS)
    fill, where = [], [None] * half
    for i in sorted(range(half), key=lambda i: -sizes[i]):
        row = next((r for r, used in enumerate(fill) if used + sizes[i] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        where[i], fill[row] = (row, fill[row]), fill[row] + sizes[i]
    n_rows, width = len(fill), max(fill)

    # Per packed slot: the flat index of its token in the collated batch, its position, its pair, its block.
    src = torch.full((n_rows, width), -1, dtype=torch.long)
    pos = torch.zeros((n_rows, width), dtype=torch.long)
    pair = torch.full((n_rows, width), -1, dtype=torch.long)
    block = torch.zeros((n_rows, width), dtype=torch.long)
    # Per (collated row, response column): the packed row and column of the state that scores it.
    state_row = torch.zeros((2 * half, width_l), dtype=torch.long)
    state_col = torch.zeros((2 * half, width_l), dtype=torch.long)
    slot = torch.zeros((2 * half, width_l), dtype=torch.long)
    off = first_state - width_p  # -1 (default: s_t precedes a_t) or 0 (compat: the state at the token)
    for i, (row, start) in enumerate(where):
        p, c, r = plen[i], len_c[i], len_r[i]
        segments = ((i * width_c + width_p - p, 0, p, 0), (i * width_c + width_p, p, c, 1),
                    ((half + i) * width_c + width_p, p, r, 2))
        at = start
        for first_src, first_pos, n, kind in segments:
            src[row, at:at + n] = first_src + torch.arange(n)
            pos[row, at:at + n] = first_pos + torch.arange(n)
            pair[row, at:at + n], block[row, at:at + n] = i, kind
            at += n
        j_c, j_r = torch.arange(c), torch.arange(r)
        state_row[i, :c], state_row[half + i, :r] = row, row
        state_col[i, :c] = start + p + off + j_c  # for j = 0 and off = -1: the last prompt token
        shared = off + j_r < 0
        state_col[half + i, :r] = torch.where(shared, start + p - 1, start + p + c + off + j_r)
        slot[half + i, :r] = shared.long()  # the shared state: the rejected action goes to slot 1

    src, pos, pair, block = (t.to(device) for t in (src, pos, pair, block))
    state_row, state_col, slot = (t.to(device) for t in (state_row, state_col, slot))
    ids = torch.where(src >= 0, input_ids.reshape(-1)[src.clamp(min=0)], torch.full_like(src, pad_token_id))
    allowed = torch.ones((width, width), dtype=torch.bool, device=device).tril()[None]
    allowed = allowed & (pair[:, :, None] == pair[:, None, :]) & (pair[:, None, :] >= 0)
    allowed &= ~((block[:, :, None] == 2) & (block[:, None, :] == 1))
    allowed |= torch.eye(width, dtype=torch.bool, device=device)  # padding queries see themselves: no NaN
    allowed = allowed[:, None]  # (rows, 1, T, T)
    if attention_kind == "eager":
        mask = torch.zeros(allowed.shape, dtype=mask_dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(mask_dtype).min)
    else:
        mask = allowed

    kept = torch.unique(state_col[needed])  # sorted; the union over rows of the states to score
    col = torch.searchsorted(kept, state_col).clamp(max=max(kept.numel() - 1, 0))
    valid = torch.zeros((n_rows, kept.numel()), dtype=torch.bool, device=device)
    valid[state_row[needed], col[needed]] = True
    n_slots = 2 if bool(slot.any()) else 1
    kept_actions = torch.full((n_rows, kept.numel(), n_slots), pad_token_id, dtype=torch.long, device=device)
    kept_actions[state_row[needed], col[needed], slot[needed]] = actions[needed]
    return _Layout(ids, mask, pos, kept, valid, kept_actions, state_row, col, slot)


def _q_and_values(model, layout: _Layout, head, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Q̂(s, a) and V(s) at every kept state of the layout, (rows, K, A) and (rows, K)."""
    inputs = dict(input_ids=layout.input_ids, attention_mask=layout.attention_mask,
                  position_ids=layout.position_ids, use_cache=False, logits_to_keep=layout.kept)
    if head is None:  # through the logits: one (rows, K, V) tensor per pass
        adapter_logits = model(**inputs).logits  # with grad
        with torch.no_grad(), _unwrap(model).disable_adapter():
            base_logits = model(**inputs).logits.float()
        q = q_values(adapter_logits, base_logits, args.parameterization, args.alpha_tilde)
        del adapter_logits
        log_pi1 = F.log_softmax(base_logits, dim=-1)
        del base_logits
        values = soft_values(q, log_pi1, args.alpha_0, args.alpha_tilde)
        q_taken = q.gather(-1, layout.actions)
        return q_taken, values

    # Fused: the base pass returns the hidden states at the kept states (its head is the identity),
    # the adapter pass hands its own to _FusedQHead inside the model's forward.
    with torch.no_grad(), _unwrap(model).disable_adapter(), replaced_forward(head, lambda hidden: hidden):
        base_hidden = model(**inputs).logits
    valid, actions = layout.valid, layout.actions
    chunk = max(1, FUSED_HEAD_TILE_BYTES // (4 * head.weight.shape[0]))

    def fused(hidden):
        values, q_taken = _FusedQHead.apply(hidden[valid], base_hidden[valid].to(hidden.dtype), _full(head.weight),
                                            _full(head.bias), actions[valid], args.alpha_0, args.alpha_tilde, chunk,
                                            args.parameterization, args.alpha_tilde)
        out = hidden.new_zeros(valid.shape + (1 + actions.shape[-1],), dtype=torch.float32)
        out[valid] = torch.cat([values[:, None], q_taken], dim=-1)
        return out

    with replaced_forward(head, fused):
        out = model(**inputs).logits
    return out[..., 1:], out[..., 0]


def loss_from_returns(q_taken, values, mask, seq_lengths, args: QAdapterConfig) -> dict[str, torch.Tensor]:
    """The loss (eqs. 3-5, or the authors' version with ``reference_compat``) and the logged means from
    Q̂(s_t, a_t) and V(s_t) at the scored states: ``q_taken``, ``values``, ``mask`` (2B, L), chosen rows
    first; ``seq_lengths`` (2B,) full sequence lengths."""
    half = q_taken.shape[0] // 2
    if args.reference_compat:
        out = reference_compat_loss(q_taken, values, mask, args.gamma, args.beta,
                                    padded_length=int(seq_lengths.max()))
    else:
        rewards = implied_rewards(q_taken, values, mask, args.gamma, args.value_pairing)
        n_c, n_r = length_normalizers(args.normalizer, mask[:half], mask[half:], seq_lengths[:half], seq_lengths[half:])
        out = preference_loss(rewards[:half], mask[:half], rewards[half:], mask[half:], n_c, n_r, args.beta)
    count = mask.sum().clamp(min=1)
    out["values_mean"] = (values.detach() * mask).sum() / count
    out["q_values_mean"] = (q_taken.detach() * mask).sum() / count
    return out


def qadapter_step(model, batch: dict[str, torch.Tensor], args: QAdapterConfig,
                  pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Loss and statistics of one batch laid out by :class:`PreferencePairCollator`.

    ``model`` is the (possibly DDP/FSDP-wrapped) PEFT model: one pass with the adapter gives Q̂,
    one pass without it (no gradient) gives log π1. Only the states that score response tokens
    are projected to the vocabulary. ``args.share_prompt`` runs each prompt once per pair (both
    passes), ``args.fused_head`` computes Q̂ and V without materializing the logits; both are exact
    (same loss and gradients as the straightforward step, to float round-off) and fall back to the
    straightforward computation for models they do not support.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    response_mask, seq_lengths = batch["response_mask"], batch["seq_lengths"]
    width_p, width = int(batch["prompt_width"]), input_ids.shape[1]
    needed = response_mask[:, width_p:]  # response column j of a row is an action to score
    if args.reference_compat:
        # The authors' alignment: the states *at* response tokens, each acting with the next token
        # (the padding token after a shorter response included), and nothing for the last token of
        # the longest sequence of the micro-batch, as their ``values[:, :-1]`` drops it.
        first_state = width_p
        positions = torch.arange(width_p, width, device=input_ids.device)
        actions = F.pad(input_ids[:, width_p + 1:], (0, 1), value=pad_token_id)
        prompt_lengths = seq_lengths - response_mask.sum(-1)
        index_in_sequence = positions[None, :] - (width_p - prompt_lengths[:, None])
        mask = needed & (index_in_sequence < int(seq_lengths.max()) - 1)
    else:
        first_state = width_p - 1
        actions = input_ids[:, width_p:]
        mask = needed

    peft_model = _peft_model(model)
    head = None
    if peft_model is not None and getattr(args, "fused_head", True) and not isinstance(model, torch.nn.DataParallel):
        head = projection_head(peft_model, training=True)  # (DataParallel replicas would each see the whole batch's closure)
    kind, half = None, input_ids.shape[0] // 2
    if peft_model is not None and getattr(args, "share_prompt", True) and half >= 1:
        longest_pair = attention_mask[:half, :width_p].sum(-1) + needed[:half].sum(-1) + needed[half:].sum(-1)
        kind = attention_kind(peft_model, int(longest_pair.max()))
    if kind is not None:
        layout = _packed_layout(input_ids, attention_mask, actions, needed, width_p, first_state, pad_token_id,
                                kind, peft_model.get_base_model().dtype)
    else:
        layout = _plain_layout(input_ids, attention_mask, actions, needed, first_state)
    q_kept, values_kept = _q_and_values(model, layout, head, args)
    values = values_kept[layout.row_of, layout.col]  # (2B, L)
    q_taken = q_kept[layout.row_of, layout.col, layout.slot]  # (2B, L)
    del q_kept, values_kept

    return loss_from_returns(q_taken, values, mask, seq_lengths, args)


class QAdapterTrainer(Trainer):
    """Trains a LoRA adapter as a residual Q-function from preference pairs.

    Args:
        model: a causal LM (a model object, or a path / hub id), or a ``PeftModel`` that already
            holds the adapter to train. A bare model is wrapped with a LoRA adapter built from
            ``args.lora_*`` (or from ``peft_config`` when given).
        args: :class:`QAdapterConfig`.
        train_dataset / eval_dataset: preference pairs, either raw (any format
            :func:`qadapter.data.load_preference_pairs` reads, already loaded) or tokenized
            (``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``).
        processing_class: the tokenizer.

    Logged metrics (TRL's names where TRL has one): ``rewards/chosen``, ``rewards/rejected``
    (mean implied returns R(y|x)), ``rewards/margins``, ``rewards/accuracies``, ``pref_loss``,
    ``chi2_loss``, ``values/mean`` (mean V(s) over scored states), ``q_values/mean``.
    """

    def __init__(self, model, args: QAdapterConfig, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, base_model_name_or_path: str | None = None, **kwargs):
        from peft import PeftModel, get_peft_model

        if isinstance(model, str):
            from ..embedded import load_model

            base_model_name_or_path = base_model_name_or_path or model
            model = load_model(model, dtype=torch.float32)
        if processing_class is None:
            raise ValueError("QAdapterTrainer needs processing_class=<the model's tokenizer>")
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        fingerprint = base_fingerprint(model)
        if not isinstance(model, PeftModel):
            target = args.lora_target_modules
            check_target_modules(model, target)
            model = get_peft_model(model, peft_config or lora_config(
                args.lora_r, args.lora_alpha, args.lora_dropout,
                target if target == "all-linear" else target.split(",")))
        self.settings = QAdapterSettings.from_config(
            args, base_model_name_or_path=base_model_name_or_path or getattr(model, "name_or_path", None)
            or model.get_base_model().name_or_path,
            base_fingerprint=fingerprint)
        train_dataset = self._tokenize(train_dataset, processing_class, args, "train")
        eval_dataset = self._tokenize(eval_dataset, processing_class, args, "eval")
        kwargs.setdefault("data_collator", WithRows(PreferencePairCollator(processing_class.pad_token_id)))
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        # Our loss is already a mean over the pairs of a micro-batch: let Trainer divide by the
        # gradient-accumulation steps as it does for any loss that ignores num_items_in_batch.
        self.model_accepts_loss_kwargs = False
        self._stored_metrics = defaultdict(lambda: defaultdict(list))
        self.add_callback(ChecksumCheckpoints())

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint`` may also be ``"auto"`` (the newest intact
        checkpoint in ``output_dir``, if any), and a checkpoint is checked before it is loaded."""
        from ..integrity import resolve_resume

        resume = resolve_resume(resume_from_checkpoint, self.args.output_dir,
                                log=print if self.args.should_log else (lambda *_: None))
        return super().train(resume, *args, **kwargs)

    @staticmethod
    def _tokenize(dataset, tokenizer, args, split):
        if dataset is None or "prompt_input_ids" in dataset.column_names:
            return dataset
        from ..data import tokenize_pairs

        tokenized, report = tokenize_pairs(dataset, tokenizer, max_length=args.max_length,
                                           max_prompt_length=args.max_prompt_length)
        if args.should_log:
            print(f"qadapter: {split} data: {report.summary()}", flush=True)
        return tokenized

    # ------------------------------------------------------------------ loss and metrics
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = qadapter_step(model, inputs, self.args, pad_token_id=self.processing_class.pad_token_id)
        if model.training:
            check_loss(out["loss"], inputs, self.state)  # stop before a non-finite step reaches the weights
        self._store(out, "train" if model.training else "eval")
        return (out["loss"], out) if return_outputs else out["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _store(self, out: dict[str, torch.Tensor], split: str) -> None:
        chosen, rejected = out["reward_chosen"].detach(), out["reward_rejected"].detach()
        metrics = {
            "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "pref_loss": out["pref_loss"].detach(), "chi2_loss": out["chi2_loss"].detach(),
            "values/mean": out["values_mean"], "q_values/mean": out["q_values_mean"],
        }
        gathered = self.accelerator.gather_for_metrics(torch.stack(list(metrics.values()))[None])
        for key, value in zip(metrics, gathered.float().mean(0).tolist()):
            self._stored_metrics[split][key].append(value)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._stored_metrics[split].items():
            logs[prefix + key] = sum(values) / len(values)
        self._stored_metrics[split].clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict=None):
        check_finite_weights(self.model)  # never write a NaN adapter
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.settings.save(output_dir or self.args.output_dir)

    def qadapter(self):
        """The trained customized policy as a :class:`qadapter.QAdapter` (shares this trainer's model)."""
        from ..modeling import QAdapter

        return QAdapter(self.accelerator.unwrap_model(self.model), self.processing_class, self.settings)
