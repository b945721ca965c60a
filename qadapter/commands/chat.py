"""``qadapter chat``: an interactive multi-turn conversation with a trained Q-Adapter, streamed."""

from __future__ import annotations

import argparse
import sys

from .generate import add_model_args, decoding_kwargs, label, load

HELP = "chat with a trained Q-Adapter (multi-turn, streamed; '/exit' or end of input quits)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("chat", help=HELP, description=HELP + ". '/reset' starts a new conversation. "
                                   "With --compare the base model answers every turn too, in its own conversation.")
    add_model_args(parser)
    parser.add_argument("--system", default=None, help="a system message to start every conversation with")
    parser.set_defaults(func=run)
    return parser


def run(args, stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    qa = load(args)
    kwargs = decoding_kwargs(args, qa)
    policies = [args.policy] + (["base"] if args.compare and args.policy != "base" else [])

    def fresh():
        start = [{"role": "system", "content": args.system}] if args.system else []
        return {policy: list(start) for policy in policies}

    histories = fresh()
    interactive = stdin.isatty()
    streamer = text_streamer(qa.tokenizer, stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            histories = fresh()
            print("(new conversation)", file=stdout, flush=True)
            continue
        if not text.strip():
            continue
        for policy in policies:
            history = histories[policy]
            history.append({"role": "user", "content": text})
            print(f"[{label(qa, policy)}] " if len(policies) > 1 else "assistant> ", end="", file=stdout, flush=True)
            # through the adapter's own generate: it knows how Q̂ is parameterized (residual or full)
            answer = qa.generate([history], policy=policy, streamer=streamer, **kwargs)[0]
            history.append({"role": "assistant", "content": answer.strip()})
    return 0


def text_streamer(tokenizer, stdout):
    """transformers' ``TextStreamer`` (prompt and special tokens skipped) writing to ``stdout``; it
    resets itself at every ``end()``, so one serves every turn."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stdout.write(text + ("\n" if stream_end else ""))
            stdout.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
