"""Where a sweep's variants run: one after another on this machine (``local``, the default), or as Ray tasks on
a cluster (``ray``, the [ray] extra). Either way the driver writes each result as it arrives, atomically and tagged
with its fingerprint, so what finished survives a lost worker or a killed driver and the next run reuses it.

A Ray task is one variant, quantized (unless its checkpoint exists) and benchmarked. It declares what it needs
(``ray_cpus`` CPUs, and its OMP_NUM_THREADS; ``ray_gpus`` GPUs, by default 1 on a CUDA sweep; ``ray_memory_gb``
for the scheduler) and is retried ``ray_retries`` times when its worker dies. Its result comes back to the
driver through Ray, so the results need no shared disk; checkpoints are written under the sweep's runs folder as
the worker sees it (share it between nodes to reuse them across runs).
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator

from compress.errors import UserError
from compress.interrupt import keep

if TYPE_CHECKING:
    from compress.sweep import SweepConfig, Variant


@dataclass
class ExecutorSettings:
    """Where work runs, and what each Ray task asks for (a sweep's and a recipe's YAML keys)."""
    executor: str = "local"
    """local (one after another here) or ray (one Ray task per variant or stage; the [ray] extra)."""
    address: str | None = None
    """ray: the cluster's address (HOST:PORT, ray://HOST:PORT or auto); none starts a local instance."""
    ray_cpus: int = 2
    """ray: CPUs each task requests, and its OMP_NUM_THREADS."""
    ray_gpus: float | None = None
    """ray: GPUs each task requests (default 1 where the device is CUDA, else 0)."""
    ray_memory_gb: float | None = None
    """ray: memory each task declares to the scheduler (default none)."""
    ray_retries: int = 2
    """ray: times a task is run again when its worker dies."""


@dataclass
class BatchSettings(ExecutorSettings):
    """What a batch of runs on one model shares (a sweep's matrix, a recipe's chain): the model, where its outputs
    and report go, the device, and where the work executes."""
    model: str = "smollm2-135m"
    name: str | None = None
    """The batch's name (default: the config file's stem): runs/<name>/ and reports/<name>/."""
    runs: str = "runs"
    """Outputs (checkpoints, stages, bench results) go to <runs>/<name>/."""
    report: str | None = None
    """Report folder (default reports/<name>)."""
    title: str | None = None
    notes: list[str] = field(default_factory=list)
    """Lines for the report's Notes section (what a reader should know about this batch)."""
    device: str = "cpu"
    progress: bool = True


