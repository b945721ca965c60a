"""``qadapter serve`` under concurrent load: 16 streaming clients against one client alone.

Saves a Q-Adapter on the embedded default model (SmolLM2-135M-Instruct; random non-zero lora_B,
seeded, so both branches really differ), starts ``qadapter serve`` on it in a subprocess on
127.0.0.1 (torch's default threads, i.e. every core, as ``qadapter serve`` runs by default;
``--threads 1`` for a shared machine), then runs two phases with streaming chat requests (greedy,
``max_tokens`` new tokens at most, usage included):

  1. one client alone, ``--single-requests`` requests one after the other;
  2. ``--clients`` concurrent clients, each sending ``--requests`` requests one after the other.

Both phases are bounded in count and time (``--time-limit`` seconds each: no new request starts
after it). For each phase it prints the p50 / p95 request latency, the p50 / p95 time to the first
token, the aggregate completion tokens per second (all completion tokens / the phase's wall time)
and the error count. The last line is

    RESULT serve_concurrency_speedup=<aggregate tok/s, concurrent / alone> serve_p50_latency_s=...
           serve_p95_latency_s=... serve_p50_ttft_s=... serve_p95_ttft_s=... serve_errors=<count>

(latencies of the concurrent phase; ``--compare-dynamic`` adds the same concurrent phase against a
server with ``--no-continuous-batching``: ``dynamic_speedup``, ``dynamic_p50_ttft_s``, ...).
Usage: python bench/serve.py [--clients 16] [--max-tokens 64] [--compare-dynamic]

``--against vllm`` runs instead the same concurrent phase (``--clients`` streaming clients x
``--requests`` requests, greedy, ``--max-tokens``) against vLLM's OpenAI server serving the exact
export of the adapter (``qadapter export``; vLLM's venv, ``bash scripts/install.sh --vllm``) and
against ``qadapter serve`` on the adapter at strength 1 and at strength 2 (both branches), one after
the other on the same machine, and prints for each the aggregate tokens/s, time to first token,
p95 latency and errors, and where each server's processes spent their CPU time (utime + stime of
each process, from /proc, over the phase), then

    RESULT vllm_tok_s=... qadapter_s1_tok_s=... qadapter_s2_tok_s=... s1_over_vllm=<ratio>
           s2_over_vllm=<ratio> vllm_p95_latency_s=... ... errors=<count>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in simple terms how a rainbow forms.",
    "Give me three tips for staying focused while studying for an exam.",
    "What are the main differences between a cat and a dog as pets?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I make a cup of green tea?",
    "Why is the sky blue during the day but red at sunset?",
    "Name three planets and one fact about each.",
    "How does a bicycle stay upright?",
    "What should I pack for a weekend hiking trip?",
    "Describe the taste of an orange to someone who has never had one.",
    "What is a good way to learn a new language?",
    "Tell me a fun fact about octopuses.",
    "How do vaccines work?",
    "Suggest a name for a small bakery.",
]


def save_adapter(folder: Path, seed: int = 0) -> Path:
    import torch

    from qadapter.embedded import DEFAULT_MODEL, resolve_model_path
    from qadapter.modeling import QAdapter
    from qadapter.settings import QAdapterSettings
    from qadapter.backbone import lora_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("embedded")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    qa = QAdapter.create(base, tok, QAdapterSettings(base_model_name_or_path=DEFAULT_MODEL),
                         lora_config(lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in qa.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return qa.save_pretrained(folder / "bench-adapter")


def start_server(adapter: Path, threads: int, args, *extra: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "qadapter.cli", "serve", "--adapter", f"bench={adapter}", "--host", "127.0.0.1",
           "--port", "0", *(["--threads", str(threads)] if threads else []), "--max-batch", str(args.clients), "--log-level", "warning",
           "--max-tokens-cap", str(args.max_tokens), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"qadapter serve exited with {proc.returncode}")
        if " on http://" in line:
            return proc, line.split(" on ")[1].split("/v1")[0]
    proc.kill()
    raise RuntimeError("qadapter serve did not start in 600 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def one_request(http, url, prompt, max_tokens, extra=None) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    start = time.perf_counter()
    first = None
    tokens = None
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content") and first is None:
                        first = time.perf_counter() - start
    except Exception as exc:  # a failed request is counted, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    if tokens is None:
        return {"error": "no usage chunk"}
    return {"latency": time.perf_counter() - start, "ttft": first if first is not None else float("nan"),
            "tokens": tokens}


async def phase(url, clients: int, requests: int, max_tokens: int, time_limit: float, extra=None) -> dict:
    import httpx

    deadline = time.perf_counter() + time_limit
    results: list[dict] = []

    async def client(i, http):
        for j in range(requests):
            if time.perf_counter() > deadline:
                return
            results.append(await one_request(http, url, PROMPTS[(i + j * clients) % len(PROMPTS)], max_tokens, extra))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit + 600), limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {"wall": wall, "requests": len(results), "ok": len(ok), "errors": errors, "tokens": tokens,
            "tok_s": tokens / wall if wall > 0 else 0.0,
            "latencies": [r["latency"] for r in ok], "ttfts": [r["ttft"] for r in ok]}


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def report(name, res):
    lat, ttft = res["latencies"], res["ttfts"]
    print(f"{name:<12} {res['ok']}/{res['requests']} requests ok, {res['tokens']} completion tokens in "
          f"{res['wall']:.1f} s = {res['tok_s']:.1f} tok/s aggregate | latency p50 {pct(lat, .5):.2f} s, "
          f"p95 {pct(lat, .95):.2f} s | first token p50 {pct(ttft, .5):.2f} s, p95 {pct(ttft, .95):.2f} s | "
          f"errors {len(res['errors'])}", flush=True)
    for e in res["errors"][:5]:
        print(f"    error: {e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=2, help="requests per concurrent client (2)")
    p.add_argument("--single-requests", type=int, default=4, help="requests of the lone client (4)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the server (0: torch's default, every core, as `qadapter serve` runs)")
    p.add_argument("--time-limit", type=float, default=300.0, help="no new request after this many seconds, per phase")
    p.add_argument("--compare-dynamic", action="store_true",
                   help="also run the concurrent phase against a server with --no-continuous-batching (the "
                        "baseline of continuous batching, same run)")
    p.add_argument("--against", choices=("vllm",),
                   help="vllm: the concurrent phase against vLLM serving the export and qadapter serve at strength 1 and 2")
    args = p.parse_args(argv)
    for name in ("clients", "requests", "single_requests", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads < 0:
        p.error("--threads must be >= 0 (0: torch's default)")
    import torch

    torch.set_num_threads(1)
    if args.against == "vllm":
        return against_vllm(args)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_adapter(Path(tmp))
        proc, url = start_server(adapter, args.threads, args)
        try:
            print(f"server {url} (embedded SmolLM2-135M-Instruct + a random LoRA adapter, {args.threads or 'default'} thread(s)); "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
            asyncio.run(phase(url, 1, 1, 8, args.time_limit))  # warm-up
            alone = asyncio.run(phase(url, 1, args.single_requests, args.max_tokens, args.time_limit))
            report("1 client", alone)
            many = asyncio.run(phase(url, args.clients, args.requests, args.max_tokens, args.time_limit))
            report(f"{args.clients} clients", many)
        finally:
            stop_server(proc)
        dynamic = None
        if args.compare_dynamic:
            proc, url = start_server(adapter, args.threads, args, "--no-continuous-batching")
            try:
                asyncio.run(phase(url, 1, 1, 8, args.time_limit))  # warm-up
                dynamic = asyncio.run(phase(url, args.clients, args.requests, args.max_tokens, args.time_limit))
                report(f"{args.clients} clients, --no-continuous-batching", dynamic)
            finally:
                stop_server(proc)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    speedup = many["tok_s"] / alone["tok_s"] if alone["tok_s"] > 0 else float("nan")
    errors = len(alone["errors"]) + len(many["errors"]) + (len(dynamic["errors"]) if dynamic else 0)
    line = (f"RESULT serve_concurrency_speedup={speedup:.2f} serve_p50_latency_s={pct(many['latencies'], .5):.2f} "
            f"serve_p95_latency_s={pct(many['latencies'], .95):.2f} serve_p50_ttft_s={pct(many['ttfts'], .5):.2f} "
            f"serve_p95_ttft_s={pct(many['ttfts'], .95):.2f} serve_errors={errors}")
    if dynamic:
        line += (f" dynamic_speedup={dynamic['tok_s'] / alone['tok_s']:.2f} "
                 f"dynamic_p50_ttft_s={pct(dynamic['ttfts'], .5):.2f} dynamic_p95_ttft_s={pct(dynamic['ttfts'], .95):.2f}")
    print(line)
    return 0 if errors == 0 else 1


def cpu_seconds(root_pid: int) -> dict[str, float]:
    """utime + stime (s) of ``root_pid`` and its descendants, by process name (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1: stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            procs[int(entry.name)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / ticks)
    keep, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, _) in procs.items():
            if ppid == parent and pid not in keep:
                keep.add(pid)
                frontier.append(pid)
    out: dict[str, float] = {}
    for pid in keep:
        if pid in procs:
            _, name, secs = procs[pid]
            out[name] = out.get(name, 0.0) + secs
    return out


