"""A bench result as typed records: one dataclass per measured thing, composed into a versioned ``BenchResult``.

The JSON file is these records' fields as nested objects (``compress.typed_json``), read back strictly: an
unknown or mistyped field is an error naming its path, never a value silently dropped. No torch here: a
report reads results without loading a model.

Versions: 2 (written now) adds ``annotations``, facts the program that ran the bench adds (a benchmark's own
end-to-end minutes). Version 1 files (every result before it) are read by ``_upgrade_v1``: the top-level keys
version 1 did not define move into ``annotations``; fields added since (``bos_choice``, ``convention``) take
their defaults, which say what those runs did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from compress.data import TextRecord
from compress.errors import UserError
from compress.tasks.result import TaskRun
from compress.typed_json import RecordError, from_plain, to_plain

SCHEMA = "compress-workbench/bench"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)


# --- accuracy --------------------------------------------------------------------------------------


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int
    """Predicted tokens (seqlen - 1 per window)."""
    windows: int


@dataclass
class AgreementResult:
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    positions: int
    top_k: int
    base_rest_mass_mean: float
    """Mean base probability outside its top K: how far KL_K can be below the full KL."""


@dataclass
class TaskAccuracyResult:
    """A sequence classifier's accuracy on a labelled split."""
    task: str
    accuracy: float
    examples: int
    batch_size: int
    max_length: int
    data: TextRecord | None = None
    """Where the labelled rows came from."""


@dataclass
class AccuracyResult:
    perplexity: PerplexityResult | None = None
    agreement: AgreementResult | None = None
    """Against ``--base`` on the same windows."""
    scoring_tokens_per_s: float | None = None
    task: TaskAccuracyResult | None = None
    tasks: TaskRun | None = None
    """lm-evaluation-harness tasks (``--tasks``)."""


# --- speed -----------------------------------------------------------------------------------------


@dataclass
class PrefillResult:
    tokens_per_s: float
    batch: int
    seqlen: int
    seconds_median: float
    repeats: int


@dataclass
class DecodeResult:
    tokens_per_s: float
    """Generated tokens per second over the whole batch."""
    batch: int
    prompt_tokens: int
    new_tokens: int
    seconds_median: float
    repeats: int
    kv_cache_bytes: int
    """Bytes of the KV cache at the end of one run (prompt + new tokens, whole batch)."""


@dataclass
class ClassifyResult:
    examples_per_s: float
    tokens_per_s: float
    """Real (unpadded) tokens per second."""
    batch: int
    batches: int
    examples: int
    seconds_median: float
    repeats: int


@dataclass
class SpeedResult:
    prefill: PrefillResult
    decode: list[DecodeResult] = field(default_factory=list)
    classify: ClassifyResult | None = None
    memory_bandwidth_gbps: float | None = None
    """The machine's measured memory read bandwidth (language models only)."""
    memory_bandwidth_method: str | None = None
    achieved_gbps: float | None = None
    """Weight bytes x batch-1 decode tokens/s."""
    bandwidth_fraction: float | None = None
    warmup: int = 1
    repeats: int = 3
    statistic: str = "median"

    def decode_at(self, batch: int) -> DecodeResult | None:
        return next((d for d in self.decode if d.batch == batch), None)

    def largest_decode_batch(self) -> DecodeResult | None:
        """The largest batch above 1 that was timed, if any."""
        return max((d for d in self.decode if d.batch > 1), key=lambda d: d.batch, default=None)


@dataclass
class ServingLevel:
    """What ``clients`` concurrent clients got from a server (vLLM's), each sending its requests one after another."""
    clients: int
    requests: int
    """Requests completed (errors are not counted)."""
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: float | None
    """Mean time to the first streamed token."""
    itl_ms: float | None
    """Inter-token latency: per request, the time from its first token to its last over the tokens after the first
    (vLLM's TPOT), averaged over requests."""
    prompt_tokens: int
    output_tokens: int
    errors: list[str] = field(default_factory=list)


@dataclass
class ServingResult:
    """A model served by an engine's own server under concurrent streaming requests (``--backend vllm``)."""
    server: str
    """What served it, e.g. vLLM 0.32.0's OpenAI server, bfloat16, eager."""
    levels: list[ServingLevel]
    start_s: float
    """From launching the server to its first healthy answer (loading included)."""
    peak_rss_bytes: int | None
    """VmHWM summed over the server's processes."""

    def at(self, clients: int) -> ServingLevel | None:
        return next((level for level in self.levels if level.clients == clients), None)


# --- memory ----------------------------------------------------------------------------------------


@dataclass
class KVCacheSummary:
    bytes: int
    batch: int
    tokens: int
    bytes_per_token: float


@dataclass
class MemoryResult:
    artifact_bytes: int
    """The model's weight files on disk."""
    weight_bytes: int
    """Parameters and persistent buffers in memory, tied tensors once."""
    runtime_cache_bytes: int
    peak_bytes: int
    """The whole run's peak (scoring pass included)."""
    peak_speed_bytes: int | None
    """The peak over the timed prefill and decode only (None where speed was not measured)."""
    peak_kind: str
    rss_before_load_bytes: int | None = None
    kv_cache: KVCacheSummary | None = None

    @property
    def inference_peak_bytes(self) -> int:
        """What serving takes: the timed passes' peak where measured, else the whole run's."""
        return self.peak_speed_bytes or self.peak_bytes


