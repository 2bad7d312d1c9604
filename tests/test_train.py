"""The training loop: it learns, resumes exactly, stops on non-finite losses, and writes result files."""
import json

import pytest
import torch
import torch.nn.functional as F

from xmr.data.paired import CaptionInputs, PairedFeatures
from xmr.encoders import DualEncoder, ProjectionHead, Tower
from xmr.results import load_results, write_result
from xmr.train import (
    CheckpointError,
    NonFiniteGradientError,
    NonFiniteLossError,
    RetrievalValidator,
    TrainConfig,
    evaluate_retrieval,
    evaluate_retrieval_per_query,
    fit,
)


class SymmetricCrossEntropy(torch.nn.Module):
    """A minimal contrastive loss, so these tests do not depend on xmr.losses."""

    def forward(self, image_features, text_features):
        logits = image_features @ text_features.T / 0.1
        labels = torch.arange(len(logits))
        i2t, t2i = F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
        return {"loss": (i2t + t2i) / 2, "loss_i2t": i2t, "loss_t2i": t2i}


def synthetic_pairs(num_images: int, seed: int):
    """Image features and 5 noisy captions per image that share a hidden 8-d code."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randn(num_images, 8, generator=generator)
    to_image, to_text = torch.randn(8, 16, generator=generator), torch.randn(8, 12, generator=generator)
    image = codes @ to_image + 0.3 * torch.randn(num_images, 16, generator=generator)
    text = codes.repeat_interleave(5, 0) @ to_text + 0.8 * torch.randn(num_images * 5, 12, generator=generator)
    return image, text


def make_model(seed: int = 0) -> DualEncoder:
    torch.manual_seed(seed)
    return DualEncoder(Tower(ProjectionHead(16, 8)), Tower(ProjectionHead(12, 8)), SymmetricCrossEntropy())


CONFIG = dict(max_epochs=4, patience=None, batch_size=16, lr=1e-2, lr_milestones=(2,), progress=False, device="cpu")


@pytest.fixture(scope="module")
def data():
    image, text = synthetic_pairs(168, seed=0)  # 128 training images, 40 validation images
    return (PairedFeatures(image[:128], text[:640], caption_choice="random", seed=0),
            RetrievalValidator(image[128:], text[640:]))


def test_a_short_run_improves_recall(data):
    train, validate = data
    model = make_model()
    before = validate(model)["rsum"]
    result = fit(model, train, TrainConfig(**CONFIG), validate=validate)
    assert result.best_metrics["rsum"] > before + 100
    assert len(result.history) == 4 and result.history[0]["lr"] == 1e-2 and result.history[2]["lr"] == 5e-3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.step_losses and result.pairs_per_second > 0
    # The best epoch's weights are restored.
    restored = evaluate_retrieval(model, validate.image, validate.text)["rsum"]
    assert restored == pytest.approx(result.best_metrics["rsum"])


def test_resume_after_interruption_equals_uninterrupted_run(data, tmp_path):
    train, validate = data
    uninterrupted = make_model()
    expected = fit(uninterrupted, train, TrainConfig(**CONFIG), validate=validate)

    class InterruptAfter:
        """Raise KeyboardInterrupt after `steps` training steps, as a user's Ctrl-C would."""

        def __init__(self, model, steps):
            self.model, self.steps = model, steps

        def __call__(self, batch):
            self.steps -= 1
            if self.steps < 0:
                raise KeyboardInterrupt
            return type(self.model).training_losses(self.model, batch)

    interrupted = make_model()
    interrupted.training_losses = InterruptAfter(interrupted, steps=8 * 2 + 3)  # mid-way through epoch 3
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, train, TrainConfig(**CONFIG), validate=validate, checkpoint_dir=tmp_path)
    assert (tmp_path / "last.pt").exists()

    resumed = make_model(seed=123)  # a fresh process: other initial weights, restored from the checkpoint
    result = fit(resumed, train, TrainConfig(**CONFIG), validate=validate, checkpoint_dir=tmp_path)
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert result.best_epoch == expected.best_epoch
    assert result.best_metrics == expected.best_metrics
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_resume_refuses_a_checkpoint_of_other_settings(data, tmp_path):
    train, validate = data
    fit(make_model(), train, TrainConfig(**{**CONFIG, "max_epochs": 1}), checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"settings differ in \['lr'\]"):
        fit(make_model(), train, TrainConfig(**{**CONFIG, "lr": 1e-3}), checkpoint_dir=tmp_path)
    # More epochs with the same settings continue the run.
    result = fit(make_model(), train, TrainConfig(**{**CONFIG, "max_epochs": 2}), checkpoint_dir=tmp_path)
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_non_finite_loss_names_the_term_and_step(data):
    train, _ = data

    class Exploding(SymmetricCrossEntropy):
        def forward(self, image_features, text_features):
            losses = super().forward(image_features, text_features)
            losses["loss_t2i"] = losses["loss_t2i"] / 0.0
            losses["loss"] = losses["loss_i2t"] + losses["loss_t2i"]
            return losses

    model = DualEncoder(Tower(ProjectionHead(16, 8)), Tower(ProjectionHead(12, 8)), Exploding())
    with pytest.raises(NonFiniteLossError, match=r"loss_t2i.*epoch 1, step 1"):
        fit(model, train, TrainConfig(**CONFIG))


