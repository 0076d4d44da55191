"""The same job through the transformers Trainer: zotune.hf_trainer.ZOTrainer.

Your TrainingArguments, datasets, collator, logging and checkpoints stay as they
are; ZOTrainer swaps the backward pass for a zeroth-order step (AR1-ZO here).
The loss is the Trainer's own: the LM loss of the answer word after the prompt.

    python examples/trainer.py                 # a few minutes on a 2-core CPU (see README)
    python examples/trainer.py --steps 50 --model path/to/hf-folder
"""
import argparse

import torch
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


# The Trainer's loss is the LM loss of the answer word over the whole vocabulary (~7 nats at the
# start, not ~0.7 like zotune's loss over the two candidates), so its ZO slopes are ~10x larger:
# the lr is 10x smaller than the plain loop's (1.5e-2 diverged here after 60 steps).
training_args = TrainingArguments(
    args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=1.5e-3,
    lr_scheduler_type="constant", logging_steps=20, save_steps=max(1, args.steps // 2), report_to=[],
    use_cpu=not torch.cuda.is_available(), seed=0)
trainer = ZOTrainer(model, training_args, train_dataset=data.train, data_collator=collate,
                    zo={"method": "ar1zo", "eps": 1e-2, "lora_r": 8, "lora_alpha": 2})
scorer = Scorer(trainer.model, tok)  # trainer.model carries the LoRA adapter
print(f"dev accuracy before: {scorer.accuracy(data.dev):.3f}")
trainer.train()
print(f"dev accuracy after:  {scorer.accuracy(data.dev):.3f}  ({trainer.zo.forward_passes} forward passes)")
