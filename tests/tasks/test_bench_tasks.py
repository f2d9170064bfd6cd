"""`compress bench --tasks`: lm-eval's task results on the model as the chosen backend runs it, the same
numbers lm-eval's own HuggingFace model gives for a dense model, and one-line errors before any loading."""

import pytest

pytest.importorskip("lm_eval", reason="install the [eval] extra")

from compress.bench.run import BenchRequest, bench  # noqa: E402
from compress.cli import main  # noqa: E402


def test_task_results_are_lm_evals_own_on_a_dense_model(eval_file, data_dir, tmp_path, monkeypatch):
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    from compress.models import load_model, resolve
    from compress.tasks.sources import resolve_tasks

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    result = bench(BenchRequest(model="tiny-llama", device="cpu", eval=str(eval_file), seqlen=32, windows=2,
                                speed=False, progress=False, tasks=["arc_easy", "winogrande"], limit=6))
    tasks = result.accuracy.tasks
    assert [r.task for r in tasks.results] == ["arc_easy", "winogrande"]
    assert tasks.limit == 6 and tasks.dtype == "float32" and tasks.lm_eval_version
    model, tokenizer = load_model(resolve("tiny-llama").path)
    manager = TaskManager()
    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=1, device="cpu", max_length=512)
    for row, source in zip(tasks.results, resolve_tasks(["arc_easy", "winogrande"], manager)):
        assert row.examples == 6 and row.source.startswith("local:")
        expected = evaluate(lm, get_task_dict([source.spec], manager), limit=6, bootstrap_iters=0,
                            log_samples=False)["results"][source.name]
        assert row.metrics["acc"] == pytest.approx(expected["acc,none"])


def test_a_quantized_checkpoint_is_scored_by_the_backend_that_runs_it(eval_file, data_dir, tmp_path, monkeypatch):
    from compress.api import QuantizeRequest, quantize

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    folder = quantize(QuantizeRequest(model="tiny-llama", method="rtn", bits=4, group_size=32, out=str(tmp_path / "q"),
                                      device="cpu", progress=False)).folder
    result = bench(BenchRequest(model=str(folder), device="cpu", eval=str(eval_file), seqlen=32, windows=2,
                                speed=False, progress=False, tasks=["piqa"], limit=4))
    assert result.model.backend == "torch" and result.accuracy.tasks.dtype == "bfloat16"
    assert result.accuracy.tasks.results[0].examples == 4


@pytest.mark.parametrize("args, message", [
    (["tiny-llama", "--tasks", "arc_easy,lambada_klingon"], "unknown task 'lambada_klingon'"),
    (["tiny-bert", "--tasks", "arc_easy"], "this model has no LM head: use --task for a classifier"),
    (["tiny-llama", "--tasks", "arc_easy", "--limit", "0"], "--limit must be positive"),
])
def test_bad_task_requests_are_one_line_errors(args, message, eval_file, data_dir, capsys):
    assert main(["bench", *args, "--eval", str(eval_file), "--windows", "1", "--seqlen", "16", "--no-speed",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
