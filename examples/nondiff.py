"""Maximise accuracy directly: a non-differentiable objective, which ZO needs no gradient of.

The closure returns 1 - accuracy on the batch (a step function of the weights:
backpropagation would see a zero gradient almost everywhere). A ZO step only
compares the objective at θ+εz and θ−εz, so the API takes it like any loss. The
signal is sparse: a slope is non-zero only when the perturbation flips a
prediction (hence the larger batch and eps), so it learns far more slowly than
the candidate loss of examples/plain_loop.py. Measured on a 2-core CPU (README):
50 steps at the defaults left dev accuracy at 0.600 (8 of 50 steps informative);
a larger lr (0.3, eps 0.1) made most steps informative but lowered it (0.585,
0.580 at r=4 over 100 steps). This shows the API working on a metric; it does
not recommend 0/1 objectives at this budget.

    python examples/nondiff.py                 # a few minutes on a 2-core CPU (see README)
    python examples/nondiff.py --steps 50 --model path/to/hf-folder
"""
import argparse
import random

import zotune
from zotune.evaluate import Scorer
from zotune.models import load_model
from zotune.tasks import load_task

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="named model or local Hugging Face folder")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--dev-size", type=int, default=200)
parser.add_argument("--lr", type=float, default=1.5e-2)
parser.add_argument("--eps", type=float, default=5e-2)
args = parser.parse_args()

data = load_task("rotten-tomatoes").subsample(seed=0, train=1000, dev=args.dev_size, test=None)
model, tok, _ = load_model(args.model)
opt = zotune.ZOOptimizer(model, method="ar1zo", lr=args.lr, eps=args.eps, lora_r=8, lora_alpha=2, seed=0)
scorer = Scorer(opt.model, tok)


def error_rate(batch):
    """1 - exact-match accuracy: the objective itself, not a differentiable surrogate."""
    return 1.0 - scorer.accuracy(batch, batch_size=len(batch))


print(f"dev accuracy before: {scorer.accuracy(data.dev):.3f}")
rng = random.Random(0)
moved = 0
for step in range(args.steps):
    batch = rng.sample(data.train, args.batch_size)
    err = opt.step(lambda: error_rate(batch))
    moved += opt.last.grads[0] != 0  # steps where the perturbation flipped a prediction
    if step % 20 == 0 or step == args.steps - 1:
        print(f"step {step:4d}  batch error {err:.3f}  informative steps {moved}/{step + 1}")
print(f"dev accuracy after:  {scorer.accuracy(data.dev):.3f}")
