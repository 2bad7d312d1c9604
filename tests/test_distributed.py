"""Two gloo processes on the CPU train exactly like one process on the concatenated (global) batch.

Every loss in xmr is checked for one DDP step in float64: the loss value and every parameter's gradient (of two
small linear heads producing the features, and of the loss's own parameters) with world size 2, each rank
holding half the batch, equal world size 1's on the whole batch to 1e-10. Then ``fit`` end to end: 2 epochs
under 2 processes end with world size 1's parameters, only rank 0 validates and writes checkpoints. CODER, which
gathers its own global batch and keeps momentum queues and per-epoch k-means labels, ends its 2 epochs in the
same state (queues and labels included) under 2 processes as in one.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from xmr import distributed
from xmr.data.paired import PairedFeatures
from xmr.distributed import GatheredLoss, ShardedBatchSampler, TrainingStep, gather_with_grad, scale_gradient
from xmr.losses import BarlowTwinsLoss, InfoNCELoss, SupervisedContrastiveLoss, TripletLoss
from xmr.methods.drcl import ReversibleConsistencyLoss
from xmr.methods.icone import IConELoss, InstanceLoss
from xmr.methods.semantic_unification import PairDistanceLoss
from xmr.train import RetrievalValidator, TrainConfig, _epoch_loader, fit

WORLD = 2
BATCH, IN_DIM, DIM, CLASSES = 12, 6, 4, 5  # the global batch; each rank holds BATCH / WORLD rows
TOLERANCE = 1e-10


# ---------------------------------------------------------------------------------------------------------------
# Every loss, as (builder, how the model calls it on the heads' outputs)
# ---------------------------------------------------------------------------------------------------------------

def _normalised_pair(loss, image, text, labels):
    return loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1))


def _raw_pair(loss, image, text, labels):
    return loss(image, text)


def _raw_pair_labels(loss, image, text, labels):  # IConE: features before normalisation, instance ids
    return loss(image, text, labels)


def _one_modality(loss, image, text, labels):  # SupCon within a modality: one (N, D) tensor and its sets
    return loss(F.normalize(image + text, dim=-1), labels)


def _drcl(loss, image, text, labels):  # DRCL's RSC: embeddings, soft targets (no graph), a float q
    return loss(image + text, F.one_hot(labels, CLASSES).double(), 0.5)


def _drcl_loss():
    prior = torch.randn(DIM, CLASSES, generator=torch.Generator().manual_seed(3))
    return ReversibleConsistencyLoss(prior).double()  # its buffers are stored in float32


LOSS_CASES = {
    "sum_triplet": (lambda: TripletLoss(margin=0.5), _normalised_pair),
    "sum_triplet_mean": (lambda: TripletLoss(margin=0.5, reduction="mean"), _normalised_pair),
    "max_triplet": (lambda: TripletLoss(margin=0.5, max_violation=True), _normalised_pair),
    "infonce": (lambda: InfoNCELoss(temperature=0.1), _normalised_pair),
    "infonce_learned_temperature": (lambda: InfoNCELoss(temperature=0.1, learn_temperature=True), _normalised_pair),
    "infonce_literal_eq4": (lambda: InfoNCELoss(exclude_positive_from_denominator=True), _normalised_pair),
    "barlow_twins": (lambda: BarlowTwinsLoss(), _raw_pair),
    "icone": (lambda: IConELoss(InstanceLoss(CLASSES, DIM)), _raw_pair_labels),
    "icone_literal_eq6": (lambda: IConELoss(InstanceLoss(CLASSES, DIM), literal_eq6=True), _raw_pair_labels),
    "semantic_contrastive": (lambda: SupervisedContrastiveLoss(), _one_modality),
    "semantic_contrastive_printed": (lambda: SupervisedContrastiveLoss(printed_formula=True), _one_modality),
    "pair_distance": (lambda: PairDistanceLoss(), _normalised_pair),
    "drcl_reversible_consistency": (_drcl_loss, _drcl),
}


class LinearPair(nn.Module):
    """Two linear heads producing (B, DIM) features, then a loss. ``mode`` says how the loss sees the batch:
    ``"gathered"`` (:class:`GatheredLoss`), or two wrong conventions kept as controls: ``"no_scaling"``
    (gather without scaling the feature gradients) and ``"loss_times_world"`` (that, with the loss times N)."""

    def __init__(self, case: str, mode: str = "gathered"):
        super().__init__()
        torch.manual_seed(0)
        build, self.call = LOSS_CASES[case]
        self.image_head = nn.Linear(IN_DIM, DIM).double()
        self.text_head = nn.Linear(IN_DIM, DIM).double()
        self.loss = GatheredLoss(build().double()) if mode == "gathered" else build().double()
        self.mode = mode

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image, text = self.image_head(batch["image"]), self.text_head(batch["text"])  # (B, DIM)
        if self.mode == "gathered":
            return self.call(self.loss, image, text, batch["label"])
        image, text, labels = gather_with_grad(image), gather_with_grad(text), gather_with_grad(batch["label"])
        losses = self.call(self.loss, image, text, labels)
        return {"loss": losses["loss"] * distributed.world_size()} if self.mode == "loss_times_world" else losses


def loss_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"image": torch.randn(BATCH, IN_DIM, generator=generator, dtype=torch.float64),
            "text": torch.randn(BATCH, IN_DIM, generator=generator, dtype=torch.float64),
            "label": torch.randint(CLASSES, (BATCH,), generator=generator)}  # sets spread over both ranks


def one_step(model: nn.Module, batch: dict, step=None) -> dict:
    """Loss values and parameter gradients of one step (``step`` = the DDP module, if any)."""
    losses = (step or model)(batch)
    losses["loss"].backward()
    return {"losses": {name: value.detach().clone() for name, value in losses.items()},
            "grads": {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}}


# ---------------------------------------------------------------------------------------------------------------
# Process plumbing: WORLD gloo processes, results through files
# ---------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bootstrap(rank: int, worker, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.setup_from_env("gloo") and distributed.is_distributed()
    try:
        worker(rank, *args)
    finally:
        distributed.cleanup()


def run_in_processes(worker, *args) -> None:
    mp.spawn(_bootstrap, args=(worker, _free_port(), args), nprocs=WORLD, join=True)


def _loss_worker(rank: int, out_dir: str) -> None:
    batch = loss_batch()
    share = BATCH // WORLD
    local = {name: value[rank * share : (rank + 1) * share] for name, value in batch.items()}
    results = {}
    for case in LOSS_CASES:
        model = LinearPair(case)
        results[case] = one_step(model, local, nn.parallel.DistributedDataParallel(model))
    for mode in ("no_scaling", "loss_times_world"):
        model = LinearPair("infonce_learned_temperature", mode)
        results[mode] = one_step(model, local, nn.parallel.DistributedDataParallel(model))
    torch.save(results, f"{out_dir}/losses_{rank}.pt")


@pytest.fixture(scope="module")
def distributed_steps(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed_losses")
    run_in_processes(_loss_worker, str(out_dir))
    return [torch.load(out_dir / f"losses_{rank}.pt") for rank in range(WORLD)]


def assert_close(actual: dict, expected: dict, scale: float = 1.0) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name] * scale, rtol=0, atol=TOLERANCE, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# One step of every loss
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_world_of_two_equals_one_process_on_the_concatenated_batch(distributed_steps, case):
    reference = one_step(LinearPair(case), loss_batch())  # world size 1: GatheredLoss passes through
    assert all(reference["grads"][f"{head}.weight"].abs().sum() > 0 for head in ("image_head", "text_head"))
    for rank_result in distributed_steps:
        assert_close(rank_result[case]["losses"], reference["losses"])
        assert_close(rank_result[case]["grads"], reference["grads"])
    if case in ("infonce_learned_temperature", "icone"):  # the loss's own parameters are checked too
        assert {"loss.loss.logit_scale", "loss.loss.instance_loss.classifier.weight"} & reference["grads"].keys()


def test_gradient_convention_neither_unscaled_nor_loss_times_world(distributed_steps):
    """The docstring's convention: without scaling the encoder gets 1/N of the gradient; with the loss times N
    the loss's own parameter (the learned temperature) gets N times its gradient."""
    reference = one_step(LinearPair("infonce_learned_temperature", "no_scaling"), loss_batch())["grads"]
    heads = [name for name in reference if "head" in name]
    for rank_result in distributed_steps:
        unscaled, times_world = rank_result["no_scaling"]["grads"], rank_result["loss_times_world"]["grads"]
        assert_close({name: unscaled[name] for name in heads}, {name: reference[name] for name in heads}, 1 / WORLD)
        assert_close({"t": unscaled["loss.logit_scale"]}, {"t": reference["loss.logit_scale"]})
        assert_close({name: times_world[name] for name in heads}, {name: reference[name] for name in heads})
        assert_close({"t": times_world["loss.logit_scale"]}, {"t": reference["loss.logit_scale"]}, WORLD)
    assert reference["loss.logit_scale"].abs() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# fit end to end
