"""`compress sweep`: the matrix expands as configured, finished variants are reused after an interruption."""

import json

import pytest
import yaml

from compress import sweep as sweep_module
from compress.errors import UserError
from compress.sweep import SweepConfig, expand, load_config, run_sweep


def tiny_config(tmp_path, calib_file, eval_file, **kw) -> SweepConfig:
    values = dict(model="tiny-llama", name="t", runs=str(tmp_path / "runs"), report=str(tmp_path / "report"),
                  device="cpu", dtypes=["float32"], methods=["rtn", "gptq"], bits=[4], group_sizes=[32], peers=[],
                  calib=str(calib_file), nsamples=4, calib_seqlen=32, eval=str(eval_file), seqlen=32, windows=3,
                  decode_tokens=2, decode_batches=[1], repeats=1, isolate=False, progress=False)
    values.update(kw)
    return SweepConfig(**values)


def test_the_matrix_expands_to_methods_x_bits_x_groups():
    variants, _ = expand(SweepConfig(dtypes=["float32", "bfloat16"], methods=["rtn", "gptq"], bits=[8, 4, 3],
                                     group_sizes=[128, -1], peers=[]))
    names = [v.name for v in variants]
    assert names[:2] == ["fp32", "bf16"]
    assert len(names) == 2 + 2 * 3 * 2 and "gptq-w3g128" in names and "rtn-w8" in names


def test_bad_sweep_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown peer"):
        expand(SweepConfig(peers=["nonesuch"]))
    with pytest.raises(UserError, match="bits"):
        expand(SweepConfig(bits=[5], peers=[]))
    with pytest.raises(UserError, match="unknown dtype"):
        expand(SweepConfig(dtypes=["float8"], peers=[]))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "tiny-llama", "bitz": [4]}))
    with pytest.raises(UserError, match="unknown key 'bitz'"):
        load_config(bad)


def test_an_interrupted_sweep_reuses_finished_variants(tmp_path, calib_file, eval_file, monkeypatch):
    import compress.api

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_config(tmp_path, calib_file, eval_file)
    root = tmp_path / "runs" / "t"
    real_quantize, real_run_variant = compress.api.quantize, sweep_module.run_variant
    quantized, benched = [], []

    def quantize(request, interrupt_at=None):
        quantized.append(request.method)
        if request.method == interrupt_at:
            raise KeyboardInterrupt
        return real_quantize(request)

    def run_variant(cfg_, variant, root_, interrupt_at=None):
        benched.append(variant.name)
        if variant.name == interrupt_at:
            raise KeyboardInterrupt
        return real_run_variant(cfg_, variant, root_)

    # 1. Interrupted while quantizing GPTQ: RTN's checkpoint is complete, nothing else is left behind.
    monkeypatch.setattr(compress.api, "quantize", lambda r: quantize(r, "gptq"))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, ["compress", "sweep", "t.yaml"])
    assert quantized == ["rtn", "gptq"]
    assert [p.name.split("-")[0] for p in (root / "models").iterdir()] == ["rtn"]

    # 2. Interrupted while benchmarking GPTQ: only GPTQ is quantized now; two results are finished.
    quantized.clear()
    monkeypatch.setattr(compress.api, "quantize", quantize)
    monkeypatch.setattr(sweep_module, "run_variant", lambda c, v, r: run_variant(c, v, r, "gptq-w4g32"))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, ["compress", "sweep", "t.yaml"])
    assert quantized == ["gptq"]
    assert benched == ["fp32", "rtn-w4g32", "gptq-w4g32"]
    results = root / "results"
    assert sorted(p.name for p in results.iterdir()) == ["fp32.json", "rtn-w4g32.json"]
    assert not (tmp_path / "report").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}

    # 3. The rerun quantizes nothing, keeps the finished results as they are and adds the missing one.
    quantized.clear()
    monkeypatch.setattr(sweep_module, "run_variant", real_run_variant)
    report = run_sweep(cfg, ["compress", "sweep", "t.yaml"])
    assert quantized == []
    for name, stamp in stamps.items():
        assert (results / name).stat().st_mtime_ns == stamp
    rows = (report / "README.md").read_text()
    assert all(name in rows for name in ("fp32", "rtn-w4g32", "gptq-w4g32"))
    assert json.loads((results / "gptq-w4g32.json").read_text())["sweep"]["variant"]["method"] == "gptq"


def test_changed_settings_are_not_served_from_the_cache(tmp_path, calib_file, eval_file, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    run_sweep(tiny_config(tmp_path, calib_file, eval_file, methods=["rtn"]), ["x"])
    first = json.loads((tmp_path / "runs" / "t" / "results" / "rtn-w4g32.json").read_text())
    run_sweep(tiny_config(tmp_path, calib_file, eval_file, methods=["rtn"], windows=2), ["x"])
    second = json.loads((tmp_path / "runs" / "t" / "results" / "rtn-w4g32.json").read_text())
    assert first["protocol"]["windows"] == 3 and second["protocol"]["windows"] == 2


def test_isolated_benchmarks_run_in_child_processes(tmp_path, calib_file, eval_file, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    report = run_sweep(tiny_config(tmp_path, calib_file, eval_file, methods=[], isolate=True), ["x"])
    result = json.loads((tmp_path / "runs" / "t" / "results" / "fp32.json").read_text())
    assert result["command"][:2] == ["compress", "bench"] and "--out" in result["command"]
    assert (report / "report.html").is_file()


def test_a_sweep_with_tasks_reports_their_recovery_from_child_processes(tmp_path, calib_file, eval_file, data_dir,
                                                                         monkeypatch):
    pytest.importorskip("lm_eval", reason="install the [eval] extra")
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="unknown task 'nope'"):
        run_sweep(tiny_config(tmp_path, calib_file, eval_file, methods=["rtn"], tasks=["nope"]), ["x"])
    assert not (tmp_path / "runs" / "t" / "models").exists()  # refused before any quantizing
    report = run_sweep(tiny_config(tmp_path, calib_file, eval_file, methods=["rtn"], tasks=["winogrande"], limit=4,
                                   isolate=True), ["x"])
    result = json.loads((tmp_path / "runs" / "t" / "results" / "rtn-w4g32.json").read_text())
    assert "--tasks" in result["command"] and result["accuracy"]["tasks"]["results"][0]["examples"] == 4
    md = (report / "README.md").read_text()
    assert "## Tasks (lm-evaluation-harness)" in md and "| rtn-w4g32 |" in md.split("## Tasks")[1]


def test_gguf_rows_are_our_codes_run_by_llama_cpp(tmp_path, calib_file, eval_file, monkeypatch):
    pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="unknown GGUF type 'q5_k'"):
        expand(SweepConfig(gguf=["q5_k"], peers=[]))
    report = run_sweep(tiny_config(tmp_path, calib_file, eval_file, methods=["rtn"], bits=[8], gguf=["q8_0"]), ["x"])
    result = json.loads((tmp_path / "runs" / "t" / "results" / "rtn-q8_0-gguf.json").read_text())
    assert result["model"]["backend"] == "llamacpp" and "q8_0 x14" in result["model"]["kernel"]
    assert result["model"]["path"].endswith(".gguf")
    assert "rtn-q8_0-gguf" in (report / "README.md").read_text()
