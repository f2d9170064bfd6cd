"""Offline task copies through lm-eval's own task configs: every released file converted whole into the hub's
fields, lm-eval's prompts on them, and one-line errors for unknown tasks and missing data."""

import pytest

pytest.importorskip("lm_eval", reason="install the [eval] extra")

from lm_eval.tasks import TaskManager, get_task_dict  # noqa: E402

from compress.errors import UserError  # noqa: E402
from compress.tasks.sources import resolve_tasks  # noqa: E402

# Rows of each released split (../shared/data/tasks/SOURCES.md).
EXPECTED = {"lambada_openai": 5153, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267,
            "boolq": 3270, "hellaswag": 10042}


@pytest.fixture(scope="module")
def manager():
    return TaskManager()


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "task-cache"))


def test_every_offline_task_is_read_whole_through_lm_evals_config(data_dir, manager):
    sources = resolve_tasks(list(EXPECTED), manager)
    for source in sources:
        assert source.source == f"local:{data_dir / 'tasks' / source.name}"
        task = get_task_dict([source.spec], manager)[source.name]
        docs = list(task.eval_docs)
        assert len(docs) == EXPECTED[source.name], source.name
        # lm-eval's own prompt functions run on the converted rows.
        doc = docs[0]
        assert task.doc_to_text(doc) is not None and task.doc_to_target(doc) is not None
    arc = get_task_dict([sources[1].spec], manager)["arc_easy"]
    doc = arc.eval_docs[0]
    assert arc.doc_to_text(doc) == "Question: Which statement best explains why photosynthesis is the foundation " \
        "of most food webs?\nAnswer:"
    assert arc.doc_to_choice(doc)[arc.doc_to_target(doc)] == "Sunlight is the source of energy for nearly all " \
        "ecosystems."
    assert [s.note is not None for s in sources] == [s.name == "hellaswag" for s in sources]


def test_unknown_tasks_and_missing_copies_are_one_line_errors(manager, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown task 'lambada_klingon'"):
        resolve_tasks(["lambada_klingon"], manager)
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match=f"task 'piqa' has no offline copy in {tmp_path / 'tasks' / 'piqa'}"):
        resolve_tasks(["piqa"], manager)
    (tmp_path / "tasks" / "piqa").mkdir(parents=True)
    (tmp_path / "tasks" / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(UserError, match="task 'piqa': the offline copy in .* cannot be read"):
        resolve_tasks(["piqa"], manager)
    monkeypatch.delenv("COMPRESS_DATA_DIR")
    assert resolve_tasks(["piqa"], manager)[0].source == "hub"
