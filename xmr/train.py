"""One training loop for every method: device, mixed precision, seeds, schedules, validation, checkpoints.

A *model* is any ``nn.Module`` with ``training_losses(batch) -> {"loss": total, <term>: ...}`` (for example
:class:`xmr.encoders.DualEncoder`); it may also define ``on_epoch_start(epoch)`` (re-clustering, queues) and
``parameter_groups(lr)`` (per-part learning rates). :func:`fit` owns everything else:

- the epoch's data order and dropout masks depend only on ``(seed, epoch)``, so a run interrupted after any
  epoch and resumed from its checkpoint ends with the same parameters and metrics as an uninterrupted one;
- a checkpoint (model, optimiser, schedule, history, best so far) is written atomically after every epoch;
- each epoch is validated (by default Rsum) and the best epoch's weights are restored at the end;
- a loss term that becomes NaN or infinite stops the run with :class:`NonFiniteLossError`;
- under ``torchrun`` (:mod:`xmr.distributed`) it trains with DistributedDataParallel: ``batch_size`` stays the
  global batch, split over the ranks, the loss sees the whole of it, rank 0 validates and writes checkpoints,
  and the run equals a single-process one up to summation order.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from . import distributed
from .features import atomic_torch_save
from .metrics import retrieval_metrics

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the term, the epoch and the step."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_milestones: tuple[int, ...] = ()  # epochs after which the learning rate is multiplied by lr_gamma
    lr_gamma: float = 0.5
    grad_clip_norm: float | None = 2.0
    seed: int = 0
    device: str = "auto"  # "auto" = CUDA when available, else CPU
    mixed_precision: bool = True  # bfloat16 autocast, on CUDA only
    select_by: str | None = "rsum"  # validation metric to maximise; None keeps the last epoch
    drop_last: bool = True  # contrastive losses want full batches
    num_workers: int = 0
    progress: bool = True

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def fingerprint(self) -> dict:
        """What must match for a checkpoint to be resumed (not the epoch count, device or display)."""
        values = asdict(self)
        for name in ("epochs", "device", "progress", "num_workers"):
            values.pop(name)
        values["lr_milestones"] = list(values["lr_milestones"])
        return values


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch
    step_losses: list[float] = field(default_factory=list)  # total loss of every step, for loss curves
    best_epoch: int | None = None
    best_metrics: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    pairs_per_second: float = 0.0


def _to_device(batch: dict, device: torch.device) -> dict:
    return {name: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for name, value in batch.items()}


def check_finite_losses(losses: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the loss terms that are NaN or infinite, and where."""
    values = torch.stack([value.detach().float() for value in losses.values()])
    if not bool(torch.isfinite(values).all()):
        bad = {name: float(value.detach()) for name, value in losses.items() if not math.isfinite(float(value.detach()))}
        raise NonFiniteLossError(
            f"loss term(s) {bad} became non-finite at epoch {epoch}, step {step}; lower the learning rate, "
            "check the inputs for NaN, or clip gradients (TrainConfig.grad_clip_norm)"
        )


