"""``fuseflow.trainer``: the knowledge-fusion recipe (:mod:`.recipe`, read top to bottom) and its parts (corpus,
dispatcher, in-process teachers, ready feed, DeepSpeed loop and checkpoints, evaluation and report), and their
commands."""

from fuseflow.cli import Command

COMMANDS = (
    Command(("fuse",), "knowledge fusion (FuseLLM) in one process: score, align, fuse, train, evaluate",
            "fuseflow.trainer.commands:Fuse"),
    Command(("finetune",), "CLM-fine-tune a model on a corpus into an HF directory (an expert to fuse): the recipe, no teachers",
            "fuseflow.trainer.commands:Finetune"),
    Command(("evaluate",), "held-out bits/byte and perplexity of models on a run config's held-out documents",
            "fuseflow.trainer.commands:Evaluate"),
    Command(("train",), "online DeepSpeed trainer consuming aligned distributions from Redis", "fuseflow.trainer.commands:Train"),
)