def task_resources(settings: ExecutorSettings, device: str) -> dict:
    """What one Ray task declares: CPUs (and its OMP threads), GPUs, memory, retries, the driver's COMPRESS_*."""
    gpus = settings.ray_gpus if settings.ray_gpus is not None else (1 if device.startswith("cuda") else 0)
    needs = {"num_cpus": settings.ray_cpus, "num_gpus": gpus, "max_retries": settings.ray_retries,
             "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(settings.ray_cpus), **_forwarded_env()}}}
    if settings.ray_memory_gb:
        needs["memory"] = int(settings.ray_memory_gb * 2**30)
    return needs


@contextmanager
def ray_session(address: str | None, show_logs: bool) -> Iterator:
    """Ray, connected to ``address`` (or a local instance of this machine's CPUs), shut down afterwards."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'compress-workbench[ray]'") from None
    import logging

    if address and address != "auto":
        check_answers(address)
    options = dict(include_dashboard=False, log_to_driver=show_logs, logging_level=logging.ERROR)
    try:
        if address:
            ray.init(address=address, **options)
        else:  # a local instance, gone when the work ends
            ray.init(num_cpus=os.cpu_count(), **options)
    except ConnectionError as exc:
        raise UserError(f"no Ray cluster answers at {address}: start one (`ray start --head`) or check --address "
                        f"({str(exc).splitlines()[0][:120]})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def ray_result(ray, ref, what: str, retries: int):
    """A finished task's value; its user error as ours (one line), a worker that kept dying as one line too."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.as_instanceof_cause()
        if isinstance(cause, UserError):
            raise UserError(f"{what}: {cause}") from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
        raise UserError(f"{what}: its worker died {retries + 1} times ({type(exc).__name__}): lower the load or "
                        "raise ray_retries") from None


def gather(ray, pending: dict, what: Callable[[object], str], retries: int,
           on_done: Callable[[object, object], None]) -> None:
    """Wait for every task of ``pending`` (ref -> its key), handing each key and value to ``on_done`` as the task
    finishes, in whatever order they do: a finished result is kept before the slowest is done."""
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(done)
        on_done(key, ray_result(ray, done, what(key), retries))


class Executor:
    name: ClassVar[str]

    def __init__(self, address: str | None = None):
        self.address = address

    def run(self, cfg: "SweepConfig", variants: list["Variant"], root: Path) -> list[Path]:
        """Every variant's result file, in the variants' order."""
        raise NotImplementedError  # pragma: no cover


class LocalExecutor(Executor):
    """Every checkpoint first, every benchmark after: timings are then never taken while a quantization of the same
    sweep competes for the cores, and a failing quantizer stops the sweep before any time goes into benchmarks."""
    name = "local"

    def run(self, cfg, variants, root):
        from compress.sweep import _say, quantized_folder, quantized_path, run_variant

        started = time.perf_counter()
        quantized = [v for v in variants if v.kind in ("ours", "peer-quantizer", "gguf")]
        paths: list[Path] = []
        try:
            for number, variant in enumerate(quantized, 1):
                _say(cfg, f"[quantize {number}/{len(quantized)}] {variant.name}  (elapsed "
                          f"{(time.perf_counter() - started) / 60:.1f} min)")
                quantized_folder(cfg, variant, root)
            for number, variant in enumerate(variants, 1):
                elapsed = time.perf_counter() - started
                _say(cfg, f"[bench {number}/{len(variants)}] {variant.name}  (elapsed {elapsed / 60:.1f} min)")
                paths.append(run_variant(cfg, variant, root))
        except KeyboardInterrupt:
            made = sum(1 for v in quantized if quantized_path(cfg, v, root).exists())
            keep(f"{made} of {len(quantized)} checkpoints and {len(paths)} of {len(variants)} benchmark results are "
                 f"kept in {root}: run the same command again to continue from there")
            raise
        return paths


def variant_task(cfg: "SweepConfig", variant: "Variant", root: str) -> dict:
    """One variant on a Ray worker: quantized if needed, benchmarked; its result as a plain dict."""
    import tempfile

    from compress.sweep import measure_variant

    with tempfile.TemporaryDirectory(prefix="compress-variant-") as tmp:
        return measure_variant(cfg, variant, Path(root), Path(tmp) / f"{variant.name}.json").to_dict()


class RayExecutor(Executor):
    name = "ray"

    def run(self, cfg, variants, root):
        from compress.bench.result import BenchResult
        from compress.sweep import _say, kept_result, result_path

        paths: dict[str, Path] = {}
        for variant in variants:
            kept = kept_result(cfg, variant, root)
            if kept is not None:
                paths[variant.name] = kept
        todo = [v for v in variants if v.name not in paths]
        if not todo:
            return [paths[v.name] for v in variants]
        started = time.perf_counter()
        with ray_session(self.address, cfg.progress) as ray:
            try:
                needs = task_resources(cfg, cfg.device)
                task = ray.remote(variant_task).options(**needs)
                pending = {task.remote(cfg, variant, str(root.resolve())): variant for variant in todo}
                gpus = f", {needs['num_gpus']} GPU" if needs["num_gpus"] else ""
                _say(cfg, f"{len(pending)} variants sent to Ray ({cfg.ray_cpus} CPUs{gpus} each)")

                def finished(variant, data: dict) -> None:
                    paths[variant.name] = BenchResult.from_dict(data).write(result_path(root, variant))
                    _say(cfg, f"[done {len(paths)}/{len(variants)}] {variant.name}  (elapsed "
                              f"{(time.perf_counter() - started) / 60:.1f} min)")

                gather(ray, pending, lambda variant: f"variant {variant.name}", cfg.ray_retries, finished)
            except KeyboardInterrupt:
                keep(f"{len(paths)} of {len(variants)} benchmark results are kept in {root / 'results'}: run the "
                     "same command again to continue from there")
                raise
        return [paths[v.name] for v in variants]


def _forwarded_env() -> dict:
    """The driver's COMPRESS_* settings (data and cache folders), so a worker finds what the driver would."""
    return {k: v for k, v in os.environ.items() if k.startswith("COMPRESS_")}


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of a Ray address; a malformed one is a one-line error."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://head:10001), or auto")
    return host, int(port)


def check_answers(address: str, timeout: float = 5.0) -> None:
    """A one-line error at once when nothing listens at ``address`` (Ray itself retries for a minute)."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one with "
                        "`ray start --head`, or check --address") from None


EXECUTORS: dict[str, type[Executor]] = {"local": LocalExecutor, "ray": RayExecutor}


def make_executor(name: str, address: str | None) -> Executor:
    if name not in EXECUTORS:
        raise UserError(f"unknown executor '{name}': choose {' or '.join(EXECUTORS)}")
    if address and name != "ray":
        raise UserError("--address names a Ray cluster: add --executor ray")
    if address and address != "auto":
        parse_address(address)  # before any work; whether it answers is asked when the cluster is needed
    return EXECUTORS[name](address)
