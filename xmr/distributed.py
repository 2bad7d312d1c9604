"""Data-parallel training with ``torchrun``: contrastive losses over the *global* batch, exactly.

Usage: a script that sets up the process group from torchrun's environment and calls :func:`xmr.train.fit`
as usual::

    # train.py                                   # run with: torchrun --nproc_per_node=N train.py
    from xmr import distributed
    from xmr.train import TrainConfig, fit

    distributed.setup_from_env()                 # no-op when not started by torchrun (WORLD_SIZE unset)
    model, train_data, validate = ...            # the same objects as in a single-process run
    fit(model, train_data, TrainConfig(batch_size=256), validate=validate, checkpoint_dir="runs/x")
    distributed.cleanup()

With a world size of 1 (no process group, or one process) nothing here is touched and :func:`~xmr.train.fit` runs its
single-process code path unchanged.

**What a run of N processes computes.** ``TrainConfig.batch_size`` is the *global* batch, the batch the loss
sees (the paper's batch size); each rank loads ``batch_size / N`` of it. The global batches are the ones a
single process would draw (same seed, same order: :class:`ShardedBatchSampler` splits each single-process batch
into N consecutive shares), and the loss runs on every rank on the gathered global batch, so N processes train
the same model as one process, up to floating-point summation order. What cannot be equivalent: dropout
masks (drawn per rank for its share) and batch statistics inside the towers (BatchNorm sees the local share;
use ``nn.SyncBatchNorm``); the tests use neither. With ``drop_last=False`` the last, partial global batch
loses its ``len % N`` trailing items (shares must have equal sizes for ``all_gather``).

**How the loss sees the global batch (the design).** Losses stay unaware of distribution (house style): they
are plain modules over (B, D) tensors. :func:`~xmr.train.fit` wraps the model in DDP through :func:`wrap_model`, whose
step module registers a forward pre-hook on ``model.loss`` for the duration of each training step; the hook
gathers every tensor argument with a batch dimension (features *and* labels, e.g. IConE's instance ids) with
:func:`gather_loss_inputs`. Nothing about the model changes (its ``state_dict`` keys, ``model.loss.temperature``
and checkpoints stay those of a single-process run), so no model or loss needed editing. A model without a
``loss`` module must gather itself (call :func:`gather_with_grad` in ``training_losses``) and say so with
``gathers_global_batch = True``. :class:`GatheredLoss` is the same gathering as an explicit wrapper, for
scripts that do not use :func:`~xmr.train.fit`.

**Gradient scaling convention.** Let ``L(X)`` be the loss on the global batch ``X = [X_0; ...; X_{N-1}]``.
Every rank computes the same value ``L``. :func:`gather_with_grad` keeps the graph of the local share ``X_r``
only, so rank r back-propagates ``dL/dX_r`` into the encoder, and DDP *averages* gradients over ranks:
``(1/N) sum_r dL/dX_r dX_r/dtheta = (1/N) dL/dtheta``, N times too small. Multiplying the loss by N would fix the
encoder but not the parameters *inside* the loss (a learned temperature, IConE's ``W_share``): each rank
already gets their full gradient ``dL/dphi`` from the global batch, and it would become ``N dL/dphi``. So the
loss is **not** scaled; instead :class:`GatheredLoss` multiplies the gradient flowing back into each local
feature tensor by N (:func:`scale_gradient`, identity in the forward pass). After DDP's average both kinds of
parameter get exactly world size 1's gradient on the concatenated batch, and the logged loss is the global
batch's loss. (Equivalently, ``torch.distributed.nn.functional.all_gather`` all-reduces the feature gradients
in its backward, which gives the same result at the cost of one more collective per step.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, Sampler


def is_distributed() -> bool:
    """True in a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def setup_from_env(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``LOCAL_RANK``); ``backend`` defaults to nccl on CUDA, gloo on CPU. On CUDA the process
    uses GPU ``LOCAL_RANK`` (so ``device="auto"``/``"cuda"`` means that GPU). Returns whether a group is set up;
    a no-op returning False when ``WORLD_SIZE`` is unset (a plain ``python`` run)."""
    if "WORLD_SIZE" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def cleanup() -> None:
    """Leave the process group (at the end of a script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(value, source: int = 0):
    """``value`` of rank ``source`` on every rank (any picklable object); the value itself in world size 1."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def broadcast_tensors(*tensors: torch.Tensor, source: int = 0) -> None:
    """Overwrite each tensor, in place, with rank ``source``'s (e.g. k-means labels computed on every rank, which
    floating-point non-determinism could make differ). World size 1: nothing happens."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor, src=source)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The (world * B, ...) concatenation of every rank's (B, ...) ``tensor``, rank order; the local share is
    ``tensor`` itself (its autograd graph kept), the others are constants (open_clip's ``gather_features``
    without ``gather_with_grad``). Shapes must match across ranks. World size 1: ``tensor`` unchanged."""
    if not is_distributed():
        return tensor
    shares = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(shares, tensor.detach().contiguous())
    shares[rank()] = tensor
    return torch.cat(shares)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        return gradient * ctx.factor, None


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor`` in the forward pass; its gradient multiplied by ``factor`` in the backward pass."""
    return _ScaleGradient.apply(tensor, factor)


