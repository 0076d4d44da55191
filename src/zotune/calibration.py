"""One-shot calibration: activation statistics of a frozen model, for methods that need data before training.

Some methods choose their query space from the data the model sees (ZO-Act:
the top activation directions of each adapted layer; AGZO-like methods: an
activation basis). :meth:`~zotune.methods.base.Method.prepare` only gets the
model, so such a method sets ``needs_calibration = True`` and receives, before
``prepare``, a few *calibration batches*: dicts of model keyword arguments
(``input_ids`` and ``attention_mask``), run once through the frozen model.

Here live the pieces such a method needs:

* :func:`calibration_batches`: a seeded choice of training examples turned into
  right-padded token batches (what ``zotune train`` and ``zotune replay`` pass);
* :func:`collect_grams`: XᵀX of each chosen layer's input activations,
  accumulated batch by batch in float64 over the *real* tokens only (the
  attention mask drops padding), so memory is d_in² per layer, never N·d_in;
* :func:`top_basis`: the top-k eigenvectors of XᵀX (the top-k right singular
  vectors of X) and the share of activation energy they capture.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from .errors import ZOError

#: What a caller passes as calibration data: batches (dicts of model kwargs), or a callable producing them.
Calibration = Union[Iterable[Mapping[str, torch.Tensor]], Callable[[], Iterable[Mapping[str, torch.Tensor]]]]


def calibration_examples(train: Sequence, n: int, seed: int) -> list:
    """``n`` training examples chosen by ``seed`` (all of them if there are fewer): the same ones on every rerun."""
    if n >= len(train):
        return list(train)
    return random.Random(seed * 7907 + 13).sample(list(train), n)


def token_batches(tok, texts: Sequence[str], batch_size: int = 32, max_length: int = 256) -> list[dict]:
    """Right-padded ``{"input_ids", "attention_mask"}`` batches; long texts keep their end (as the Scorer does)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for i in range(0, len(texts), batch_size):
        ids = [tok(t, add_special_tokens=True).input_ids[-max_length:] for t in texts[i:i + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, :len(x)] = 1
        out.append({"input_ids": input_ids, "attention_mask": mask})
    return out


def calibration_batches(train: Sequence, tok, n: int, seed: int, batch_size: int = 32,
                        max_length: int = 256) -> list[dict]:
    """The calibration batches of a run: ``n`` seeded training examples' prompts, tokenized.

    Prompts are what the model reads when it scores single-token candidates, the
    bulk of the tokens otherwise.
    """
    examples = calibration_examples(train, n, seed)
    if not examples:
        raise ZOError("calibration needs at least one training example")
    return token_batches(tok, [e.prompt for e in examples], batch_size, max_length)


def resolve_batches(calibration: Calibration | None) -> list[Mapping[str, torch.Tensor]]:
    """Materialize a :data:`Calibration` (call it if it is a callable); refuse nothing-at-all."""
    if calibration is None:
        raise ZOError("this method needs calibration data (a few examples run once through the frozen model); "
                      "zotune train passes them itself, ZOOptimizer takes calibration=[batches] or a callable")
    batches = list(calibration() if callable(calibration) else calibration)
    if not batches:
        raise ZOError("calibration data is empty")
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping) or "input_ids" not in b:
            raise ZOError(f"calibration batch {i} must be a dict with input_ids (and attention_mask), "
                          f"got {type(b).__name__}")
    return batches


@dataclass
class Gram:
    """XᵀX of one layer's inputs over the calibration tokens, and how many tokens went in."""

    xtx: torch.Tensor  # [d_in, d_in], float64
    tokens: int = 0


