import copy
import json
import re

import pytest

from compress.bench.result import BenchResult
from compress.bench.run import BenchRequest, bench
from compress.errors import UserError
from compress.report import build_report
from compress.report.pareto import pareto_front
from compress.tasks.result import TaskResult, TaskRun


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 10.0), (2.0, 5.0), (3.0, 6.0), (4.0, 1.0), (2.0, 5.0), (5.0, None)]
    assert pareto_front(points) == [0, 1, 3, 4]
    assert pareto_front([(1.0, 1.0), (2.0, 3.0)], maximize_y=True) == [0, 1]
    assert pareto_front([(1.0, 3.0), (2.0, 1.0)], maximize_y=True) == [0]


@pytest.fixture(scope="module")
def two_results(tmp_path_factory, eval_file):
    folder = tmp_path_factory.mktemp("results")
    common = dict(device="cpu", eval=str(eval_file), seqlen=32, windows=3, decode_tokens=2, decode_batches=[1, 2],
                  repeats=1, progress=False, base="tiny-llama")
    a = bench(BenchRequest(model="tiny-llama", name="fp32", out=str(folder / "fp32.json"), **common))
    b = bench(BenchRequest(model="tiny-llama", name="bf16", dtype="bfloat16", base_dtype="float32",
                           out=str(folder / "bf16.json"), **common))
    return folder, a, b


def test_the_report_has_its_table_plots_and_protocol(two_results, tmp_path):
    folder, a, b = two_results
    out = build_report([folder], tmp_path / "rep", title="tiny report")
    md = (out / "README.md").read_text()
    page = (out / "report.html").read_text()
    assert "| base" in md and "bf16" in md and "## Protocol" in md
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["decode_vs_size.png", "kl_vs_bits.png",
                                                                 "perplexity_vs_size.png"]
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3 and all(len(i) > 1000 for i in images)
    assert "http" not in page.split("<body>")[1].replace("https://", "")  # self-contained: nothing fetched
    # bf16 halves the weights: its size ratio to the base is printed.
    assert "(0.50x)" in md
    assert sorted(p.name for p in (out / "results").iterdir()) == ["bf16.json", "fp32.json"]


def test_results_from_different_windows_are_not_mixed(two_results, tmp_path):
    folder, a, _ = two_results
    other = copy.deepcopy(a)
    other.protocol.windows = 99
    other.write(tmp_path / "other.json")
    with pytest.raises(UserError, match="different texts or windows"):
        build_report([folder / "fp32.json", tmp_path / "other.json"], tmp_path / "rep")


def test_an_existing_report_is_kept_without_force(two_results, tmp_path):
    folder, _, _ = two_results
    build_report([folder], tmp_path / "rep")
    with pytest.raises(UserError, match="already exists"):
        build_report([folder], tmp_path / "rep")
    build_report([folder], tmp_path / "rep", force=True)
    assert json.loads((tmp_path / "rep" / "results" / "fp32.json").read_text())["name"] == "fp32"


def test_a_report_of_a_sealed_folder_reads_only_its_results(two_results, tmp_path):
    """A folder of ours carries its inventory (.compress-output.json): it is no bench result."""
    import shutil

    from compress.output import INVENTORY_FILE, seal

    folder = tmp_path / "sealed"
    shutil.copytree(two_results[0], folder)
    seal(folder)
    assert (folder / INVENTORY_FILE).is_file()
    build_report([folder], tmp_path / "rep")
    assert sorted(p.name for p in (tmp_path / "rep" / "results").iterdir()) == ["bf16.json", "fp32.json"]


