"""``python -m qadapter.vllm serve FOLDER --name NAME [--plugin]``: start vLLM's OpenAI server on a
qadapter export (vLLM's LoRA support) or, with ``--plugin``, on a residual Q-Adapter at any strength
per request (docs/serving.md). Runs in vLLM's venv (``bash scripts/install.sh --vllm``)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .launch import vllm_command


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qadapter.vllm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="exec vLLM's OpenAI server on FOLDER")
    s.add_argument("folder", help="a `qadapter export` folder, or a residual Q-Adapter with --plugin")
    s.add_argument("--name", required=True, help="the model name clients ask for")
    s.add_argument("--base", help="base model folder (default: the adapter's own)")
    s.add_argument("--plugin", action="store_true", help="serve pi-tilde at any strength (vllm_xargs.strength)")
    s.add_argument("--also", action="append", default=[], metavar="NAME=DIR",
                   help="another export on the same base, served beside it (repeatable)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--print", action="store_true", help="print the command instead of running it")
    args, extra = p.parse_known_args(argv)
    also = []
    for item in args.also:
        if "=" not in item:
            p.error(f"--also {item!r}: expected NAME=DIR")
        also.append(tuple(item.split("=", 1)))
    cmd = vllm_command(args.folder, name=args.name, base=args.base, plugin=args.plugin, also=also, host=args.host,
                       port=args.port, dtype=args.dtype, extra=extra)
    if args.print:
        print(shlex.join(cmd))
        return 0
    if args.plugin:  # the plugin's strength tracker is a V1-runner logits processor (qadapter/vllm/model.py)
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
