"""One training loop for every method: device, mixed precision, seeds, schedules, validation, checkpoints.

A *model* is any ``nn.Module`` that is :class:`Trainable` (for example :class:`xmr.encoders.DualEncoder`);
:func:`fit` owns everything else:

- the epoch's data order and dropout masks depend only on ``(seed, epoch)``, so a run interrupted after any
  epoch and resumed from its checkpoint ends with the same parameters and metrics as an uninterrupted one;
- a checkpoint (model, optimiser, schedule, history, best so far) is written atomically after every epoch;
- each epoch is validated (by default Rsum) and the best epoch's weights are restored at the end; a run stops
  early once ``patience`` epochs pass without an improvement of more than ``min_delta``, and records whether it
  stopped on such a plateau or by its ``max_epochs`` budget (:meth:`TrainResult.record`);
- a loss term or a gradient that becomes NaN or infinite stops the run at that step
  (:class:`NonFiniteLossError`, :class:`NonFiniteGradientError`, naming the term or parameter);
- a checkpoint holds plain data only (loaded with ``weights_only=True``) and is resumed only by the same
  settings, model, loss and training data (:func:`run_fingerprint`); a mismatch names the part that differs;
- under ``torchrun`` (:mod:`xmr.distributed`) it trains with DistributedDataParallel: ``batch_size`` stays the
  global batch, split over the ranks, the loss sees the whole of it, rank 0 validates and writes checkpoints,
  and the run equals a single-process one up to summation order.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, default_collate
from tqdm.auto import tqdm

from . import distributed
from .data.paired import CaptionInputs
from .io import atomic_torch_save
from .metrics import human_relevance_evaluation, retrieval_evaluation, retrieval_metrics

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the term, the epoch and the step."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient became NaN or infinite although the loss was finite; the message names the parameters."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or was written by another run (settings, model, loss or data differ)."""


STOPPED_BY = ("plateau", "budget")


@runtime_checkable
class Trainable(Protocol):
    """What :func:`fit` needs of a model: ``training_losses(batch) -> {"loss": total, <term>: ...}``.

    Hooks it calls when the model has them: ``on_epoch_start(epoch)`` (re-clustering, queues, a schedule of the
    loss), ``parameter_groups(lr) -> list[dict]`` (per-part learning rates) and the attribute
    ``find_unused_parameters`` (DDP, for a model that leaves parts of itself out on some steps). Of the data it
    uses ``set_epoch(epoch)`` (a per-epoch draw), ``fingerprint()`` (for checkpoints) and ``fetches_batches``
    (``__getitem__`` takes a batch's indices) when they are there.
    """

    def training_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

