"""The settings every model-changing command shares (quantize, prune): calibration, device, output and
module selection. Free of torch, so the command line builds and checks a request before any heavy import."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from compress.errors import UserError
from compress.limits import DEFAULT_ACTIVATION_BUDGET
from compress.registry import config_fields
from compress.select import ModuleSelection


@dataclass
class RunSettings:
    model: str = "smollm2-135m"
    """Alias (see `compress models`) or a local model folder."""
    method: str = ""
    calib: str = "auto"
    """Calibration text: NAME[:SPLIT] (wikitext2, c4, sst2), a file, or auto."""
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    """Output folder; default out/<model>-<method>-<tag>."""
    force: bool = False
    trust_remote_code: bool = False
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    progress: bool = True
    in_memory: bool = False
    """Load the whole model before changing it (the older path; the default streams one block at a time)."""
    resume: bool = False
    """Continue an interrupted run of the same command from its last finished block."""
    checkpoint_every: float = 60.0
    """Seconds between resumable checkpoints (0: after every block)."""
    max_shard_bytes: int = 2 << 30
    """Largest output weight file; bigger outputs are split into indexed shards."""
    expert_min_share: float = 0.005
    """Mixture of experts: an expert that fewer than this share of the calibration tokens reach (at least
    one) is not calibrated on them; it is quantized with RTN (pruned by magnitude) instead, and the
    manifest and the output say which."""
    activation_budget: int = DEFAULT_ACTIVATION_BUDGET
    """Bytes of calibration activations carried between blocks in memory; beyond it they go to files
    in the output's partial folder."""

    @property
    def selection(self) -> ModuleSelection:
        return ModuleSelection(list(self.include), list(self.exclude))

    def output_folder(self, tag: str) -> Path:
        if self.out:
            return Path(self.out)
        stem = Path(self.model).name if Path(self.model).is_dir() else self.model
        return Path("out") / f"{stem}-{self.method}-{tag}"

    def say(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr)

    def result_settings(self) -> dict:
        """The settings that decide the output's bytes (for resuming only the same run)."""
        ignored = {"out", "force", "progress", "resume", "checkpoint_every", "device", "in_memory",
                   "activation_budget"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}


def method_option_values(request, options: tuple[str, ...], method, hint) -> dict:
    """The method-specific options a request gives (None = not given: the method's config holds the default),
    as config values. One given to a method whose config has no such field is an error, never dropped: the one
    rule of quantize and prune. ``hint(option)`` says which methods take it."""
    names = config_fields(method)
    values = {}
    for option in options:
        value = getattr(request, option)
        if value is None:
            continue
        if option not in names:
            raise UserError(f"--{option.replace('_', '-')} does not apply to {method.name}: {hint(option)}")
        values[option] = value
    return values
