"""What every method's run returns, and the one way to record it.

Every runner takes its settings, a :class:`~xmr.train.TrainConfig` and the splits, and returns an
:class:`Outcome` (:func:`xmr.experiment.run_dual_encoder`, :func:`xmr.methods.coder.run_coder`,
:func:`xmr.methods.icone.run_schedule`, :func:`xmr.methods.semantic_unification.run_semantic_unification`);
:func:`record` writes the result file of any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .results import staged_training, write_result
from .train import TrainResult


@dataclass
class Outcome:
    """A trained model, its test metrics with the per-query outcomes they come from, and how it trained."""

    model: nn.Module
    parameters: dict  # the method's settings and training config, as the result file records them
    stages: dict[str, TrainResult]  # every trained stage, in order; one entry for a single-stage method
    test_metrics: dict
    per_query: dict  # the test ranks the metrics come from (xmr.metrics.retrieval_evaluation)
    trainable_parameters: int
    device: str
    preparation_time_s: float = 0.0  # work done once before the epochs (e.g. encoding inputs of frozen parts)
    extra: dict = field(default_factory=dict)  # method-specific numbers for the result file

    def __post_init__(self):
        if not self.stages:
            raise ValueError("an Outcome needs at least one trained stage")

    @property
    def training(self) -> TrainResult:
        """The last stage's training, the only one of a single-stage method; its best epoch is the model's."""
        return list(self.stages.values())[-1]

    @property
    def wall_time_s(self) -> float:
        return sum(result.wall_time_s for result in self.stages.values()) + self.preparation_time_s

    @property
    def training_time_s(self) -> float:
        """Seconds in training steps and preparation, per-epoch validation excluded."""
        steps = sum(row["train_time_s"] for result in self.stages.values() for row in result.history)
        return float(steps) + self.preparation_time_s

    def training_record(self) -> dict:
        """The result file's ``training`` entry: the stage's record, or every stage's for a staged method."""
        if len(self.stages) == 1:
            return {**self.training.record(), "wall_time_s": self.wall_time_s}
        return {**staged_training({name: result.record() for name, result in self.stages.items()}),
                "wall_time_s": self.wall_time_s}

    @property
    def history(self) -> list[dict]:
        """Every epoch of every stage, numbered on from stage to stage, with the stage's name when staged."""
        if len(self.stages) == 1:
            return list(self.training.history)
        rows, offset = [], 0
        for name, result in self.stages.items():
            rows += [{**row, "stage": name, "epoch": row["epoch"] + offset} for row in result.history]
            offset += len(result.history)
        return rows


def record(results_dir: str | Path, paper_id: str, run_name: str, outcome: Outcome, dataset: str = "flickr8k",
           extra_parameters: dict | None = None) -> Path:
    """Write the result file of any runner's :class:`Outcome`: the test metrics beside the best validation
    metrics (``val_`` prefix), the per-query outcomes, the training record and history."""
    validation = {f"val_{name}": value for name, value in outcome.training.best_metrics.items()}
    return write_result(
        results_dir, paper_id, run_name, parameters={**outcome.parameters, **(extra_parameters or {})},
        dataset=dataset, split="test", metrics={**outcome.test_metrics, **validation},
        training=outcome.training_record(), per_query=outcome.per_query, history=outcome.history,
        device=outcome.device,
        extra={"trainable_parameters": outcome.trainable_parameters, "training_time_s": outcome.training_time_s,
               **outcome.extra},
    )
