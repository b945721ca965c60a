"""The public engine API of ``qadapter.generation`` (the pieces ``generate`` and the server's decoder
share): rows with their own settings (base, two α settings, one sampled with its own seed) decoded in
one batch through ``decode`` + ``branches_engine`` + ``row_composer``, with rows joining the running
batch's KV cache between two tokens, give each row exactly the tokens ``QAdapter.generate`` gives
for that prompt alone."""

from __future__ import annotations

import torch

from conftest import make_tiny_tokenizer, randomize_lora, tiny_llama
from qadapter import generation as G
from qadapter.backbone import eos_token_ids, lora_config, pad_token_id
from qadapter.chat import encode_prompt
from qadapter.modeling import QAdapter
from qadapter.objective import customized_logits
from qadapter.settings import QAdapterSettings

torch.set_default_dtype(torch.float32)


def _qadapter():
    tok = make_tiny_tokenizer()
    qa = QAdapter.create(tiny_llama(), tok, QAdapterSettings(),
                         peft_config=lora_config(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=("q_proj", "v_proj")))
    randomize_lora(qa.model, seed=3, scale=0.5)
    qa.model.eval()
    return qa


# (prompt, settings key: None = base, else (α0, α̃), sampled seed or None, budget)
SPECS = [("w1 w2 w3", (0.5, 1.0), None, 9), ("w7", None, None, 7), ("w30 w31 w32 w33", (2.0, 0.8), None, 8),
         ("w11 w12", (1.0, 1.0), 5, 6), ("w40 w41 w42 w43 w44 w45", (0.3, 1.7), None, 5), ("w9 w8", None, 11, 6)]


def _alone(qa, prompt, key, seed, budget):
    kw = dict(max_new_tokens=budget, eos_token_id=[], return_ids=True)
    if seed is not None:
        kw.update(do_sample=True, temperature=0.9, top_k=20, seed=seed)
    if key is None:
        return qa.generate([prompt], policy="base", **kw)[1][0]
    return qa.generate([prompt], alpha_0=key[0], alpha_tilde=key[1], **kw)[1][0]


def test_rows_with_own_settings_and_joining_rows_decode_as_alone():
    qa = _qadapter()
    model, tok, s = qa.model, qa.tokenizer, qa.settings
    want = [_alone(qa, *spec) for spec in SPECS]

    def compose_one(key, q, base):
        if key is None:
            return base
        return customized_logits(q, base, parameterization=s.parameterization, q_scale=s.q_scale,
                                 alpha_0=key[0], alpha_tilde=key[1])

    def row(prompt, key, seed, budget):
        ids = encode_prompt(tok, prompt)
        sampler = G.GREEDY if seed is None else G.Sampler.build(do_sample=True, prompt_len=len(ids), device="cpu",
                                                                temperature=0.9, top_k=20, seed=seed)
        return G.DecodeRow(ids, budget, key, sampler)

    rows = [row(*spec) for spec in SPECS]
    waiting = rows[3:]
    joined_at = []

    def admit(n_live):  # two rows join after the first token, the last one after the third
        step = len(rows[0].new_ids)
        take = {1: 2, 3: 1}.get(step, 0)
        taken, waiting[:] = waiting[:take], waiting[take:]
        joined_at.extend([step] * len(taken))
        return taken

    def new_engine(batch_rows):
        compose = G.row_composer([r.key for r in batch_rows], compose_one)
        return G.branches_engine(model, ("base", "adapter"), len(batch_rows), compose)

    eos = eos_token_ids(model, tok, [])
    G.decode(new_engine, rows[:3], eos=eos, pad_id=pad_token_id(tok, model, eos), device="cpu", admit=admit)
    assert joined_at == [1, 1, 3]
    assert [r.new_ids for r in rows] == want
    assert all(len(r.new_ids) == spec[3] for r, spec in zip(rows, SPECS))
    assert len({tuple(w) for w in want}) == len(want)  # the settings really differ