def timed_phase(proc, url, args, extra=None):
    """The concurrent phase, with the CPU seconds each of the server's processes spent in it."""
    asyncio.run(phase(url, 1, 1, 8, args.time_limit, extra))  # warm-up
    before = cpu_seconds(proc.pid)
    res = asyncio.run(phase(url, args.clients, args.requests, args.max_tokens, args.time_limit, extra))
    after = cpu_seconds(proc.pid)
    res["cpu"] = {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0) > 0.05}
    return res


def report_cpu(name, res):
    total = sum(res["cpu"].values())
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(res["cpu"].items(), key=lambda kv: -kv[1]))
    print(f"{name:<12} server CPU in the phase: {total:.1f} s over {res['wall']:.1f} s wall "
          f"({total / max(res['tokens'], 1) * 1000:.0f} ms per completion token): {parts}", flush=True)


def against_vllm(args) -> int:
    """``--against vllm`` (module docstring)."""
    from qadapter.export import export
    from qadapter.vllm.launch import start as start_vllm, stop as stop_vllm

    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_adapter(Path(tmp))
        export(adapter, Path(tmp) / "export", log=lambda *a: None)
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.clients} clients x {args.requests} "
              f"streaming chat requests x <= {args.max_tokens} greedy tokens; qadapter serve --threads "
              f"{args.threads or 'default'}", flush=True)
        started = time.perf_counter()
        proc, url = start_vllm(Path(tmp) / "export", "bench", log=Path(tmp) / "vllm.log")
        print(f"vLLM (the exact export through --enable-lora) up in {time.perf_counter() - started:.0f} s", flush=True)
        try:
            vllm = timed_phase(proc, url, args)
        finally:
            stop_vllm(proc)
        report("vLLM", vllm)
        report_cpu("vLLM", vllm)
        proc, url = start_server(adapter, args.threads, args)
        try:
            s1 = timed_phase(proc, url, args, {"strength": 1.0})
            report("qadapter s=1", s1)
            report_cpu("qadapter s=1", s1)
            s2 = timed_phase(proc, url, args, {"strength": 2.0})
            report("qadapter s=2", s2)
            report_cpu("qadapter s=2", s2)
        finally:
            stop_server(proc)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    errors = sum(len(r["errors"]) for r in (vllm, s1, s2))

    def ratio(a, b):
        return a / b if b > 0 else float("nan")

    line = (f"RESULT vllm_tok_s={vllm['tok_s']:.1f} qadapter_s1_tok_s={s1['tok_s']:.1f} qadapter_s2_tok_s={s2['tok_s']:.1f} "
            f"s1_over_vllm={ratio(s1['tok_s'], vllm['tok_s']):.2f} s2_over_vllm={ratio(s2['tok_s'], vllm['tok_s']):.2f}")
    for name, res in (("vllm", vllm), ("qadapter_s1", s1), ("qadapter_s2", s2)):
        line += (f" {name}_p50_ttft_s={pct(res['ttfts'], .5):.2f} {name}_p95_ttft_s={pct(res['ttfts'], .95):.2f}"
                 f" {name}_p95_latency_s={pct(res['latencies'], .95):.2f}")
    print(line + f" errors={errors}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
