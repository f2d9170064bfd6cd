"""One plain training loop for every stage (and for fine-tuning the teacher): AdamW with linear
warm-up and decay, a progress bar with ETA, periodic evaluation and checkpoints.

The step's batch comes from ``distill.data.batch_indices`` and the learning rate from the step
number, so resuming at step k replays exactly what an uninterrupted run does from step k.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from distill.capture import Captured, capture, check_scores
from distill.data import TrainingData, batch_indices, total_steps
from distill.losses import attention_mse, hidden_mse, prediction_kl


@dataclass
class Pair:
    """The two models of a distillation and what connects them."""
    teacher: nn.Module
    student: nn.Module
    tokenizer: object
    kind: str
    """'classifier', 'lm' or 'encoder' (a bare encoder: intermediate losses only)."""
    layer_map: list[int]
    projections: nn.ModuleDict
    device: torch.device


@dataclass
class LoopSettings:
    steps: int
    lr: float
    warmup: float
    weight_decay: float
    eval_every: int = 0
    checkpoint_every: int = 0
    progress: bool = True
    desc: str = "training"


@dataclass
class LoopResult:
    steps: int
    seconds: float
    last_losses: dict[str, float] = field(default_factory=dict)


def make_projections(student_width: int, teacher_width: int, names: list[str]) -> nn.ModuleDict:
    """TinyBERT's W_e and W_h: learned maps from the student's width to the teacher's, only when
    the widths differ."""
    if student_width == teacher_width:
        return nn.ModuleDict()
    return nn.ModuleDict({name: nn.Linear(student_width, teacher_width, bias=False) for name in names})


def encode(pair: Pair, data: TrainingData, indices: list[int], seqlen: int) -> dict:
    if data.rows is not None:
        texts = [data.rows[i][0] for i in indices]
        enc = pair.tokenizer(texts, padding=True, truncation=True, max_length=seqlen, return_tensors="pt")
        batch = {k: v.to(pair.device) for k, v in enc.items()}
        batch["labels"] = torch.tensor([data.rows[i][1] for i in indices], device=pair.device)
        return batch
    return {"input_ids": data.windows[indices].to(pair.device)}


def _forward(model: nn.Module, batch: dict, logits: bool):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # Intermediate losses need no head: the base model skips an LM head's vocabulary-wide matmul.
    target = model if logits else model.base_model
    if "use_cache" in inspect.signature(target.forward).parameters:
        inputs["use_cache"] = False  # training never decodes; a KV cache would only cost memory
    output = target(**inputs)
    return output.logits if logits else output


class DistillLoss:
    """Weighted TinyBERT losses of one stage, computed from one teacher and one student forward."""

    def __init__(self, pair: Pair, losses: dict[str, float], temperature: float, hard_label_weight: float = 0.0,
                 hidden_normalize: bool = False):
        self.pair, self.losses, self.temperature = pair, losses, temperature
        self.hidden_normalize = hidden_normalize
        self.hard_label_weight = hard_label_weight
        self.hidden = bool({"embedding", "hidden"} & set(losses))
        self.attention = "attention" in losses
        self.logits = "prediction" in losses or hard_label_weight > 0

    def __call__(self, batch: dict, teacher_seen: Captured, student_seen: Captured) -> dict[str, torch.Tensor]:
        pair = self.pair
        with torch.no_grad():
            teacher_logits = _forward(pair.teacher, batch, self.logits)
        student_logits = _forward(pair.student, batch, self.logits)
        mask = batch.get("attention_mask")
        parts: dict[str, torch.Tensor] = {}
        student_layers = list(range(1, len(pair.layer_map) + 1))
        if "embedding" in self.losses:
            parts["embedding"] = hidden_mse(student_seen.embedding, teacher_seen.embedding, mask,
                                            pair.projections["embedding"] if pair.projections else None,
                                            self.hidden_normalize)
        if "hidden" in self.losses:
            projection = pair.projections["hidden"] if pair.projections else None
            parts["hidden"] = sum(hidden_mse(student_seen.hidden[m], teacher_seen.hidden[g], mask, projection,
                                             self.hidden_normalize)
                                  for m, g in zip(student_layers, pair.layer_map))
        if self.attention:
            check_scores(teacher_seen, pair.layer_map, pair.teacher)
            check_scores(student_seen, student_layers, pair.student)
            total = 0.0
            for m, g in zip(student_layers, pair.layer_map):
                scores_t, usable = teacher_seen.scores[g]
                if mask is not None:  # padded queries are not compared either
                    usable = usable & mask.bool()[:, None, :, None]
                total = total + attention_mse(student_seen.scores[m][0], scores_t, usable)
            parts["attention"] = total
        if "prediction" in self.losses:
            token_mask = mask if pair.kind == "lm" else None
            parts["prediction"] = prediction_kl(student_logits, teacher_logits, self.temperature, token_mask)
        if self.hard_label_weight > 0 and "labels" in batch:
            parts["hard_label"] = nn.functional.cross_entropy(student_logits.float(), batch["labels"])
        weights = dict(self.losses, hard_label=self.hard_label_weight)
        parts["total"] = sum(weights[name] * value for name, value in parts.items())
        return parts


def learning_rate(step: int, settings: LoopSettings) -> float:
    """Linear warm-up over the first ``warmup`` fraction of steps, then linear decay to zero."""
    warm = int(settings.warmup * settings.steps)
    if step < warm:
        return settings.lr * (step + 1) / warm
    return settings.lr * max(0.0, (settings.steps - step) / max(1, settings.steps - warm))


def make_optimizer(modules: list[nn.Module], settings: LoopSettings) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad:
                (no_decay if param.dim() < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr)


def run_loop(settings: LoopSettings, start_step: int, optimizer: torch.optim.Optimizer, trained: list[nn.Module],
             step_loss: Callable[[int], dict[str, torch.Tensor]],
             evaluate: Callable[[int], None] | None = None,
             checkpoint: Callable[[int], None] | None = None) -> LoopResult:
    """Steps ``start_step .. settings.steps - 1``; ``step_loss(step)`` returns the loss parts with 'total'."""
    for module in trained:
        module.train()
    started = time.perf_counter()
    bar = tqdm(total=settings.steps, initial=start_step, desc=settings.desc, unit="step",
               disable=not settings.progress, dynamic_ncols=True)
    running: dict[str, float] = {}
    try:
        for step in range(start_step, settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings)
            parts = step_loss(step)
            optimizer.zero_grad(set_to_none=True)
            parts["total"].backward()
            optimizer.step()
            for name, value in parts.items():
                value = float(value.detach())
                running[name] = value if name not in running else 0.9 * running[name] + 0.1 * value
            bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()}, refresh=False)
            bar.update(1)
            done = step + 1
            if evaluate and settings.eval_every and done % settings.eval_every == 0 and done < settings.steps:
                evaluate(done)
                for module in trained:
                    module.train()
            if checkpoint and settings.checkpoint_every and done % settings.checkpoint_every == 0 \
                    and done < settings.steps:
                checkpoint(done)
    finally:
        bar.close()
    for module in trained:
        module.eval()
    return LoopResult(settings.steps - start_step, time.perf_counter() - started, running)


def distill_stage(pair: Pair, data: TrainingData, loss: DistillLoss, settings: LoopSettings, seqlen: int,
                  batch_size: int, seed: int, stage_index: int, start_step: int, optimizer, evaluate=None,
                  checkpoint=None) -> LoopResult:
    attention_student = list(range(1, len(pair.layer_map) + 1)) if loss.attention else []
    attention_teacher = pair.layer_map if loss.attention else []
    with capture(pair.teacher, loss.hidden, attention_teacher) as teacher_seen, \
            capture(pair.student, loss.hidden, attention_student) as student_seen:
        def step_loss(step: int) -> dict[str, torch.Tensor]:
            indices = batch_indices(step, len(data), batch_size, seed, stage_index)
            return loss(encode(pair, data, indices, seqlen), teacher_seen, student_seen)

        return run_loop(settings, start_step, optimizer, [pair.student, pair.projections], step_loss, evaluate,
                        checkpoint)


def stage_settings(stage, examples: int, eval_every: int, checkpoint_every: int, progress: bool,
                   desc: str) -> LoopSettings:
    steps = total_steps(examples, stage.batch_size, stage.epochs, stage.max_steps)
    return LoopSettings(steps, stage.lr, stage.warmup, stage.weight_decay, eval_every, checkpoint_every, progress,
                        desc)