def test_a_classifier_report_shows_task_figures_and_no_empty_columns(tmp_path):
    from tests.bench.test_task_accuracy import _classifier

    _classifier(tmp_path / "clf")
    data = tmp_path / "dev.tsv"
    data.write_text("text\tlabel\n" + "".join(f"sentence number {i}\t{i % 2}\n" for i in range(40)))
    for name in ("teacher", "student"):
        bench(BenchRequest(model=str(tmp_path / "clf"), name=name, device="cpu", task=str(data), repeats=1,
                           progress=False, out=str(tmp_path / "res" / f"{name}.json")))
    md = (build_report([tmp_path / "res"], tmp_path / "rep") / "README.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("|  | variant"))
    assert "task acc %" in header and "task examples/s" in header
    assert "perplexity" not in header and "decode" not in header and "KL" not in header
    assert "@32" in md  # 40 examples in batches of 32
    assert "Task accuracy and speed" in md and "greedy decode" not in md


def test_rows_from_different_instruction_sets_are_flagged(two_results, tmp_path):
    folder, a, b = two_results
    assert a.isa == b.isa
    md = (build_report([folder], tmp_path / "same") / "README.md").read_text()
    assert "## Warnings" not in md
    assert f"CPU instruction sets: {a.isa}" in md  # the protocol names the set
    other = copy.deepcopy(b)
    mine = a.isa
    theirs = "x86-64 AVX2" if mine != "x86-64 AVX2" else "x86-64 AVX-512 VNNI"
    other.environment["cpu"] |= {"isa": theirs}
    other.write(tmp_path / "mixed" / "bf16.json")
    a.write(tmp_path / "mixed" / "fp32.json")
    out = build_report([tmp_path / "mixed"], tmp_path / "rep")
    md, page = (out / "README.md").read_text(), (out / "report.html").read_text()
    warning = f"different instruction sets ({theirs}: bf16; {mine}: fp32)"
    assert "## Warnings" in md and warning in md and warning in page
    del other.environment["cpu"]  # a result from before the set was recorded
    other.write(tmp_path / "mixed" / "bf16.json")
    md = (build_report([tmp_path / "mixed"], tmp_path / "rep2") / "README.md").read_text()
    assert "not recorded: bf16" in md


def _with_tasks(result: BenchResult, scores: dict[str, tuple[float, int]]) -> BenchResult:
    result = copy.deepcopy(result)
    result.accuracy.tasks = TaskRun([
        TaskResult(task, {"acc": value - 0.05, "acc_norm": value} if task != "winogrande" else {"acc": value},
                   {"acc": 0.02, "acc_norm": 0.02}, n, 2000, 0, "local:/data/tasks/" + task, None, 1.0)
        for task, (value, n) in scores.items()], "0.4.13", None, None, "lm-eval's own")
    return result


def test_task_recovery_is_the_score_over_the_bases_on_the_same_examples(two_results, tmp_path):
    _, a, b = two_results
    folder = tmp_path / "results"
    folder.mkdir()
    _with_tasks(a, {"arc_easy": (0.50, 500), "winogrande": (0.60, 500), "piqa": (0.70, 500)}).write(folder / "fp32.json")
    # piqa on other examples than the base's: no recovery for it, and so no mean.
    _with_tasks(b, {"arc_easy": (0.45, 500), "winogrande": (0.57, 500), "piqa": (0.69, 400)}).write(folder / "bf16.json")
    out = build_report([folder], tmp_path / "rep")
    md = (out / "README.md").read_text()
    assert "| variant | arc_easy acc_norm % | winogrande acc % | piqa acc_norm % | mean recovery |" in md
    assert "| bf16 | 45.0 ±2.0 (90.0%) | 57.0 ±2.0 (95.0%) | 69.0 ±2.0 | - |" in md
    assert "| base fp32 | 50.0 ±2.0 | 60.0 ±2.0 | 70.0 ±2.0 | - |" in md
    assert (out / "plots" / "task_recovery.png").stat().st_size > 1000
    _with_tasks(b, {"arc_easy": (0.45, 500), "winogrande": (0.57, 500), "piqa": (0.63, 500)}).write(folder / "bf16.json")
    md = (build_report([folder], tmp_path / "rep2") / "README.md").read_text()
    assert "| bf16 | 45.0 ±2.0 (90.0%) | 57.0 ±2.0 (95.0%) | 63.0 ±2.0 (90.0%) | 91.7% |" in md


def test_kl_keeps_its_digits_in_the_table():
    from compress.report.render import _kl

    assert [_kl(v) for v in (1.0016, 0.10007, 0.0010, 3.6e-06, 0.0, None)] == \
        ["1.0016", "0.1001", "0.0010", "3.60e-06", "0", "-"]


def test_bandwidth_above_the_measured_is_not_shown_as_a_share():
    from types import SimpleNamespace

    from compress.report.render import _achieved, cache_note

    assert _achieved(12.0, 20.0) == "12.0 (60%)"
    assert _achieved(31.0, 20.0) == "31.0 (above measured†)" and "%" not in _achieved(31.0, 20.0)
    assert _achieved(None, 20.0) == "-" and _achieved(5.0, None) == "5.0"
    rows = [SimpleNamespace(achieved_gbps=31.0, bandwidth_gbps=20.0), SimpleNamespace(achieved_gbps=1.0,
                                                                                      bandwidth_gbps=20.0)]
    assert "CPU's caches" in cache_note(rows)[0] and cache_note(rows[1:]) == []
