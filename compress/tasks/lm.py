"""lm-evaluation-harness's model interface over any model our benchmark loads: a callable
``model(ids, use_cache=..., logits_to_keep=..., past_key_values=...)`` returning ``.logits`` (transformers
models, our quantized loader, torch kernels, bitsandbytes, ONNX Runtime, llama.cpp alike).

Tokenization follows lm-eval's HuggingFace model (``HFLM``): the tokenizer's own special-token convention, the
context's trailing spaces moved to the continuation, an empty context replaced by BOS (or EOS). Requests are
scored longest first in batches of right-padded rows: a causal model's logits at a real position do not depend
on the padding after it, so no attention mask is needed and every backend can take the batch.
"""

from __future__ import annotations

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

LOGITS_BUDGET_BYTES = 1 << 30
"""Float32 logits one scoring batch may hold (rows x positions x vocabulary)."""


class CompressLM(TemplateLM):
    def __init__(self, model, tokenizer, device: torch.device, max_length: int, vocab: int,
                 batch_size: int | None = None, progress: bool = False) -> None:
        super().__init__()
        self.model, self.tokenizer, self._device = model, tokenizer, device
        self._max_length, self.vocab = max_length, vocab
        self.batch_size = batch_size
        self.progress = progress

    # --- what lm-eval asks of a model --------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            options["add_special_tokens"] = False  # the text carries its BOS already
        return self.tokenizer.encode(string, **options)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # --- scoring -----------------------------------------------------------------------------------

    def _rows_per_batch(self, length: int) -> int:
        if self.batch_size:
            return self.batch_size
        # Bounded as if every position's logits were kept (the worst case of a batch).
        return max(1, min(32, LOGITS_BUDGET_BYTES // max(1, length * self.vocab * 4)))

    @torch.inference_mode()
    def _score(self, sequences: list[tuple[list[int], int]], desc: str) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, all greedy) of the last ``n`` tokens of each sequence given the ones
        before, for (tokens, n) pairs."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(sequences)
        bar = tqdm(total=len(order), desc=desc, disable=not self.progress, dynamic_ncols=True)
        at = 0
        while at < len(order):
            longest = len(sequences[order[at]][0]) - 1
            rows = order[at:at + self._rows_per_batch(longest)]
            at += len(rows)
            batch = torch.full((len(rows), longest), self.prefix_token_id, dtype=torch.long)
            for r, i in enumerate(rows):
                tokens = sequences[i][0][:-1]
                batch[r, :len(tokens)] = torch.tensor(tokens)
            # Logits only from the first position any row scores: rows of one batch have similar lengths and
            # short continuations, so this is a small tail of the window, not the whole vocabulary x window.
            first = min(len(sequences[i][0]) - 1 - sequences[i][1] for i in rows)
            logits = self.model(batch.to(self._device), use_cache=False, logits_to_keep=longest - first).logits
            for r, i in enumerate(rows):
                tokens, n = sequences[i]
                end = len(tokens) - 1 - first
                logprobs = torch.log_softmax(logits[r, end - n:end].float(), dim=-1)
                targets = torch.tensor(tokens[-n:], device=logprobs.device)
                total = float(logprobs.gather(1, targets[:, None]).sum())
                results[i] = (total, bool((logprobs.argmax(-1) == targets).all()))
            bar.update(len(rows))
        bar.close()
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        sequences = []
        for _, context_enc, continuation_enc in requests:
            # The last max_length + 1 tokens: the model sees max_length, the continuation is scored.
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            sequences.append((whole, min(len(continuation_enc), len(whole) - 1)))
        return self._score(sequences, "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        sequences, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            for context, continuation in windows:
                sequences.append((context + continuation, len(continuation)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score(sequences, "rolling loglikelihood")):
            totals[owner] += logprob
        return totals

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation of each request until one of its stop strings (or max_gen_toks tokens)."""
        outputs = []
        for context, options in tqdm([req.args for req in requests], desc="generate", disable=not self.progress):
            options = dict(options or {})
            until = options.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(options.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - budget):]
            out = self.model(torch.tensor([ids], device=self._device), use_cache=True, logits_to_keep=1)
            generated: list[int] = []
            text = ""
            for _ in range(budget):
                token = int(out.logits[0, -1].argmax())
                if token == self.eot_token_id:
                    break
                generated.append(token)
                text = self.tok_decode(generated)
                if any(stop in text for stop in until):
                    break
                out = self.model(torch.tensor([[token]], device=self._device), past_key_values=out.past_key_values,
                                 use_cache=True)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs
