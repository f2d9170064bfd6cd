import pytest

from compress.errors import UserError
from distill.config import config_from_dict, load_config, stage_losses


def test_example_config_loads(tmp_path):
    from pathlib import Path

    config = load_config(Path(__file__).parents[2] / "configs" / "tinybert.yaml")
    assert config.teacher == "minilm-l6" and config.student.layers == 3
    assert [s.kind for s in config.stages] == ["intermediate", "prediction"]
    assert stage_losses(config, config.stages[0]) == {"embedding": 1.0, "hidden": 1.0, "attention": 1.0}


def test_set_overrides_nested_and_list_items(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: tiny-bert\nstages:\n  - kind: intermediate\n  - kind: prediction\n")
    config = load_config(path, ["student.layers=1", "stages.1.max_steps=3", "losses.attention=0", "layer_map=[2]"])
    assert config.student.layers == 1 and config.stages[1].max_steps == 3 and config.layer_map == [2]
    assert "attention" not in stage_losses(config, config.stages[0])


@pytest.mark.parametrize("values,words", [
    ({"teachr": "x"}, "unknown key 'teachr'"),
    ({"student": {"layers": "three"}}, "'layers'"),
    ({"losses": {"attn": 1.0}}, "unknown loss 'attn'"),
    ({"stages": [{"kind": "intermediate", "losses": ["hiden"]}]}, "unknown loss 'hiden'"),
    ({"stages": [{"kind": "final"}]}, "kind 'final'"),
    ({"layer_map": "random"}, "layer_map"),
    ({"temperature": 0}, "temperature"),
    ({"stages": []}, "non-empty"),
    ({"teacher_dtype": "int8"}, "teacher_dtype"),
    ({"finetune": {"lr": 0}}, "section 'finetune'"),
    ({"stages": [{"kind": "prediction", "max_steps": 0}]}, "max_steps"),
])
def test_bad_config_is_one_line_user_error(values, words):
    with pytest.raises(UserError, match=words) as info:
        config_from_dict(values)
    assert "\n" not in str(info.value)


def test_bad_set_syntax(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: tiny-bert\n")
    with pytest.raises(UserError, match="key=value"):
        load_config(path, ["student.layers"])
    with pytest.raises(UserError, match="not an index"):
        load_config(path, ["stages.5.lr=1"])


def test_augment_section_needs_its_masked_lm():
    with pytest.raises(UserError, match="missing required key"):
        config_from_dict({"augment": {"copies": 2}})
