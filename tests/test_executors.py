"""Sweep executors: the same sweep on a local Ray instance (2 CPUs, started here) gives the local executor's
results; a worker killed mid-variant is retried and the sweep completes; a cluster that does not answer is one
line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compress.bench.result import BenchResult
from compress.cli import main
from compress.errors import UserError
from compress.executors import check_answers, make_executor
from tests.conftest import assert_same_checkpoint, free_port


def test_an_unknown_executor_or_a_stray_address_is_refused():
    with pytest.raises(UserError, match="unknown executor 'slurm'"):
        make_executor("slurm", None)
    with pytest.raises(UserError, match="add --executor ray"):
        make_executor("local", "10.0.0.1:6379")
    with pytest.raises(UserError, match="is not HOST:PORT"):
        check_answers("nowhere")
    with pytest.raises(UserError, match="is not HOST:PORT"):
        make_executor("ray", "nowhere")  # said before any work
    assert make_executor("ray", "auto").name == make_executor("ray", "10.0.0.5:6379").name == "ray"


def test_a_cluster_that_does_not_answer_is_one_line_at_once(tmp_path, calib_file, eval_file, capsys):
    pytest.importorskip("ray")
    config = sweep_yaml(tmp_path, calib_file, eval_file)
    port = free_port()  # nothing listens there
    started = time.perf_counter()
    assert main(["sweep", str(config), "--executor", "ray", "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: no Ray cluster answers at 127.0.0.1:{port}") and len(err.splitlines()) == 1
    assert time.perf_counter() - started < 60  # not Ray's own minute of retries (and nothing quantized first)
    assert not (tmp_path / "runs" / "t" / "models").exists()


def sweep_yaml(tmp_path, calib_file, eval_file, **changes) -> Path:
    values = dict(model="tiny-llama", name="t", runs=str(tmp_path / "runs"), report=str(tmp_path / "report"),
                  device="cpu", dtypes=["float32"], methods=["rtn", "gptq"], bits=[4], group_sizes=[32], peers=[],
                  calib=str(calib_file), nsamples=4, calib_seqlen=32, eval=str(eval_file), seqlen=32, windows=3,
                  decode_tokens=2, decode_batches=[1], repeats=1, progress=False, ray_cpus=1)
    values.update(changes)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def perplexities(root: Path) -> dict[str, float]:
    return {p.stem: BenchResult.read(p).accuracy.perplexity.perplexity for p in sorted((root / "results").glob("*.json"))}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, calib_file, eval_file):
    tmp_path = tmp_path_factory.mktemp("local")
    assert main(["sweep", str(sweep_yaml(tmp_path, calib_file, eval_file))]) == 0
    return tmp_path / "runs" / "t"


@pytest.mark.slow
def test_ray_gives_the_local_executors_results(ray_cluster, local_sweep, tmp_path, calib_file, eval_file):
    assert main(["sweep", str(sweep_yaml(tmp_path, calib_file, eval_file)), "--executor", "ray",
                 "--address", ray_cluster]) == 0
    root = tmp_path / "runs" / "t"
    assert perplexities(root) == perplexities(local_sweep)
    for model in (local_sweep / "models").iterdir():
        assert_same_checkpoint(root / "models" / model.name, model)
    assert (tmp_path / "report" / "README.md").is_file()
    # A rerun reuses every result and sends nothing to the cluster (it is not even reached).
    before = {p.name: p.stat().st_mtime_ns for p in (root / "results").iterdir()}
    assert main(["sweep", str(sweep_yaml(tmp_path, calib_file, eval_file)), "--executor", "ray",
                 "--address", "127.0.0.1:1"]) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (root / "results").iterdir()}


def _variant_task_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::variant_task"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_a_worker_killed_mid_variant_is_retried_and_the_sweep_completes(ray_cluster, local_sweep, tmp_path,
                                                                        calib_file, eval_file):
    config = sweep_yaml(tmp_path, calib_file, eval_file, ray_cpus=2)  # one variant at a time
    driver = subprocess.Popen([sys.executable, "-m", "compress.cli", "sweep", str(config), "--executor", "ray",
                               "--address", ray_cluster], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"OMP_NUM_THREADS": "1"})
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and driver.poll() is None and time.monotonic() < deadline:
        pids = _variant_task_pids()
        if pids:
            time.sleep(1.0)  # mid-variant: the worker has started on it
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.1)
    out, err = driver.communicate(timeout=600)
    assert killed is not None, "no variant task was seen running"
    assert driver.returncode == 0, err[-3000:]
    root = tmp_path / "runs" / "t"
    assert perplexities(root) == perplexities(local_sweep)
    assert (tmp_path / "report" / "README.md").is_file()
