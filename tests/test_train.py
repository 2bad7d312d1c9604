"""The training loop: it learns, resumes exactly, stops on non-finite losses, and writes result files."""
import json

import pytest
import torch
import torch.nn.functional as F

from xmr.data.paired import PairedFeatures
from xmr.encoders import DualEncoder, ProjectionHead, Tower
from xmr.results import load_results, write_result
from xmr.train import NonFiniteLossError, RetrievalValidator, TrainConfig, evaluate_retrieval, fit


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


CONFIG = dict(epochs=4, batch_size=16, lr=1e-2, lr_milestones=(2,), progress=False, device="cpu")


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
    assert evaluate_retrieval(model, validate.image, validate.text)["rsum"] == pytest.approx(result.best_metrics["rsum"])


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
    fit(make_model(), train, TrainConfig(**{**CONFIG, "epochs": 1}), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="other settings"):
        fit(make_model(), train, TrainConfig(**{**CONFIG, "lr": 1e-3}), checkpoint_dir=tmp_path)
    # More epochs with the same settings continue the run.
    result = fit(make_model(), train, TrainConfig(**{**CONFIG, "epochs": 2}), checkpoint_dir=tmp_path)
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
    path = write_result(tmp_path, "timofeev2022", "smoke_seed0", parameters={"lr": 1e-4, "milestones": (1, 4)},
                        dataset="synthetic", split="test", metrics={"rsum": torch.tensor(12.5)},
                        history=[{"epoch": 1}], wall_time_s=1.5, device="cpu")
    record = json.loads(path.read_text())
    assert record["paper_id"] == "timofeev2022" and record["metrics"] == {"rsum": 12.5}
    assert record["parameters"]["milestones"] == [1, 4]
    assert record["environment"]["packages"]["torch"] == torch.__version__.split("+")[0]
    assert load_results(tmp_path) == [record]
    with pytest.raises(ValueError, match="unknown paper id"):
        write_result(tmp_path, "nobody2099", "x", parameters={}, dataset="d", split="s", metrics={})
    with pytest.raises(ValueError, match="run_name"):
        write_result(tmp_path, "drcl2024", "a/b", parameters={}, dataset="d", split="s", metrics={})


def test_load_claims_reads_every_notebooks_wording(tmp_path):
    from xmr.results import load_claims

    common = dict(parameters={}, dataset="flickr8k", split="test")
    write_result(tmp_path, "timofeev2022", "cpu_summary", **common, metrics={"claims": [
        {"claim": "A > B", "report": "+3.8", "ours (mean, per seed)": "+1.8 [1.8]", "held": True}]})
    write_result(tmp_path, "drcl2024", "cpu_summary", **common, metrics={}, extra={"claims": [
        {"claim": "C > D", "paper": "+0.02", "ours: mean [per seed]": "-0.001", "verdict": "within noise"}]})
    write_result(tmp_path, "shi2024", "cpu_summary", **common, metrics={"claims": [
        {"claim": "fewer parameters", "ours": "16 vs 213", "held": False}]})
    write_result(tmp_path, "shi2024", "smoke_summary", **common, metrics={"claims": [
        {"claim": "not read", "ours": "-", "held": True}]})
    assert load_claims(tmp_path) == [
        {"paper_id": "drcl2024", "claim": "C > D", "paper": "+0.02", "ours": "-0.001", "verdict": "within noise"},
        {"paper_id": "shi2024", "claim": "fewer parameters", "paper": "", "ours": "16 vs 213", "verdict": "not held"},
        {"paper_id": "timofeev2022", "claim": "A > B", "paper": "+3.8", "ours": "+1.8 [1.8]", "verdict": "held"}]
    assert [row["claim"] for row in load_claims(tmp_path, "smoke_summary")] == ["not read"]


def test_mean_and_spread_formats_seeds():
    import pandas as pd

    from xmr.results import mean_and_spread

    frame = pd.DataFrame({"loss": ["a", "a", "b"], "r1": [10.0, 12.0, 7.0]})
    table = mean_and_spread(frame, "loss", ["r1"])
    assert table.loc["a", "r1"] == "11.0 ± 1.4" and table.loc["b", "r1"] == "7.0"