@dataclass
class TrainConfig:
    max_epochs: int = 10
    patience: int | None = 3  # stop after this many epochs without a validation improvement; None: never early
    min_delta: float = 0.0  # an improvement must exceed this (in the select_by metric's units)
    batch_size: int = 64
    lr: float = 1e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_milestones: tuple[int, ...] = ()  # epochs after which the learning rate is multiplied by lr_gamma
    lr_gamma: float = 0.5
    grad_clip_norm: float | None = 2.0
    seed: int = 0
    device: str = "auto"  # "auto" = CUDA when available, else CPU
    mixed_precision: bool = True  # bfloat16 autocast, on CUDA
    # The fast path of fine-tuning on cached activations (issue #18); both off by default: they change the
    # rounding, so a run that leaves them off gives today's numbers. See training_autocast.
    mixed_precision_cpu: bool = False  # bfloat16 autocast on the CPU too (AVX512-BF16/AMX: MiniLM's top x1.8)
    channels_last: bool = False  # convolution weights, so activations, in NHWC (EfficientNet's top x1.6)
    select_by: str | None = "rsum"  # validation metric selecting the epoch; None keeps the last epoch
    select_mode: str = "max"  # "max" (Rsum, MAP) or "min" (a validation loss)
    drop_last: bool = True  # contrastive losses want full batches
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self):
        def integer(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {minimum}, got {value!r}")

        integer("max_epochs", 1)
        integer("batch_size", 1)
        integer("num_workers", 0)
        if self.patience is not None:
            integer("patience", 1)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.min_delta, (int, float)) and self.min_delta >= 0):
            raise ValueError(f"TrainConfig.min_delta must be a number >= 0, got {self.min_delta!r}")
        if self.select_mode not in ("max", "min"):
            raise ValueError(f"TrainConfig.select_mode must be 'max' or 'min', got {self.select_mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {sorted(OPTIMIZERS)}")
        self.lr_milestones = tuple(self.lr_milestones)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def fingerprint(self) -> dict:
        """What must match for a checkpoint to be resumed (not the epoch budget, stopping rule, device or display)."""
        values = asdict(self)
        for name in ("max_epochs", "patience", "min_delta", "device", "progress", "num_workers"):
            values.pop(name)
        values["lr_milestones"] = list(values["lr_milestones"])
        return values

    def improves(self, score: float, best: float | None) -> bool:
        """Whether ``score`` beats ``best`` by more than ``min_delta`` in the ``select_mode`` direction."""
        if best is None:
            return True
        return score > best + self.min_delta if self.select_mode == "max" else score < best - self.min_delta


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch
    step_losses: list[float] = field(default_factory=list)  # total loss of every step, for loss curves
    best_epoch: int | None = None
    best_metrics: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    pairs_per_second: float = 0.0
    epochs_budget: int = 0
    stopped_by: str | None = None  # "plateau" or "budget" (STOPPED_BY)

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    def record(self) -> dict:
        """The ``training`` entry of a result file (schema version 2)."""
        return {"epochs_budget": self.epochs_budget, "epochs_run": self.epochs_run, "best_epoch": self.best_epoch,
                "stopped_by": self.stopped_by, "wall_time_s": self.wall_time_s,
                "pairs_per_second": self.pairs_per_second}

    def state(self) -> dict:
        """Plain data for a checkpoint (``weights_only=True`` can load it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def run_fingerprint(model: nn.Module, train_data: Dataset, config: TrainConfig) -> dict:
    """What a checkpoint must share with the run that resumes it: the settings, the model (its parameters'
    names and shapes and every module's scalar hyper-parameters, a loss's temperature or margin included) and
    the training data (its length, public scalars and a digest of its public tensors, or its ``fingerprint()``)."""
    def scalars(module: nn.Module) -> dict:
        return {name: value for name, value in vars(module).items()
                if not name.startswith("_") and name != "training" and isinstance(value, (bool, int, float, str))}

    modules = {name or type(model).__name__: [type(module).__qualname__, scalars(module)]
               for name, module in model.named_modules()}
    shapes = {name: list(value.shape) for name, value in model.state_dict().items()}
    data = train_data.fingerprint() if hasattr(train_data, "fingerprint") else _data_fingerprint(train_data)
    return json.loads(json.dumps({"config": config.fingerprint(), "model": {"modules": modules, "shapes": shapes},
                                  "data": data}, default=str))


def _data_fingerprint(train_data: Dataset, max_elements: int = 1 << 22) -> dict:
    """Length, public scalar attributes and a digest of the public tensors (large ones sampled on a stride);
    private attributes (``_name``: per-epoch state such as the caption drawn for each image) are left out."""
    digest, scalars = hashlib.sha256(), {}
    for name, value in sorted(vars(train_data).items()):
        if name.startswith("_"):
            continue
        if torch.is_tensor(value):
            flat = value.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // max_elements)]
            digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
            digest.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(value, (bool, int, float, str)) or value is None:
            scalars[name] = value
    return {"type": type(train_data).__qualname__, "length": len(train_data), "scalars": scalars,
            "tensors": digest.hexdigest()}


def _load_checkpoint(path: Path, device: torch.device, expected: dict) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, corrupt or not a plain-data checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); delete it to "
                              "start over, or pass another checkpoint_dir") from error
    stored_fingerprint = state.get("fingerprint", {})
    differing = [part for part in ("config", "model", "data") if stored_fingerprint.get(part) != expected[part]]
    if differing:
        details = []
        if "config" in differing:
            stored = stored_fingerprint.get("config", {})
            keys = sorted(k for k in set(stored) | set(expected["config"])
                          if stored.get(k) != expected["config"].get(k))
            details.append(f"settings differ in {keys}")
        if "model" in differing:
            details.append("the model or its loss differs")
        if "data" in differing:
            details.append("the training data differ")
        raise CheckpointError(f"checkpoint {path} was written by another run: {'; '.join(details)}. Use a new "
                              "checkpoint_dir, or the same settings, model, loss and data")
    return state


def _to_device(batch: dict, device: torch.device) -> dict:
    return {name: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for name, value in batch.items()}


def check_finite_losses(losses: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the loss terms that are NaN or infinite, and where."""
    values = torch.stack([value.detach().float() for value in losses.values()])
    if not bool(torch.isfinite(values).all()):
        bad = {name: float(value.detach()) for name, value in losses.items()
               if not math.isfinite(float(value.detach()))}
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


