"""Slow: distillation on the real offline models, a few steps each (CI runs them)."""

import json
from pathlib import Path

import pytest

from distill.config import load_config
from distill.run import run

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).parents[2] / "configs"


def test_minilm_sst2_recipe_runs_end_to_end(tmp_path, data_dir, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    config = load_config(CONFIGS / "tinybert.yaml", [
        "finetune.max_steps=40", "finetune.max_examples=1280", "max_examples=320", "stages.0.max_steps=6",
        "stages.1.max_steps=6", "checkpoint_every=0", "progress=false", f"out={tmp_path / 'student'}"])
    manifest = run(config)
    assert manifest["layer_map"]["student_to_teacher"] == {"1": 2, "2": 4, "3": 6}
    assert manifest["student"]["init_detail"]["sliced_tensors"] == 3 * 3  # MLP in/out weights and the in bias
    assert manifest["figures"]["teacher"] > 0.6  # 40 steps of fine-tuning already beat chance on SST-2 dev
    student = AutoModelForSequenceClassification.from_pretrained(manifest["out"])
    assert student.config.num_hidden_layers == 3 and student.config.intermediate_size == 1152
    saved = json.loads((Path(manifest["out"]) / "distill.json").read_text())
    assert saved["teacher"]["finetune"]["data"]["source"] == "sst2"


def test_smollm2_intermediate_distillation_lowers_perplexity(tmp_path, data_dir):
    config = load_config(CONFIGS / "distill" / "smollm2-l10.yaml", [
        "max_examples=48", "eval_windows=2", "stages.0.max_steps=6", "stages.1.max_steps=2", "checkpoint_every=0",
        "progress=false", f"out={tmp_path / 'student'}"])
    manifest = run(config)
    figures = manifest["figures"]
    # The 10 copied layers start far from a language model; 8 steps bring the perplexity to 8.7e-5 of where it
    # started (reports/test_bounds.json).
    assert figures["student_after"] < 1.2e-4 * figures["student_before"]
    assert manifest["student"]["layers"] == 10 and manifest["teacher"]["layers"] == 30
