"""`distill` command line: ``distill run CONFIG.yaml [--set key=value ...] [--resume]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compress.cli import command_parser, dispatch


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML recipe (see configs/tinybert.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted for sections and list items (e.g. student.layers=2, "
                        "stages.0.max_steps=10); repeatable")
    p.add_argument("--out", help="student folder (overrides the config's out)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides the config's device")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--force", action="store_true", help="replace an earlier student folder of ours (a folder holding anything else is refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def _run(args: argparse.Namespace) -> int:
    from distill.config import load_config
    from distill.run import run

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    if args.device:
        overrides.append(f"device={args.device}")
    if args.quiet:
        overrides.append("progress=false")
    config = load_config(args.config, overrides)
    manifest = run(config, resume=args.resume, force=args.force)
    figures = manifest["figures"]
    print(f"student written to {manifest['out']}")
    if figures:
        print(json.dumps(figures, indent=1))
    return 0


COMMANDS = {"run": ("distil a teacher into a smaller student, layer by layer (TinyBERT)", _run_args, _run)}


def build_parser() -> argparse.ArgumentParser:
    return command_parser("distill", "TinyBERT-style layerwise distillation", COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv, "no student was written")


if __name__ == "__main__":
    sys.exit(main())
