"""Candidate scoring for prompt-based classification and multiple choice.

An example's score for a candidate is the average per-token log-likelihood of
the candidate after the prompt (MeZO's protocol); the prediction is the best
candidate and the training loss is cross-entropy over the candidates' scores.

Logits are computed only where they are needed. The backbone runs once and the
output embedding is applied to the few scored positions, never to the whole
sequence. When every candidate is a single token (sentiment verbalizers), only
the candidates' rows of the output embedding are used: the log-softmax
normalizer is the same for all candidates at that position, so it cancels in
both the argmax and the cross-entropy over candidates.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ZOError
from .tasks import Example


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Scorer:
    """Scores candidates with a causal LM; right padding, explicit positions."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 256):
        self.model, self.tok, self.max_length = model, tokenizer, max_length
        self._single: dict[tuple[str, ...], list[int] | None] = {}

    # -- pieces of the model -------------------------------------------------------------
    def _backbone(self) -> nn.Module:
        hf = hf_model(self.model)
        return getattr(hf, hf.base_model_prefix)

    def _head(self) -> nn.Module:
        return hf_model(self.model).get_output_embeddings()

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _hidden(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the backbone on right-padded ``ids``; return (hidden states, lengths)."""
        lengths = torch.tensor([len(x) for x in ids])
        width = int(lengths.max())
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        dev = self._device()
        out = self._backbone()(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        return out.last_hidden_state, lengths.to(dev)

    def _prompt_ids(self, prompt: str, reserve: int = 0) -> list[int]:
        ids = self.tok(prompt, add_special_tokens=True).input_ids
        keep = self.max_length - reserve
        return ids[-keep:] if len(ids) > keep else ids  # keep the end: the template's cue is there

    def _single_token_ids(self, candidates: tuple[str, ...]) -> list[int] | None:
        """Token ids when every candidate is exactly one token, else None."""
        if candidates not in self._single:
            ids = [self.tok(c, add_special_tokens=False).input_ids for c in candidates]
            self._single[candidates] = [x[0] for x in ids] if all(len(x) == 1 for x in ids) else None
        return self._single[candidates]

    # -- scores --------------------------------------------------------------------------
    def scores(self, examples: Sequence[Example]) -> torch.Tensor:
        """``[len(examples), n_candidates]`` candidate scores (higher is better)."""
        singles = [self._single_token_ids(e.candidates) for e in examples]
        if len({len(e.candidates) for e in examples}) == 1 and all(s is not None for s in singles):
            return self._scores_single(examples, singles)
        return self._scores_multi(examples)

    def _scores_single(self, examples, cand_ids) -> torch.Tensor:
        hidden, lengths = self._hidden([self._prompt_ids(e.prompt) for e in examples])
        last = hidden[torch.arange(len(examples), device=hidden.device), lengths - 1]  # [B, H]
        head = self._head()
        rows = head.weight[torch.tensor(cand_ids, device=hidden.device)]  # [B, C, H]
        scores = torch.einsum("bh,bch->bc", last.to(rows.dtype), rows)
        if getattr(head, "bias", None) is not None:
            scores = scores + head.bias[torch.tensor(cand_ids, device=hidden.device)]
        return scores.float()

    def _scores_multi(self, examples) -> torch.Tensor:
        seqs, spans = [], []
        for e in examples:
            for c in e.candidates:
                cid = self.tok(c, add_special_tokens=False).input_ids or [self.tok.eos_token_id]
                cid = cid[: self.max_length // 2]
                pid = self._prompt_ids(e.prompt, reserve=len(cid))
                spans.append((len(pid), len(cid)))
                seqs.append(pid + cid)
        hidden, _ = self._hidden(seqs)
        head = self._head()
        out = []
        for i, (start, n) in enumerate(spans):
            logits = head(hidden[i, start - 1 : start - 1 + n]).float()  # positions predicting the candidate
            target = torch.tensor(seqs[i][start : start + n], device=logits.device)
            out.append(F.log_softmax(logits, -1).gather(1, target[:, None]).mean())
        # Examples may have different numbers of candidates (ReCoRD): pad with -inf,
        # which neither wins the argmax nor takes probability mass in the cross-entropy.
        width = max(len(e.candidates) for e in examples)
        scores = torch.full((len(examples), width), float("-inf"), device=hidden.device)
        i = 0
        for row, e in enumerate(examples):
            scores[row, : len(e.candidates)] = torch.stack(out[i : i + len(e.candidates)])
            i += len(e.candidates)
        return scores

    # -- what training and evaluation use ------------------------------------------------
    @torch.no_grad()
    def loss(self, examples: Sequence[Example]) -> float:
        """Cross-entropy over candidates, averaged over the batch."""
        if examples and examples[0].answers:  # generation (SQuAD): teacher-forced answer NLL, see zotune.generation
            from .generation import teacher_forcing_loss
            return teacher_forcing_loss(self.model, self.tok, examples, self.max_length)
        labels = torch.tensor([e.label for e in examples], device=self._device())
        return float(F.cross_entropy(self.scores(examples), labels))

    @torch.no_grad()
    def accuracy(self, examples: Sequence[Example], batch_size: int = 32, progress: bool = False,
                 desc: str = "eval") -> float:
        """Fraction of examples whose best-scored candidate is the gold one.

        Examples are scored in order of prompt length to cut padding (results do
        not depend on the order).
        """
        if not examples:
            raise ZOError("cannot evaluate on an empty split")
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc=desc, leave=False, unit="batch")
        correct = 0
        for idx in batches:
            batch = [examples[i] for i in idx]
            pred = self.scores(batch).argmax(-1).cpu()
            correct += int((pred == torch.tensor([e.label for e in batch])).sum())
        return correct / len(examples)
