"""The training library: `train_and_evaluate(TrainConfig(...), workdir, backend)`.

config.py      TrainConfig: the run as data, trajectory fields marked
backend.py     the Backend protocol a framework implements; the backends by name
loop.py        setup, the epoch loop, validation, the final test: train_and_evaluate
state.py       the run state and the `last` checkpoint files --resume trusts
evaluation.py  loss, top-1/5 and confusion matrix of a predictor
progress.py    the progress line
reports.py     the epoch line, summary plots
cli.py         the command line, derived from TrainConfig
"""

from vitspec.app.training.backend import Backend, normalization_table
from vitspec.app.training.config import TrainConfig
from vitspec.app.training.evaluation import Evaluation, evaluate
from vitspec.app.training.loop import train_and_evaluate

__all__ = ["Backend", "Evaluation", "TrainConfig", "evaluate", "normalization_table", "train_and_evaluate"]
