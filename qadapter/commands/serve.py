"""``qadapter serve``: an OpenAI-compatible server for trained Q-Adapters, with a web playground at ``/``."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "serve Q-Adapters over an OpenAI-compatible HTTP API, with a web playground"


def _adapter(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter takes NAME=PATH, got {value!r}")
    return name, path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help=HELP, description=HELP + ". The request's 'model' picks the base "
                                   "model or an adapter; 'strength' (or 'alpha_0' / 'alpha_tilde') are per-request "
                                   "extra fields.")
    parser.add_argument("--adapter", action="append", type=_adapter, required=True, metavar="NAME=PATH",
                        help="serve the Q-Adapter saved in PATH as model NAME (repeatable; all on one base model)")
    parser.add_argument("--base-model", default=None, metavar="PATH",
                        help="base model folder or hub id (default: the one the first adapter was trained on)")
    parser.add_argument("--base-name", default=None, help="the base model's name in the API (default: its folder name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--max-batch", type=int, default=16, help="at most this many prompts decoded together (16)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="at most this many prompts waiting; more get 429 with Retry-After (64)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long the first waiting request waits for others to join its batch (10 ms)")
    parser.add_argument("--no-continuous-batching", dest="continuous", action="store_false",
                        help="waiting requests start only when the running batch has ended (default: they join it "
                             "between two tokens)")
    parser.add_argument("--max-tokens-cap", type=int, default=512, help="the largest max_tokens a request may ask (512)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every route but /health and the playground's "
                             "static files (default: the QADAPTER_API_KEY environment variable; unset: no key; "
                             "prefer the variable: a flag shows in the process list)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    for name, value, lo in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                            ("--max-tokens-cap", args.max_tokens_cap, 1), ("--port", args.port, 0)):
        if value < lo:
            print(f"qadapter serve: {name} must be >= {lo}, got {value}", file=sys.stderr)
            return 2
    if args.batch_wait_ms < 0:
        print(f"qadapter serve: --batch-wait-ms must be >= 0, got {args.batch_wait_ms}", file=sys.stderr)
        return 2
    api_key = args.api_key if args.api_key is not None else os.environ.get("QADAPTER_API_KEY") or None
    if api_key is not None and not api_key.strip():
        print("qadapter serve: --api-key must not be empty", file=sys.stderr)
        return 2
    names = [n for n, _ in args.adapter]
    if len(set(names)) != len(names):
        print(f"qadapter serve: adapter names must be distinct, got {names}", file=sys.stderr)
        return 2
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("qadapter serve needs FastAPI, uvicorn and prometheus_client: pip install 'qadapter[serve]'",
              file=sys.stderr)
        return 2
    import torch

    from ..server import ServedModels
    from ..server.app import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        served = ServedModels.load(dict(args.adapter), base_model=args.base_model, base_name=args.base_name,
                                   device=device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"qadapter serve: {exc}", file=sys.stderr)
        return 2

    def ready(url):
        print(f"qadapter serve: {', '.join(served.names())} on {url}/v1 (playground: {url}/"
              + ("; the API needs the key: the playground asks for it" if api_key else "") + ")", flush=True)

    return serve(served, host=args.host, port=args.port, log_level=args.log_level, on_ready=ready,
                 max_batch=args.max_batch, max_queue=args.max_queue, batch_wait=args.batch_wait_ms / 1000,
                 max_tokens_cap=args.max_tokens_cap, continuous=args.continuous, api_key=api_key)
