import pytest
import torch

from compress.data import calibration_windows, eval_windows, load_calibration_text, load_text, tokenize
from compress.errors import UserError


def test_calibration_windows_are_seeded_and_recorded(calib_file):
    text, record = load_text(str(calib_file))
    ids = torch.arange(5000)
    a, rec_a = calibration_windows(ids, record, 8, 64, seed=3)
    b, rec_b = calibration_windows(ids, record, 8, 64, seed=3)
    c, _ = calibration_windows(ids, record, 8, 64, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and rec_a.starts == rec_b.starts
    assert [int(w[0]) for w in a] != [int(w[0]) for w in c]
    assert all(w.numel() == 64 and torch.equal(w, ids[s:s + 64]) for w, s in zip(a, rec_a.starts))
    assert rec_a.count == 8 and rec_a.seed == 3 and rec_a.text.sha256 == record.sha256


def test_eval_windows_non_overlapping_remainder_dropped(calib_file):
    _, record = load_text(str(calib_file))
    windows, rec = eval_windows(torch.arange(1000), record, 300)
    assert [int(w[0]) for w in windows] == [0, 300, 600] and rec.count == 3
    assert len(eval_windows(torch.arange(1000), record, 300, max_windows=2)[0]) == 2


def test_text_too_short(calib_file):
    _, record = load_text(str(calib_file))
    with pytest.raises(UserError, match="fewer than seqlen"):
        calibration_windows(torch.arange(10), record, 2, 64, seed=0)


def test_file_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert load_text(str(tmp_path / "a.jsonl"))[0] == "one\n\ntwo"
    (tmp_path / "b.tsv").write_text("text\tlabel\nhello there\t1\nbye\t0\n")
    assert load_text(str(tmp_path / "b.tsv"))[0] == "hello there\n\nbye"
    (tmp_path / "c.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(UserError, match="c.jsonl:1"):
        load_text(str(tmp_path / "c.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))


def test_offline_without_data_dir_names_the_fix(monkeypatch):
    monkeypatch.delenv("COMPRESS_DATA_DIR", raising=False)
    with pytest.raises(UserError, match="COMPRESS_DATA_DIR"):
        load_text("wikitext2:test")
    with pytest.raises(UserError, match="--calib FILE"):
        load_calibration_text("auto")


def test_shared_wikitext_and_sst2(data_dir):
    text, record = load_text("wikitext2")
    assert record.split == "test" and record.origin.startswith("local:")
    assert record.sha256 == "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
    _, calib = load_calibration_text("auto")
    # WikiText-2 train is not shipped offline: calibration falls back to SST-2 train, never the eval text.
    assert (calib.source, calib.split) == ("sst2", "train")


def test_tokenize_adds_no_special_tokens():
    from compress.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = tokenize(tok, "the river")
    assert ids.dtype == torch.long and tok.bos_token_id not in ids.tolist()