def test_random_captions_depend_only_on_seed_and_epoch():
    image, text = torch.randn(10, 3), torch.randn(50, 2)
    a, b = PairedFeatures(image, text, seed=3), PairedFeatures(image, text, seed=3)
    a.set_epoch(5), b.set_epoch(2), b.set_epoch(5)
    assert torch.equal(a._caption_of_image, b._caption_of_image)
    a.set_epoch(6)
    assert not torch.equal(a._caption_of_image, b._caption_of_image)
    assert all(int(c) // 5 == i for i, c in enumerate(a._caption_of_image))
    assert len(PairedFeatures(image, text, caption_choice="all")) == 50
    with pytest.raises(ValueError, match="need 50 captions"):
        PairedFeatures(image, text[:40])


def test_result_file_round_trip(tmp_path, data):
    train, validate = data
    model = make_model()
    result = fit(model, train, TrainConfig(**{**CONFIG, "max_epochs": 1}), validate=validate)
    metrics, per_query = evaluate_retrieval_per_query(model, CaptionInputs(validate.image, validate.text))
    path = write_result(tmp_path, "timofeev2022", "smoke_seed0", parameters={"lr": 1e-4, "milestones": (1, 4)},
                        dataset="synthetic", split="test", metrics=metrics, training=result.record(),
                        per_query=per_query, history=result.history, device="cpu")
    record = json.loads(path.read_text())
    assert record["paper_id"] == "timofeev2022" and record["metrics"] == pytest.approx(metrics)
    assert record["parameters"]["milestones"] == [1, 4]
    assert record["training"]["stopped_by"] == "budget" and record["training"]["epochs_run"] == 1
    assert len(record["per_query"]["caption_ranks"]["t2i"]) == 200
    assert record["environment"]["packages"]["torch"] == torch.__version__.split("+")[0]
    assert load_results(tmp_path) == [record]
    # the per-query lists sit on one line each: a result file stays a short, diffable text
    per_query_lines = [line for line in path.read_text().splitlines() if line.startswith(' "per_query"')]
    assert len(per_query_lines) == 1 and per_query_lines[0].endswith("]}}")


def test_training_stops_on_a_plateau_and_says_so(data):
    train, validate = data
    scores = iter([10.0, 12.0, 11.0, 12.0, 11.5, 30.0])  # best at epoch 2, then 3 epochs without improvement

    result = fit(make_model(), train, TrainConfig(**{**CONFIG, "max_epochs": 6, "patience": 3}),
                 validate=lambda model: {"rsum": next(scores)})
    assert result.epochs_run == 5 and result.best_epoch == 2 and result.stopped_by == "plateau"
    assert result.record() == {"epochs_budget": 6, "epochs_run": 5, "best_epoch": 2, "stopped_by": "plateau",
                               "wall_time_s": result.wall_time_s, "pairs_per_second": result.pairs_per_second}


def test_a_run_still_improving_at_its_last_epoch_is_budget_limited(data):
    train, validate = data
    result = fit(make_model(), train, TrainConfig(**{**CONFIG, "max_epochs": 3, "patience": 2}),
                 validate=lambda model, s=iter([1.0, 2.0, 3.0]): {"rsum": next(s)})
    assert result.stopped_by == "budget" and result.best_epoch == 3 and result.epochs_run == 3


def test_min_delta_and_min_mode(data):
    train, _ = data
    losses = iter([5.0, 4.95, 4.9, 3.0])  # improvements of 0.05 do not count with min_delta 0.1
    config = TrainConfig(**{**CONFIG, "max_epochs": 4, "patience": 2, "min_delta": 0.1, "select_by": "loss",
                            "select_mode": "min"})
    result = fit(make_model(), train, config, validate=lambda model: {"loss": next(losses)})
    assert result.best_epoch == 1 and result.stopped_by == "plateau" and result.epochs_run == 3


@pytest.mark.parametrize("bad", [{"max_epochs": 0}, {"max_epochs": -3}, {"max_epochs": 2.5}, {"max_epochs": True},
                                 {"patience": 0}, {"lr": -1.0}, {"lr": float("nan")}, {"min_delta": -0.1},
                                 {"select_mode": "maximum"}, {"optimizer": "adamm"}, {"batch_size": 0}])
def test_config_rejects_bad_values_before_training(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**{**CONFIG, **bad})


def test_nan_gradient_with_a_finite_loss_stops_at_its_step(data):
    train, _ = data

    class NanGradient(SymmetricCrossEntropy):
        def forward(self, image_features, text_features):
            losses = super().forward(image_features, text_features)
            # sqrt at 0 has an infinite derivative: the loss stays finite, the gradient does not
            losses["loss"] = losses["loss"] + torch.sqrt((image_features[0] - image_features[0]).sum().abs())
            return losses

    model = DualEncoder(Tower(ProjectionHead(16, 8)), Tower(ProjectionHead(12, 8)), NanGradient())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteGradientError, match=r"image_tower.*epoch 1, step 1"):
        fit(model, train, TrainConfig(**CONFIG))
    for name, value in model.state_dict().items():  # no optimiser step was taken with the bad gradient
        assert torch.equal(value, before[name]), name