@torch.no_grad()
def collect_grams(model: nn.Module, modules: Mapping[str, nn.Module], batches: Sequence[Mapping[str, torch.Tensor]],
                  progress: bool = False) -> dict[str, Gram]:
    """Run ``batches`` through ``model`` once; return XᵀX of each module's input over the non-padding tokens.

    A forward pre-hook per module adds xᵀx of the current batch's real tokens
    (selected by the batch's ``attention_mask``) to a float64 accumulator: no
    token is stored, and float64 keeps the sum of many rank-1 terms exact enough
    that an exactly low-rank X gives an exactly low-rank XᵀX.
    """
    grams: dict[str, Gram] = {}
    current: dict = {"mask": None, "last": None}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            last = current["last"]
            if last is not None and last[0] is x:  # q/k/v projections read the same tensor: one product for all
                xtx, n = last[1], last[2]
            else:
                rows = x
                mask = current["mask"]
                if mask is not None:
                    if x.shape[:-1] != mask.shape:
                        raise ZOError(f"calibration: input of {name} has shape {tuple(x.shape)}, which does not "
                                      f"match the attention mask {tuple(mask.shape)}; cannot drop padding tokens")
                    rows = x[mask]
                rows = rows.reshape(-1, x.shape[-1]).to(torch.float64)
                xtx, n = rows.T @ rows, rows.shape[0]
                current["last"] = (x, xtx, n)  # holding x keeps its identity from being reused meanwhile
            g = grams.get(name)
            if g is None:
                g = grams[name] = Gram(torch.zeros_like(xtx))
            g.xtx.add_(xtx)
            g.tokens += n
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    device = next(model.parameters()).device
    it: Iterable = batches
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(batches, desc="calibration", unit="batch", leave=False)
    try:
        for batch in it:
            kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            mask = kwargs.get("attention_mask")
            current["mask"] = mask.bool() if mask is not None else None
            current["last"] = None
            if hasattr(model, "config"):  # a transformers model: no KV cache to build
                kwargs.setdefault("use_cache", False)
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
        current["last"] = None
    missing = [n for n in modules if n not in grams]
    if missing:
        raise ZOError(f"calibration: the forward pass never reached {missing[0]} (and {len(missing) - 1} more)")
    return grams


def top_basis(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """(U, energy): U [d_in, k] the top-k eigenvectors of ``gram`` (orthonormal columns, largest first),
    energy = (sum of their eigenvalues) / trace, the share of Σ‖x‖² that U captures.

    Each column's sign is fixed (its largest-magnitude entry positive), so U does
    not depend on the eigensolver's arbitrary sign choice.
    """
    d = gram.shape[0]
    if not 1 <= k <= d:
        raise ZOError(f"calibration rank k must be in 1..{d} (the layer's input size), got {k}")
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    u = evecs[:, -k:].flip(-1)
    top = evals[-k:].clamp_min(0).sum()
    trace = gram.diagonal().sum()
    idx = u.abs().argmax(0)
    sign = torch.sign(u[idx, torch.arange(k)])
    u = u * torch.where(sign == 0, torch.ones_like(sign), sign)
    energy = float(top / trace) if trace > 0 else 0.0
    return u, energy


@dataclass
class CalibrationReport:
    """What calibration saw and kept: per-layer captured energy, tokens, and the time it took."""

    rank: int
    examples: int
    tokens: int
    seconds: float
    energy: dict[str, float]

    def text(self) -> str:
        e = list(self.energy.values())
        return (f"calibration: {len(e)} layers, k={self.rank}, {self.tokens} tokens from {self.examples} examples "
                f"in {self.seconds:.1f} s; captured activation energy mean {sum(e) / len(e):.3f} "
                f"(min {min(e):.3f}, max {max(e):.3f})")


def activation_bases(model: nn.Module, modules: Mapping[str, nn.Module], batches: Sequence[Mapping], k: int,
                     progress: bool = False) -> tuple[dict[str, torch.Tensor], CalibrationReport]:
    """U (float32, [d_in, k]) per module from one pass over ``batches``, and the report."""
    t0 = time.time()
    grams = collect_grams(model, modules, batches, progress)
    bases, energy = {}, {}
    previous = None  # layers reading the same input (q_proj, v_proj) have equal grams: one eigensolve
    for name, g in grams.items():
        if previous is None or not torch.equal(previous[0], g.xtx):
            u, e = top_basis(g.xtx, k)
            previous = (g.xtx, u.to(torch.float32).contiguous(), e)
        bases[name], energy[name] = previous[1].clone(), previous[2]
    examples = sum(int(b["input_ids"].shape[0]) for b in batches)
    tokens = next(iter(grams.values())).tokens
    return bases, CalibrationReport(k, examples, tokens, time.time() - t0, energy)
