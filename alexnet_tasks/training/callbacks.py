"""What runs around each epoch: the random streams, the rate of each step, the log, the budget, the commit.

Every callback reads and writes one ``Progress``: the plan (how many epochs
the schedule runs to), the history of completed epochs and why training
stopped early, if it did.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from alexnet_tasks.progress import report
from alexnet_tasks.training.checkpoints import commit_epoch
from alexnet_tasks.training.model import reseed_random_layers
from alexnet_tasks.training.recipe import Hyperparameters, learning_rate_at

log = logging.getLogger(__name__)

TIME_BUDGET = "time budget"


@dataclass
class Progress:
    """The run's plan and record, shared by the callbacks and saved in ``state.json``."""

    hyperparameters: Hyperparameters  # the resolved recipe
    steps_per_epoch: int  # optimizer steps in one epoch
    epochs_planned: int  # the epoch the learning-rate schedule ends with
    plan_fixed: bool  # False until a time budget has sized the plan from the first epoch
    budget_seconds: float | None  # max_train_minutes in seconds, None without a budget
    history: list[dict] = field(default_factory=list)  # one entry per completed epoch
    stopped_reason: str | None = None  # why training stopped before the plan ended

    def seconds_spent(self) -> float:
        return sum(entry.get("epoch_seconds", 0.0) for entry in self.history)


class ReplicaLog(keras.callbacks.Callback):
    """Say at the start of ``fit`` how many replicas the model's strategy trains on."""

    def on_train_begin(self, logs=None):
        log.info("fit on %d replica(s)", self.model.distribute_strategy.num_replicas_in_sync)


class SeedsAndSchedule(keras.callbacks.Callback):
    """Restart the random streams at (seed, epoch) and set each step's learning rate from the plan."""

    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        reseed_random_layers(self.model, epoch)

    def on_train_batch_begin(self, batch, logs=None):
        progress = self.progress
        step = self.epoch * progress.steps_per_epoch + batch
        self.model.optimizer.learning_rate = learning_rate_at(
            progress.hyperparameters, step, progress.steps_per_epoch, progress.epochs_planned
        )


class EpochLog(keras.callbacks.Callback):
    """One fixed-column line per epoch; puts the learning rate and the epoch's seconds into the logs."""

    def __init__(self, progress: Progress, train_images: int):
        super().__init__()
        self.progress, self.train_images = progress, train_images

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        seconds = time.monotonic() - self._started
        logs["learning_rate"] = float(np.asarray(self.model.optimizer.learning_rate))
        logs["epoch_seconds"] = seconds
        report(
            "train: epoch %3d/%-3d  loss %7.4f  accuracy %6.4f  val_loss %7.4f  val_accuracy %6.4f"
            "  lr %.5f  %7.1f s  %7.1f img/s",
            epoch + 1, self.progress.epochs_planned, logs.get("loss", math.nan), logs.get("accuracy", math.nan),
            logs.get("val_loss", math.nan), logs.get("val_accuracy", math.nan),
            epoch_learning_rate(self.progress, epoch), seconds, self.train_images / max(seconds, 1e-9),
        )


def epoch_learning_rate(progress: Progress, epoch: int) -> float:
    """The learning rate epoch ``epoch`` (0-based) trained at: the mean of its steps' scheduled rates.

    The optimizer's rate after the epoch is the next step's, 0 at the end of a
    decayed schedule; this is the figure the epoch's line shows.
    """
    steps = progress.steps_per_epoch
    first = epoch * steps
    rates = [learning_rate_at(progress.hyperparameters, step, steps, progress.epochs_planned)
             for step in range(first, first + steps)]
    return float(sum(rates) / len(rates)) if rates else 0.0


# The plan sizes the schedule for epochs this much longer than the first one, so that a few slower
# epochs (a busy machine, a checkpoint on a slow disk) still end the schedule inside the budget.
PLAN_HEADROOM = 1.05


class TimeBudget(keras.callbacks.Callback):
    """Size the plan to the budget after the first epoch; stop when the plan ends or the budget would overrun."""

    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress

    def on_epoch_end(self, epoch, logs=None):
        progress, done = self.progress, epoch + 1
        seconds = (logs or {}).get("epoch_seconds", 0.0)
        if progress.budget_seconds is not None and not progress.plan_fixed:
            fits = int(progress.budget_seconds // (max(seconds, 1e-9) * PLAN_HEADROOM))
            progress.epochs_planned = max(done, min(progress.hyperparameters.epochs, fits))
            progress.plan_fixed = True
            log.info(
                "time budget %.2f min: epoch %d took %.1f s, so the schedule ends after epoch %d of %d",
                progress.budget_seconds / 60, done, seconds, progress.epochs_planned, progress.hyperparameters.epochs,
            )
        if done >= progress.epochs_planned:
            self.model.stop_training = True  # the schedule is complete
            return
        if progress.budget_seconds is None:
            return
        elapsed = progress.seconds_spent() + seconds  # this epoch is not in the history yet
        # The next epoch is expected to take the run's mean so far: one epoch slowed by a busy
        # machine does not cut the schedule one epoch short of its end.
        if elapsed + elapsed / done > progress.budget_seconds:
            log.info(
                "time budget of %.2f min reached after %d of %d planned epochs; stopping (truncated)",
                progress.budget_seconds / 60, done, progress.epochs_planned,
            )
            progress.stopped_reason = TIME_BUDGET
            self.model.stop_training = True


class CommitEpoch(keras.callbacks.Callback):
    """Record the epoch, checkpoint model + optimizer, then commit ``state.json``: the epoch is done.

    ``on_commit(epochs_done, checkpoint)``, when given, runs after each local
    commit (an object-store root puts the epoch on the store there).
    """

    def __init__(self, progress: Progress, run_dir: Path, record: dict, on_commit=None):
        super().__init__()
        self.progress, self.run_dir, self.record, self.on_commit = progress, run_dir, record, on_commit

    def on_epoch_end(self, epoch, logs=None):
        self.progress.history.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
        checkpoint = commit_epoch(
            self.run_dir,
            self.model,
            epoch + 1,
            {**self.record, "epochs_planned": self.progress.epochs_planned, "history": self.progress.history},
        )
        if self.on_commit is not None:
            self.on_commit(epoch + 1, checkpoint)


def training_callbacks(progress: Progress, run_dir: Path, record: dict, train_images: int, tensorboard_dir: Path,
                       on_commit=None):
    """The callbacks in the order they must run.

    The seeds and the rate come first; EpochLog puts the learning rate into
    the logs that TensorBoard and the history record; TimeBudget fixes the
    plan before CommitEpoch saves it.
    """
    tensorboard = keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir), write_graph=False, update_freq="epoch")
    return [
        ReplicaLog(),
        SeedsAndSchedule(progress),
        EpochLog(progress, train_images),
        tensorboard,
        TimeBudget(progress),
        CommitEpoch(progress, run_dir, record, on_commit),
    ]
