"""Candidate scoring for prompt-based classification and multiple choice.

An example's score for a candidate is the average per-token log-likelihood of
the candidate after the prompt (MeZO's protocol); the prediction is the best
candidate and the training loss is cross-entropy over the candidates' scores.

A ZO step is two forward passes and nothing else, so the forward is the whole
cost of training. The scorer therefore does only the work the scores need
(``scoring="restricted"``, the default):

* The backbone runs once and the output embedding (vocabulary x hidden, a
  large share of a small model: 49152 x 576 on SmolLM2-135M) is applied only
  at the scored positions, never to the whole sequence.
* When every candidate is a single token (sentiment verbalizers), only the
  candidates' rows of the output embedding are used: the log-softmax
  normalizer is the same for all candidates at that position, so it cancels in
  both the argmax and the cross-entropy over candidates. The scores are then
  logits, not log-probabilities; :meth:`Scorer.candidate_logprobs`
  (normalized over the candidates) is the same in every mode.
* Multiple choice with multi-token candidates (COPA, ReCoRD) runs each prompt
  once, keeps its key/value cache, and runs only the candidates' tokens on
  copies of that cache (``share_prompt``), instead of re-running the prompt
  once per candidate.

``scoring="full"`` is the plain reference: the model's own forward, logits for
the whole vocabulary at every position, log-softmax, gather. It exists so that
tests and ``benchmarks/step_cost.py`` can check and price the shortcuts.

Padding is wasted compute: batches are right-padded with explicit positions
(so results do not depend on what an example is batched with), evaluation
scores examples in order of token length, and ``micro_batch_size`` splits a
training batch into length-sorted chunks (same mean loss, less padding).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ZOError, require
from .tasks import Example


def cache_argument(module: nn.Module) -> str:
    """The name under which ``module``'s forward takes a KV cache to continue.

    Why: transformers 5 renamed ``past_key_values`` to ``cache`` (the old name still works, with a
    deprecation warning in every user's log until it is removed); older versions know only the old one.
    """
    forward = getattr(module, "_orig_mod", module).forward  # a torch.compile wrapper: the model inside
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned (``cache`` since transformers 5, ``past_key_values`` before), or None."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


SCORING = ("restricted", "full")


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the token slots in right-padded ``batches`` (lists of indices into ``lengths``) that are padding."""
    real = sum(lengths[i] for b in batches for i in b)
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1.0 - real / slots if slots else 0.0


def length_sorted_chunks(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices sorted by length, cut into chunks of ``size``: the least padding for that chunk size."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + size] for i in range(0, len(order), size)]


class Scorer:
    """Scores candidates with a causal LM; right padding, explicit positions.

    ``scoring``: ``restricted`` (logits only where needed) or ``full`` (the
    model's whole-vocabulary logits; the reference). ``share_prompt``: score
    multi-token candidates on the prompt's KV cache instead of re-running the
    prompt. ``micro_batch_size``: split batches larger than this into
    length-sorted chunks (0 = one forward per batch). ``compile``: run the
    model through ``torch.compile`` (opt-in; compiles on first use and again
    for new shapes).
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 256, scoring: str = "restricted",
                 share_prompt: bool = True, micro_batch_size: int = 0, compile: bool = False):
        require(scoring in SCORING, f"scoring must be one of {', '.join(SCORING)}, got {scoring!r}")
        require(micro_batch_size >= 0, f"micro_batch_size must be >= 0, got {micro_batch_size}")
        self.model, self.tok, self.max_length = model, tokenizer, max_length
        self.scoring, self.share_prompt, self.micro_batch_size = scoring, share_prompt, micro_batch_size
        self.compile = compile
        self._single: dict[tuple[str, ...], list[int] | None] = {}
        self._compiled: dict[int, nn.Module] = {}

    # -- pieces of the model -------------------------------------------------------------
    def _backbone(self) -> nn.Module:
        hf = hf_model(self.model)
        return getattr(hf, hf.base_model_prefix)

    def _head(self) -> nn.Module:
        return hf_model(self.model).get_output_embeddings()

    def _device(self) -> torch.device:
        """Where inputs go: accelerate's execution device for a model placed over devices/disk."""
        from .models import execution_device

        return execution_device(self.model)

    def _module(self) -> nn.Module:
        """What a forward runs: the backbone (restricted) or the whole LM with its head (full)."""
        module = hf_model(self.model) if self.scoring == "full" else self._backbone()
        if not self.compile:
            return module
        if id(module) not in self._compiled:  # parameters are shared: ZO perturbations still apply
            self._compiled[id(module)] = torch.compile(module, dynamic=True)
        return self._compiled[id(module)]

    def _run(self, ids: list[list[int]], past=None, past_mask: torch.Tensor | None = None,
             start: torch.Tensor | None = None, cache: bool = False):
        """Run right-padded ``ids``, continuing ``past`` (a KV cache whose padding is ``past_mask``)
        at positions ``start`` when given. Returns (model output, lengths, attention mask)."""
        dev = self._device()
        lengths = torch.tensor([len(x) for x in ids], device=dev)
        width = max(1, int(lengths.max()))
        input_ids = torch.full((len(ids), width), self.tok.pad_token_id, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        cols = torch.arange(width, device=dev)
        mask = (cols[None] < lengths[:, None]).long()
        positions = cols[None] + (start[:, None] if start is not None else 0)
        full_mask = mask if past_mask is None else torch.cat([past_mask, mask], 1)
        module = self._module()
        kv = {cache_argument(module): past} if past is not None else {}
        out = module(input_ids=input_ids.to(dev), attention_mask=full_mask, position_ids=positions,
                     use_cache=cache, **kv)
        return out, lengths, full_mask

    def _logprobs_at(self, out, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) predicted at positions (rows, cols) of a run's output."""
        if self.scoring == "full":
            logits = out.logits[rows, cols]
        else:
            logits = self._head()(out.last_hidden_state[rows, cols])
        return F.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0]

    # -- tokens --------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str, reserve: int = 0) -> list[int]:
        ids = self.tok(prompt, add_special_tokens=True).input_ids
        keep = self.max_length - reserve
        return ids[-keep:] if len(ids) > keep else ids  # keep the end: the template's cue is there

    def _candidate_ids(self, candidate: str) -> list[int]:
        ids = self.tok(candidate, add_special_tokens=False).input_ids or [self.tok.eos_token_id]
        return ids[: self.max_length // 2]

    def _single_token_ids(self, candidates: tuple[str, ...]) -> list[int] | None:
        """Token ids when every candidate is exactly one token, else None."""
        if candidates not in self._single:
            ids = [self.tok(c, add_special_tokens=False).input_ids for c in candidates]
            self._single[candidates] = [x[0] for x in ids] if all(len(x) == 1 for x in ids) else None
        return self._single[candidates]

    def _plan(self, e: Example) -> tuple[list[int], list[list[int]]]:
        """(prompt ids, candidate ids) of a multi-token example. The prompt is cut to leave room for
        the longest candidate, so every candidate follows the same prompt (what the KV cache shares)."""
        cands = [self._candidate_ids(c) for c in e.candidates]
        return self._prompt_ids(e.prompt, reserve=max(len(c) for c in cands)), cands

    def length(self, e: Example) -> int:
        """Tokens the example's longest scored sequence has (its padding-relevant length)."""
        if self._single_token_ids(e.candidates) is not None:
            return len(self._prompt_ids(e.prompt))
        prompt, cands = self._plan(e)
        return len(prompt) + max(len(c) for c in cands)

    # -- scores --------------------------------------------------------------------------
    def scores(self, examples: Sequence[Example]) -> torch.Tensor:
        """``[len(examples), n_candidates]`` candidate scores (higher is better); -inf pads rows with fewer candidates."""
        m = self.micro_batch_size
        if not m or len(examples) <= m:
            return self._scores_batch(examples)
        parts = [(idx, self._scores_batch([examples[i] for i in idx]))
                 for idx in length_sorted_chunks([self.length(e) for e in examples], m)]
        width = max(p.shape[1] for _, p in parts)
        out = torch.full((len(examples), width), float("-inf"), device=parts[0][1].device)
        for idx, p in parts:
            out[torch.tensor(idx, device=out.device), : p.shape[1]] = p
        return out

    def candidate_logprobs(self, examples: Sequence[Example]) -> torch.Tensor:
        """Log-probabilities of the candidates among the candidates (what the loss and argmax see)."""
        return F.log_softmax(self.scores(examples), -1)

    def _scores_batch(self, examples: Sequence[Example]) -> torch.Tensor:
        singles = [self._single_token_ids(e.candidates) for e in examples]
        if len({len(e.candidates) for e in examples}) == 1 and all(s is not None for s in singles):
            return self._scores_single(examples, singles)
        return self._scores_multi(examples)

    def _scores_multi(self, examples: Sequence[Example]) -> torch.Tensor:
        """Mean log-likelihood of each candidate's tokens (any number of tokens, candidates per example)."""
        plans = [self._plan(e) for e in examples]
        if self.share_prompt:
            scores = self._scores_shared(plans)
            if scores is not None:
                return scores
        return self._scores_recompute(plans)

    def _scores_single(self, examples, cand_ids) -> torch.Tensor:
        out, lengths, _ = self._run([self._prompt_ids(e.prompt) for e in examples])
        rows, last = torch.arange(len(examples), device=lengths.device), lengths - 1
        cand = torch.tensor(cand_ids, device=lengths.device)  # [B, C]
        if self.scoring == "full":
            return F.log_softmax(out.logits[rows, last].float(), -1).gather(1, cand)
        hidden = out.last_hidden_state[rows, last]  # [B, H]
        head = self._head()
        from accelerate.utils import align_module_device

        with align_module_device(head):  # an offloaded (untied) head is loaded for this read
            scores = torch.einsum("bh,bch->bc", hidden.to(head.weight.dtype), head.weight[cand])
        if getattr(head, "bias", None) is not None:
            scores = scores + head.bias[cand]
        return scores.float()

    def _scores_recompute(self, plans) -> torch.Tensor:
        """Every (prompt + candidate) as its own sequence."""
        seqs = [p + c for p, cands in plans for c in cands]
        out, _, _ = self._run(seqs)
        rows, cols, targets, owner = [], [], [], []
        i = 0
        for p, cands in plans:
            for c in cands:
                rows += [i] * len(c)
                cols += range(len(p) - 1, len(p) - 1 + len(c))  # positions predicting the candidate
                targets += c
                owner += [i] * len(c)
                i += 1
        lp = self._logprobs_at(out, *self._tensors(rows, cols, targets))
        return self._assemble(plans, lp, torch.tensor(owner, device=lp.device))

    def _scores_shared(self, plans) -> torch.Tensor | None:
        """Prompts once (keeping their KV cache), then only the candidates' tokens on copies of it.

        A candidate's first token is predicted at the prompt's last position; the
        rest by feeding the candidate's own tokens after the cache. Returns None
        when the model keeps no cache (the caller recomputes).
        """
        out, lengths, prompt_mask = self._run([p for p, _ in plans], cache=True)
        cache = returned_cache(out)
        if cache is None or not hasattr(cache, "reorder_cache"):
            return None
        dev = lengths.device
        cands = [c for _, cs in plans for c in cs]
        owner = torch.tensor([b for b, (_, cs) in enumerate(plans) for _ in cs], device=dev)
        first = self._logprobs_at(out, owner, lengths[owner] - 1, torch.tensor([c[0] for c in cands], device=dev))
        lp, who = [first], [torch.arange(len(cands), device=dev)]
        feed = [c[:-1] for c in cands]
        if any(feed):
            cache.reorder_cache(owner)  # one copy of its prompt's cache per candidate
            out2, _, _ = self._run(feed, past=cache, past_mask=prompt_mask[owner], start=lengths[owner])
            rows = [i for i, f in enumerate(feed) for _ in f]
            cols = [k for f in feed for k in range(len(f))]
            targets = [t for c in cands for t in c[1:]]
            lp.append(self._logprobs_at(out2, *self._tensors(rows, cols, targets)))
            who.append(torch.tensor(rows, device=dev))
        return self._assemble(plans, torch.cat(lp), torch.cat(who))

    def _tensors(self, *lists):
        dev = self._device()
        return tuple(torch.tensor(x, dtype=torch.long, device=dev) for x in lists)

    @staticmethod
    def _assemble(plans, token_lp: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs (``owner``: their candidate) -> ``[B, max candidates]`` mean log-likelihoods."""
        n_cands = sum(len(cs) for _, cs in plans)
        sums = torch.zeros(n_cands, device=token_lp.device).index_add_(0, owner, token_lp)
        counts = torch.tensor([len(c) for _, cs in plans for c in cs], device=token_lp.device)
        means = sums / counts
        # Examples may have different numbers of candidates (ReCoRD): pad with -inf,
        # which neither wins the argmax nor takes probability mass in the cross-entropy.
        width = max(len(cs) for _, cs in plans)
        scores = torch.full((len(plans), width), float("-inf"), device=token_lp.device)
        i = 0
        for row, (_, cs) in enumerate(plans):
            scores[row, : len(cs)] = means[i : i + len(cs)]
            i += len(cs)
        return scores

    # -- what training and evaluation use ------------------------------------------------
    @torch.no_grad()
    def loss(self, examples: Sequence[Example]) -> float:
        """Cross-entropy over candidates (generation: answer NLL), averaged over the batch."""
        return float(self.loss_tensor(examples))

    def loss_tensor(self, examples: Sequence[Example]) -> torch.Tensor:
        """:meth:`loss` as a 0-d tensor, differentiable when grad mode is on (first-order training).

        Under a ZO step (``no_grad``) it is the same number as :meth:`loss`.
        Generation examples (SQuAD) give the teacher-forced NLL of the answer.
        """
        if examples and examples[0].answers:  # generation: see zotune.generation
            from .generation import teacher_forcing_loss
            return teacher_forcing_loss(self.model, self.tok, examples, self.max_length)
        labels = torch.tensor([e.label for e in examples], device=self._device())
        return F.cross_entropy(self.scores(examples), labels)

    @torch.no_grad()
    def copy_losses(self, examples: Sequence[Example], copies: int) -> torch.Tensor:
        """``[copies]``: :meth:`loss_tensor` of each copy of ``examples`` run ``copies`` times in one forward.

        Each forward (each micro-batch, when ``micro_batch_size`` splits the batch) runs
        its examples repeated ``copies`` times, copy-major, so rows ``[j·n, (j+1)·n)`` are
        copy j: what :mod:`zotune.batched` gives each copy its own adapter for. Without
        such a hook every copy sees the same model and all entries equal ``loss(examples)``.
        """
        if examples and examples[0].answers:  # generation: mean answer NLL per copy
            from .generation import answer_nll
            return answer_nll(self.model, self.tok, list(examples) * copies, self.max_length).view(copies, -1).mean(1)
        labels = torch.tensor([e.label for e in examples], device=self._device())
        m = self.micro_batch_size
        chunks = [list(range(len(examples)))] if not m or len(examples) <= m else \
            length_sorted_chunks([self.length(e) for e in examples], m)
        parts = []
        for idx in chunks:
            part = self._scores_batch([examples[i] for i in idx] * copies)
            parts.append((idx, part.view(copies, len(idx), part.shape[1])))
        width = max(p.shape[2] for _, p in parts)
        out = torch.full((copies, len(examples), width), float("-inf"), device=parts[0][1].device)
        for idx, p in parts:  # as scores(): each chunk's rows back in example order, -inf padded
            out[:, torch.tensor(idx, device=out.device), : p.shape[2]] = p
        return torch.stack([F.cross_entropy(scores, labels) for scores in out])

    @torch.no_grad()
    def accuracy(self, examples: Sequence[Example], batch_size: int = 32, progress: bool = False,
                 desc: str = "eval", sort: bool = True) -> float:
        """Fraction of examples whose best-scored candidate is the gold one.

        Examples are scored in order of token length to cut padding (``sort``;
        results do not depend on the order: right padding, explicit positions).
        """
        if not examples:
            raise ZOError("cannot evaluate on an empty split")
        if sort:
            batches = length_sorted_chunks([self.length(e) for e in examples], batch_size)
        else:
            batches = [list(range(i, min(i + batch_size, len(examples)))) for i in range(0, len(examples), batch_size)]
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc=desc, leave=False, unit="batch")
        correct = 0
        for idx in batches:
            batch = [examples[i] for i in idx]
            pred = self.scores(batch).argmax(-1).cpu()
            correct += int((pred == torch.tensor([e.label for e in batch])).sum())
        return correct / len(examples)
