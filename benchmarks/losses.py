"""Each loss's forward+backward time against a per-anchor loop formulation of the same equation.

    python benchmarks/losses.py [--batch 128] [--dim 256] [--bank 4096]

The loop formulations compute one anchor (one row of the similarity matrix, or one sample) at a time with
vector operations: the equations as they read, and how a first implementation is often written. Before
anything is timed, each loop formulation is checked against the module in the same run (the loss and the
gradients with respect to every input, float32), so each ratio compares two computations of the same number.
Times are medians of ``torch.utils.benchmark.Timer.blocked_autorange`` with the process's torch threads.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from xmr.losses import BarlowTwinsLoss, InfoNCELoss, SupervisedContrastiveLoss, TripletLoss
from xmr.methods.coder import DiversityContrastiveLoss
from xmr.methods.drcl import ReversibleConsistencyLoss, random_orthogonal_prior
from xmr.methods.icone import InstanceLoss

MARGIN, TEMPERATURE, LAMBD, EPS = 0.2, 0.07, 0.0051, 1e-5
MU, GAMMA, DIVERSITY_EPS = 0.1, 0.3, 0.1
NUM_INSTANCES, NUM_CLASSES, GCE_Q, SET_SIZE = 6000, 10, 0.5, 5


# ---------------------------------------------------------------------------------------------------------------
# Per-anchor loop formulations (each returns the scalar loss)
# ---------------------------------------------------------------------------------------------------------------

def loop_triplet(image, text, max_violation):
    reduce = torch.max if max_violation else torch.sum
    total = 0.0
    for i in range(len(image)):
        negatives = torch.arange(len(image)) != i
        positive = image[i] @ text[i]
        total = total + reduce((MARGIN - positive + text[negatives] @ image[i]).clamp(min=0))  # image anchor
        total = total + reduce((MARGIN - positive + image[negatives] @ text[i]).clamp(min=0))  # caption anchor
    return total


def loop_infonce(image, text):
    total = 0.0
    for i in range(len(image)):
        total = total - F.log_softmax(text @ image[i] / TEMPERATURE, dim=0)[i]
        total = total - F.log_softmax(image @ text[i] / TEMPERATURE, dim=0)[i]
    return total / (2 * len(image))


def loop_barlow_twins(image, text):
    def standardise(x):
        return (x - x.mean(dim=0)) / torch.sqrt(x.var(dim=0, unbiased=False) + EPS)

    za, zb = standardise(image), standardise(text)
    on_diagonal, off_diagonal = 0.0, 0.0
    for d in range(za.shape[1]):  # one row of the cross-correlation matrix at a time
        row = za[:, d] @ zb / len(za)
        on_diagonal = on_diagonal + (1 - row[d]) ** 2
        off_diagonal = off_diagonal + row.pow(2).sum() - row[d] ** 2
    return on_diagonal + LAMBD * off_diagonal


def _raw_diversity(values):
    """Eq. (3) for one anchor: 1 / sigmoid(eps / SD) over its negatives' similarities."""
    return 1.0 / torch.sigmoid(DIVERSITY_EPS / values.detach().std(unbiased=False))


def loop_dcl_direction(queries, keys, bank=None):
    """One direction of Eq. (5), or of Eq. (6) when ``bank`` (its negatives and its diversity) is given."""
    size = len(queries)
    rows = [queries[n] @ keys.T for n in range(size)]
    negatives = [torch.cat([row[:n], row[n + 1 :]]) for n, row in enumerate(rows)]
    raw = torch.stack([_raw_diversity(values) for values in negatives])
    div = raw / raw.max()
    if bank is not None:
        bank_rows = [queries[n] @ bank.T for n in range(size)]
        raw_bank = torch.stack([_raw_diversity(values) for values in bank_rows])
        div = (div + raw_bank / raw_bank.max()) / 2
        negatives = [torch.cat([values, bank_row]) for values, bank_row in zip(negatives, bank_rows)]
    total = 0.0
    for n in range(size):
        inside = 1 + torch.exp((negatives[n] - GAMMA) / (MU * div[n])).sum()
        total = total + torch.log(inside) - torch.log(1 + rows[n][n])
    return MU * total / size


def loop_dcl(image, text):
    return loop_dcl_direction(image, text) + loop_dcl_direction(text, image)


def loop_memory_dcl(image, text, image_keys, text_keys, image_bank, text_bank):
    return loop_dcl_direction(image, text_keys, text_bank) + loop_dcl_direction(text, image_keys, image_bank)


