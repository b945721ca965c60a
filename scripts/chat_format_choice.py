"""Which chat rendering suits a model that has no chat template (docs/models.md, "Chat rendering").

For each format of ``qadapter.chat.CHAT_FORMATS``, on the base model alone (no adapter): the embedded
HH-RLHF pairs of at most 128 tokens are tokenized in that format (as training tokenizes them), and
this prints the mean log-probability per response token (chosen and rejected, end-of-turn token
included), the mean log-probability of the end-of-turn token right after each chosen answer (can the
model end a turn?), the preference accuracy of the base model's summed log-likelihoods, and the
greedy answers to the first single-turn prompts with how many ended within the token budget.

Usage: python scripts/chat_format_choice.py [--model gemma3-270m] [--pairs 60] [--formats plain,gemma]
"""

from __future__ import annotations

import argparse
import time

import torch


def measure(model, tokenizer, pairs, n_pairs: int, new_tokens: int) -> None:
    from qadapter.data import tokenize_pairs
    from qadapter.generation import generate
    from qadapter.scoring import score

    ids, report = tokenize_pairs(pairs, tokenizer, max_length=128, drop_longer_than=128)
    rows = ids.select(range(min(n_pairs, len(ids))))
    m = len(rows)
    requests = ([(p, c) for p, c in zip(rows["prompt_input_ids"], rows["chosen_input_ids"])]
                + [(p, r) for p, r in zip(rows["prompt_input_ids"], rows["rejected_input_ids"])])
    started = time.monotonic()
    scores = score(model, requests, policies=("base",), batch_size=8)
    logprobs, n_tokens = scores.logprobs["base"], scores.n_tokens
    end = tokenizer.eos_token_id
    ends = [(p + c[:-1], [c[-1]]) for p, c in zip(rows["prompt_input_ids"], rows["chosen_input_ids"]) if c and c[-1] == end]
    end_logprobs = score(model, ends, policies=("base",), batch_size=8).logprobs["base"]
    accuracy = sum(logprobs[i] > logprobs[m + i] for i in range(m)) / m
    print(f"  pairs {m} (prompt not a prefix: {report.n_prompt_not_prefix}, no end-of-turn: {report.n_response_no_eos}); "
          f"mean log p per response token {sum(logprobs) / sum(n_tokens):.3f}; "
          f"mean log p(end-of-turn {tokenizer.eos_token!r} | chosen answer) {sum(end_logprobs) / len(end_logprobs):.3f} "
          f"(n = {len(end_logprobs)}); base preference accuracy {accuracy:.3f} [{time.monotonic() - started:.0f} s]",
          flush=True)
    prompts = [pairs[i]["prompt"] for i in keep if len(pairs[i]["prompt"]) == 1][:4]
    texts, new = generate(model, tokenizer, prompts, policy="base", alpha_0=0.0, alpha_tilde=1.0,
                          max_new_tokens=new_tokens, return_ids=True)
    print(f"  greedy answers that ended within {new_tokens} tokens: "
          f"{sum(1 for r in new if r and r[-1] == end)}/{len(new)}")
    for prompt, text in zip(prompts, texts):
        print(f"    Q: {prompt[-1]['content'].strip()[:100]!r}\n    A: {text[:200]!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m", help="an embedded model name or a model folder")
    parser.add_argument("--pairs", type=int, default=60, help="pairs to score (default 60)")
    parser.add_argument("--formats", default="plain,gemma", help="formats to compare (default plain,gemma)")
    parser.add_argument("--new-tokens", type=int, default=48, help="new tokens per greedy answer (default 48)")
    args = parser.parse_args(argv)

    from qadapter.chat import set_chat_format
    from qadapter.data import load_embedded_pairs
    from qadapter.embedded import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    model = load_model(path, dtype=torch.float32).eval()
    pairs, _ = load_embedded_pairs()
    print(f"model {args.model} ({path}), base policy, embedded HH-RLHF pairs of at most 128 tokens", flush=True)
    for name in args.formats.split(","):
        tokenizer = load_tokenizer(path)
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)  # the model's own, before any format
        set_chat_format(tokenizer, name)
        print(f"[{name}]", flush=True)
        measure(model, tokenizer, pairs, args.pairs, args.new_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
