"""Shared test set-up: deliberate thread count, offline hubs, tiny models of every architecture."""

from __future__ import annotations

import os
import subprocess
import sys

# Before torch is imported: two cores, and oversubscription makes GPTQ many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as compress sets it on import: the same bits at any thread count

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from compress.tiny import TINY_CONFIGS  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, so a test's unseeded draws (token ids, weights) are
    the same on every run and machine: a failure repeats, a pass is not luck."""
    import random

    import numpy

    random.seed(0)
    numpy.random.seed(0)
    torch.manual_seed(0)


# --- under CI=true a skip is a failure, unless it depends on the machine by design ---------------------------

SKIPS_CI_ALLOWS = ("no CUDA GPU", "a GPU is present")
"""The only skips CI accepts: CI has no GPU, so the CUDA tests skip there. Every other skip (an extra that failed
to build, a missing qemu, the shared data not found) would hide a whole feature behind a green run."""


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _refused_under_ci(report) -> str | None:
    """The reason of a skip CI does not accept (None where it does, or outside CI)."""
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return None
    reason = _skip_reason(report).removeprefix("Skipped: ")
    return None if any(allowed in reason for allowed in SKIPS_CI_ALLOWS) else reason


def _ci_message(reason: str) -> str:
    return (f"CI=true: this may not be skipped here ({reason}); install what it names (.ci/test does) or fix why "
            "it is missing")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    reason = _refused_under_ci(report)
    if reason is not None:
        report.outcome, report.longrepr = "failed", _ci_message(reason)


_SKIPPED_FILES: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level importorskip skips a whole file at collection: the rest of the suite still runs, and the
    run fails at its end naming the file and why."""
    report = (yield).get_result()
    reason = _refused_under_ci(report)
    if reason is not None:
        _SKIPPED_FILES.append(f"{collector.nodeid}: {_ci_message(reason)}")


def pytest_sessionfinish(session, exitstatus):
    if _SKIPPED_FILES and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _SKIPPED_FILES:
        terminalreporter.section("files skipped whole under CI=true (the run fails)")
        for line in _SKIPPED_FILES:
            terminalreporter.line(line)


ALL_ARCHS = list(TINY_CONFIGS)
CAUSAL_ARCHS = [a for a in ALL_ARCHS if a != "bert"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared offline data (set by .ci/run); tests that need it skip loudly without it."""
    value = os.environ.get("COMPRESS_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip(f"the shared data folder is missing: COMPRESS_DATA_DIR is {value or 'not set'!r} (.ci/test sets it "
                    "to ../shared/data)")
    return Path(value)


def calibration_ids(n: int, length: int, vocab: int = 512, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A small calibration text (fast to tokenize), independent of the shared data."""
    from compress.tiny import _TRAINING_TEXT

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(f"{i}. {_TRAINING_TEXT}" for i in range(20)))
    return path


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Two output folders hold the same files with the same bytes (the manifests' timings aside)."""
    from compress.checkpoint import MANIFEST_NAME

    names = lambda folder: sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_NAME)  # noqa: E731
    assert names(a) == names(b)
    for name in names(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


def model_output(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden state of an encoder."""
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory):
    from compress.tiny import _TRAINING_TEXT

    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: {_TRAINING_TEXT}" for i in range(6)))
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    from compress.models import load_model, resolve

    return load_model(resolve("tiny-llama").path)


@pytest.fixture(scope="module")
def smollm2_windows(data_dir):
    """The real SmolLM2-135M and 4 WikiText-2 test windows of 256 tokens (for the slow tests)."""
    from compress.data import eval_windows, load_text, tokenize
    from compress.models import load_model, resolve

    model, tokenizer = load_model(resolve("smollm2-135m").path)
    text, record = load_text("wikitext2:test")
    windows, _ = eval_windows(tokenize(tokenizer, text), record, 256, max_windows=4)
    return model, windows


def naive_perplexity(model, windows: list[torch.Tensor]) -> float:
    """exp(mean NLL) of every predicted token, each window alone through transformers' own loss: the figure a
    scorer's batching, caching and bookkeeping must reproduce."""
    import math

    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            loss = model(window[None], labels=window[None]).loss.double().item()
            nll += loss * (window.numel() - 1)
            count += window.numel() - 1
    return math.exp(nll / count)


LAYERS = 5
"""Blocks of ``deep_llama``: enough for a run to stop in the middle."""


@pytest.fixture(scope="session")
def deep_llama(tmp_path_factory) -> Path:
    """A tiny Llama with 5 blocks, so a run can stop between blocks. Shared: tests read it, never change it (the
    fault suite checks that every file of it is unchanged)."""
    from transformers import AutoModelForCausalLM

    from compress.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.num_hidden_layers = LAYERS
    folder = tmp_path_factory.mktemp("deep") / "llama5"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray instance of 2 CPUs, as a user starts one (`ray start --head`), stopped afterwards."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).parent / "ray"
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    # Token authentication is Ray's default for clusters users start; this throwaway one is local only, and the
    # drivers below (this process and its children) are told so through RAY_AUTH_MODE.
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    started = subprocess.run([str(ray_bin), "start", "--head", "--num-cpus", "2", "--port", str(port),
                              "--include-dashboard", "false", "--temp-dir", str(temp), "--disable-usage-stats"],
                             capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    yield f"127.0.0.1:{port}"
    subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env, timeout=120)
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved
