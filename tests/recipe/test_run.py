"""`compress recipe run` on tiny models: stages chained and fingerprinted, reused on a rerun, redone from the first
changed stage, bad recipes refused up front with one line naming the stage and the key."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import yaml

from compress.bench.result import BenchResult
from compress.cli import main

DISTILL = {"data": None, "seqlen": 16, "max_examples": 16, "eval_windows": 2, "eval_seqlen": 32,
           "checkpoint_every": 2, "losses": {"prediction": 1.0, "hidden": 1.0},
           "stages": [{"kind": "prediction", "max_steps": 4, "batch_size": 4, "lr": 1e-3}]}


def recipe(tmp_path, calib_file, eval_file, **changes) -> dict:
    values = {
        "model": "tiny-llama", "name": "tiny", "runs": str(tmp_path / "runs"), "report": str(tmp_path / "report"),
        "device": "cpu", "progress": False,
        "bench": {"eval": str(eval_file), "seqlen": 32, "windows": 2, "speed": False},
        "stages": [
            {"prune": {"method": "structured", "target": "mlp", "sparsity": 0.25, "calib": str(calib_file),
                       "nsamples": 4, "seqlen": 32}},
            {"distill": copy.deepcopy(DISTILL) | {"data": str(calib_file), "eval": str(eval_file)}},
            {"name": "w4", "quantize": {"method": "rtn", "bits": 4, "group_size": 32}},
        ],
    }
    values.update(changes)
    return values


def write(tmp_path, values, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def stage_folders(tmp_path) -> list:
    return sorted(p.name for p in (tmp_path / "runs" / "tiny" / "stages").iterdir())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, calib_file, eval_file):
    tmp_path = tmp_path_factory.mktemp("recipe")
    assert main(["recipe", "run", str(write(tmp_path, recipe(tmp_path, calib_file, eval_file)))]) == 0
    return tmp_path


def test_stages_chain_and_every_stage_is_benchmarked(finished):
    folders = stage_folders(finished)
    assert [f.split("-")[0:2] for f in folders] == [["01", "prune"], ["02", "distill"], ["03", "w4"]]
    stages = finished / "runs" / "tiny" / "stages"
    pruned, distilled, quantized = (stages / f for f in folders)
    # Each stage read the one before it: the pruned MLP width carries through distillation into the checkpoint.
    width = json.loads((pruned / "config.json").read_text())["intermediate_size"]
    assert json.loads((distilled / "config.json").read_text())["intermediate_size"] == width
    assert json.loads((quantized / "config.json").read_text())["intermediate_size"] == width
    distill_manifest = json.loads((distilled / "distill.json").read_text())
    assert distill_manifest["student"]["init"] == f"from_model:{pruned}"
    assert distill_manifest["teacher"]["reference"] == "tiny-llama"  # the base is the teacher
    results = {p.stem: BenchResult.read(p) for p in (finished / "runs" / "tiny" / "results").glob("*.json")}
    assert set(results) == {"base", "prune", "distill", "w4"}
    windows = {r.protocol.windows_key() for r in results.values()}
    assert len(windows) == 1  # the same windows for every row
    assert results["base"].accuracy.agreement.kl_mean < 1e-6 and results["w4"].accuracy.agreement.kl_mean > 0
    assert results["w4"].model.quantization["bits"] == 4
    readme = (finished / "report" / "README.md").read_text()
    assert "Stages: tiny-llama (base) -> prune (prune) -> distill (distill) -> w4 (quantize)." in readme
    assert "training tokens" in readme and "| w4 |" in readme


def test_a_rerun_reuses_everything(finished, calib_file, eval_file, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (finished / "runs" / "tiny" / "results").iterdir()}
    # Shown progress: the reuse is said (and how a run is shown is not part of any fingerprint).
    assert main(["recipe", "run", str(write(finished, recipe(finished, calib_file, eval_file, progress=True)))]) == 0
    err = capsys.readouterr().err
    assert err.count(": reusing ") == 3 and err.count("  reusing ") == 4
    assert before == {p.name: p.stat().st_mtime_ns for p in (finished / "runs" / "tiny" / "results").iterdir()}


def test_a_changed_stage_is_redone_with_every_stage_after_it(finished, calib_file, eval_file, capsys, tmp_path):
    # On a copy of the finished run: the module's other tests compare with the finished run as it was made.
    shutil.copytree(finished / "runs", tmp_path / "runs")
    values = recipe(tmp_path, calib_file, eval_file, progress=True)
    values["stages"][1]["distill"]["stages"][0]["max_steps"] = 3
    old = stage_folders(tmp_path)
    assert main(["recipe", "run", str(write(tmp_path, values, "changed.yaml"))]) == 0
    new = stage_folders(tmp_path)
    err = capsys.readouterr().err
    assert f"reusing {tmp_path / 'runs' / 'tiny' / 'stages' / old[0]}" in err
    added = sorted(set(new) - set(old))
    assert [a.split("-")[1] for a in added] == ["distill", "w4"]


@pytest.mark.parametrize("change, said", [
    ({"stages": [{"prune": {"method": "wanda", "target": "mlp"}}]},
     "stage 1 (prune): --target does not apply to wanda"),
    ({"stages": [{"quantize": {"bits": 5}}]}, "stage 1 (quantize): unsupported bits 5"),
    ({"stages": [{"quantize": {"bitz": 4}}]}, "unknown key 'bitz' in"),
    ({"stages": [{"quantize": {"out": "x"}}]}, "key 'out' in"),
    ({"stages": [{"prune": {}, "quantize": {}}]}, "must name exactly one kind"),
    ({"stages": [{"squeeze": {}}]}, "unknown key 'squeeze' in"),
    ({"stages": [{"distill": {"student": {"from_model": "x"}}}]}, "'student.from_model'"),
    ({"stages": [{"distill": {"temperature": 0}}]}, "temperature"),
    ({"stages": [{"export": {"format": "tflite"}}]}, "needs 'format: onnx' or 'format: gguf'"),
    ({"stages": [{"quantize": {}}, {"quantize": {}}]}, "two stages"),
    ({"stages": []}, "non-empty list of stages"),
    ({"bench": {"model": "x"}}, "key 'model' in section 'bench'"),
    ({"bench": {"windowz": 2}}, "unknown key 'windowz' in section 'bench'"),
    ({"model": "llama-9000"}, "llama-9000"),
])
def test_a_bad_recipe_is_one_line_before_any_work(tmp_path, calib_file, eval_file, capsys, change, said):
    path = write(tmp_path, recipe(tmp_path, calib_file, eval_file) | change)
    assert main(["recipe", "run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("path", sorted((__import__("pathlib").Path(__file__).parents[2] / "configs" / "recipes")
                                        .glob("*.yaml")), ids=lambda p: p.name)
def test_committed_recipes_are_valid(path):
    from compress.recipe.config import load_recipe

    recipe_config, stages = load_recipe(path)
    assert recipe_config.name == path.stem and stages


@pytest.mark.slow
def test_a_recipe_on_ray_makes_what_it_makes_here(ray_cluster, finished, tmp_path, calib_file, eval_file):
    """Each stage one Ray task on a 2-CPU instance the test starts, each bench row another: the same stage
    outputs, fingerprints and figures as the local run."""
    values = recipe(tmp_path, calib_file, eval_file, executor="ray", address=ray_cluster, ray_cpus=1)
    assert main(["recipe", "run", str(write(tmp_path, values))]) == 0
    assert stage_folders(tmp_path) == stage_folders(finished)
    stages = tmp_path / "runs" / "tiny" / "stages"
    for folder in stage_folders(finished):
        ours, theirs = stages / folder, finished / "runs" / "tiny" / "stages" / folder
        assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
    ppl = {p.stem: BenchResult.read(p).accuracy.perplexity.perplexity
           for p in (tmp_path / "runs" / "tiny" / "results").glob("*.json")}
    assert ppl == {p.stem: BenchResult.read(p).accuracy.perplexity.perplexity
                   for p in (finished / "runs" / "tiny" / "results").glob("*.json")}


def test_the_tinybert_path_fine_tunes_distils_from_it_and_quantizes(tmp_path, monkeypatch):
    """finetune -> distill -> INT8 on a tiny BERT: the distillation's teacher is the fine-tuned stage, the student
    is shaped by `student:`, and every row is measured by task accuracy (no base row: a bare encoder)."""
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))  # the fine-tuned teacher's cache
    data = tmp_path / "task.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{'good' if i % 2 else 'bad'} sentence number {i}\t{i % 2}\n"
                                               for i in range(48)))
    values = {
        "model": "tiny-bert", "name": "tiny", "runs": str(tmp_path / "runs"), "report": str(tmp_path / "report"),
        "device": "cpu", "progress": False, "bench_base": False,
        "bench": {"task": str(data), "repeats": 1, "decode_batches": [1]},
        "stages": [
            {"name": "teacher", "finetune": {"num_labels": 2, "data": str(data), "epochs": 1, "batch_size": 8,
                                             "lr": 1e-3}},
            {"name": "student", "distill": {"data": str(data), "eval": str(data), "seqlen": 16,
                                            "student": {"layers": 1}, "checkpoint_every": 2,
                                            "stages": [{"kind": "intermediate", "max_steps": 3, "batch_size": 8},
                                                       {"kind": "prediction", "max_steps": 3, "batch_size": 8}]}},
            {"name": "int8", "quantize": {"method": "rtn", "bits": 8, "group_size": -1}},
        ],
    }
    assert main(["recipe", "run", str(write(tmp_path, values))]) == 0
    stages = {p.name.split("-")[1]: p for p in (tmp_path / "runs" / "tiny" / "stages").iterdir()}
    manifest = json.loads((stages["student"] / "distill.json").read_text())
    assert manifest["teacher"]["path"] == str(stages["teacher"]) and manifest["student"]["layers"] == 1
    results = {p.stem: BenchResult.read(p) for p in (tmp_path / "runs" / "tiny" / "results").glob("*.json")}
    assert set(results) == {"teacher", "student", "int8"}
    assert all(r.accuracy.task.examples == 48 and r.base is None for r in results.values())
    assert results["int8"].model.quantization["bits"] == 8
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "| base | teacher |" in readme  # the fine-tuned teacher is the row every other is compared with
    assert "48 training sentences" in readme  # (3 + 3) steps x 8 sentences