# ---------------------------------------------------------------------------------------------------------------

class TinyDualEncoder(nn.Module):
    """Linear heads in float64 and InfoNCE with a learned temperature (a parameter inside the loss)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image_head, self.text_head = nn.Linear(16, 8).double(), nn.Linear(12, 8).double()
        self.loss = InfoNCELoss(temperature=0.1, learn_temperature=True).double()

    def encode_image(self, images):
        return F.normalize(self.image_head(images.double()), dim=-1)

    def encode_text(self, texts, mask=None):
        return F.normalize(self.text_head(texts.double()), dim=-1)

    def training_losses(self, batch):
        return self.loss(self.encode_image(batch["image"]), self.encode_text(batch["text"]))


class CountingValidator(RetrievalValidator):
    calls = 0

    def __call__(self, model):
        CountingValidator.calls += 1
        return super().__call__(model)


def fit_data():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(46, 4, generator=generator, dtype=torch.float64)
    image = codes @ torch.randn(4, 16, generator=generator, dtype=torch.float64)
    text = codes.repeat_interleave(5, 0) @ torch.randn(4, 12, generator=generator, dtype=torch.float64)
    text = text + 0.5 * torch.randn(text.shape, generator=generator, dtype=torch.float64)
    train = PairedFeatures(image[:36], text[:180], caption_choice="random", seed=0)  # a caption draw per epoch
    return train, CountingValidator(image[36:].float(), text[180:].float())


FIT_CONFIGS = {"drop_last": dict(drop_last=True), "keep_last": dict(drop_last=False, select_by=None)}


def fit_config(name: str) -> TrainConfig:  # 36 items: 4 global batches of 8, and with keep_last a 5th of 4
    return TrainConfig(max_epochs=2, batch_size=8, lr=1e-2, lr_milestones=(1,), device="cpu", progress=False,
                       **FIT_CONFIGS[name])


def _fit_worker(rank: int, out_dir: str) -> None:
    import xmr.train

    saves = []
    real_save = xmr.train.atomic_torch_save
    xmr.train.atomic_torch_save = lambda state, path: (saves.append(str(path)), real_save(state, path))
    results = {}
    for name in FIT_CONFIGS:
        model, (train, validate) = TinyDualEncoder(), fit_data()
        CountingValidator.calls = 0
        result = fit(model, train, fit_config(name), validate=validate, checkpoint_dir=f"{out_dir}/{name}")
        results[name] = {"state": model.state_dict(), "result": result, "validations": CountingValidator.calls}
    results["saves"] = saves
    torch.save(results, f"{out_dir}/fit_{rank}.pt")


@pytest.fixture(scope="module")
def distributed_fits(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed_fit")
    run_in_processes(_fit_worker, str(out_dir))
    return out_dir, [torch.load(out_dir / f"fit_{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.parametrize("name", list(FIT_CONFIGS))
def test_fit_under_two_processes_ends_like_one_process(distributed_fits, tmp_path, name):
    out_dir, ranks = distributed_fits
    model, (train, validate) = TinyDualEncoder(), fit_data()
    reference = fit(model, train, fit_config(name), validate=validate, checkpoint_dir=tmp_path)
    for rank_result in ranks:
        assert_close(rank_result[name]["state"], model.state_dict())
        result = rank_result[name]["result"]
        assert result.best_epoch == reference.best_epoch
        assert result.step_losses == pytest.approx(reference.step_losses, abs=TOLERANCE)
        assert len(result.step_losses) == (8 if name == "drop_last" else 10)
        assert [row["val_rsum"] for row in result.history] == [row["val_rsum"] for row in reference.history]
    assert all(torch.equal(ranks[0][name]["state"][key], ranks[1][name]["state"][key]) for key in model.state_dict())
    # Rank 0 alone validates (each epoch, plus the final one without select_by) and writes each epoch's checkpoint.
    assert [rank_result[name]["validations"] for rank_result in ranks] == [2 + (name == "keep_last"), 0]
    checkpoint = torch.load(out_dir / name / "last.pt", weights_only=True)
    written = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["fingerprint"]["config"] == written["fingerprint"]["config"]
    assert_close(checkpoint["model"], written["model"])


def test_only_rank_zero_writes_checkpoints(distributed_fits):
    out_dir, ranks = distributed_fits
    assert len(ranks[0]["saves"]) == 2 * len(FIT_CONFIGS) and ranks[1]["saves"] == []


# ---------------------------------------------------------------------------------------------------------------
# CODER: a model that gathers itself, with momentum queues and per-epoch k-means
# ---------------------------------------------------------------------------------------------------------------

def coder_fit(seed: int = 0, aggregation: str = "mean") -> tuple[nn.Module, object]:
    """The toy CODER model of test_coder (concepts, queue of 20, K = 4) trained 2 epochs with fit; float32.
    ``aggregation="gpo"``: on toy region/token inputs with masks (the masks are gathered too)."""
    from test_coder import _toy_model, _toy_regions, _toy_split

    generator = torch.Generator().manual_seed(seed)
    image, text, captions = _toy_split(generator)
    mask = None
    if aggregation == "gpo":
        image, text, mask = _toy_regions(generator, image, text)
    torch.manual_seed(seed)
    model = _toy_model(generator, captions, aggregation=aggregation)
    model.set_clustering_inputs(image, text, mask, 5)
    config = TrainConfig(max_epochs=2, batch_size=10, lr=1e-2, device="cpu", progress=False, select_by=None)
    result = fit(model, PairedFeatures(image, text, mask, 5, caption_choice="all"), config)
    return model, result


def _coder_worker(rank: int, out_dir: str, aggregation: str) -> None:
    model, result = coder_fit(aggregation=aggregation)
    own = torch.full((3,), float(rank))  # what broadcast_tensors (used for k-means labels) must replace
    distributed.broadcast_tensors(own)
    torch.save({"state": model.state_dict(), "step_losses": result.step_losses, "broadcast": own},
               f"{out_dir}/coder_{rank}.pt")


@pytest.mark.parametrize("aggregation", ["mean", "gpo"])
def test_coder_under_two_processes_ends_like_one_process(tmp_path, aggregation):
    run_in_processes(_coder_worker, str(tmp_path), aggregation)
    model, result = coder_fit(aggregation=aggregation)
    assert len(model.image_queue) == 20 and bool(model.clustered)
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"coder_{rank}.pt")
        assert saved["step_losses"] == pytest.approx(result.step_losses, abs=1e-5)
        assert torch.equal(saved["broadcast"], torch.zeros(3))  # rank 0's values on every rank
        # GPO's GRUs get small gradients that Adam (lr 1e-2) scales up, round-off included: up to 1.5e-5 apart
        tolerance = 1e-5 if aggregation == "mean" else 1e-4
        for name, value in model.state_dict().items():  # heads, key heads, queues and their ids, pseudo labels
            torch.testing.assert_close(saved["state"][name], value, rtol=tolerance, atol=tolerance, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Without a process group
# ---------------------------------------------------------------------------------------------------------------

def test_world_size_one_touches_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup_from_env() is False
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main_process() and distributed.broadcast_object({"a": 1}) == {"a": 1}
    features = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(features) is features
    loss, wrapped = InfoNCELoss(), GatheredLoss(InfoNCELoss())
    normalised = F.normalize(features, dim=-1)
    expected, actual = loss(normalised, normalised), wrapped(normalised, normalised)
    assert all(torch.equal(actual[name], expected[name]) for name in ("loss", "loss_i2t"))


def test_scale_gradient_is_identity_forward_and_scales_backward():
    features = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    scaled = scale_gradient(features, 3.0)
    assert torch.equal(scaled, features)
    scaled.sum().backward()
    assert torch.equal(features.grad, torch.full_like(features, 3.0))


class IndexDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 37

    def __getitem__(self, index):
        return index


@pytest.mark.parametrize("world, drop_last", [(2, True), (2, False), (4, True), (4, False)])
def test_rank_shares_reassemble_the_single_process_batches(world, drop_last):
    config = TrainConfig(batch_size=8, drop_last=drop_last, seed=3)
    single = [batch.tolist() for batch in _epoch_loader(IndexDataset(), config, epoch=2)]
    shares = [[batch.tolist() for batch in _epoch_loader(IndexDataset(), config, 2, rank, world)]
              for rank in range(world)]
    assert all(len(rank_batches) == len(shares[0]) for rank_batches in shares)
    assert [len(loader) for loader in (_epoch_loader(IndexDataset(), config, 2, r, world) for r in range(world))] \
        == [len(shares[0])] * world
    for step, batch in enumerate(single[: len(shares[0])]):
        joined = sum((rank_batches[step] for rank_batches in shares), [])
        kept = len(batch) // world * world  # a partial last batch loses len % world items
        assert joined == batch[:kept]
    assert len(shares[0]) == len(single) - (not drop_last and 37 % 8 < world)


def test_sharded_sampler_checks_its_rank():
    with pytest.raises(ValueError, match="rank"):
        ShardedBatchSampler(torch.utils.data.BatchSampler(range(4), 2, False), rank=2, world_size=2)


def test_a_model_without_a_loss_module_must_say_it_gathers():
    class NoLoss(nn.Module):
        def training_losses(self, batch):
            return {"loss": batch["x"].sum()}

    with pytest.raises(ValueError, match="gathers_global_batch"):
        TrainingStep(NoLoss())
    model = NoLoss()
    model.gathers_global_batch = True
    assert TrainingStep(model)({"x": torch.ones(2)})["loss"] == 2


def test_batch_size_must_split_over_the_processes(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    model, (train, _) = TinyDualEncoder(), fit_data()
    with pytest.raises(ValueError, match="divisible"):
        fit(model, train, fit_config("drop_last"))
