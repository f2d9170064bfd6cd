"""`compress prune` end to end: saved folders load with from_pretrained (or as GPTQ checkpoints with
--bits), the manifest records per-layer sparsity, and bad input is one line with exit code 2."""

import json
import re

import pytest
import torch

from compress.checkpoint import MANIFEST_NAME, load_quantized
from compress.cli import main
from compress.errors import UserError
from compress.models import resolve
from compress.prune.run import PruneRequest, prune
from tests.conftest import model_output


def request(tmp_path, calib_file, **kw):
    settings = dict(model="tiny-llama", calib=str(calib_file), nsamples=8, seqlen=48, out=str(tmp_path / "p"),
                    progress=False, device="cpu", in_memory=True)
    settings.update(kw)
    return PruneRequest(**settings)


def _hash(folder):
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "4:8")])
def test_pruned_model_loads_with_from_pretrained(method, pattern, tmp_path, calib_file):
    from transformers import AutoModelForCausalLM

    source = resolve("tiny-llama").path
    before = _hash(source)
    result = prune(request(tmp_path, calib_file, method=method, pattern=pattern))
    reloaded = AutoModelForCausalLM.from_pretrained(result.folder).eval()
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model_output(reloaded, ids), model_output(result.model, ids))
    manifest = json.loads((result.folder / MANIFEST_NAME).read_text())
    assert manifest["method"] == method and manifest["config"]["pattern"] == pattern
    assert len(manifest["layers"]) == 14  # 7 linears x 2 blocks
    for layer in manifest["layers"]:
        weight = reloaded.get_submodule(layer["name"]).weight
        assert layer["sparsity"] == pytest.approx((weight == 0).float().mean().item())
        assert layer["sparsity"] >= 0.5
    assert manifest["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-6)
    assert _hash(source) == before  # the source model is never modified


def test_prune_and_quantize_in_one_run_writes_a_gptq_checkpoint(tmp_path, calib_file):
    result = prune(request(tmp_path, calib_file, method="sparsegpt", pattern="2:4", bits=4, group_size=32))
    assert result.folder.name == "p"
    config = json.loads((result.folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["quantization_config"]["meta"]["method"] == "sparsegpt+gptq"
    model, _ = load_quantized(result.folder)
    weight = model.model.layers[0].mlp.down_proj.quantized_weight().dequantize()
    assert torch.all((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) >= 2)
    assert result.output_bytes < result.source_bytes


def test_structured_writes_a_smaller_model(tmp_path, calib_file):
    from transformers import AutoModelForCausalLM

    result = prune(request(tmp_path, calib_file, method="structured", target="mlp", sparsity=0.25))
    reloaded = AutoModelForCausalLM.from_pretrained(result.folder)
    assert reloaded.config.intermediate_size == 96
    assert reloaded.model.layers[0].mlp.down_proj.in_features == 96
    assert result.output_bytes < result.source_bytes
    manifest = json.loads((result.folder / MANIFEST_NAME).read_text())
    assert manifest["structure"]["units_after"] == 96 and manifest["parameters"] < 139584


def test_default_output_names_method_and_pattern(tmp_path, calib_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = prune(request(tmp_path, calib_file, method="magnitude", pattern="2:4", out=None))
    assert result.folder.as_posix() == "out/tiny-llama-magnitude-2of4"


def test_failed_save_leaves_no_folder(tmp_path, calib_file, monkeypatch):
    import compress.prune.run as run

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(run.json, "dumps", broken)
    with pytest.raises(OSError):
        prune(request(tmp_path, calib_file, method="magnitude"))
    assert list(tmp_path.iterdir()) == []


def test_recipe_file_and_command_line(tmp_path, calib_file, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: tiny-llama\nmethod: wanda\npattern: '2:4'\nbits: 4\ngroup_size: 32\n"
                      f"calib: {calib_file}\nnsamples: 8\nseqlen: 48\nprogress: false\n")
    assert main(["prune", "--config", str(recipe), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    # At least half are zero: the removed ones, and a few kept ones that round to zero at 4 bits.
    assert re.search(r"5\d\.\d% of the weights of 14 layers are zero", out) and "quantized to 4 bits" in out
    manifest = json.loads((tmp_path / "r" / MANIFEST_NAME).read_text())
    assert manifest["quantization"]["bits"] == 4 and manifest["method"] == "wanda"


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.0"], r"sparsity 1.0 is outside \[0, 1\)"),
    (["--sparsity", "-0.2"], r"sparsity -0.2 is outside \[0, 1\)"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--pattern", "2:4", "--sparsity", "0.6"], "always removes 50%"),
    (["--method", "structured", "--pattern", "2:4"], "--pattern does not apply to structured"),
    (["--method", "wanda", "--target", "heads"], "--target does not apply to wanda: leave it out, or prune with "
                                                 "structured"),
    # A value equal to another method's default is still not this method's option (it was dropped silently).
    (["--method", "wanda", "--target", "mlp"], "--target does not apply to wanda"),
    (["--method", "magnitude", "--damp-percent", "0.01"], "--damp-percent does not apply to magnitude: leave it "
                                                          "out, prune with sparsegpt, or add --bits"),
    (["--method", "structured", "--target", "heads", "--sparsity", "0.9"], "zero kv groups"),
    (["--method", "structured", "--target", "heads", "--model-arch", "opt"], "derives the head size"),
    (["--method", "structured", "--target", "mlp", "--model-arch", "bloom"], "no MLP width setting"),
    (["--method", "structured", "--bits", "4"], "quantize it afterwards"),
    (["--method", "pruneit"], "unknown pruning method 'pruneit'"),
    (["--bits", "5"], "unsupported bits 5"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "cuda|unknown device"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, calib_file, capsys):
    arch = "llama"
    if "--model-arch" in args:
        arch = args[args.index("--model-arch") + 1]
        args = args[:args.index("--model-arch")]
    code = main(["prune", f"tiny-{arch}", "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "32",
                 "--out", str(tmp_path / "x"), "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "x").exists()


def test_missing_model_and_bad_recipe_key(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("method: wanda\nsparsty: 0.5\n")
    assert main(["prune", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'sparsty'" in err


@pytest.mark.parametrize("recipe", sorted(p.name for p in (__import__("pathlib").Path(__file__).parents[2] / "configs"
                                                            / "prune").glob("*.yaml")))
def test_committed_recipes_are_valid(recipe):
    from pathlib import Path

    from compress.config_io import check_fields, read_yaml_mapping

    path = Path(__file__).parents[2] / "configs" / "prune" / recipe
    request = PruneRequest(**check_fields(PruneRequest, read_yaml_mapping(path), str(path)))
    method, cfg = request.method_config()
    assert method.name == request.method
    request.quant_config()


def test_bench_reads_what_pruning_did(tmp_path, calib_file, eval_file, monkeypatch):
    from compress.bench.run import BenchRequest, bench

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    sparse = prune(request(tmp_path, calib_file, method="wanda", pattern="2:4", out=str(tmp_path / "w")))
    smaller = prune(request(tmp_path, calib_file, method="structured", target="layers", sparsity=0.5,
                            out=str(tmp_path / "s")))
    notes = {}
    for name, result in (("sparse", sparse), ("smaller", smaller)):
        measured = bench(BenchRequest(model=str(result.folder), base="tiny-llama", device="cpu", eval=str(eval_file),
                                      seqlen=32, windows=2, speed=False, progress=False))
        notes[name] = " ".join(measured.model.notes)
        # The figure is the pruned folder's own: transformers loads it and scores the same windows alike.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from compress.bench.run import _windows
        from tests.conftest import naive_perplexity

        model = AutoModelForCausalLM.from_pretrained(result.folder)
        windows, _ = _windows(BenchRequest(eval=str(eval_file), seqlen=32, windows=2),
                              AutoTokenizer.from_pretrained(result.folder), 512)
        assert measured.accuracy.perplexity.perplexity == pytest.approx(naive_perplexity(model, windows), rel=1e-4)
    assert "wanda pruning (2:4): 50.0% of the pruned layers' weights are zero" in notes["sparse"]
    assert "structured pruning (layers): 2 -> 1 layers in the model" in notes["smaller"]


def test_damp_percent_with_bits_damps_the_gptq_step_of_wanda():
    """With --bits, magnitude's and Wanda's kept weights are quantized by GPTQ keeping the mask: --damp-percent is
    that step's (it was refused); without --bits it is still an error."""
    from compress.prune.config import GPTQConfig, KeptWeightsQuantConfig

    asked = PruneRequest(model="tiny-llama", method="wanda", bits=4, damp_percent=0.2)
    method, cfg = asked.method_config()
    assert not hasattr(cfg, "damp_percent") and asked.quant_config() == KeptWeightsQuantConfig(4, 128, True, damp_percent=0.2)
    assert PruneRequest(method="wanda", bits=4).quant_config().damp_percent == GPTQConfig().damp_percent
    sparsegpt = PruneRequest(method="sparsegpt", bits=4, damp_percent=0.2)
    assert sparsegpt.method_config()[1].damp_percent == 0.2  # its joint mode's own
    with pytest.raises(UserError, match="add --bits"):
        PruneRequest(method="wanda", damp_percent=0.2).method_config()


def test_the_gptq_step_uses_the_damp_it_is_given():
    from compress.prune.apply import prune_and_quantize
    from compress.prune.config import KeptWeightsQuantConfig
    from compress.registry import get_prune_method

    torch.manual_seed(0)
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    hessian, weight = x.T @ x / 256, torch.randn(32, 64)
    wanda = get_prune_method("wanda")
    cfg = wanda.config_cls()
    results = [prune_and_quantize(wanda, weight, hessian, cfg, KeptWeightsQuantConfig(4, 32, damp_percent=d))
               for d in (0.01, 0.5)]
    assert torch.equal(results[0][1], results[1][1])  # the same mask
    assert not torch.equal(results[0][0], results[1][0])  # other updates
