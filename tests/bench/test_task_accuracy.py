"""Classifier accuracy: what `compress bench` reports for a sequence classifier (SST-2 dev by default)."""

import torch

from compress.bench.run import BenchRequest, bench
from compress.bench.task_accuracy import task_accuracy


def _classifier(folder):
    from transformers import AutoModelForSequenceClassification

    from compress.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("bert")
    config.num_labels = 2
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer


def test_accuracy_is_the_share_of_argmax_matches(tmp_path):
    model, tokenizer = _classifier(tmp_path / "clf")
    texts = ["a fine film", "dull and long", "the model is tiny", "quantization", "great", "bad bad bad"]
    with torch.no_grad():
        predicted = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax()) for t in texts]
    labels = [p if i % 2 else 1 - p for i, p in enumerate(predicted)]  # every other one wrong
    result = task_accuracy(model, tokenizer, list(zip(texts, labels)), torch.device("cpu"), "toy", batch_size=4)
    assert result.examples == 6 and abs(result.accuracy - 0.5) < 1e-9


def test_bench_reports_task_accuracy_for_a_classifier(tmp_path):
    _classifier(tmp_path / "clf")
    data = tmp_path / "dev.tsv"
    data.write_text("text\tlabel\n" + "".join(f"sentence number {i}\t{i % 2}\n" for i in range(10)))
    result = bench(BenchRequest(model=str(tmp_path / "clf"), device="cpu", task=str(data), decode_batches=[1],
                                repeats=1, progress=False))
    task = result.accuracy.task
    assert task.examples == 10 and 0.0 <= task.accuracy <= 1.0
    assert result.accuracy.perplexity is None
    assert result.speed.prefill.tokens_per_s > 0 and result.speed.decode == []
    classify = result.speed.classify  # the whole task at batch 32: one batch of 10 here
    assert classify.examples == 10 and classify.batches == 1 and classify.batch == 10
    assert classify.examples_per_s > 0 and classify.tokens_per_s > classify.examples_per_s