def loop_supervised_contrastive(features, labels):
    total, anchors = 0.0, 0
    for i in range(len(features)):
        others = torch.arange(len(features)) != i
        log_probability = F.log_softmax(features[others] @ features[i] / 0.1, dim=0)
        positives = labels[others] == labels[i]
        if positives.any():
            total, anchors = total - log_probability[positives].mean(), anchors + 1
    return total / anchors


def loop_reversible_consistency(embeddings, targets, prior):
    anchors = targets @ torch.linalg.pinv(prior.double()).float()
    size = len(embeddings)

    def scaled_cosines(vector, matrix):
        return 2 * (matrix @ vector) / (matrix.norm(dim=1) * vector.norm()).clamp_min(1e-6)

    discrimination, mse, label = 0.0, 0.0, 0.0
    for i in range(size):
        discrimination = discrimination + ((scaled_cosines(anchors[i], anchors)
                                            - scaled_cosines(embeddings[i], embeddings)) ** 2).sum()
        # C(r_i, z_j) against C(r_j, z_i): row i and column i of the (B, B) matrix
        discrimination = discrimination + ((scaled_cosines(anchors[i], embeddings)
                                            - scaled_cosines(embeddings[i], anchors)) ** 2).sum()
        mse = mse + ((anchors[i] - embeddings[i]) ** 2).sum()
        probability = (F.softmax(embeddings[i] @ prior, dim=0) * targets[i]).sum()
        label = label + (1 - probability**GCE_Q) / GCE_Q
    return label / size + 0.1 * discrimination / size**2 + 0.1 * mse / embeddings.numel()


def loop_instance(image, text, weight, labels):
    total = 0.0
    for i in range(len(image)):
        total = total - F.log_softmax(weight @ image[i], dim=0)[labels[i]]
        total = total - F.log_softmax(weight @ text[i], dim=0)[labels[i]]
    return total / len(image)


# ---------------------------------------------------------------------------------------------------------------
# The cases: the module, its inputs and its loop formulation
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Case:
    """``inputs(batch, dim, bank, generator)`` gives (leaf tensors needing gradients, constants); ``module`` and
    ``loop`` map (*leaves, *constants) to the scalar loss."""

    name: str
    equation: str
    inputs: Callable
    module: Callable
    loop: Callable


def unit(generator, *shape):
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def _pair(batch, dim, bank, generator):
    return [unit(generator, batch, dim), unit(generator, batch, dim)], []


def _raw_pair(batch, dim, bank, generator):
    return [torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)], []


def _memory(batch, dim, bank, generator):
    return _pair(batch, dim, bank, generator)[0], [unit(generator, batch, dim), unit(generator, batch, dim),
                                                   unit(generator, bank, dim), unit(generator, bank, dim)]


def _sets(batch, dim, bank, generator):  # positive sets of SET_SIZE (the five captions of an image)
    return [unit(generator, batch, dim)], [torch.arange(batch) // SET_SIZE]


def _drcl(batch, dim, bank, generator):
    targets = F.one_hot(torch.randint(NUM_CLASSES, (batch,), generator=generator), NUM_CLASSES).float()
    targets = 0.9 * targets + 0.1 * targets[torch.randperm(batch, generator=generator)]  # FA's mixed labels
    return [torch.randn(batch, dim, generator=generator)], [targets, random_orthogonal_prior(dim, NUM_CLASSES)]


def _instances(batch, dim, bank, generator):
    return ([torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator),
             0.01 * torch.randn(NUM_INSTANCES, dim, generator=generator)],
            [torch.randint(NUM_INSTANCES, (batch,), generator=generator)])


@functools.cache
def _instance_loss(dim: int) -> InstanceLoss:
    return InstanceLoss(NUM_INSTANCES, dim)


def _instance_module(image, text, weight, labels):  # W_share given as a leaf, so its gradient is compared too
    loss = _instance_loss(image.shape[1])
    return torch.func.functional_call(loss, {"classifier.weight": weight}, (image, text, labels))["loss"]


@functools.cache  # the pseudo-inverse is computed once per prior, as when training
def _reversible_consistency_loss(prior: torch.Tensor) -> ReversibleConsistencyLoss:
    return ReversibleConsistencyLoss(prior)


def _drcl_module(embeddings, targets, prior):
    return _reversible_consistency_loss(prior)(embeddings, targets, GCE_Q)["loss"]