def evaluate_retrieval_per_query(model: nn.Module, test: CaptionInputs) -> tuple[dict, dict]:
    """``(metrics, per_query)`` of ``model`` on a test split, as a result file stores them: the standard metrics
    and ranks (:func:`xmr.metrics.retrieval_evaluation`) and, where the split has human judgements, the same
    metrics with the pairs judged relevant as positives, prefixed by their source
    (:func:`xmr.metrics.human_relevance_evaluation`; subset metrics with an empty subset are left out)."""
    sims = retrieval_similarities(model, test.image, test.text, test.text_mask)
    metrics, per_query = retrieval_evaluation(sims, captions_per_image=test.captions_per_image)
    if test.judgements:
        expert, crowd = test.judgements.get("expert"), test.judgements.get("crowd")
        human, human_per_query = human_relevance_evaluation(sims, expert, crowd,
                                                            captions_per_image=test.captions_per_image)
        metrics.update({name: value for name, value in human.items() if value is not None})
        per_query.update({key: value for key, value in human_per_query.items() if value})
    return metrics, per_query


class RetrievalValidator:
    """``validate(model) -> metrics`` for :func:`fit`: image-caption retrieval on a held-out split."""

    def __init__(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                 captions_per_image: int = 5):
        self.image, self.text, self.text_mask = image, text, text_mask
        self.captions_per_image = captions_per_image

    @classmethod
    def for_split(cls, inputs: CaptionInputs) -> RetrievalValidator:
        """The validator of a split's :class:`~xmr.data.paired.CaptionInputs`."""
        return cls(inputs.image, inputs.text, inputs.text_mask, inputs.captions_per_image)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return evaluate_retrieval(model, self.image, self.text, self.text_mask, self.captions_per_image)


