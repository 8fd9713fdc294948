"""The playground's speed as a user sees it (issue #4): time to first token and streamed tokens/s through the server,
every panel on (coloured text and metrics every 0.1 s, plots every 2 s), on this machine's CPU.

    python benchmarks/app_cpu.py [--checkpoint DIR] [--new-tokens 64] [--runs 3]

Starts `mobiquant app` in a subprocess (default: the embedded model's cached --fast checkpoint, made on first run),
warms up with one generation, then streams each prompt at each budget in router mode through gradio_client. TTFT is
measured from submit to the first streamed token on the client; tokens/s over the tokens after the first.
Writes benchmarks/results/app_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Explain in three sentences why the sky is blue.", "List the planets of the solar system.",
           "Write a short Python function that checks whether a number is prime."]


def stream(client, prompt: str, budget: float, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    job = client.submit(prompt, budget, new_tokens, False, 0.8, 0.95, 0, "router", "all layers", "all",
                        api_name="/generate")
    seen, t_first, t_last = 0, None, None
    for out in job:  # one update per token
        n = out[0].count('class="mq-tok')
        if n > seen:
            now = time.perf_counter()
            t_first = t_first or now
            t_last, seen = now, n
    trace = job.outputs()[-1][4]
    return {"budget": budget, "tokens": len(trace), "ttft_s": t_first - t0,
            "tokens_per_s": (len(trace) - 1) / (t_last - t_first) if len(trace) > 1 and t_last > t_first else None,
            "bits": sum(r["bits"] for r in trace) / len(trace)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--budgets", default="3,4.5,6")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=7870)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "app_cpu.json"))
    args = p.parse_args()
    cmd = [sys.executable, "-m", "mobiquant", "app", "--port", str(args.port)]
    cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    server = subprocess.Popen(cmd, env=os.environ | {"GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        for _ in range(900):
            try:
                socket.create_connection(("127.0.0.1", args.port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("the app exited")
                time.sleep(1)
        from gradio_client import Client

        client = Client(f"http://127.0.0.1:{args.port}/", verbose=False)
        stream(client, "Hello!", 4.0, 8)  # warm-up: first-use caches
        rows = [stream(client, pr, float(b), args.new_tokens) for b in args.budgets.split(",") for pr in PROMPTS]
        client.close()
    finally:
        server.terminate()
        server.wait(30)
    print(f"{'budget':>6} {'tokens':>6} {'TTFT s':>7} {'tok/s':>6} {'bits':>5}")
    for r in rows:
        rate = r["tokens_per_s"] or 0
        print(f"{r['budget']:>6g} {r['tokens']:>6} {r['ttft_s']:>7.2f} {rate:>6.2f} {r['bits']:>5.2f}")
    rates = [r["tokens_per_s"] for r in rows if r["tokens_per_s"]]
    ttft = [r["ttft_s"] for r in rows]
    summary = {"ttft_s_median": statistics.median(ttft), "ttft_s_max": max(ttft),
               "tokens_per_s_median": statistics.median(rates), "tokens_per_s_min": min(rates)}
    print(json.dumps(summary))
    import torch

    Path(args.out).write_text(json.dumps({"meta": {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "checkpoint": args.checkpoint or "embedded model, cached --fast checkpoint",
        "new_tokens": args.new_tokens, "mode": "router",
        "panels": "all (text and metrics every 0.1 s, plots every 2 s: app/app.py)"},
        "rows": rows, "summary": summary}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
