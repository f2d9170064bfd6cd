"""Tokenizers in GGUF: a SentencePiece (Llama-2 / Mistral style) tokenizer.model written as llama.cpp's "llama"
tokenizer tokenizes as SentencePiece and the model's Hugging Face tokenizer do; a broken tokenizer.model is a
one-line error."""

import io

import pytest
import torch

from compress.cli import main
from compress.export_gguf.run import export_gguf
from compress.export_gguf.sentencepiece import BYTE, CONTROL, UNKNOWN, read_sentencepiece
from tests.export_gguf.llama_cpp_run import llama_cpp_logits, relative_error

TEXTS = ["the quick brown fox, 42 times", "Über naïve café — 3.14159!", "  two  spaces\nand a new line"]


@pytest.fixture(scope="module")
def spm_llama(tmp_path_factory):
    """A tiny Llama whose tokenizer is a real SentencePiece BPE model (byte fallback and no normalization, as
    Llama-2's), trained here, converted by transformers as it converts Llama-2's."""
    spm = pytest.importorskip("sentencepiece", reason="install the [test] extra")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.tiny import _TRAINING_TEXT, tiny_config

    folder = tmp_path_factory.mktemp("spm-llama")
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_TRAINING_TEXT.split(". ") * 5), model_writer=model_file,
                                   model_type="bpe", vocab_size=512, byte_fallback=True, hard_vocab_limit=False,
                                   minloglevel=2, unk_id=0, bos_id=1, eos_id=2,
                                   # Llama-2's normalizer: the text as it is, spaces kept
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer", "add_bos_token": true, '
                                                  '"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}')
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(folder)
    return folder


def test_the_sentencepiece_pieces_are_read_as_written(spm_llama):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(spm_llama / "tokenizer.model"))
    model = read_sentencepiece((spm_llama / "tokenizer.model").read_bytes())
    assert len(model.pieces) == processor.vocab_size() and model.add_dummy_prefix
    for i, piece in enumerate(model.pieces):
        assert piece.text == processor.id_to_piece(i) and piece.score == processor.get_score(i)
    assert model.pieces[0].kind == UNKNOWN and model.pieces[1].kind == CONTROL and model.pieces[3].kind == BYTE


def test_llama_cpp_tokenizes_as_the_model_tokenizer_and_runs_it(spm_llama, tmp_path):
    pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    export_gguf(str(spm_llama), "f16", str(tmp_path / "m.gguf"))
    fields = GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
    tokenizer = AutoTokenizer.from_pretrained(spm_llama)
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(spm_llama / "tokenizer.model"))
    ids = tokenizer(TEXTS[0])["input_ids"]
    theirs, tokenized = llama_cpp_logits(tmp_path / "m.gguf", ids, tuple(TEXTS), add_bos=True)
    for text, ours in zip(TEXTS, tokenized):
        assert ours == [1] + processor.encode(text), text
        # transformers' converted tokenizer agrees except at leading spaces, where its Metaspace
        # ("prepend_scheme": "first") adds no dummy space before one already there, SentencePiece does.
        if not text.startswith(" "):
            assert ours == tokenizer(text)["input_ids"], text
    from compress.models import load_model

    with torch.no_grad():
        expected = load_model(spm_llama)[0](torch.tensor([ids])).logits[0]
    assert relative_error(theirs, expected) < 0.005


def test_a_broken_tokenizer_model_is_a_one_line_error(spm_llama, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(spm_llama, broken)
    (broken / "tokenizer.model").write_bytes((spm_llama / "tokenizer.model").read_bytes()[:1000])
    assert main(["export-gguf", str(broken), "--type", "f16", "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.model is not a SentencePiece model" in err and err.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists()


def test_a_converted_sentencepiece_tokenizer_json_alone_is_written_as_the_tokenizer_model_would_be(spm_llama,
                                                                                                   tmp_path):
    """Without tokenizer.model (Gemma 3's case), the converted tokenizer.json gives llama.cpp the same pieces and
    types, and scores in the same order for every piece a join can make: so it tokenizes as SentencePiece does."""
    pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")
    import shutil

    import sentencepiece as spm
    from gguf import GGUFReader

    alone = tmp_path / "alone"
    shutil.copytree(spm_llama, alone)
    (alone / "tokenizer.model").unlink()
    export_gguf(str(spm_llama), "f16", str(tmp_path / "model.gguf"))
    export_gguf(str(alone), "f16", str(tmp_path / "json.gguf"))
    written = {}
    for name in ("model", "json"):
        fields = GGUFReader(str(tmp_path / f"{name}.gguf")).fields
        written[name] = {key: fields[f"tokenizer.ggml.{key}"].contents()
                         for key in ("model", "tokens", "token_type", "scores", "add_space_prefix", "bos_token_id")}
    from_model, from_json = written["model"], written["json"]
    assert from_json["model"] == "llama" and from_json["add_space_prefix"] and from_json["bos_token_id"] == 1
    assert from_json["tokens"] == from_model["tokens"]
    # tokenizer.json lists <unk> among its special added tokens, so it is a control token there, as llama.cpp's
    # converter makes it when tokenizer_config.json lists it so (Gemma's own GGUF); byte fallback never emits it.
    differ = {i: (a, b) for i, (a, b) in enumerate(zip(from_model["token_type"], from_json["token_type"])) if a != b}
    assert differ == {0: (UNKNOWN, CONTROL)}
    made = [i for i, token in enumerate(from_model["tokens"]) if from_model["token_type"][i] == 1 and len(token) > 1]
    assert len(made) > 200
    order = sorted(made, key=lambda i: -from_model["scores"][i])
    assert sorted(made, key=lambda i: -from_json["scores"][i]) == order  # ties never happen among made pieces
    processor = spm.SentencePieceProcessor(model_file=str(spm_llama / "tokenizer.model"))
    _, tokenized = llama_cpp_logits(tmp_path / "json.gguf", [1], tuple(TEXTS), add_bos=True)
    for text, ours in zip(TEXTS, tokenized):
        assert ours == [1] + processor.encode(text), text


@pytest.mark.parametrize("normalizer, pre_tokenizer, prefix", [
    ({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
     {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}, False),
    ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                          {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
     None, True),
    (None, {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": False}, False),
    (None, {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}, None),
    (None, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, None),
    ({"type": "NFKC"}, None, None),
])
def test_which_tokenizer_json_is_a_converted_sentencepiece_model(normalizer, pre_tokenizer, prefix):
    from compress.export_gguf.vocab import sentencepiece_space_prefix

    spec = {"model": {"type": "BPE", "byte_fallback": True}, "normalizer": normalizer, "pre_tokenizer": pre_tokenizer}
    assert sentencepiece_space_prefix(spec) is prefix
    assert sentencepiece_space_prefix(spec | {"model": {"type": "BPE", "byte_fallback": False}}) is None


def test_merge_scores_rank_each_piece_by_the_first_merge_that_makes_it():
    from compress.export_gguf.vocab import merge_scores

    scores = merge_scores(["a b", "ab c", "a bc", "x y"], ["a", "ab", "abc", "xy", "bc", "q"])
    assert scores == [-4.0, -0.0, -1.0, -3.0, -4.0, -4.0]