class HeldOutLossValidator:
    """``validate(model) -> {"loss": ...}`` for :func:`fit`: the model's own training loss, averaged over fixed
    batches of held-out items, for a stage with no retrieval signal to validate on (shi2024's stage 2: instance
    discrimination on crops of the dev images; use ``select_by="loss", select_mode="min"``). Random items (crops)
    are drawn once, from ``seed``, so every epoch is scored on the same batches."""

    def __init__(self, data: Dataset, batch_size: int, seed: int = 0):
        if len(data) < 2:
            raise ValueError(f"a held-out loss needs at least 2 items, got {len(data)}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            items = [data[index] for index in range(len(data))]
        size = min(batch_size, len(items))  # full batches only, as in training: a contrastive loss depends on size
        self.batches = [default_collate(items[start : start + size]) for start in range(0, len(items) - size + 1, size)]

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        losses = [float(model.training_losses({key: value.to(device) for key, value in batch.items()})["loss"])
                  for batch in self.batches]
        model.train(was_training)
        return {"loss": sum(losses) / len(losses)}


def check_finite_gradients(model: nn.Module, epoch: int, step: int) -> None:
    """Raise :class:`NonFiniteGradientError` naming the parameters whose gradient holds a NaN or an infinity."""
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    if not gradients or bool(torch.stack([torch.isfinite(g).all() for g in gradients]).all()):
        return
    bad = [name for name, p in model.named_parameters()
           if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    raise NonFiniteGradientError(f"the gradient of {bad[:5]}{' and more' if len(bad) > 5 else ''} became non-finite "
                                 f"at epoch {epoch}, step {step} (the loss was finite); lower the learning rate or "
                                 "check the loss for a division by zero or a log of 0")


def training_autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    """The autocast context of a training step (forward and loss; the backward follows it): bfloat16 on CUDA with
    ``config.mixed_precision``, on the CPU with ``config.mixed_precision_cpu``, else disabled (float32).
    Parameters, gradients and the optimiser stay float32; validation and evaluation run in float32."""
    enabled = {"cuda": config.mixed_precision, "cpu": config.mixed_precision_cpu}.get(device.type, False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
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
    if getattr(train_data, "fetches_batches", False):  # __getitem__ takes a batch's indices: no per-item collation
        batches = BatchSampler(RandomSampler(train_data, generator=generator), config.batch_size, config.drop_last)
        if world_size > 1:
            batches = distributed.ShardedBatchSampler(batches, rank, world_size)
        return DataLoader(train_data, sampler=batches, batch_size=None, num_workers=config.num_workers,
                          generator=generator)
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
    """Train ``model`` on ``train_data`` for at most ``config.max_epochs`` epochs; resume from ``checkpoint_dir``.

    With ``validate`` the model is evaluated after every epoch, the epoch with the best ``config.select_by``
    metric is restored at the end (its metrics are ``best_metrics``), and training stops once ``config.patience``
    epochs have passed without an improvement (``stopped_by = "plateau"``; otherwise ``"budget"``).

    In a process group of N > 1 (:mod:`xmr.distributed`) each rank trains on its ``batch_size / N`` share of
    every global batch through DDP, ``model.loss`` sees the gathered global batch, only rank 0 validates (its
    metrics are broadcast) and writes checkpoints; every rank returns the same result.
    """
    if not isinstance(model, Trainable):
        raise TypeError(f"{type(model).__name__} has no training_losses(batch) method: fit trains Trainable models")
    device = config.resolved_device()
    model.to(device)
    if config.channels_last:  # 4-D weights only: convolutions then compute (and return) NHWC activations
        model.to(memory_format=torch.channels_last)
    world_size, rank, is_main = distributed.world_size(), distributed.rank(), distributed.is_main_process()
    if config.batch_size % world_size:
        raise ValueError(f"the global batch_size {config.batch_size} must be divisible by the {world_size} processes")
    optimizer = _optimizer(model, config)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.lr_milestones), config.lr_gamma)
    result, best_state, first_epoch = TrainResult(epochs_budget=config.max_epochs), None, 1
    checkpoint_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    fingerprint = run_fingerprint(model, train_data, config) if checkpoint_path is not None else None

    if checkpoint_path is not None and checkpoint_path.exists():
        state = _load_checkpoint(checkpoint_path, device, fingerprint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        result, best_state, first_epoch = TrainResult(**state["result"]), state["best_state"], state["epoch"] + 1
        result.epochs_budget = config.max_epochs

    step_model = (distributed.wrap_model(model, device, getattr(model, "find_unused_parameters", False))
                  if world_size > 1 else None)  # DDP: ranks start from rank 0's parameters
    started = time.perf_counter() - result.wall_time_s
    pairs_seen = 0
    for epoch in range(first_epoch, config.max_epochs + 1):
        if result.stopped_by == "plateau":  # resumed from a run that had already stopped
            break
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
        bar = tqdm(loader, desc=f"epoch {epoch}/{config.max_epochs}", disable=not (config.progress and is_main),
                   leave=False)
        for step, batch in enumerate(bar, start=1):
            batch = _to_device(batch, device)
            with training_autocast(config, device):
                losses = model.training_losses(batch) if step_model is None else step_model(batch)
            check_finite_losses(losses, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            check_finite_gradients(model, epoch, step)
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
            if not (score is None or math.isfinite(score)):
                raise NonFiniteLossError(f"validation {config.select_by} is {score} after epoch {epoch}")
            best_score = result.best_metrics.get(config.select_by) if result.best_epoch is not None else None
            if score is not None and config.improves(score, best_score):
                result.best_epoch, result.best_metrics = epoch, dict(metrics)
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            if (score is not None and config.patience is not None
                    and epoch - result.best_epoch >= config.patience):
                result.stopped_by = "plateau"
        row["epoch_time_s"] = time.perf_counter() - epoch_started
        result.history.append(row)
        result.wall_time_s = time.perf_counter() - started
        if config.progress and is_main:
            shown = {k: round(v, 4) for k, v in row.items() if k in ("train_loss", f"val_{config.select_by}")}
            tqdm.write(f"epoch {epoch}: {shown}")
        if checkpoint_path is not None:
            if is_main:
                atomic_torch_save({"epoch": epoch, "fingerprint": fingerprint, "model": model.state_dict(),
                                   "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                   "result": result.state(), "best_state": best_state}, checkpoint_path)
            distributed.barrier()
        if result.stopped_by == "plateau":
            break

    if result.stopped_by is None:
        result.stopped_by = "budget"

    if best_state is not None:
        model.load_state_dict(best_state)
    elif result.history and validate is not None and not config.select_by:
        result.best_epoch = result.history[-1]["epoch"]
        result.best_metrics = distributed.broadcast_object(validate(model) if is_main else None)
    trained_time = sum(row["train_time_s"] for row in result.history[first_epoch - 1 :])
    if trained_time > 0 and pairs_seen:
        result.pairs_per_second = pairs_seen / trained_time
    return result
