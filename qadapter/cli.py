"""The ``qadapter`` command: a thin shell over the Python API.

    qadapter train [flags]                       train (no flags: the embedded default job)
    qadapter generate --adapter DIR "prompt"     answer with the customized policy
    qadapter chat --adapter DIR                  interactive chat with it
    qadapter compare --output-dir DIR [flags]    Q-Adapter vs SFT / Replay / DPO: retention and preference
    qadapter serve --adapter NAME=DIR            an OpenAI-compatible server with a web playground
    qadapter export DIR --to OUT [--strength S]  one plain PEFT LoRA folder (vLLM, plain generate())

A user error prints one message on stderr and exits 2 (``--debug``: the traceback); see docs/reliability.md.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user error (bad data, a bad flag or path, a module name that does not exist,
    a corrupted checkpoint) prints one message on stderr and returns 2; a failed save returns 1.
    ``--debug`` (anywhere) shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from .errors import SaveError, UserError, cli_spelling
    from .integrity import NonFiniteError

    with cli_spelling():
        try:
            return _main(argv)
        except (UserError, SaveError, NonFiniteError) as err:
            if debug:
                raise
            # a fault during training interrupts a progress bar mid-line: start the message on its own line
            fresh_line = "" if isinstance(err, UserError) else "\n"
            print(f"{fresh_line}qadapter: error: {err}", file=sys.stderr, flush=True)
            return 2 if isinstance(err, UserError) else 1


def _main(argv: list[str]) -> int:
    # `train` owns its parser: every TrainingArguments / QAdapterConfig field is a flag there.
    if argv and argv[0] == "train":
        from .commands import train

        return train.main(argv[1:])
    from .commands import chat, compare, export, generate, serve
    from .commands import train as train_cmd

    parser = argparse.ArgumentParser(prog="qadapter", description="Customize a chat LLM to new preferences "
                                     "without forgetting (Q-Adapter, ICLR 2025).")
    parser.add_argument("--version", action="version", version=f"qadapter {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (any command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help=train_cmd.HELP + " (see: qadapter train --help)", add_help=False)
    generate.add_parser(sub)
    chat.add_parser(sub)
    compare.add_parser(sub)
    serve.add_parser(sub)
    export.add_parser(sub)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # only `compare` takes flags it does not define (they are `qadapter train` flags)
        if not getattr(args, "takes_train_flags", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.train_flags = unknown
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
