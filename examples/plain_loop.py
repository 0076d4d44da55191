"""Fine-tune SmolLM2-135M with AR1-ZO from a plain PyTorch loop: zotune.ZOOptimizer.

    python examples/plain_loop.py              # a few minutes on a 2-core CPU (see README)
    python examples/plain_loop.py --steps 50 --model path/to/hf-folder
"""
import argparse
import random

import zotune
from zotune.evaluate import Scorer
from zotune.models import load_model
from zotune.tasks import load_task

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="named model or local Hugging Face folder")
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--dev-size", type=int, default=200)
parser.add_argument("--out", default="runs/plain-loop/adapter", help="where the PEFT adapter is saved")
args = parser.parse_args()

data = load_task("rotten-tomatoes").subsample(seed=0, train=1000, dev=args.dev_size, test=None)
model, tok, _ = load_model(args.model)
opt = zotune.ZOOptimizer(model, method="ar1zo", lr=1.5e-2, eps=1e-2, lora_r=4, lora_alpha=2, seed=0)
# opt.model is the model with its peft LoRA adapter; micro-batches of 4 length-sorted prompts
# halve the forward time on a CPU (less padding) and give the same loss
scorer = Scorer(opt.model, tok, micro_batch_size=4)
print(f"dev accuracy before: {scorer.accuracy(data.dev):.3f}")
rng = random.Random(0)
for step in range(args.steps):
    batch = rng.sample(data.train, args.batch_size)
    loss = opt.step(lambda: scorer.loss(batch))  # two forward passes, no backward
    if step % 20 == 0 or step == args.steps - 1:
        print(f"step {step:4d}  loss {loss:.4f}  forward passes {opt.forward_passes}")
print(f"dev accuracy after:  {scorer.accuracy(data.dev):.3f}")
opt.save(args.out)
print(f"adapter saved in {args.out}")
