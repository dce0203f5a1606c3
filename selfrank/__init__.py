"""selfrank: PPO fine-tuning of causal language models without human rankers (STR).

The package spans the project's top-level folders: ``selfrank`` itself is the base room that every
other room may import (``errors``, ``atomic`` writes, ``jsonl`` reading, ``validate``);
``selfrank.ranking`` (ranking/) is the STR signal and its worker pool; ``selfrank.train`` (train/) holds
the stages and the RL maths; ``selfrank.launch`` (launch/) is the front door (CLI, configs, SLURM,
tracking). Imports run one way: launch -> train -> ranking -> base.
"""
__version__ = "0.1.0"