def test_resume_refuses_other_data_or_another_loss(data, tmp_path):
    train, validate = data
    fit(make_model(), train, TrainConfig(**{**CONFIG, "max_epochs": 1}), checkpoint_dir=tmp_path)
    image, text = synthetic_pairs(168, seed=1)
    other = PairedFeatures(image[:128], text[:640], caption_choice="random", seed=0)
    with pytest.raises(CheckpointError, match="training data differ"):
        fit(make_model(), other, TrainConfig(**CONFIG), checkpoint_dir=tmp_path)

    class Hotter(SymmetricCrossEntropy):
        temperature = None

        def __init__(self):
            super().__init__()
            self.temperature = 0.5

    model = DualEncoder(Tower(ProjectionHead(16, 8)), Tower(ProjectionHead(12, 8)), Hotter())
    with pytest.raises(CheckpointError, match="model or its loss differs"):
        fit(model, train, TrainConfig(**CONFIG), checkpoint_dir=tmp_path)


def test_a_truncated_checkpoint_is_reported_with_its_path(data, tmp_path):
    train, _ = data
    fit(make_model(), train, TrainConfig(**{**CONFIG, "max_epochs": 1}), checkpoint_dir=tmp_path)
    path = tmp_path / "last.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=str(path)):
        fit(make_model(), train, TrainConfig(**CONFIG), checkpoint_dir=tmp_path)


def test_a_crafted_checkpoint_cannot_run_code(data, tmp_path):
    train, _ = data
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"epoch": 1, "payload": Payload()}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):
        fit(make_model(), train, TrainConfig(**CONFIG), checkpoint_dir=tmp_path)
    assert not marker.exists()


def test_fit_names_a_model_without_training_losses(data):
    train, _ = data
    with pytest.raises(TypeError, match="Linear has no training_losses"):
        fit(torch.nn.Linear(4, 4), train, TrainConfig(**CONFIG))
