"""The same job through the transformers Trainer: zotune.hf_trainer.ZOTrainer.

Your TrainingArguments, datasets, collator, logging and checkpoints stay as they
are; ZOTrainer swaps the backward pass for a zeroth-order step (AR1-ZO here).
The loss goes through the Trainer's own hook, ``compute_loss_func``: cross-entropy
over the two answer words only (MeZO's loss), not over the whole vocabulary.

    python examples/trainer.py                 # a few minutes on a 2-core CPU (see README)
    python examples/trainer.py --steps 50 --model path/to/hf-folder
"""
import argparse

import torch

import zotune  # noqa: F401  (imported before transformers: it quiets torchao's optional-kernel log lines)
from transformers import TrainingArguments

from zotune.evaluate import Scorer
from zotune.hf_trainer import ZOTrainer, answer_collator
from zotune.models import load_model
from zotune.tasks import load_task

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="named model or local Hugging Face folder")
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--dev-size", type=int, default=200)
parser.add_argument("--out", default="runs/zo-trainer", help="Trainer output_dir (checkpoints)")
args = parser.parse_args()

data = load_task("rotten-tomatoes").subsample(seed=0, train=1000, dev=args.dev_size, test=None)
model, tok, _ = load_model(args.model)


collate = answer_collator(tok)  # prompt + gold answer word, only the answer labelled
# The first token of each answer word (" terrible", " great"): the scored rows of the LM head.
answer_ids = torch.tensor([tok(c, add_special_tokens=False).input_ids[0] for c in data.train[0].candidates])
assert len(set(answer_ids.tolist())) == len(answer_ids), "answer words must differ in their first token"


def candidate_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy over the answer words at the answer position (the Trainer pops ``labels`` for us).

    The LM loss over all ~49k tokens would also push up every answer-like word and
    is ~10x larger (~7 nats vs ~0.7); its ZO slopes are dominated by that, so it
    needed a 10x smaller lr and still did not move dev accuracy in 100 steps.
    """
    logits, target = outputs.logits[:, :-1], labels[:, 1:]  # position t predicts token t+1
    rows = torch.arange(len(labels))
    first = (target != -100).int().argmax(dim=1)  # each row's first answer token
    scores = logits[rows, first][:, answer_ids].float()  # [batch, candidates]
    gold = (target[rows, first, None] == answer_ids).int().argmax(dim=1)
    return torch.nn.functional.cross_entropy(scores, gold)


training_args = TrainingArguments(
    args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=1.5e-2,
    lr_scheduler_type="constant", logging_steps=20, save_steps=max(1, args.steps // 2), report_to=[],
    use_cpu=not torch.cuda.is_available(), seed=0)
trainer = ZOTrainer(model, training_args, train_dataset=data.train, data_collator=collate,
                    compute_loss_func=candidate_loss,
                    zo={"method": "ar1zo", "eps": 1e-2, "lora_r": 4, "lora_alpha": 2})
scorer = Scorer(trainer.model, tok)  # trainer.model carries the LoRA adapter
print(f"dev accuracy before: {scorer.accuracy(data.dev):.3f}")
trainer.train()
print(f"dev accuracy after:  {scorer.accuracy(data.dev):.3f}  ({trainer.zo.forward_passes} forward passes)")
