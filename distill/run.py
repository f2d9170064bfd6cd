"""``distill run``: teacher (fine-tuned on the task when asked) -> student, stage by stage, -> a normal
Hugging Face folder with a manifest (distill.json) of teacher, mapping, losses, data and figures.

Checkpoints live beside the output in ``.<name>.checkpoints/`` until the student is complete; the
student folder itself appears only when everything is written (atomic rename).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from compress import __version__
from compress.errors import UserError
from compress.fingerprint import fingerprint, source_hash
from compress.interrupt import keep
from compress.output import atomic_folder, cache_entry, refuse_existing, refuse_output_of_source, refuse_source_overlap
from compress.models import (FLOAT_READER_FIX, ResolvedModel, cache_dir, is_causal_lm, quiet_transformers,
                             refuse_quantized_source, resolve)
from compress.shards import ShardReader
from compress.runtime import environment, resolve_device
from distill import checkpoint as ckpt
from distill.augment import augment_rows
from distill.capture import blocks_of, check_attention_support
from distill.config import DistillConfig, stage_losses, to_dict
from distill.data import TrainingData, batch_indices, classifier_data, lm_data
from distill.evaluate import make_evaluator
from distill.layer_map import resolve_layer_map
from distill.student import build_student, layer_count, load_student, student_source
from distill.train import (DistillLoss, Pair, distill_stage, encode, make_optimizer, make_projections,
                           run_loop, stage_settings)

SCHEMA = "compress-workbench/distill"
MANIFEST = "distill.json"


def _say(config: DistillConfig, message: str) -> None:
    if config.progress:
        print(message, file=sys.stderr)


def default_out(config: DistillConfig) -> Path:
    name = Path(config.teacher).name if Path(config.teacher).is_dir() else config.teacher
    layers = config.student.layers or "half"
    return Path("runs") / "distill" / f"{name}-student-l{layers}"


# --- teacher ----------------------------------------------------------------------------------------


def load_teacher(config: DistillConfig, device: torch.device):
    """(model, tokenizer, kind, resolved): classifier, causal LM, or bare encoder."""
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    resolved = resolve(config.teacher, config.trust_remote_code)
    refuse_quantized_source(config.teacher, ShardReader(resolved.path), FLOAT_READER_FIX)
    model_config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=config.trust_remote_code)
    classifier = any(a.endswith("ForSequenceClassification") for a in (model_config.architectures or []))
    if is_causal_lm(model_config):
        cls, kind, extra = AutoModelForCausalLM, "lm", {}
    elif classifier or config.num_labels:
        cls, kind = AutoModelForSequenceClassification, "classifier"
        extra = {"num_labels": config.num_labels} if config.num_labels else {}
    else:
        cls, kind, extra = AutoModel, "encoder", {}
    if kind == "classifier" and not classifier and not config.finetune:
        raise UserError(f"teacher {config.teacher} has no classifier head: add a 'finetune' section so the recipe "
                        "trains one on the task first")
    dtype = torch.float32
    with quiet_transformers():
        model = cls.from_pretrained(resolved.path, dtype=dtype, use_safetensors=True,
                                    trust_remote_code=config.trust_remote_code, **extra)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    blocks_of(model)  # an architecture without one stack of blocks cannot be mapped: fail before any work
    return model.to(device).eval(), tokenizer, kind, resolved


def finetune_teacher(config: DistillConfig, teacher: nn.Module, tokenizer, resolved: ResolvedModel,
                     device: torch.device) -> tuple[nn.Module, dict]:
    """Fine-tune the teacher on the labelled task, cached by (weights, recipe) so students reuse it."""
    from transformers import AutoModelForSequenceClassification

    recipe = asdict(config.finetune) | {"num_labels": config.num_labels, "seqlen": config.seqlen, "seed": config.seed}
    key = fingerprint({"weights": source_hash(resolved.path), "recipe": recipe})
    folder = cache_dir() / "teachers" / f"{Path(str(resolved.path)).name}-{key}"
    info_file = folder / "finetune.json"
    if info_file.is_file():
        _say(config, f"fine-tuned teacher found in {folder}")
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32,
                                                                       use_safetensors=True)
        return model.to(device).eval(), json.loads(info_file.read_text()) | {"path": str(folder)}
    data = classifier_data(config.finetune.data, config.finetune.max_examples, config.seed)
    settings = stage_settings(config.finetune, len(data), 0, 0, config.progress, "fine-tune teacher")
    pair = Pair(teacher, teacher, tokenizer, "classifier", [], nn.ModuleDict(), device)
    torch.manual_seed(config.seed)
    optimizer = make_optimizer([teacher], settings)

    def step_loss(step: int) -> dict[str, torch.Tensor]:
        batch = encode(pair, data, batch_indices(step, len(data), config.finetune.batch_size, config.seed, -1),
                       config.seqlen)
        labels = batch.pop("labels")
        return {"total": nn.functional.cross_entropy(teacher(**batch).logits, labels)}

    result = run_loop(settings, 0, optimizer, [teacher], step_loss)
    info = {"data": data.describe(), "recipe": recipe, "steps": result.steps, "seconds": round(result.seconds, 1),
            "device": str(device)}
    with cache_entry(folder) as tmp, quiet_transformers():
        teacher.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "finetune.json").write_text(json.dumps(info, indent=1))
    return teacher.eval(), info | {"path": str(folder)}


def fine_tuned_teacher(config: DistillConfig, out: Path) -> Path:
    """The teacher of ``config`` fine-tuned on its task (its ``finetune`` section), written to ``out`` as an
    ordinary classifier folder with the fine-tune's record (a recipe's ``finetune`` stage)."""
    device = resolve_device(config.device)
    teacher, tokenizer, kind, resolved = load_teacher(config, device)
    if kind != "classifier":
        raise UserError(f"{config.teacher} is a {kind}, not an encoder a classifier head can be trained on: "
                        "fine-tune stages are for classifiers")
    refuse_source_overlap(out, resolved.path)
    model, info = finetune_teacher(config, teacher, tokenizer, resolved, device)
    with atomic_folder(out, force=False, source=resolved.path) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "finetune.json").write_text(json.dumps(info | {"teacher": config.teacher}, indent=1))
    return out


# --- the run -----------------------------------------------------------------------------------------


def _training_data(config: DistillConfig, kind: str, source: str, tokenizer) -> TrainingData:
    if kind == "classifier":
        data = classifier_data(source, config.max_examples, config.seed)
        if config.augment is not None:
            rows = augment_rows(data.rows, config.augment, progress=config.progress)
            data = TrainingData(data.record, rows=rows, augmented_from=len(data.rows))
        return data
    return lm_data(source, tokenizer, config.seqlen, config.max_examples, config.seed)


def _check_pair(config: DistillConfig, teacher: nn.Module, kind: str) -> None:
    attention = any("attention" in stage_losses(config, s) for s in config.stages)
    if attention:
        check_attention_support(teacher)
    heads_t = teacher.config.num_attention_heads
    if attention and config.student.attention_heads and config.student.attention_heads != heads_t:
        raise UserError(f"the attention loss compares heads one to one: the student has "
                        f"{config.student.attention_heads} heads, the teacher {heads_t}; keep the teacher's head count "
                        "or set losses.attention to 0")
    for i, stage in enumerate(config.stages):
        if kind == "encoder" and "prediction" in stage_losses(config, stage):
            raise UserError(f"stage {i} trains the prediction loss but the teacher {config.teacher} has no output "
                            "head: use intermediate stages only, or a classifier / causal-LM teacher")


def run(config: DistillConfig, resume: bool = False, force: bool = False) -> dict:
    started = time.perf_counter()
    device = resolve_device(config.device)
    out = Path(config.out) if config.out else default_out(config)
    refuse_output_of_source(out, config.teacher)
    refuse_existing(out, force)
    checkpoints = out.parent / f".{out.name}.checkpoints"
    if checkpoints.exists() and not resume:
        raise UserError(f"an interrupted run left checkpoints in {checkpoints}: pass --resume to continue it, or "
                        "remove that folder to start over")

    teacher, tokenizer, kind, resolved = load_teacher(config, device)
    refuse_source_overlap(out, resolved.path)
    teacher_layers = layer_count(teacher.config)
    source = student_source(config.student.from_model) if config.student.from_model else None
    if source is not None:
        student_layers = source.layers
        spec = source.teacher_layers if config.layer_map == "uniform" and source.teacher_layers else config.layer_map
    else:
        student_layers, spec = config.student.layers or max(1, teacher_layers // 2), config.layer_map
    layer_map = resolve_layer_map(spec, student_layers, teacher_layers)
    _check_pair(config, teacher, kind)
    evaluator = make_evaluator(kind, config.eval, tokenizer, config.eval_windows, config.eval_seqlen, config.seqlen)
    stage_data = [_training_data(config, kind, stage.data or config.data, tokenizer) for stage in config.stages]

    finetune_info = None
    if config.finetune is not None:
        teacher, finetune_info = finetune_teacher(config, teacher, tokenizer, resolved, device)
    for param in teacher.parameters():
        param.requires_grad_(False)
    figures: dict = {}
    if evaluator:
        figures["teacher"] = evaluator(teacher, tokenizer, device)
        _say(config, f"teacher {evaluator.metric}: {figures['teacher']:.4f}")
    if source is not None:
        student, init = load_student(source, teacher)
    else:
        student, init = build_student(teacher, config.student, layer_map)
    teacher.to(getattr(torch, config.teacher_dtype))
    student.to(device)
    projections = make_projections(student.config.hidden_size, teacher.config.hidden_size,
                                   ["embedding", "hidden"]).to(device)
    pair = Pair(teacher, student, tokenizer, kind, layer_map, projections, device)
    if evaluator:
        figures["student_before"] = evaluator(student, tokenizer, device)
        _say(config, f"student ({student_layers} layers, before distillation) {evaluator.metric}: "
                     f"{figures['student_before']:.4f}")

    settings_fp = fingerprint({k: v for k, v in to_dict(config).items()
                               if k not in ("progress", "checkpoint_every", "out")})
    state = ckpt.read_checkpoint(checkpoints, settings_fp) if resume else None
    history: list[dict] = state["history"] if state else []
    if state:
        ckpt.restore_weights(state, student, projections)
    first_stage = state["stage"] if state else 0
    try:
        for index, stage in enumerate(config.stages):
            if index < first_stage:
                continue
            losses = stage_losses(config, stage)
            data = stage_data[index]
            settings = stage_settings(stage, len(data), config.eval_every, config.checkpoint_every, config.progress,
                                      f"stage {index + 1}/{len(config.stages)} {stage.kind}")
            hard = config.hard_label_weight if stage.kind == "prediction" else 0.0
            loss = DistillLoss(pair, losses, config.temperature, hard, config.hidden_normalize)
            torch.manual_seed(config.seed + index)
            optimizer = make_optimizer([student, projections], settings)
            start_step = 0
            if state and state["stage"] == index and state["step"] > 0:
                # Inside a stage: the optimizer's moments and the RNG continue; at a stage boundary the
                # fresh optimizer and seed above are what an uninterrupted run uses too.
                ckpt.restore_training(state, optimizer)
                start_step = state["step"]
                _say(config, f"resuming stage {index + 1} at step {start_step} of {settings.steps}")

            def save(step: int, index=index, optimizer=optimizer) -> None:
                ckpt.save_checkpoint(checkpoints, stage=index, step=step, student=student, extra=projections,
                                     optimizer=optimizer, history=history, fingerprint=settings_fp)

            def evaluate(step: int, index=index) -> None:
                value = evaluator(student, tokenizer, device)
                history.append({"event": "eval", "stage": index, "step": step, evaluator.metric: value})
                _say(config, f"  stage {index + 1} step {step}: {evaluator.metric} {value:.4f}")

            result = distill_stage(pair, data, loss, settings, config.seqlen, stage.batch_size, config.seed, index,
                                   start_step, optimizer, evaluate if evaluator else None, save)
            report = {"event": "stage", "stage": index, "kind": stage.kind, "losses": losses, "steps": settings.steps,
                      "resumed_at": start_step, "seconds": round(result.seconds, 1),
                      "final_losses": {k: round(v, 6) for k, v in result.last_losses.items()}, "data": data.describe()}
            if evaluator:
                report[evaluator.metric] = evaluator(student, tokenizer, device)
                _say(config, f"stage {index + 1} ({stage.kind}) done: {evaluator.metric} {report[evaluator.metric]:.4f}")
            history.append(report)
            state = None
            next_optimizer = make_optimizer([student, projections], settings)
            ckpt.save_checkpoint(checkpoints, stage=index + 1, step=0, student=student, extra=projections,
                                 optimizer=next_optimizer, history=history, fingerprint=settings_fp)
    except KeyboardInterrupt:
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            keep(f"checkpoints are kept in {checkpoints}: run the same command with --resume to continue from "
                 "the last one")
        raise

    if evaluator:
        # The last stage ended with an evaluation of the final weights (in this run or before a resume).
        last = [h for h in history if h.get("event") == "stage"][-1]
        figures["student_after"] = last[evaluator.metric]
        if evaluator.higher_is_better:
            figures["retention"] = figures["student_after"] / figures["teacher"]
    manifest = _manifest(config, resolved, finetune_info, teacher, student, init, layer_map, kind, evaluator,
                         figures, history, device, time.perf_counter() - started)
    with atomic_folder(out, force, source=resolved.path) as tmp, quiet_transformers():
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(checkpoints, ignore_errors=True)
    manifest["out"] = str(out)
    return manifest


def _manifest(config, resolved, finetune_info, teacher, student, init, layer_map, kind, evaluator, figures, history,
              device, seconds) -> dict:
    def shape(model) -> dict:
        c = model.config
        return {"architecture": type(model).__name__, "layers": layer_count(c), "hidden_size": c.hidden_size,
                "intermediate_size": getattr(c, "intermediate_size", None),
                "attention_heads": c.num_attention_heads, "parameters": sum(p.numel() for p in model.parameters())}

    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "distill"
    program = "distill" if program in ("cli.py", "__main__.py") else program
    return {
        "schema": SCHEMA, "schema_version": 1, "tool_version": __version__, "kind": kind,
        "teacher": {"reference": config.teacher, "path": str(resolved.path), "origin": resolved.origin,
                    "finetune": finetune_info, **shape(teacher)},
        "student": shape(student) | {"init": (f"from_model:{config.student.from_model}" if config.student.from_model
                                              else config.student.init), "init_detail": init.to_dict()},
        "layer_map": {"student_to_teacher": {str(m): g for m, g in enumerate(layer_map, start=1)}, "embedding": "0 -> 0",
                      "spec": config.layer_map},
        "losses": config.losses, "temperature": config.temperature,
        "eval": None if evaluator is None else {"metric": evaluator.metric, "source": evaluator.source,
                                                "record": evaluator.record},
        "figures": figures, "history": history, "config": to_dict(config), "device": str(device),
        "seconds": round(seconds, 1), "command": [program, *sys.argv[1:]], "environment": environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
