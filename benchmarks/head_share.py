"""How much can candidate-restricted scoring save? The LM head's share of a forward, counted in FLOPs.

Restricted scoring skips the output projection (hidden -> vocabulary) everywhere
except the scored rows, so its best possible speed-up over full-vocabulary
logits is (body + head) / body, where both are multiply-adds per token. This
script counts them from a model config (no weights needed) and writes the
ceiling to ``benchmarks/results/head_share.json``, to read beside the measured
ratio in ``forward_cost.md``.

    python benchmarks/head_share.py                     # SmolLM2-135M and a Qwen3-0.6B-sized config
    python benchmarks/head_share.py --tokens 26 87      # at SST-2's and RTE's mean prompt length

Why it matters: issue 8 set a 1.5x target for restricted scoring on SST-2. For
SmolLM2-135M the head is 28.3M multiply-adds per token against a 106M body, so
no implementation of restricted scoring can exceed ~1.27x there (attention over
26 tokens adds little); 1.5x needs a head at least half the body's size.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# Qwen3-0.6B's published architecture (config.json of Qwen/Qwen3-0.6B): no download needed.
QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936)


def macs_per_token(cfg: dict, tokens: int) -> dict[str, float]:
    """Multiply-adds per token of the decoder body and of the full LM head (a Llama-style block)."""
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    projections = h * heads * hd * 2 + h * kv * hd * 2  # q, o and k, v
    mlp = 3 * h * inter  # gate, up, down
    attention = 2 * heads * hd * tokens / 2  # scores and values against ~tokens/2 earlier positions (causal)
    body = layers * (projections + mlp + attention)
    head = h * cfg["vocab_size"]
    return {"body": body, "head": head, "ceiling": (body + head) / body}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[26, 87], help="prompt lengths (tokens)")
    parser.add_argument("--out", default=str(RESULTS / "head_share.json"))
    args = parser.parse_args()

    from transformers import AutoConfig

    from zotune.models import resolve_model

    smol = AutoConfig.from_pretrained(resolve_model("smollm2-135m")[0]).to_dict()  # converted once, cached
    configs = {"smollm2-135m": smol, "qwen3-0.6b-sized": QWEN3_06B}
    rows = []
    for name, cfg in configs.items():
        for t in args.tokens:
            m = macs_per_token(cfg, t)
            rows.append({"model": name, "tokens": t, "body_macs": m["body"], "head_macs": m["head"],
                         "head_share": m["head"] / (m["body"] + m["head"]), "restricted_ceiling": m["ceiling"]})
            print(f"{name:18s} {t:4d} tokens  body {m['body'] / 1e6:7.1f}M  head {m['head'] / 1e6:6.1f}M "
                  f"MACs/token  ->  restricted scoring at most {m['ceiling']:.2f}x faster")
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
