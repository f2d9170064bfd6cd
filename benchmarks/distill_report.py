"""Teacher vs distilled student, measured side by side: `compress bench` on both (each in its own
process, so each peak is its own) plus, for classifiers, an interleaved timing of the whole task at
batch 32 (teacher, student, teacher, student, ...) so that a change of machine load hits both.

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data \
        python benchmarks/distill_report.py runs/distill/minilm-l6-sst2-student-l3 --out reports/distill-sst2

reads the student's distill.json for its teacher, and writes the report folder (README.md,
report.html, results/) with the manifest's figures and the side-by-side ratio in its notes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import bench_subprocess, report_with_extras, timed_main  # noqa: E402


def interleaved_classify(teacher: str, student: str, task: str, batch: int, rounds: int) -> dict:
    from compress.bench import throughput
    from compress.data import load_labelled
    from compress.models import load_model

    rows, _ = load_labelled(task)
    models = {}
    for name, path in (("teacher", teacher), ("student", student)):
        model, tokenizer = load_model(Path(path))
        models[name] = model
    batches = throughput.classification_batches(tokenizer, [t for t, _ in rows], batch)
    seconds: dict[str, list[float]] = {"teacher": [], "student": []}
    for name, model in models.items():  # warm-up
        throughput.classify(model, batches, torch.device("cpu"), warmup=0, repeats=1)
    for _ in range(rounds):
        for name, model in models.items():
            result = throughput.classify(model, batches, torch.device("cpu"), warmup=0, repeats=1)
            seconds[name].append(result.seconds_median)
    examples = len(rows)
    ratios = [t / s for t, s in zip(seconds["teacher"], seconds["student"])]
    return {"task": task, "batch": batch, "examples": examples, "rounds": rounds,
            "teacher_examples_per_s": examples / statistics.median(seconds["teacher"]),
            "student_examples_per_s": examples / statistics.median(seconds["student"]),
            "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--windows", type=int, default=40, help="language models: WikiText-2 windows of 512")
    args = parser.parse_args()

    manifest = json.loads((args.student / "distill.json").read_text())
    teacher = (manifest["teacher"].get("finetune") or {}).get("path") or manifest["teacher"]["path"]
    kind = manifest["kind"]
    results = Path(tempfile.mkdtemp(prefix="distill-report-"))
    notes = []
    figures = manifest["figures"]
    if kind == "classifier":
        task = manifest["eval"]["source"]
        bench_subprocess(teacher, results / "teacher.json", ["--name", "teacher (fine-tuned)", "--task", task])
        bench_subprocess(str(args.student), results / "student.json", ["--name", "student (distilled)", "--task", task])
        side = interleaved_classify(teacher, str(args.student), task, 32, args.rounds)
        (results / "side_by_side.json").write_text(json.dumps(side, indent=1))
        notes.append(f"Side by side, interleaved over {side['rounds']} rounds of the whole {task} "
                     f"({side['examples']} examples, batch {side['batch']}, {side['threads']} threads): teacher "
                     f"{side['teacher_examples_per_s']:.1f} examples/s, student {side['student_examples_per_s']:.1f} "
                     f"examples/s; student speed-up median {side['speedup_median']:.2f}x "
                     f"(min {side['speedup_min']:.2f}x, max {side['speedup_max']:.2f}x).")
        notes.append(f"Accuracy retention (student / teacher on {task}): {figures['retention']:.4f} "
                     f"({figures['student_after']:.4f} / {figures['teacher']:.4f}); the student before "
                     f"distillation (mapped teacher layers, no training) scored {figures['student_before']:.4f}.")
    else:
        window_args = ["--windows", str(args.windows), "--seqlen", "512"]
        bench_subprocess(teacher, results / "teacher.json", ["--name", "teacher", *window_args])
        bench_subprocess(str(args.student), results / "student.json",
               ["--name", "student (distilled)", "--base", teacher, *window_args])
        notes.append(f"WikiText-2 perplexity of the student before distillation (teacher layers "
                     f"{', '.join(map(str, manifest['layer_map']['student_to_teacher'].values()))} copied, no training): "
                     f"{figures['student_before']:.2f}; after: {figures['student_after']:.2f}; teacher: "
                     f"{figures['teacher']:.2f} (distill.json, same windows).")
    stages = [h for h in manifest["history"] if h.get("event") == "stage"]
    for h in stages:
        metric = "accuracy" if "accuracy" in h else "perplexity"
        notes.append(f"Stage {h['stage'] + 1} ({h['kind']}: {', '.join(h['losses'])}): {h['steps']} steps, "
                     f"{h['seconds']:.0f} s on {manifest['device']}, data {h['data']['source']}:{h['data']['split']} "
                     f"({h['data']['examples']} examples); {metric} after it {h.get(metric, float('nan')):.4f}.")
    ft = manifest["teacher"].get("finetune")
    if ft:
        notes.append(f"Teacher fine-tuning: {ft['steps']} steps, {ft['seconds']:.0f} s on {ft['device']}, data "
                     f"{ft['data']['source']}:{ft['data']['split']} ({ft['data']['examples']} examples).")
    notes.append(f"Student: {manifest['student']['layers']} layers (teacher {manifest['teacher']['layers']}), "
                 f"{manifest['student']['parameters']:,} parameters (teacher {manifest['teacher']['parameters']:,}); "
                 f"layer map {manifest['layer_map']['student_to_teacher']}.")
    (results / "distill.json").write_text(json.dumps(manifest, indent=1))

    config = manifest["config"]
    reproduce = [f"distill run {' '.join(manifest['command'][2:]) if len(manifest['command']) > 2 else ''}".strip(),
                 f"python benchmarks/distill_report.py {args.student} --out {args.out}"]
    bench_files = [results / "teacher.json", results / "student.json"]
    report_with_extras(bench_files, args.out, f"Distillation: {config['teacher']} -> {manifest['student']['layers']}"
                       "-layer student", reproduce, notes, results, ("side_by_side.json", "distill.json"))
    return 0


if __name__ == "__main__":
    timed_main(main)
