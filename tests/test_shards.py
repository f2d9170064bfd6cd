"""Safetensors read and written a tensor at a time: files every safetensors reader accepts, standard shard
names and index, and a writer that resumes from its recorded state to the same bytes."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.errors import UserError
from compress.shards import INDEX_NAME, SINGLE_NAME, ShardReader, ShardWriter


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17, generator=g),
        "a.half": torch.randn(8, 8, generator=g).half(),
        "b.bf16": torch.randn(5, 3, generator=g).bfloat16(),
        "b.codes": torch.randint(-2**31, 2**31 - 1, (12, 7), generator=g, dtype=torch.int32),
        "c.mask": torch.rand(9, generator=g) > 0.5,
        "c.scalar": torch.tensor(3.5),
        "c.empty": torch.zeros(0, 4),
        "d.bytes": torch.randint(0, 255, (100,), generator=g, dtype=torch.uint8),
    }


def read_all(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def test_one_shard_is_a_valid_safetensors_file(tmp_path):
    tensors = sample_tensors()
    writer = ShardWriter(tmp_path)
    writer.add_all(tensors)
    assert writer.finish() == [tmp_path / SINGLE_NAME]
    assert not (tmp_path / INDEX_NAME).exists()
    back = read_all(tmp_path)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert [p.name for p in tmp_path.iterdir()] == [SINGLE_NAME]  # no leftover data files


def test_large_outputs_split_into_indexed_shards_with_standard_names(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((64, 64), float(i)) for i in range(10)}  # 16 KiB each
    writer = ShardWriter(tmp_path, max_shard_bytes=40_000)
    writer.add_all(tensors)
    files = writer.finish()
    assert [f.name for f in files] == [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 10 * 64 * 64 * 4
    assert set(index["weight_map"]) == set(tensors)
    back = read_all(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor)
        with safe_open(str(tmp_path / index["weight_map"][name]), framework="pt") as f:
            assert name in f.keys()


def test_a_tensor_larger_than_the_limit_gets_a_shard_of_its_own(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=100)
    writer.add("small", torch.zeros(4))
    writer.add("big", torch.zeros(1000))
    writer.add("small2", torch.zeros(4))
    files = writer.finish()
    assert len(files) == 3 and torch.equal(read_all(tmp_path)["big"], torch.zeros(1000))


def test_same_tensors_same_bytes_and_names_written_once(tmp_path):
    for run in ("x", "y"):
        writer = ShardWriter(tmp_path / run)
        (tmp_path / run).mkdir()
        writer.add_all(sample_tensors())
        writer.finish()
    assert (tmp_path / "x" / SINGLE_NAME).read_bytes() == (tmp_path / "y" / SINGLE_NAME).read_bytes()
    writer = ShardWriter(tmp_path / "x")
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="already written"):
        writer.add("a", torch.ones(2))


@pytest.mark.parametrize("limit", [10_000, 30_000])  # stop inside a shard; stop after a later shard closed
def test_resumed_writer_gives_the_uninterrupted_bytes(tmp_path, limit):
    tensors = {f"t.{i}": torch.full((40, 50), float(i)) for i in range(12)}  # 8 KB each
    names = sorted(tensors)
    whole = tmp_path / "whole"
    whole.mkdir()
    writer = ShardWriter(whole, max_shard_bytes=limit)
    writer.add_all(tensors)
    writer.finish()

    cut = tmp_path / "cut"
    cut.mkdir()
    writer = ShardWriter(cut, max_shard_bytes=limit)
    for name in names[:5]:
        writer.add(name, tensors[name])
    state = json.loads(json.dumps(writer.state()))  # what progress.json keeps
    for name in names[5:9]:  # written after the state, then the process dies
        writer.add(name, tensors[name] + 100)
    resumed = ShardWriter.resume(cut, state)
    for name in names[5:]:
        resumed.add(name, tensors[name])
    resumed.finish()
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in whole.iterdir())
    for file in whole.iterdir():
        assert (cut / file.name).read_bytes() == file.read_bytes(), file.name


def test_reader_reads_what_safetensors_writes_and_refuses_truncation(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = ShardReader(tmp_path)
    assert set(reader.keys()) == set(tensors)
    for name, tensor in tensors.items():
        assert reader.dtype_of(name) == tensor.dtype and reader.shape_of(name) == tuple(tensor.shape)
        assert torch.equal(reader.read(name), tensor), name
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-50])
    with pytest.raises(UserError, match="truncated"):
        ShardReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(UserError, match="corrupt or truncated"):
        ShardReader(tmp_path)


def _write_raw(path, header: dict, data: bytes) -> None:
    """A safetensors file written by hand, so that a header can say what a real writer never would."""
    import struct

    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_the_index_is_the_truth(tmp_path):
    """Only the files the index names are read, counted and hashed; one it names but the folder lacks is
    a one-line error."""
    from compress.api import source_hash
    from compress.models import weight_bytes_on_disk
    from compress.shards import weight_files

    tensors = sample_tensors()
    writer = ShardWriter(tmp_path, max_shard_bytes=2000)
    writer.add_all(tensors)
    files = writer.finish()
    save_file(tensors, str(tmp_path / "consolidated.safetensors"))  # Mistral repositories ship both
    assert weight_files(tmp_path) == sorted(files)
    assert weight_bytes_on_disk(tmp_path) == sum(f.stat().st_size for f in files)
    hash_with_copy = source_hash(tmp_path)
    (tmp_path / "consolidated.safetensors").unlink()
    assert source_hash(tmp_path) == hash_with_copy
    assert set(ShardReader(tmp_path).keys()) == set(tensors)
    files[-1].unlink()
    with pytest.raises(UserError, match=f"lacks {files[-1].name}, which {INDEX_NAME} names"):
        ShardReader(tmp_path)


def test_the_same_tensor_in_two_files_without_an_index_is_refused(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-1.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-2.safetensors"))
    with pytest.raises(UserError, match="tensor a is in both model-1.safetensors and model-2.safetensors"):
        ShardReader(tmp_path)


def test_a_tensor_shorter_than_its_shape_is_refused(tmp_path):
    _write_raw(tmp_path / "model.safetensors",
               {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}, bytes(64))
    with pytest.raises(UserError, match=r"tensor w has 60 bytes, not the 64 its shape \[4, 4\] and dtype F32 need"):
        ShardReader(tmp_path)


def test_an_unsupported_dtype_is_an_error_only_when_that_tensor_is_read(tmp_path):
    _write_raw(tmp_path / "model.safetensors",
               {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "ids": {"dtype": "U32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16))
    reader = ShardReader(tmp_path)
    assert torch.equal(reader.read("w"), torch.zeros(2))
    with pytest.raises(UserError, match="tensor ids has dtype U32, which this tool does not read"):
        reader.read("ids")
