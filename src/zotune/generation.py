"""Generation tasks (SQuAD): a teacher-forced training loss and greedy decoding.

A generation example is an :class:`~zotune.tasks.Example` with ``answers`` (the
gold texts) and no candidates. Training scores only the first gold answer,
after the prompt, by teacher forcing: the loss is the mean token negative
log-likelihood of ``target_text(example)`` (a space, the answer and a
newline, as MeZO's SQuAD template writes it, so the model also learns to stop),
averaged over the examples of the batch. Evaluation decodes greedily, stops at
a newline or EOS, and scores the text with SQuAD's EM and F1
(:mod:`zotune.metrics`).

The prompt keeps its last ``max_length`` tokens (the question is at the end);
the answer comes on top of that budget, so ``max_length`` means the same thing
as for classification: the longest prompt.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ZOError
from .tasks import Example

MAX_NEW_TOKENS = 30  # SQuAD answers are short spans: 30 tokens cover nearly all of them
MAX_TARGET_TOKENS = 64


def target_text(example: Example) -> str:
    """The continuation teacher forcing scores: the first gold answer, then a newline.

    A space separates it from a prompt that ends in a word (``"Answer:"`` +
    ``" Denver Broncos\\n"``), none from one that ends in whitespace, as for
    classification candidates.
    """
    if not example.answers:
        raise ZOError("not a generation example (it has no answers)")
    sep = "" if example.prompt[-1:].isspace() else " "
    return f"{sep}{example.answers[0]}\n"


def _hf(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _prompt_ids(tok, prompt: str, max_length: int) -> list[int]:
    ids = tok(prompt, add_special_tokens=True).input_ids
    return ids[-max_length:] if len(ids) > max_length else ids


def answer_nll(model: nn.Module, tok, examples: Sequence[Example], max_length: int = 256) -> torch.Tensor:
    """``[len(examples)]``: mean token NLL of each example's target after its prompt.

    The backbone runs once on right-padded ``prompt + target``; the output
    embedding is applied only to the positions that predict target tokens.
    """
    seqs, spans = [], []
    for e in examples:
        tid = tok(target_text(e), add_special_tokens=False).input_ids[:MAX_TARGET_TOKENS]
        pid = _prompt_ids(tok, e.prompt, max_length)
        spans.append((len(pid), len(tid)))
        seqs.append(pid + tid)
    hf = _hf(model)
    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    backbone = getattr(hf, hf.base_model_prefix)
    hidden = backbone(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    head = hf.get_output_embeddings()
    out = []
    for i, (start, n) in enumerate(spans):
        logits = head(hidden[i, start - 1 : start - 1 + n]).float()
        target = input_ids[i, start : start + n].to(logits.device)
        out.append(-F.log_softmax(logits, -1).gather(1, target[:, None]).mean())
    return torch.stack(out)


def teacher_forcing_loss(model: nn.Module, tok, examples: Sequence[Example], max_length: int = 256) -> torch.Tensor:
    """The training loss of a batch of generation examples (what ``Scorer.loss_tensor`` returns for them).

    A 0-d tensor, differentiable when grad mode is on (first-order LoRA); ZO steps call it under ``no_grad``.
    """
    if not all(e.answers for e in examples):
        raise ZOError("a batch mixes generation and classification examples")
    return answer_nll(model, tok, examples, max_length).mean()


_STOP_IDS: dict[tuple[str, int], list[int]] = {}


def stop_token_ids(tok) -> list[int]:
    """EOS plus every token whose text holds a newline: decoding stops at the end of the answer line."""
    key = (getattr(tok, "name_or_path", ""), len(tok))
    if key not in _STOP_IDS:
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        ids = [i for i, t in enumerate(texts) if "\n" in t]
        if tok.eos_token_id is not None:
            ids.insert(0, tok.eos_token_id)
        _STOP_IDS[key] = ids
    return _STOP_IDS[key]


@torch.no_grad()
def greedy_generate(model: nn.Module, tok, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS,
                    max_length: int = 256, batch_size: int = 16) -> list[str]:
    """Greedy continuations of ``prompts``, cut at the first newline and stripped.

    Prompts are batched in order of length (left padding, so every row's
    next token sits at the last position); results come back in input order.
    """
    from transformers import GenerationConfig

    hf = _hf(model)
    device = next(model.parameters()).device
    stops = stop_token_ids(tok)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=stops or None, pad_token_id=tok.pad_token_id)
    ids = [_prompt_ids(tok, p, max_length) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]) :] = 1
        gen = hf.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for row, i in enumerate(idx):
            text = tok.decode(gen[row, width:], skip_special_tokens=True)
            out[i] = text.split("\n", 1)[0].strip()
    return out