@torch.no_grad()
def encode(encoder: Callable, inputs: torch.Tensor, mask: torch.Tensor | None = None, batch_size: int = 256,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Run ``encoder`` over ``inputs`` in batches; returns (N, D) float32 on ``device``."""
    outputs = []
    for start in range(0, inputs.shape[0], batch_size):
        chunk = inputs[start : start + batch_size].to(device)
        if mask is None:
            outputs.append(encoder(chunk).float())
        else:
            outputs.append(encoder(chunk, mask[start : start + batch_size].to(device)).float())
    return torch.cat(outputs)


@torch.no_grad()
def retrieval_similarities(model: nn.Module, image: torch.Tensor, text: torch.Tensor,
                           text_mask: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
    """(N_images, N_captions) cosine similarities of a model with ``encode_image`` / ``encode_text``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    image_features = encode(model.encode_image, image, None, batch_size, device)
    text_features = encode(model.encode_text, text, text_mask, batch_size, device)
    model.train(was_training)
    return image_features @ text_features.T


def evaluate_retrieval(model: nn.Module, image: torch.Tensor, text: torch.Tensor,
                       text_mask: torch.Tensor | None = None, captions_per_image: int = 5) -> dict[str, float]:
    """The VSE++ protocol metrics (:func:`xmr.metrics.retrieval_metrics`) of ``model`` on cached inputs."""
    sims = retrieval_similarities(model, image, text, text_mask)
    return retrieval_metrics(sims, captions_per_image=captions_per_image)


class RetrievalValidator:
    """``validate(model) -> metrics`` for :func:`fit`: image-caption retrieval on a held-out split."""

    def __init__(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                 captions_per_image: int = 5):
        self.image, self.text, self.text_mask = image, text, text_mask
        self.captions_per_image = captions_per_image

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return evaluate_retrieval(model, self.image, self.text, self.text_mask, self.captions_per_image)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose from {sorted(OPTIMIZERS)}")
    if hasattr(model, "parameter_groups"):
        groups = model.parameter_groups(config.lr)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if not any(p.requires_grad for group in groups for p in group["params"]):
        raise ValueError("the model has no trainable parameters")
    return OPTIMIZERS[config.optimizer](groups, lr=config.lr, weight_decay=config.weight_decay)


def _epoch_seed(config: TrainConfig, epoch: int) -> int:
    return config.seed * 1_000_003 + epoch


def _epoch_loader(train_data: Dataset, config: TrainConfig, epoch: int, rank: int = 0,
                  world_size: int = 1) -> DataLoader:
    """The epoch's shuffled batches; with ``world_size > 1`` rank ``rank``'s share of each of the same batches."""
    generator = torch.Generator().manual_seed(_epoch_seed(config, epoch))
    if world_size == 1:
        return DataLoader(train_data, batch_size=config.batch_size, shuffle=True, drop_last=config.drop_last,
                          num_workers=config.num_workers, generator=generator)
    # The single-process loader's sampler (RandomSampler then BatchSampler on the same generator), sharded.
    global_batches = BatchSampler(RandomSampler(train_data, generator=generator), config.batch_size, config.drop_last)
    return DataLoader(train_data, batch_sampler=distributed.ShardedBatchSampler(global_batches, rank, world_size),
                      num_workers=config.num_workers, generator=generator)


def fit(model: nn.Module, train_data: Dataset, config: TrainConfig,
        validate: Callable[[nn.Module], dict[str, float]] | None = None,
        checkpoint_dir: str | Path | None = None) -> TrainResult:
    """Train ``model`` on ``train_data`` for ``config.epochs`` epochs; resume from ``checkpoint_dir`` if it holds one.

    With ``validate`` the model is evaluated after every epoch and the epoch with the highest
    ``config.select_by`` metric is restored at the end (its metrics are ``best_metrics``).

    In a process group of N > 1 (:mod:`xmr.distributed`) each rank trains on its ``batch_size / N`` share of
    every global batch through DDP, ``model.loss`` sees the gathered global batch, only rank 0 validates (its
    metrics are broadcast) and writes checkpoints; every rank returns the same result.
    """
    device = config.resolved_device()
    model.to(device)
    world_size, rank, is_main = distributed.world_size(), distributed.rank(), distributed.is_main_process()
    if config.batch_size % world_size:
        raise ValueError(f"the global batch_size {config.batch_size} must be divisible by the {world_size} processes")
    optimizer = _optimizer(model, config)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.lr_milestones), config.lr_gamma)
    autocast = device.type == "cuda" and config.mixed_precision
    result, best_state, first_epoch = TrainResult(), None, 1
    checkpoint_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None

    if checkpoint_path is not None and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if state["config"] != config.fingerprint():
            raise ValueError(
                f"checkpoint {checkpoint_path} was written with other settings {state['config']}; "
                "use a new checkpoint_dir or the same TrainConfig"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        result, best_state, first_epoch = state["result"], state["best_state"], state["epoch"] + 1

    step_model = (distributed.wrap_model(model, device, getattr(model, "find_unused_parameters", False))
                  if world_size > 1 else None)  # DDP: ranks start from rank 0's parameters
    started = time.perf_counter() - result.wall_time_s
    pairs_seen = 0
    for epoch in range(first_epoch, config.epochs + 1):
        epoch_started = time.perf_counter()
        torch.manual_seed(_epoch_seed(config, epoch))
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(epoch)
        if hasattr(model, "on_epoch_start"):
            model.on_epoch_start(epoch)
        loader = _epoch_loader(train_data, config, epoch, rank, world_size)
        if len(loader) == 0:
            raise ValueError(f"{len(train_data)} training items make no batch of {config.batch_size}")
        model.train()
        sums: dict[str, float] = {}
        bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not (config.progress and is_main),
                   leave=False)
        for step, batch in enumerate(bar, start=1):
            batch = _to_device(batch, device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                losses = model.training_losses(batch) if step_model is None else step_model(batch)
            check_finite_losses(losses, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if config.grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            result.step_losses.append(float(losses["loss"].detach()))
            pairs_seen += len(next(iter(batch.values()))) * world_size  # items of the global batch
            bar.set_postfix(loss=f"{result.step_losses[-1]:.4f}")
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
               "train_time_s": time.perf_counter() - epoch_started}
        row.update({f"train_{name}": total / len(loader) for name, total in sums.items()})
        schedule.step()
        if validate is not None:
            metrics = distributed.broadcast_object(validate(model) if is_main else None)
            row.update({f"val_{name}": value for name, value in metrics.items()})
            score = metrics.get(config.select_by) if config.select_by else None
            if config.select_by and score is None:
                raise KeyError(f"select_by={config.select_by!r} is not among the validation metrics {sorted(metrics)}")
            if score is not None and (result.best_epoch is None or score > result.best_metrics[config.select_by]):
                result.best_epoch, result.best_metrics = epoch, dict(metrics)
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        row["epoch_time_s"] = time.perf_counter() - epoch_started
        result.history.append(row)
        result.wall_time_s = time.perf_counter() - started
        if config.progress and is_main:
            shown = {k: round(v, 4) for k, v in row.items() if k in ("train_loss", f"val_{config.select_by}")}
            tqdm.write(f"epoch {epoch}: {shown}")
        if checkpoint_path is not None:
            if is_main:
                atomic_torch_save({"epoch": epoch, "config": config.fingerprint(), "model": model.state_dict(),
                                   "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                   "result": result, "best_state": best_state}, checkpoint_path)
            distributed.barrier()

    if best_state is not None:
        model.load_state_dict(best_state)
    elif result.history and validate is not None and not config.select_by:
        result.best_epoch = result.history[-1]["epoch"]
        result.best_metrics = distributed.broadcast_object(validate(model) if is_main else None)
    trained_time = sum(row["train_time_s"] for row in result.history[first_epoch - 1 :])
    if trained_time > 0 and pairs_seen:
        result.pairs_per_second = pairs_seen / trained_time
    return result