# --- what was measured, and how ---------------------------------------------------------------------


@dataclass
class ModelInfo:
    reference: str
    """As the user named it: an alias, a folder or a file."""
    path: str
    origin: str
    model_type: str
    parameters: int
    dtype: str
    quantization: dict | None
    """The checkpoint's quantization config (method-specific keys), None for a dense model."""
    weight_bits: float
    transform: str | None
    kernel: str
    backend: str | None = None
    """compress.backends' name of what ran it; None in results made before backends were recorded."""
    notes: list[str] = field(default_factory=list)
    license: str | None = None
    """The terms of the weights it was made from, where known (compress.models.source_license)."""

    @property
    def method(self) -> str:
        """The quantization method, or the dtype of a dense model."""
        return (self.quantization or {}).get("method") or self.dtype


@dataclass
class BaseReferenceInfo:
    """The base model a result's KL and top-1 were measured against, and its cached reference."""
    reference: str
    path: str
    dtype: str
    top_k: int
    cache: str
    cached: bool | None = None


@dataclass
class Protocol:
    device: str
    dtype: str
    bos: bool = False
    """Each perplexity window starts with the BOS token."""
    bos_choice: str | None = None
    """--bos as asked (auto, yes, no); None in results made before the choice existed (they used no BOS)."""
    tokenization: str = ""
    eval: TextRecord | None = None
    seqlen: int | None = None
    stride: int | None = None
    windows: int | None = None
    text_tokens: int | None = None
    scored_tokens: int | None = None
    remainder: str | None = None
    batch_size: int | None = None
    scoring_threads: list[int] | None = None
    kl: str | None = None
    base_reference: BaseReferenceInfo | None = None

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def windows_key(self) -> tuple:
        """What makes two perplexities comparable: the same text, windows and BOS rule."""
        return (self.eval.sha256 if self.eval else None, self.seqlen, self.windows, bool(self.bos))


@dataclass
class SweepTag:
    """Which sweep variant a result is, and the fingerprint of its settings (a rerun reuses a matching one)."""
    name: str
    variant: dict
    fingerprint: str


@dataclass
class BenchResult:
    name: str
    model: ModelInfo
    base: BaseReferenceInfo | None
    memory: MemoryResult
    speed: SpeedResult | None
    accuracy: AccuracyResult
    protocol: Protocol
    environment: dict
    """Versions, threads and the CPU's instruction sets (compress.runtime.environment), device name."""
    timings_s: dict[str, float]
    command: list[str] = field(default_factory=list)
    created: str = ""
    sweep: SweepTag | None = None
    serving: ServingResult | None = None
    """Serving figures from an engine's own server (``--backend vllm``)."""
    annotations: dict = field(default_factory=dict)
    """Facts added by the program that ran the bench (a benchmark's end-to-end minutes)."""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    @property
    def isa(self) -> str | None:
        """The instruction-set label of the CPU it ran on; None on CUDA, whose kernels do not depend on it."""
        if self.protocol.on_cuda:
            return None
        return (self.environment.get("cpu") or {}).get("isa")

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "BenchResult":
        """A result of any readable version; raises RecordError on a field its version does not define."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise RecordError("not a compress bench result")
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise RecordError(f"schema version {version}; this version reads {', '.join(map(str, READABLE_VERSIONS))}")
        if version == 1:
            data = _upgrade_v1(data)
        return from_plain(cls, data, "result")

    @classmethod
    def from_json(cls, text: str) -> "BenchResult":
        return cls.from_dict(json.loads(text))

    def write(self, path: Path) -> Path:
        """Atomically: a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, path: Path) -> "BenchResult":
        """A result file; anything else (missing, not JSON, another schema, damaged) is a one-line UserError."""
        if not path.is_file():
            raise UserError(f"result file {path} does not exist: check the path")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path} is not a JSON file: pass results written by `compress bench --out`")
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise UserError(f"{path} is not a compress bench result: pass results written by `compress bench --out`")
        if data.get("schema_version") not in READABLE_VERSIONS:
            raise UserError(f"{path} has schema version {data.get('schema_version')}, this version reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))}: re-run `compress bench` on it")
        try:
            return cls.from_dict(data)
        except RecordError as exc:
            raise UserError(f"{path} is damaged ({exc}): re-run `compress bench` to write it again")


def kept_result(path: Path, fingerprint: str) -> Path | None:
    """``path`` if it holds a result tagged with ``fingerprint`` (made with the same settings by an earlier run of a
    sweep or recipe); a damaged, foreign or outdated file there is removed, so the row is measured again."""
    if not path.is_file():
        return None
    try:
        kept = BenchResult.read(path)
        if kept.sweep is not None and kept.sweep.fingerprint == fingerprint:
            return path
    except UserError:
        pass
    path.unlink()
    return None


_V1_FIELDS = {"schema", "schema_version", "name", "model", "base", "memory", "speed", "accuracy", "protocol",
              "environment", "timings_s", "command", "created", "sweep"}


def _upgrade_v1(data: dict) -> dict:
    """A version-1 result in version 2's layout: keys it did not define (a benchmark's additions) are annotations."""
    upgraded = {k: v for k, v in data.items() if k in _V1_FIELDS}
    upgraded["annotations"] = {k: v for k, v in data.items() if k not in _V1_FIELDS}
    upgraded["schema_version"] = SCHEMA_VERSION
    return upgraded
