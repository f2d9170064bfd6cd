"""export-gguf streams: a checkpoint's layers are read, encoded and given back one at a time (never the whole model
in memory), and a float model's tensors are read one at a time from its shards."""

import pytest

from compress.api import QuantizeRequest, quantize
from compress.export_gguf.run import export_gguf
from compress.lazy import LazyModel


@pytest.fixture
def held(monkeypatch):
    """From the call on: tracks the tensors a LazyModel holds read at once, and refuses a whole-model read."""
    state = {"now": set(), "most": 0}
    materialize, release = LazyModel.materialize_names, LazyModel.release_names

    def tracked_materialize(self, names, device="cpu"):
        done = materialize(self, names, device)
        state["now"].update(done.names)
        state["most"] = max(state["most"], len(state["now"]))
        return done

    def tracked_release(self, names):
        state["now"].difference_update(names)
        return release(self, names)

    def refused(self, device="cpu"):
        raise AssertionError("the whole model was read")

    def start():
        monkeypatch.setattr(LazyModel, "materialize_names", tracked_materialize)
        monkeypatch.setattr(LazyModel, "release_names", tracked_release)
        monkeypatch.setattr(LazyModel, "materialize_all", refused)
        return state

    return start


def test_a_checkpoint_is_exported_one_layer_at_a_time(held, tmp_path):
    folder = quantize(QuantizeRequest(model="tiny-mixtral", method="rtn", bits=4, group_size=32, sym=True,
                                      format="gptq", out=str(tmp_path / "q"), progress=False, device="cpu")).folder
    state = held()
    export_gguf(str(folder), "q4_0", str(tmp_path / "m.gguf"))
    assert 0 < state["most"] <= 5  # one packed layer's qweight, qzeros, scales, g_idx (and bias), or one tensor
    assert not state["now"]  # everything read was given back


def test_a_float_model_is_exported_one_tensor_at_a_time(held, tmp_path, monkeypatch):
    reads = []
    read = LazyModel.read
    monkeypatch.setattr(LazyModel, "read", lambda self, name: reads.append(name) or read(self, name))
    state = held()
    export_gguf("tiny-qwen2_moe", "f16", str(tmp_path / "m.gguf"))
    assert len(reads) > 20 and state["most"] == 0  # each tensor read alone from the shards; nothing materialized
