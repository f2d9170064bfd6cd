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
    # The file (SHA-256 4f3e427e…) read as the hub's rows are joined: non-empty lines, LF line ends.
    assert record.sha256 == "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a"
    assert "\r" not in text and record.convention.startswith("WikiText: its non-empty rows")
    _, calib = load_calibration_text("auto")
    # WikiText-2 train is not shipped offline: calibration falls back to SST-2 train, never the eval text.
    assert (calib.source, calib.split) == ("sst2", "train")


def test_tokenize_adds_no_special_tokens():
    from compress.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = tokenize(tok, "the river")
    assert ids.dtype == torch.long and tok.bos_token_id not in ids.tolist()


@pytest.mark.parametrize("source", ["wikitext2", "sst2:train"])
def test_a_prefix_gives_the_whole_texts_first_tokens(data_dir, source):
    from compress.data import tokenize_prefix
    from compress.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    text, _ = load_text(source)
    whole = tokenize(tok, text[:400_000])
    for tokens in (1, 100, 4096, 50_000):
        assert torch.equal(tokenize_prefix(tok, text[:400_000], tokens), whole[:tokens]), tokens
    assert torch.equal(tokenize_prefix(tok, text[:3000], 10**9), tokenize(tok, text[:3000]))
    assert torch.equal(tokenize_prefix(tok, text[:3000], None), tokenize(tok, text[:3000]))


def test_only_the_needed_text_is_tokenized(data_dir):
    from compress.data import CALIBRATION_POOL, calibration_windows_of_text, eval_windows_of_text
    from compress.tiny import tiny_tokenizer

    class CountingTokenizer:
        def __init__(self):
            self.inner, self.characters = tiny_tokenizer(), 0

        def __call__(self, text, **kwargs):
            self.characters += len(text)
            return self.inner(text, **kwargs)

    text, record = load_text("sst2:train")
    counting = CountingTokenizer()
    windows, rec = calibration_windows_of_text(counting, text, record, 8, 64, seed=0)
    pool = CALIBRATION_POOL * 8 * 64
    assert rec.tokens == pool and str(pool) in rec.rule and len(windows) == 8
    assert counting.characters < 30 * pool < len(text) / 10  # a few prefixes, never the 67k sentences
    # The windows are the old rule's over the pool: the same starts as over the pool's ids.
    again, rec_again = calibration_windows(tokenize(counting.inner, text[:200_000])[:pool], record, 8, 64, seed=0)
    assert rec_again.starts == rec.starts and all(torch.equal(a, b) for a, b in zip(windows, again))

    counting.characters = 0
    evals, rec = eval_windows_of_text(counting, text, record, 64, max_windows=3)
    assert len(evals) == 3 and rec.tokens == 192 and counting.characters < 10_000
    assert torch.equal(torch.cat(evals), tokenize(counting.inner, text[:20_000])[:192])


def test_calibration_of_a_short_text_is_unchanged(calib_file):
    from compress.data import calibration_windows_of_text
    from compress.tiny import tiny_tokenizer

    # A text shorter than the pool is used whole: the windows the earlier rule drew.
    tok = tiny_tokenizer()
    text, record = load_text(str(calib_file))
    whole = tokenize(tok, text)
    nsamples = 4
    seqlen = whole.numel() // (4 * nsamples) + 1  # the pool (4 x nsamples x seqlen) exceeds the text
    new, _ = calibration_windows_of_text(tok, text, record, nsamples, seqlen, seed=5)
    old, _ = calibration_windows(whole, record, nsamples, seqlen, seed=5)
    assert len(new) == nsamples and all(torch.equal(a, b) for a, b in zip(new, old))


def test_wikitext_is_one_text_from_the_hub_or_the_offline_copy(data_dir):
    from compress.data import _read_wikitext, wikitext_text

    path = data_dir / "wikitext-2-raw" / "wiki.test.raw"
    # The hub's rows: the raw file's lines with LF ends, whitespace-only lines as empty rows (which the offline
    # copy dropped), as the datasets loader yields them.
    lines = path.read_bytes().decode("utf-8").replace("\r\n", "\n").splitlines(keepends=True)
    hub_rows = [""]
    for number, line in enumerate(lines):
        hub_rows += [line, ""] if line.lstrip().startswith("=") else [line]
        if number % 7 == 0:
            hub_rows.append("")
    assert wikitext_text(hub_rows) == _read_wikitext(path)


def test_a_hub_that_cannot_give_a_split_is_named_as_such(monkeypatch, tmp_path):
    import compress.data as data

    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    broken = data.SOURCES["wikitext2"].__class__(**{**data.SOURCES["wikitext2"].__dict__,
                                                    "hub": lambda split: (_ for _ in ()).throw(ValueError(
                                                        f"Unknown split {split}"))})
    monkeypatch.setitem(data.SOURCES, "wikitext2", broken)
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"the hub did not give it \(ValueError: Unknown split nope\) and no offline"):
        load_text("wikitext2:nope")


def test_calibration_windows_start_with_bos_where_the_tokenizer_puts_one(calib_file):
    """A tokenizer that puts BOS before a text (Llama-2, Gemma) gets windows of BOS and seqlen - 1 text tokens, the
    text drawn as the same rule draws seqlen - 1 tokens; one that does not (SmolLM2's, the tiny ones) is unchanged."""
    from tokenizers import processors

    from compress.data import calibration_windows_of_text, leading_bos
    from compress.tiny import tiny_tokenizer

    plain = tiny_tokenizer()
    with_bos = tiny_tokenizer()
    bos = with_bos.bos_token_id
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{with_bos.bos_token} $A", special_tokens=[(with_bos.bos_token, bos)])
    assert leading_bos(plain) is None and leading_bos(with_bos) == bos
    text, record = load_text(str(calib_file))
    windows, rec = calibration_windows_of_text(with_bos, text, record, 4, 32, seed=1)
    text_only, rec_plain = calibration_windows_of_text(plain, text, record, 4, 31, seed=1)
    assert rec.bos and not rec_plain.bos and rec.starts == rec_plain.starts
    assert all(w.numel() == 32 and int(w[0]) == bos and torch.equal(w[1:], t) for w, t in zip(windows, text_only))