SUM_TRIPLET, MAX_TRIPLET = TripletLoss(MARGIN), TripletLoss(MARGIN, max_violation=True)
INFONCE, BARLOW_TWINS = InfoNCELoss(TEMPERATURE), BarlowTwinsLoss(LAMBD, EPS)
DCL, SUPERVISED_CONTRASTIVE = DiversityContrastiveLoss(MU, GAMMA, DIVERSITY_EPS), SupervisedContrastiveLoss(0.1)


CASES = [
    Case("sum-triplet", "timofeev2022 Sec. III-A", _pair,
         lambda i, t: SUM_TRIPLET(i, t)["loss"], lambda i, t: loop_triplet(i, t, False)),
    Case("max-triplet (VSE++)", "timofeev2022 Eq. 1", _pair,
         lambda i, t: MAX_TRIPLET(i, t)["loss"], lambda i, t: loop_triplet(i, t, True)),
    Case("InfoNCE", "timofeev2022 Eq. 4", _pair, lambda i, t: INFONCE(i, t)["loss"], loop_infonce),
    Case("Barlow Twins", "timofeev2022 Eq. 3", _raw_pair,
         lambda i, t: BARLOW_TWINS(i, t)["loss"], loop_barlow_twins),
    Case("DCL, explicit diversity", "coder2022 Eqs. 3, 5", _pair,
         lambda i, t: DCL(i, t)["loss"], loop_dcl),
    Case("M-DCL with a queue", "coder2022 Eq. 6", _memory,
         lambda *args: DCL.with_memory(*args)["loss"], loop_memory_dcl),
    Case("instance loss, 6000 classes", "icone2024 Eqs. 1-5", _instances, _instance_module, loop_instance),
    Case("supervised contrastive", "shi2024 Secs. 3.1-3.2", _sets,
         lambda f, labels: SUPERVISED_CONTRASTIVE(f, labels)["loss"], loop_supervised_contrastive),
    Case("reversible consistency (RSC)", "drcl2024 Eqs. 4-8", _drcl, _drcl_module, loop_reversible_consistency),
]


# ---------------------------------------------------------------------------------------------------------------
# Checking and timing
# ---------------------------------------------------------------------------------------------------------------

def _value_and_gradients(function, leaves, constants):
    leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    value = function(*leaves, *constants)
    return value.detach(), torch.autograd.grad(value, leaves)


def check(case: Case, leaves, constants) -> float:
    """Asserts that the module and the loop agree (value and gradients); returns the largest gradient difference."""
    value, gradients = _value_and_gradients(case.module, leaves, constants)
    loop_value, loop_gradients = _value_and_gradients(case.loop, leaves, constants)
    torch.testing.assert_close(value, loop_value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{case.name}: {m}")
    worst = 0.0
    for ours, theirs in zip(gradients, loop_gradients):
        scale = max(1.0, float(theirs.abs().max()))
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-5 * scale, msg=lambda m: f"{case.name}: {m}")
        worst = max(worst, float((ours - theirs).abs().max()))
    return worst


def forward_backward_seconds(function, leaves, constants, min_run_time: float) -> float:
    leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]

    def step():
        for leaf in leaves:
            leaf.grad = None
        function(*leaves, *constants).backward()

    timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def run(batch: int = 128, dim: int = 256, bank: int = 4096, min_run_time: float = 1.0, seed: int = 0) -> dict:
    print(f"losses, forward+backward, batch {batch}, dim {dim}, bank {bank}, torch threads {torch.get_num_threads()}:")
    rows = []
    for case in CASES:
        leaves, constants = case.inputs(batch, dim, bank, torch.Generator().manual_seed(seed))
        gradient_difference = check(case, leaves, constants)
        seconds = forward_backward_seconds(case.module, leaves, constants, min_run_time)
        loop_seconds = forward_backward_seconds(case.loop, leaves, constants, min_run_time)
        rows.append({"loss": case.name, "equation": case.equation, "seconds": seconds, "loop_seconds": loop_seconds,
                     "speedup": loop_seconds / seconds, "max_gradient_difference": gradient_difference})
        print(f"  {case.name:<30} {1e3 * seconds:8.3f} ms; per-anchor loop {1e3 * loop_seconds:9.2f} ms; "
              f"speed-up x{loop_seconds / seconds:.1f}", flush=True)
    return {"batch": batch, "dim": dim, "bank": bank, "rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="the papers' batch size")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--bank", type=int, default=4096, help="M-DCL's queue (coder2022: 4096)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    args = parser.parse_args(argv)
    return run(args.batch, args.dim, args.bank, args.min_run_time)  # benchmarks/run_all.py records the figures


if __name__ == "__main__":
    main()
