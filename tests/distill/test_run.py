"""`distill run` end to end on tiny teachers: students that reload, exact resume, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill import checkpoint as ckpt
from distill.cli import main
from distill.config import config_from_dict
from distill.run import run

BASE = {
    "teacher": "tiny-llama", "data": None, "seqlen": 16, "max_examples": 24, "eval": None, "eval_windows": 2,
    "eval_seqlen": 32, "checkpoint_every": 2, "progress": False,
    "student": {"layers": 1},
    "stages": [{"kind": "intermediate", "max_steps": 5, "batch_size": 4, "lr": 1e-3},
               {"kind": "prediction", "max_steps": 3, "batch_size": 4, "lr": 1e-3}],
}


def _config(tmp_path, text_file, **changes):
    values = json.loads(json.dumps(BASE)) | {"data": str(text_file), "eval": str(text_file),
                                             "out": str(tmp_path / "student")}
    for key, value in changes.items():
        values[key] = value
    return config_from_dict(values)


def test_lm_student_improves_and_reloads(tmp_path, calib_file):
    from transformers import AutoModelForCausalLM

    manifest = run(_config(tmp_path, calib_file))
    out = Path(manifest["out"])
    saved = json.loads((out / "distill.json").read_text())
    assert saved["layer_map"]["student_to_teacher"] == {"1": 2}
    assert saved["student"]["layers"] == 1 and saved["teacher"]["layers"] == 2
    assert [h["kind"] for h in saved["history"] if h["event"] == "stage"] == ["intermediate", "prediction"]
    figures = saved["figures"]
    # Perplexity falls with distillation: to 0.9988x in these 8 steps (reports/test_bounds.json).
    assert figures["student_after"] < 0.9992 * figures["student_before"]
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 1
    assert not (tmp_path / ".student.checkpoints").exists()


def test_layer_map_from_config_is_used(tmp_path, calib_file):
    manifest = run(_config(tmp_path, calib_file, layer_map=[1], stages=[BASE["stages"][0]]))
    assert manifest["layer_map"]["student_to_teacher"] == {"1": 1}


def test_resume_gives_the_uninterrupted_result(tmp_path, calib_file, monkeypatch):
    straight = run(_config(tmp_path / "a", calib_file))
    expected = load_file(str(Path(straight["out"]) / "model.safetensors"))

    saves = []
    original = ckpt.save_checkpoint

    def interrupt_after_second_save(*args, **kwargs):
        original(*args, **kwargs)
        saves.append(kwargs["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", interrupt_after_second_save)
    config = _config(tmp_path / "b", calib_file)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.setattr(ckpt, "save_checkpoint", original)
    assert not (tmp_path / "b" / "student").exists()  # nothing that looks complete
    state = json.loads((tmp_path / "b" / ".student.checkpoints" / "state.json").read_text())
    assert (state["stage"], state["step"]) == (0, 4)
    resumed = run(config, resume=True)
    got = load_file(str(Path(resumed["out"]) / "model.safetensors"))
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert any(h.get("resumed_at") == 4 for h in resumed["history"])


def test_classifier_task_distillation_with_finetuned_teacher(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    rows = "text\tlabel\n" + "".join(f"{w} movie number {i}\t{int(w == 'good')}\n"
                                     for i in range(40) for w in ("good", "bad"))
    train = tmp_path / "train.tsv"
    train.write_text(rows)
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    config = config_from_dict({
        "teacher": "tiny-bert", "num_labels": 2, "data": str(train), "eval": str(train), "seqlen": 16,
        "finetune": {"data": str(train), "epochs": 3, "lr": 1e-3, "batch_size": 16},
        "student": {"layers": 1, "intermediate_size": 64}, "progress": False, "out": str(tmp_path / "student"),
        "stages": [{"kind": "intermediate", "epochs": 1, "batch_size": 16, "lr": 1e-3},
                   {"kind": "prediction", "epochs": 2, "batch_size": 16, "lr": 1e-3}],
    })
    manifest = run(config)
    figures = manifest["figures"]
    assert figures["teacher"] > 0.9  # the fine-tuning is part of the recipe and learns the toy task
    assert manifest["teacher"]["finetune"]["steps"] == 15
    assert figures["retention"] == pytest.approx(figures["student_after"] / figures["teacher"])
    assert 0 < figures["student_after"] <= 1
    student = AutoModelForSequenceClassification.from_pretrained(manifest["out"])
    assert student.config.num_hidden_layers == 1 and student.config.intermediate_size == 64
    # A second run reuses the cached fine-tuned teacher.
    again = run(config, force=True)
    assert again["teacher"]["finetune"]["path"] == manifest["teacher"]["finetune"]["path"]
    assert again["figures"]["teacher"] == figures["teacher"]


def test_narrow_student_learns_a_projection(tmp_path, calib_file):
    from distill import run as run_module

    seen = {}
    original = run_module.make_projections

    def spy(*args, **kwargs):
        seen["module"] = original(*args, **kwargs)
        seen["initial"] = {k: v.clone() for k, v in seen["module"].state_dict().items()}
        return seen["module"]

    run_module.make_projections = spy
    try:
        run(_config(tmp_path, calib_file, student={"layers": 1, "hidden_size": 32},
                    losses={"embedding": 1.0, "hidden": 1.0, "attention": 0.0, "prediction": 1.0}))
    finally:
        run_module.make_projections = original
    projections = seen["module"]
    assert set(projections.keys()) == {"embedding", "hidden"}
    assert projections["hidden"].weight.shape == (64, 32)
    for name, tensor in projections.state_dict().items():
        assert not torch.equal(tensor, seen["initial"][name]), name


# --- bad input: one line, exit code 2, no partial student ----------------------------------------------


def _cli(tmp_path, calib_file, *sets):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(BASE | {"data": str(calib_file), "eval": str(calib_file)}))
    out = tmp_path / "student"
    result = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(config), "--out", str(out), *sets],
                            capture_output=True, text=True, cwd=Path(__file__).parents[2])
    return result, out


@pytest.mark.parametrize("sets,words", [
    (["--set", "student.layers=3"], "more than the teacher"),
    (["--set", "layer_map=[5]"], "out of range"),
    (["--set", "losses.kl=1"], "unknown loss 'kl'"),
    (["--set", "teacher=tiny-bloom"], "cannot be mapped for the attention loss"),
    (["--set", "teacher=/nonexistent/folder"], "does not exist"),
])
def test_bad_input_exits_2_without_partial_student(tmp_path, calib_file, sets, words):
    result, out = _cli(tmp_path, calib_file, *sets)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".student*"))


def test_encoder_decoder_teacher_cannot_be_mapped(tmp_path, calib_file):
    from transformers import T5Config, T5ForConditionalGeneration

    from compress.tiny import tiny_tokenizer

    folder = tmp_path / "t5"
    config = T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tiny_tokenizer(512).save_pretrained(folder)
    result, out = _cli(tmp_path, calib_file, "--set", f"teacher={folder}")
    assert result.returncode == 2 and "encoder-decoder" in result.stderr, result.stderr
    assert not out.exists()


def test_main_maps_user_errors(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_student_goes_straight_to_quantize_and_bench(tmp_path, calib_file):
    from compress.api import QuantizeRequest, quantize
    from compress.bench.run import BenchRequest, bench

    manifest = run(_config(tmp_path, calib_file, stages=[BASE["stages"][0]]))
    result = quantize(QuantizeRequest(model=manifest["out"], method="gptq", bits=4, group_size=32,
                                      calib=str(calib_file), nsamples=4, seqlen=32, device="cpu",
                                      out=str(tmp_path / "q"), progress=False))
    measured = bench(BenchRequest(model=str(result.folder), base=manifest["out"], device="cpu", eval=str(calib_file),
                                  seqlen=32, windows=2, speed=False, progress=False))
    assert measured.model.quantization["bits"] == 4
    # The student against itself agrees exactly; its 4-bit copy measurably does not.
    itself = bench(BenchRequest(model=manifest["out"], base=manifest["out"], device="cpu", eval=str(calib_file),
                                seqlen=32, windows=2, speed=False, progress=False))
    assert itself.accuracy.agreement.kl_mean < 1e-7
    assert measured.accuracy.agreement.kl_mean > 1e-6


def test_task_data_augmentation_multiplies_the_training_rows(tmp_path, monkeypatch):

    rows = "text\tlabel\n" + "".join(f"the model is {w} number {i}\t{int(w == 'good')}\n"
                                     for i in range(6) for w in ("good", "bad"))
    train = tmp_path / "train.tsv"
    train.write_text(rows)
    import transformers

    from compress.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("bert")
    tokenizer = tiny_tokenizer(config.vocab_size)
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    config.vocab_size = len(tokenizer)
    config.architectures = ["BertForMaskedLM"]
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    manifest = run(config_from_dict({
        "teacher": "tiny-bert", "num_labels": 2, "data": str(train), "eval": str(train), "seqlen": 16,
        "finetune": {"data": str(train), "max_steps": 2, "batch_size": 8},
        "augment": {"mlm": str(tmp_path / "mlm"), "copies": 2, "p_replace": 0.5},
        "student": {"layers": 1}, "progress": False, "out": str(tmp_path / "student"),
        "stages": [{"kind": "prediction", "max_steps": 2, "batch_size": 8}]}))
    data = next(h for h in manifest["history"] if h["event"] == "stage")["data"]
    assert data["augmented_from"] == 12 and data["examples"] == 36


def test_periodic_evaluation_is_recorded(tmp_path, calib_file):
    manifest = run(_config(tmp_path, calib_file, eval_every=2, stages=[BASE["stages"][0]]))
    evals = [h for h in manifest["history"] if h["event"] == "eval"]
    assert [(h["stage"], h["step"]) for h in evals] == [(0, 2), (0, 4)]
    assert evals[0]["perplexity"] != evals[1]["perplexity"]  # measured on the weights of that step
    # The evaluator's figure is the model's own: the saved student, scored alone by transformers, gives the
    # stage's final figure.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data import eval_windows_of_text, load_text
    from tests.conftest import naive_perplexity

    text, record = load_text(str(calib_file))
    windows, _ = eval_windows_of_text(AutoTokenizer.from_pretrained(manifest["out"]), text, record,
                                      BASE["eval_seqlen"], BASE["eval_windows"])
    final = next(h for h in manifest["history"] if h["event"] == "stage")["perplexity"]
    student = AutoModelForCausalLM.from_pretrained(manifest["out"])
    assert final == pytest.approx(naive_perplexity(student, windows), rel=1e-4)


def test_general_distillation_of_a_bare_encoder_on_unlabelled_text(tmp_path, calib_file):
    """TinyBERT's general distillation: a pre-trained encoder without a task head, plain text, intermediate
    losses only; a prediction stage is refused because there is no output to match."""
    from transformers import AutoModel

    manifest = run(_config(tmp_path, calib_file, teacher="tiny-bert", stages=[BASE["stages"][0]]))
    assert manifest["kind"] == "encoder" and manifest["figures"] == {}
    stage = next(h for h in manifest["history"] if h["event"] == "stage")
    assert set(stage["losses"]) == {"embedding", "hidden", "attention"}
    assert AutoModel.from_pretrained(manifest["out"]).config.num_hidden_layers == 1
    from compress.errors import UserError

    with pytest.raises(UserError, match="no output head"):
        run(_config(tmp_path / "b", calib_file, teacher="tiny-bert"))


@pytest.mark.parametrize("target,sparsity", [("layers", 0.5), ("mlp", 0.25)])
def test_structurally_pruned_model_as_the_student(tmp_path, calib_file, target, sparsity):
    """compress prune --method structured, then distill run with student.from_model: the pruned
    model is the student's starting point, and a layer-pruned one distils the blocks it kept."""
    from transformers import AutoModelForCausalLM

    from compress.prune.run import PruneRequest, prune

    pruned = prune(PruneRequest(model="tiny-llama", method="structured", target=target, sparsity=sparsity,
                                calib=str(calib_file), nsamples=4, seqlen=32, out=str(tmp_path / "pruned"),
                                progress=False, device="cpu"))
    start = AutoModelForCausalLM.from_pretrained(pruned.folder)
    manifest = run(_config(tmp_path, calib_file, student={"from_model": str(pruned.folder)}))
    saved = json.loads((Path(manifest["out"]) / "distill.json").read_text())
    assert saved["student"]["init"] == f"from_model:{pruned.folder}"
    assert saved["student"]["init_detail"]["random_tensors"] == []
    if target == "layers":
        kept = pruned.manifest["structure"]["kept_layers"]
        assert saved["layer_map"]["student_to_teacher"] == {"1": kept[0] + 1}
    else:
        assert saved["layer_map"]["student_to_teacher"] == {"1": 1, "2": 2}
    student = AutoModelForCausalLM.from_pretrained(manifest["out"])
    assert student.config.intermediate_size == start.config.intermediate_size
    assert student.config.num_hidden_layers == start.config.num_hidden_layers


def test_from_model_refuses_shape_settings(tmp_path, calib_file):
    from compress.errors import UserError

    with pytest.raises(UserError, match="leave student.layers out"):
        _config(tmp_path, calib_file, student={"from_model": "tiny-llama", "layers": 1})