def _gather(value):
    if not torch.is_tensor(value) or value.dim() == 0:
        return value  # scalars and non-tensors (IConE's weights, DRCL's q) are the same on every rank
    if value.dtype == torch.bool:  # masks: gloo has no all_gather for bool
        return gather_with_grad(value.to(torch.uint8)).bool()
    if value.requires_grad:  # the N of the convention in the module docstring
        return gather_with_grad(scale_gradient(value, float(world_size())))
    return gather_with_grad(value)  # labels, ids: no graph


def gather_loss_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Every tensor argument with a batch dimension gathered over ranks (features with the gradient scaling of
    the module docstring, labels plainly); scalars and non-tensors unchanged. World size 1: unchanged."""
    if not is_distributed():
        return args, kwargs
    return tuple(_gather(value) for value in args), {name: _gather(value) for name, value in kwargs.items()}


class GatheredLoss(nn.Module):
    """``loss`` computed on the global batch: ``GatheredLoss(InfoNCELoss())(image_features, text_features)``.

    Each tensor argument with a leading batch dimension is gathered over ranks (:func:`gather_loss_inputs`), so
    a contrastive loss sees every rank's pairs as negatives, BatchNorm-like standardisation (Barlow Twins) uses
    global statistics, and labels (IConE's instance ids, SupCon's sets) follow their features. The returned
    dict is the wrapped loss's on the global batch, equal on every rank. Pass-through in world size 1.
    :func:`xmr.train.fit` does the same without wrapping (a hook on ``model.loss``).
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        args, kwargs = gather_loss_inputs(args, kwargs)
        return self.loss(*args, **kwargs)


def _gather_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return gather_loss_inputs(args, kwargs)


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s share of each global batch of ``batch_sampler``: its ``rank``-th of ``world_size``
    consecutive equal parts (``len // world_size`` items; a trailing ``len % world_size`` are dropped, and a
    batch smaller than ``world_size`` is skipped on every rank). The union of the shares, in rank order, is the
    single-process batch, so ``DataLoader(..., batch_sampler=ShardedBatchSampler(...), generator=g)`` with the
    single-process loader's generator reproduces its order exactly (unlike ``DistributedSampler``, which draws
    its own permutation and deals items round-robin)."""

    def __init__(self, batch_sampler: BatchSampler, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            share = len(batch) // self.world_size
            if share:
                yield batch[self.rank * share : (self.rank + 1) * share]

    def __len__(self) -> int:
        items, size = len(self.batch_sampler.sampler), self.batch_sampler.batch_size
        last = 0 if self.batch_sampler.drop_last else items % size
        return items // size + (last >= self.world_size)


class TrainingStep(nn.Module):
    """``forward(batch) = model.training_losses(batch)`` with ``model.loss`` on the global batch, for DDP (whose
    gradient synchronisation needs the step to go through its ``forward``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        loss = getattr(model, "loss", None)
        if not isinstance(loss, nn.Module) and not getattr(model, "gathers_global_batch", False):
            raise ValueError(
                f"{type(model).__name__} has no `loss` module, so fit cannot make its loss see the global batch: "
                "give it one, or gather in training_losses (xmr.distributed.gather_with_grad) and set "
                "gathers_global_batch = True on the model")
        self.model = model

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        loss = getattr(self.model, "loss", None)
        if getattr(self.model, "gathers_global_batch", False) or isinstance(loss, GatheredLoss):
            return self.model.training_losses(batch)
        handle = loss.register_forward_pre_hook(_gather_hook, with_kwargs=True)
        try:
            return self.model.training_losses(batch)
        finally:
            handle.remove()


def wrap_model(model: nn.Module, device: torch.device,
               find_unused_parameters: bool = False) -> nn.parallel.DistributedDataParallel:
    """DDP around :class:`TrainingStep` of ``model`` (parameters shared, broadcast from rank 0 now).

    ``find_unused_parameters=True`` is needed when a trainable parameter gets no gradient in a step (for
    example a loss term with weight 0 that owns parameters); :func:`~xmr.train.fit` reads it from the model's attribute
    ``find_unused_parameters`` (default False)."""
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(TrainingStep(model), device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)
