"""Interrupted streaming runs: what finished is kept, --resume continues at the next block and writes the
bytes an uninterrupted run writes, also after a SIGKILL and with activations spilled to files."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from compress import interrupt
from compress.api import QuantizeRequest, quantize
from compress.cli import main
from compress.errors import UserError
from compress.output import PROGRESS_FILE, ModelOutput, seal
from compress.prune.run import PruneRequest, prune
from tests.conftest import LAYERS, assert_same_checkpoint


def settings(model, out, calib_file, **kw):
    values = dict(model=str(model), method="gptq", bits=4, group_size=32, calib=str(calib_file), nsamples=8,
                  seqlen=64, out=str(out), progress=False, device="cpu", checkpoint_every=0)
    values.update(kw)
    return values


def stop_after_block(monkeypatch, block: int):
    """Interrupt the run (Ctrl-C) right after block ``block`` was checkpointed."""
    real = ModelOutput.checkpoint

    def checkpoint(self, next_block, *args, **kwargs):
        real(self, next_block, *args, **kwargs)
        if next_block == block + 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ModelOutput, "checkpoint", checkpoint)


@pytest.mark.parametrize("budget", [2 << 30, 0])  # activations carried in memory / spilled to files
def test_resumed_quantize_equals_an_uninterrupted_run(deep_llama, tmp_path, calib_file, monkeypatch, budget):
    whole = quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "whole", calib_file, activation_budget=budget,
                                                lm_head_bits=8)))
    target = tmp_path / "cut"
    with monkeypatch.context() as patch:
        stop_after_block(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            quantize(QuantizeRequest(**settings(deep_llama, target, calib_file, activation_budget=budget,
                                                lm_head_bits=8)))
    partial = tmp_path / ".cut.partial"
    assert not target.exists() and (partial / PROGRESS_FILE).is_file()
    assert json.loads((partial / PROGRESS_FILE).read_text())["next_block"] == 3
    # Without --resume the kept blocks are not thrown away silently.
    with pytest.raises(UserError, match="pass --resume to continue it, or --force"):
        quantize(QuantizeRequest(**settings(deep_llama, target, calib_file, activation_budget=budget, lm_head_bits=8)))
    resumed = quantize(QuantizeRequest(**settings(deep_llama, target, calib_file, activation_budget=budget,
                                                  lm_head_bits=8, resume=True)))
    assert resumed.manifest["resumed_at_block"] == 3 and whole.manifest["resumed_at_block"] is None
    saved = lambda result: json.loads((result.folder / "compress_manifest.json").read_text())  # noqa: E731
    assert saved(resumed)["layers"] == saved(whole)["layers"] and len(saved(whole)["layers"]) == 7 * LAYERS
    assert saved(resumed)["lm_head"] == saved(whole)["lm_head"]
    assert_same_checkpoint(resumed.folder, whole.folder)
    assert not partial.exists()


def test_resumed_prune_with_sharded_output_equals_an_uninterrupted_run(deep_llama, tmp_path, calib_file, monkeypatch):
    common = dict(method="sparsegpt", pattern="2:4", max_shard_bytes=60_000)
    whole = prune(PruneRequest(**settings(deep_llama, tmp_path / "whole", calib_file, **common)))
    assert len(list(whole.folder.glob("model-*-of-*.safetensors"))) > 2
    with monkeypatch.context() as patch:
        stop_after_block(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            prune(PruneRequest(**settings(deep_llama, tmp_path / "cut", calib_file, **common)))
    resumed = prune(PruneRequest(**settings(deep_llama, tmp_path / "cut", calib_file, resume=True, **common)))
    assert resumed.manifest["resumed_at_block"] == 2
    assert_same_checkpoint(resumed.folder, whole.folder)


def test_a_killed_run_resumes_to_the_same_bytes(deep_llama, tmp_path, calib_file):
    """SIGKILL after block 1: no handler runs, the folder is as the kill left it."""
    args = ["quantize", str(deep_llama), "--method", "rtn", "--bits", "4", "--group-size", "32", "--device", "cpu",
            "--no-progress", "--checkpoint-every", "0", "--max-shard-size", "50KB"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    script = (
        "import os, signal, sys\n"
        "from compress.output import ModelOutput\n"
        "real = ModelOutput.checkpoint\n"
        "def checkpoint(self, next_block, *a, **k):\n"
        "    real(self, next_block, *a, **k)\n"
        "    if next_block == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "ModelOutput.checkpoint = checkpoint\n"
        "from compress.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    killed = subprocess.run([sys.executable, "-c", script, *args, "--out", str(tmp_path / "cut")],
                            capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "cut").exists() and (tmp_path / ".cut.partial" / PROGRESS_FILE).is_file()
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_checkpoint(tmp_path / "cut", tmp_path / "whole")


def test_resume_refuses_a_partial_run_with_other_settings(deep_llama, tmp_path, calib_file, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        stop_after_block(patch, 0)
        with pytest.raises(KeyboardInterrupt):
            quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file)))
    assert any(f"1 block(s) are written and kept in {tmp_path / '.q.partial'}" in line for line in interrupt.kept())
    with pytest.raises(UserError, match="other settings, another source model or other calibration text"):
        quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file, bits=3, resume=True)))
    # --force starts again; --resume with nothing to resume starts at the first block.
    quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file, bits=3, force=True)))
    fresh = quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "r", calib_file, resume=True)))
    assert fresh.manifest["resumed_at_block"] is None


def test_a_run_interrupted_before_its_first_block_leaves_nothing(deep_llama, tmp_path, calib_file, monkeypatch):
    with monkeypatch.context() as patch:
        stop_after_block(patch, -1)  # never fires: interrupt inside block 0 instead
        from compress.quant import gptq

        patch.setattr(gptq, "gptq_quantize", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file)))
    assert list(tmp_path.iterdir()) == []


def test_resume_is_for_streaming_runs(tmp_path, calib_file):
    with pytest.raises(UserError, match="--resume continues a streaming run"):
        quantize(QuantizeRequest(**settings("tiny-llama", tmp_path / "q", calib_file, in_memory=True, resume=True)))


# --- the lifecycle's late steps, and what may never be written over ---------------------------------

def test_a_failure_while_finishing_keeps_every_block_and_resume_finishes(deep_llama, tmp_path, calib_file,
                                                                         monkeypatch, capsys):
    """A full disk while the last shard closes, or Ctrl-C while the tokenizer is saved: every block is
    already written, so nothing is redone; --resume finishes into the bytes of an uninterrupted run."""
    import errno

    from compress.shards import ShardWriter

    common = dict(max_shard_bytes=60_000, lm_head_bits=8)
    whole = quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "whole", calib_file, **common)))
    real_finish = ShardWriter.finish

    def full_disk(self):
        real_finish(self)  # the shards got their names; then the index write fails
        raise OSError(errno.ENOSPC, "No space left on device")

    for failure, target in ((full_disk, "disk"), (KeyboardInterrupt, "ctrl-c")):
        interrupt.forget()
        with monkeypatch.context() as patch:
            if failure is KeyboardInterrupt:
                patch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained",
                              lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
            else:
                patch.setattr(ShardWriter, "finish", failure)
            with pytest.raises((OSError, KeyboardInterrupt)):
                quantize(QuantizeRequest(**settings(deep_llama, tmp_path / target, calib_file, **common)))
        partial = tmp_path / f".{target}.partial"
        assert not (tmp_path / target).exists()
        progress = json.loads((partial / PROGRESS_FILE).read_text())
        assert progress["phase"] == "finishing" and progress["next_block"] == LAYERS
        assert any("all blocks are written and kept in" in line for line in interrupt.kept())
        with monkeypatch.context() as patch:  # nothing may be calibrated again
            from compress.quant import gptq

            patch.setattr(gptq, "gptq_quantize", lambda *a, **k: pytest.fail("a finished block was redone"))
            resumed = quantize(QuantizeRequest(**settings(deep_llama, tmp_path / target, calib_file, resume=True,
                                                          **common)))
        assert_same_checkpoint(resumed.folder, whole.folder)
        assert not partial.exists() and not (resumed.folder / PROGRESS_FILE).exists()


def test_an_exchange_cut_between_its_renames_loses_nothing(tmp_path):
    """Killed after the old output was moved aside: it is put back (or, with --resume of a finished
    partial folder, replaced as asked); killed after the new one moved in: only the clean-up is done."""
    final, old, partial = tmp_path / "q", tmp_path / ".q.old", tmp_path / ".q.partial"
    old.mkdir()
    (old / "weights").write_text("old")
    seal(old)  # an earlier output of ours
    output = ModelOutput(final, "f", resume=False, force=True, max_shard_bytes=1 << 20, say=lambda m: None)
    assert (final / "weights").read_text() == "old" and not old.exists()  # put back before anything else
    output.abandon()
    assert not partial.exists()
    # The new output in place with its record still inside: complete; the record and the old copy go.
    old.mkdir()
    (final / PROGRESS_FILE).write_text(json.dumps({"fingerprint": "f", "phase": "finishing"}))
    with pytest.raises(UserError, match="already exists"):
        ModelOutput(final, "f", resume=False, force=False, max_shard_bytes=1 << 20, say=lambda m: None)
    assert not (final / PROGRESS_FILE).exists() and not old.exists() and (final / "weights").is_file()


@pytest.mark.parametrize("where", ["source", "parent"])
def test_out_may_not_be_or_hold_the_source_even_with_force(deep_llama, tmp_path, where, capsys):
    import shutil

    models = tmp_path / "models"
    source = models / "llama"
    shutil.copytree(deep_llama, source)
    (models / "other").mkdir()
    before = sorted(p.name for p in source.iterdir())
    out = source if where == "source" else models
    code = main(["quantize", str(source), "--method", "rtn", "--out", str(out), "--force", "--device", "cpu",
                 "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "choose an output folder outside it" in err and err.count("\n") == 1
    assert sorted(p.name for p in source.iterdir()) == before and (models / "other").is_dir()


def test_a_second_run_on_a_busy_out_stops_with_one_line(deep_llama, tmp_path, capsys):
    from compress.fsutil import OutputLock

    lock = OutputLock(tmp_path / "q").acquire()  # another run holds the output
    try:
        code = main(["quantize", str(deep_llama), "--method", "rtn", "--out", str(tmp_path / "q"), "--device", "cpu",
                     "--no-progress"])
    finally:
        lock.release()
    assert code == 2
    assert f"another run (process {os.getpid()}) is writing {tmp_path / 'q'}" in capsys.readouterr().err
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.partial").exists()
    assert main(["quantize", str(deep_llama), "--method", "rtn", "--out", str(tmp_path / "q"), "--device", "cpu",
                 "--no-progress"]) == 0
    assert not (tmp_path / ".q.lock").exists()


def test_resume_refuses_an_edited_calibration_text(deep_llama, tmp_path, calib_file, monkeypatch):
    text = tmp_path / "calib.txt"
    text.write_text(calib_file.read_text())
    with monkeypatch.context() as patch:
        stop_after_block(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", text)))
    text.write_text(calib_file.read_text().replace("the", "a"))
    with pytest.raises(UserError, match="other calibration text"):
        quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", text, resume=True)))
    assert (tmp_path / ".q.partial" / PROGRESS_FILE).is_file()  # still there for the right text


def test_a_resumed_awq_mixed_precision_run_equals_an_uninterrupted_one(deep_llama, tmp_path, calib_file, monkeypatch):
    """AWQ's folded scales and the mixed-precision choice are kept with the partial run: the resumed run does
    not measure again and writes the same bytes, manifest records included."""
    kw = dict(method="awq", avg_bits=4.9, format="gptq")  # 4.9 bits needs 3-bit layers on these widths
    whole = quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "whole", calib_file, **kw)))
    target = tmp_path / "cut"
    with monkeypatch.context() as patch:
        stop_after_block(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            quantize(QuantizeRequest(**settings(deep_llama, target, calib_file, **kw)))
    import compress.quant.run as api_module

    def no_second_measure(*_args, **_kwargs):
        raise AssertionError("a resumed run measured the sensitivities again")

    monkeypatch.setattr(api_module, "measure_sensitivities", no_second_measure)
    resumed = quantize(QuantizeRequest(**settings(deep_llama, target, calib_file, resume=True, **kw)))
    saved = lambda result: json.loads((result.folder / "compress_manifest.json").read_text())  # noqa: E731
    for key in ("awq_scales", "mixed_precision", "layers"):
        assert saved(resumed)[key] == saved(whole)[key], key
    assert len(saved(whole)["awq_scales"]) == 4 * LAYERS
    assert_same_checkpoint(resumed.folder, whole.folder)


# --- damaged records, an --out that appears mid-run, what an interrupted run keeps -------------------------

RTN = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--device", "cpu", "--no-progress",
       "--checkpoint-every", "0"]


@pytest.mark.parametrize("record, why", [("{not json", "Expecting property name"), ("[1, 2]", "a JSON list"),
                                         ('{"version": 2, "fingerprint": "f", "phase": "blocks", "next_block": 1}',
                                          "no shards")])
def test_a_damaged_progress_record_ends_in_one_line_whose_command_works(deep_llama, tmp_path, capsys, record, why):
    out = tmp_path / "q"
    partial = tmp_path / ".q.partial"
    partial.mkdir()
    (partial / PROGRESS_FILE).write_text(record)
    args = ["quantize", str(deep_llama), *RTN, "--out", str(out)]
    assert main(args) == 2
    assert "pass --resume to continue it, or --force to start again" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{partial / PROGRESS_FILE} is damaged (" in err and why in err
    assert "run the same command without --resume and with --force to start again" in err
    assert main([*args, "--force"]) == 0  # the command the message gives works
    assert not partial.exists() and (out / "config.json").is_file()


def test_an_out_that_appears_while_finishing_is_kept_and_resume_then_finishes(deep_llama, tmp_path, capsys,
                                                                              monkeypatch):
    from compress.shards import ShardWriter

    assert main(["quantize", str(deep_llama), *RTN, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "q"
    real_finish = ShardWriter.finish

    def someone_writes_out(self):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return real_finish(self)

    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "finish", someone_writes_out)
        assert main(["quantize", str(deep_llama), *RTN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} appeared while this run was writing it and is not replaced: move it away")
    assert "all blocks are written and kept in" in err and "--resume to finish" in err and err.count("\n") == 1
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").rename(tmp_path / "notes.txt")
    out.rmdir()
    assert main(["quantize", str(deep_llama), *RTN, "--out", str(out), "--resume"]) == 0  # what the message says
    assert_same_checkpoint(out, tmp_path / "whole")


def test_an_interrupted_run_keeps_only_what_resume_needs_and_says_how_much(deep_llama, tmp_path, calib_file,
                                                                          monkeypatch):
    """Spilling activations (budget 0) the run holds up to three sets; stopped, only the recorded one is kept."""
    from compress.activations import Activations

    sets_seen = set()
    real_save = Activations.save

    def save(self, where):
        activations = where.parent
        sets_seen.update(p.name for p in activations.rglob("set-*"))
        return real_save(self, where)

    with monkeypatch.context() as patch:
        patch.setattr(Activations, "save", save)
        stop_after_block(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file, activation_budget=0)))
    assert sets_seen, "the run did not spill: the test no longer tests what it says"
    partial = tmp_path / ".q.partial"
    progress = json.loads((partial / PROGRESS_FILE).read_text())
    assert sorted(p.name for p in (partial / "activations").iterdir()) == [Path(progress["hidden"]["folder"]).name]
    kept_bytes = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
    line = [line for line in interrupt.kept() if "3 block(s) are written" in line][0]
    assert f"kept in {partial} (" in line
    number, unit = line.split(f"kept in {partial} (")[1].split(")")[0].split()
    assert abs(float(number) * {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit] - kept_bytes) <= 0.05 * kept_bytes
    resumed = quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file, activation_budget=0,
                                                  resume=True)))
    whole = quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "whole", calib_file, activation_budget=0)))
    assert_same_checkpoint(resumed.folder, whole.folder)


def test_a_damaged_method_record_in_the_progress_file_ends_in_one_line(deep_llama, tmp_path, calib_file, monkeypatch,
                                                                       capsys):
    """The record's own part (the layers quantized so far) is read by the method's progress dataclass: a damaged
    one is the same one line, and --force then starts again."""
    with monkeypatch.context() as patch:
        stop_after_block(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file)))
    record_file = tmp_path / ".q.partial" / PROGRESS_FILE
    progress = json.loads(record_file.read_text())
    progress["extra"]["layers"] = [{"not": "a layer"}]
    record_file.write_text(json.dumps(progress))
    with pytest.raises(UserError, match=r"progress.json is damaged \(its quantize record: .*\): run the same command "
                                        r"without --resume and with --force to start again"):
        quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file, resume=True)))
    done = quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file, force=True)))
    assert done.manifest["resumed_at_block"] is None and not (tmp_path / ".q.partial").exists()
