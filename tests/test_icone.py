"""IConE (icone2024): the shared instance classifier, the objective against plain-loop references, the stage switch."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from xmr.data import CaptionInputs
from xmr.losses import InfoNCELoss
from xmr.methods.icone import (
    PAPER_ID,
    IConELoss,
    IConESettings,
    InstanceLoss,
    ScratchTextEncoder,
    Stage,
    build_icone_model,
    enter_stage,
    literal_eq6_image_to_text,
    paper_stages,
    run_baseline,
    run_schedule,
)
from xmr.outcome import record
from xmr.train import TrainConfig

DTYPES = (torch.float32, torch.float64)


# --- plain-loop references -----------------------------------------------------------------------------------

def reference_cross_entropy(logits, label):
    """-log softmax(logits)[label] for one row, as a loop over classes."""
    total = sum(math.exp(float(value)) for value in logits)
    return -math.log(math.exp(float(logits[label])) / total)


def reference_instance_loss(image_features, text_features, labels, weight):
    """Eqs. (1)-(5) with explicit loops: W_share^T f for each sample, then the mean of -log P(c) per modality."""
    batch, classes = len(labels), weight.shape[0]
    terms = []
    for features in (image_features, text_features):
        losses = []
        for i in range(batch):
            logits = [sum(float(weight[c, k]) * float(features[i, k]) for k in range(weight.shape[1]))
                      for c in range(classes)]
            losses.append(reference_cross_entropy(logits, int(labels[i])))
        terms.append(sum(losses) / batch)
    return terms[0] + terms[1], terms[0], terms[1]


def reference_contrastive(image_features, text_features, tau, literal_eq6=False):
    """Eqs. (6)-(8): cosine similarities, both directions summed; literal_eq6 drops / tau from Eq. 6's denominator."""
    image = [row / math.sqrt(sum(float(x) ** 2 for x in row)) for row in image_features]
    text = [row / math.sqrt(sum(float(x) ** 2 for x in row)) for row in text_features]
    batch = len(image)
    sims = [[sum(float(a) * float(b) for a, b in zip(image[i], text[j])) for j in range(batch)] for i in range(batch)]
    v2t = t2v = 0.0
    for i in range(batch):
        below = sum(math.exp(sims[i][j] if literal_eq6 else sims[i][j] / tau) for j in range(batch))
        v2t -= math.log(math.exp(sims[i][i] / tau) / below)
        t2v -= math.log(math.exp(sims[i][i] / tau) / sum(math.exp(sims[j][i] / tau) for j in range(batch)))
    return v2t / batch + t2v / batch


def _features(generator, dtype, batch=5, dim=4, classes=7):
    image = torch.randn(batch, dim, generator=generator, dtype=dtype, requires_grad=True)
    text = torch.randn(batch, dim, generator=generator, dtype=dtype, requires_grad=True)
    labels = torch.randint(classes, (batch,), generator=generator)
    return image, text, labels


def _instance_loss(classes, dim, dtype, generator):
    loss = InstanceLoss(classes, dim).to(dtype)
    with torch.no_grad():
        loss.classifier.weight.copy_(torch.randn(classes, dim, generator=generator, dtype=dtype))
    return loss


# --- the shared classifier ------------------------------------------------------------------------------------

def test_one_classifier_is_shared_by_both_modalities():
    loss = InstanceLoss(num_classes=11, dim=6)
    parameters = list(loss.parameters())
    assert len(parameters) == 1 and parameters[0] is loss.classifier.weight
    assert parameters[0].shape == (11, 6) and loss.classifier.bias is None  # Eq. (1) has no bias


def test_both_modalities_send_gradient_to_the_same_weights(generator):
    loss = InstanceLoss(num_classes=7, dim=4)
    image, text, labels = _features(generator, torch.float32)
    grads = {}
    for name, term in (("image", "image"), ("text", "text")):
        loss.zero_grad()
        loss(image, text, labels)[term].backward()
        grads[name] = loss.classifier.weight.grad.clone()
    assert grads["image"].abs().sum() > 0 and grads["text"].abs().sum() > 0
    assert not torch.allclose(grads["image"], grads["text"])
    loss.zero_grad()
    loss(image, text, labels)["loss"].backward()  # Eq. (5): both modalities' gradients add up in W_share
    torch.testing.assert_close(loss.classifier.weight.grad, grads["image"] + grads["text"])


def test_swapping_the_modalities_swaps_the_terms(generator):
    loss = InstanceLoss(num_classes=7, dim=4)
    image, text, labels = _features(generator, torch.float32)
    forward, swapped = loss(image, text, labels), loss(text, image, labels)
    torch.testing.assert_close(forward["image"], swapped["text"])
    torch.testing.assert_close(forward["text"], swapped["image"])


# --- the losses against the references ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_instance_loss_matches_the_reference_forward_and_gradient(dtype, generator):
    loss = _instance_loss(7, 4, dtype, generator)
    image, text, labels = _features(generator, dtype)
    out = loss(image, text, labels)
    total, image_term, text_term = reference_instance_loss(image.detach(), text.detach(), labels,
                                                           loss.classifier.weight.detach())
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    for key, expected in (("loss", total), ("image", image_term), ("text", text_term)):
        torch.testing.assert_close(out[key], torch.tensor(expected, dtype=dtype), **tolerance)
    # Gradient: dL_v/df_v,i = (softmax(W f_v,i) - onehot(c_i)) W / B, checked against the autograd one.
    out["loss"].backward()
    weight = loss.classifier.weight.detach()
    expected_grad = (torch.softmax(image.detach() @ weight.T, dim=1) - F.one_hot(labels, 7).to(dtype)) @ weight / 5
    torch.testing.assert_close(image.grad, expected_grad, **tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("literal_eq6", [False, True])
def test_objective_matches_the_reference(dtype, literal_eq6, generator):
    instance = _instance_loss(7, 4, dtype, generator)
    objective = IConELoss(instance, temperature=0.05, instance_weight=0.7, contrastive_weight=1.3,
                          literal_eq6=literal_eq6)
    image, text, labels = _features(generator, dtype)
    out = objective(image, text, labels)
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    expected_instance = reference_instance_loss(image.detach(), text.detach(), labels,
                                                instance.classifier.weight.detach())[0]
    expected_contrastive = reference_contrastive(image.detach(), text.detach(), 0.05, literal_eq6)
    torch.testing.assert_close(out["instance"], torch.tensor(expected_instance, dtype=dtype), **tolerance)
    torch.testing.assert_close(out["contrastive"], torch.tensor(expected_contrastive, dtype=dtype), **tolerance)
    torch.testing.assert_close(out["loss"], torch.tensor(0.7 * expected_instance + 1.3 * expected_contrastive,
                                                         dtype=dtype), **tolerance)
    out["loss"].backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


def test_contrastive_term_is_the_sum_of_xmr_infonce_directions(generator):
    """Eq. (8) adds the directions: twice xmr.losses.InfoNCELoss's averaged loss, on normalised features."""
    image, text, labels = _features(generator, torch.float64)
    out = IConELoss(InstanceLoss(7, 4).double(), temperature=0.05)(image, text, labels)
    reference = InfoNCELoss(temperature=0.05)(F.normalize(image, dim=-1), F.normalize(text, dim=-1))["loss"]
    torch.testing.assert_close(out["contrastive"], 2 * reference)


def test_literal_eq6_differs_and_is_not_a_probability():
    """Two orthogonal unit pairs: the standard term is a proper -log p (>= 0), the printed one goes negative."""
    image = torch.eye(2, dtype=torch.float64)
    literal = literal_eq6_image_to_text(image, image, 0.05)
    # log(e^1 + e^0) - 1 / 0.05
    torch.testing.assert_close(literal, torch.tensor(math.log(math.e + 1) - 20, dtype=torch.float64))
    standard = InfoNCELoss(temperature=0.05)(image, image)["loss_i2t"]
    torch.testing.assert_close(standard, torch.tensor(math.log(1 + math.exp(-20)), dtype=torch.float64))


def test_zero_weight_term_is_reported_but_sends_no_gradient(generator):
    instance = InstanceLoss(7, 4)
    image, text, labels = _features(generator, torch.float32)
    out = IConELoss(instance, instance_weight=0.0, contrastive_weight=1.0)(image, text, labels)
    assert not out["instance"].requires_grad and out["instance"] > 0
    torch.testing.assert_close(out["loss"], out["contrastive"])
    out["loss"].backward()
    assert instance.classifier.weight.grad is None  # Stage I "InfoNCE only": W_share never moves
    only_instance = IConELoss(instance, instance_weight=1.0, contrastive_weight=0.0)(image, text, labels)
    assert not only_instance["contrastive"].requires_grad
    torch.testing.assert_close(only_instance["loss"], only_instance["instance"])


def test_edge_cases(generator):
    instance = InstanceLoss(3, 2)
    with pytest.raises(ValueError):
        instance(torch.randn(2, 2), torch.randn(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        IConELoss(instance, instance_weight=0, contrastive_weight=0)
    # A batch of one: InfoNCE has no negative (0), the instance loss still classifies.
    image, text = torch.randn(1, 2, generator=generator), torch.randn(1, 2, generator=generator)
    out = IConELoss(instance)(image, text, torch.tensor([1]))
    torch.testing.assert_close(out["contrastive"], torch.tensor(0.0))
    assert out["instance"] > 0
    # Identical embeddings everywhere: every class and every pair is equally likely.
    same = torch.ones(4, 2)
    out = IConELoss(InstanceLoss(3, 2))(same, same, torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(out["contrastive"], torch.tensor(2 * math.log(4)))


def test_dropout_applies_before_the_shared_layer_in_training_only(generator):
    loss = InstanceLoss(5, 8, dropout=0.5)
    image, text, labels = _features(generator, torch.float32, dim=8, classes=5)
    loss.eval()
    assert torch.equal(loss(image, text, labels)["loss"], loss(image, text, labels)["loss"])
    loss.train()
    torch.manual_seed(0)
    first = loss(image, text, labels)["loss"]
    torch.manual_seed(1)
    assert not torch.equal(first, loss(image, text, labels)["loss"])


# --- the model and the stage switch ---------------------------------------------------------------------------

def _trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_model_passes_unnormalised_features_and_instance_ids():
    torch.manual_seed(0)
    model = build_icone_model(IConESettings(embed_dim=8), num_classes=6, stage=Stage("I", 1, 1e-4, 1.0, 0.0))
    batch = {"image": torch.randn(4, 1280), "text": torch.randn(4, 384), "image_index": torch.tensor([0, 5, 2, 3])}
    out = model.training_losses(batch)
    assert set(out) == {"loss", "instance", "contrastive"}
    image_features, text_features = model.image_tower(batch["image"]), model.text_tower(batch["text"])
    expected = model.loss.instance_loss(image_features, text_features, batch["image_index"])["loss"]
    torch.testing.assert_close(out["instance"], expected)
    torch.testing.assert_close(model.encode_image(batch["image"]), F.normalize(image_features, dim=-1))


def test_stage_one_trains_only_heads_and_shared_classifier():
    model = build_icone_model(IConESettings(embed_dim=8), num_classes=6, stage=paper_stages(1, 1, 1, 1)[0])
    assert model.tops == (0, 0) and model.image_tower.upper is None and model.text_tower.upper is None
    assert _trainable(model) == {"image_tower.projection.net.1.weight", "image_tower.projection.net.1.bias",
                                 "text_tower.projection.net.1.weight", "text_tower.projection.net.1.bias",
                                 "loss.instance_loss.classifier.weight"}


def test_stage_switch_unfreezes_the_tops_and_carries_the_heads_over():
    settings = IConESettings(embed_dim=8, temperature=0.05)
    stage_one, stage_two = paper_stages(1, 1, image_top=1, text_top=1)
    torch.manual_seed(0)
    first = build_icone_model(settings, num_classes=6, stage=stage_one)
    with torch.no_grad():  # pretend Stage I trained them
        for parameter in first.parameters():
            parameter.add_(0.1)
    before = {name: value.clone() for name, value in first.state_dict().items()}
    second = enter_stage(first, stage_two, settings)
    assert second.tops == (1, 1)
    trainable = _trainable(second)
    assert any(name.startswith("image_tower.upper.upper.") for name in trainable)
    assert any(".encoder.layer.5." in name for name in trainable)
    assert not any(".encoder.layer.4." in name or "image_tower.upper.lower." in name or "embeddings" in name
                   for name in trainable)
    assert "loss.instance_loss.classifier.weight" in trainable
    for name, value in first.state_dict().items():  # carried over, and the source is left alone
        torch.testing.assert_close(second.state_dict()[name], value, rtol=0, atol=0)
        torch.testing.assert_close(before[name], value, rtol=0, atol=0)
    assert second.state_dict()["loss.instance_loss.classifier.weight"].data_ptr() != \
        first.state_dict()["loss.instance_loss.classifier.weight"].data_ptr()
    assert (second.loss.instance_weight, second.loss.contrastive_weight) == (1.0, 1.0)
    assert (first.loss.instance_weight, first.loss.contrastive_weight) == (1.0, 0.0)


def test_stage_switch_refuses_to_drop_trained_tops():
    settings = IConESettings(embed_dim=8)
    tuned = build_icone_model(settings, 6, Stage("II", 1, 1e-5, 1.0, 1.0, image_top=1, text_top=1))
    with pytest.raises(ValueError, match="image encoder"):
        enter_stage(tuned, Stage("back", 1, 1e-5, 1.0, 1.0, image_top=0, text_top=1), settings)
    same = enter_stage(tuned, Stage("again", 1, 1e-5, 0.0, 1.0, image_top=1, text_top=1), settings)
    assert same.tops == (1, 1) and same.loss.instance_weight == 0.0


def test_stage_switch_takes_the_new_temperature():
    settings = IConESettings(embed_dim=8, temperature=0.05)
    model = build_icone_model(settings, 6, Stage("I", 1, 1e-4, 1.0, 0.0))
    switched = enter_stage(model, Stage("II", 1, 1e-5, 1.0, 1.0), IConESettings(embed_dim=8, temperature=0.2))
    assert model.loss.temperature == 0.05 and switched.loss.temperature == 0.2


@pytest.mark.parametrize("kind", ScratchTextEncoder.KINDS)
def test_scratch_text_encoder_trains_in_both_stages_and_carries_over(kind):
    settings = IConESettings(embed_dim=8, text_encoder="scratch", scratch_kind=kind, scratch_vocab_size=50,
                             scratch_word_dim=6, scratch_hidden_dim=5)
    stage_one, stage_two = paper_stages(1, 1, image_top=1, text_top=1)
    torch.manual_seed(0)
    first = build_icone_model(settings, 6, stage_one)
    assert isinstance(first.text_tower.upper, ScratchTextEncoder) and first.text_tower.upper.kind == kind
    assert "text_tower.upper.embedding.weight" in _trainable(first)
    assert (kind == "gru") == ("text_tower.upper.gru.weight_ih_l0" in _trainable(first))
    ids = torch.tensor([[3, 7, 9, 0], [4, 0, 0, 0]])
    mask = (ids > 0).long()
    second = enter_stage(first, stage_two, settings)
    torch.testing.assert_close(second.encode_text(ids.float(), mask), first.encode_text(ids.float(), mask))
    # Padding does not change a caption's embedding.
    torch.testing.assert_close(first.encode_text(ids[:, :3].float(), mask[:, :3]), first.encode_text(ids.float(), mask))


# --- the schedule as an Outcome -------------------------------------------------------------------------------

def test_continued_schedule_is_one_outcome_whose_result_file_holds_every_stage(tmp_path, generator):
    def split(num_images):  # frozen encoders: pooled features
        return CaptionInputs(torch.randn(num_images, 1280, generator=generator),
                             torch.randn(5 * num_images, 384, generator=generator))

    data = {"train": split(12), "dev": split(4), "test": split(4)}
    settings, config = IConESettings(embed_dim=8), TrainConfig(batch_size=4, progress=False, device="cpu")
    first = run_schedule(settings, [Stage("I", 1, 1e-3, 1.0, 0.0)], config, lambda tops: data)
    both = run_schedule(settings, [Stage("II", 2, 1e-3, 1.0, 1.0)], config, lambda tops: data, start=first)
    assert both.training_time_s == pytest.approx(first.training_time_s + sum(
        row["train_time_s"] for row in both.training.history))
    written = json.loads(record(tmp_path, PAPER_ID, "test_schedule", both).read_text())
    assert list(written["training"]["stages"]) == ["1_I", "2_II"] and written["training"]["epochs_run"] == 3
    assert [stage["name"] for stage in written["parameters"]["stages"]] == ["I", "II"]
    assert written["metrics"]["val_rsum"] == pytest.approx(both.training.best_metrics["rsum"])
    assert written["trainable_parameters"] == both.trainable_parameters == (1280 + 1) * 8 + (384 + 1) * 8 + 12 * 8
    assert [row["stage"] for row in written["history"]] == ["1_I", "2_II", "2_II"]


def test_baseline_trains_like_a_stage_and_records_its_loss(tmp_path, generator):
    def split(num_images):
        return CaptionInputs(torch.randn(num_images, 1280, generator=generator),
                             torch.randn(5 * num_images, 384, generator=generator))

    data = {"train": split(12), "dev": split(4), "test": split(4)}
    config = TrainConfig(batch_size=4, progress=False, device="cpu", patience=None)
    stage = Stage("VSE++", 2, 1e-3, 0.0, 0.0, captions="all")
    outcome = run_baseline("max_triplet", {"margin": 0.2}, IConESettings(embed_dim=8), stage, config, lambda tops: data)
    assert outcome.training.epochs_run == 2 and len(outcome.training.step_losses) == 2 * 60 // 4  # all captions
    assert outcome.model.loss.max_violation and outcome.model.loss.margin == 0.2
    written = json.loads(record(tmp_path, PAPER_ID, "test_baseline", outcome).read_text())
    assert written["parameters"]["loss"] == "max_triplet" and written["parameters"]["stages"][0]["name"] == "VSE++"
    assert written["trainable_parameters"] == (1280 + 1) * 8 + (384 + 1) * 8


# --- on real cached inputs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    from xmr.features import ExtractionSettings, FeatureCache

    return ExtractionSettings(batch_size=16, progress=False, cache=FeatureCache(tmp_path_factory.mktemp("cache")))


def test_switched_model_on_top_inputs_embeds_like_stage_one_on_pooled_features(data_root, extraction):
    """Frozen encoders give the cached pooled features, so Stage I on them and the switched top-1 model agree."""
    from xmr.features import load_caption_inputs
    from xmr.train import encode

    pooled = load_caption_inputs("test", num_images=3, root=data_root, settings=extraction)
    tops = load_caption_inputs("test", 1, 1, num_images=3, root=data_root, settings=extraction)
    settings = IConESettings(embed_dim=8)
    stage_one, stage_two = paper_stages(1, 1, image_top=1, text_top=1)
    first = build_icone_model(settings, 6, stage_one).eval()
    second = enter_stage(first, stage_two, settings).eval()
    torch.testing.assert_close(encode(second.encode_image, tops.image), encode(first.encode_image, pooled.image),
                               atol=2e-3, rtol=0)  # the cache stores the lower activations in float16
    torch.testing.assert_close(encode(second.encode_text, tops.text, tops.text_mask),
                               encode(first.encode_text, pooled.text), atol=2e-3, rtol=0)


def test_two_stage_schedule_runs_and_only_stage_two_moves_the_tops(data_root, extraction):
    from xmr.features import load_caption_inputs

    cache = {}

    def inputs(tops):
        if tops not in cache:
            cache[tops] = {split: load_caption_inputs(split, *tops, num_images=n, root=data_root, settings=extraction)
                           for split, n in (("train", 16), ("dev", 6), ("test", 6))}
        return cache[tops]

    settings = IConESettings(embed_dim=8)
    config = TrainConfig(batch_size=8, progress=False, device="cpu")
    stage_one, stage_two = paper_stages(2, 1, image_top=1, text_top=1)
    stage_one = dataclasses.replace(stage_one, captions="all")  # 80 pairs an epoch: 10 steps of 8
    first = run_schedule(settings, [stage_one], config, inputs)
    assert list(first.stages) == ["1_I"] and len(first.training.step_losses) == 2 * 10
    assert first.model.num_classes == 16 and first.trainable_parameters == (1280 + 1) * 8 + (384 + 1) * 8 + 16 * 8
    full = run_schedule(settings, [stage_two], config, inputs, start=first)
    assert full.schedule == [stage_one, stage_two] and list(full.stages) == ["1_I", "2_II"]
    assert full.stages["1_I"] is first.training and first.schedule == [stage_one]  # start is not changed
    assert [stage["name"] for stage in full.parameters["stages"]] == ["I", "II"] and full.parameters["embed_dim"] == 8
    assert [row["epoch"] for row in full.history] == [1, 2, 3] and full.history[-1]["stage"] == "2_II"
    assert {"train_instance", "train_contrastive"} <= set(full.history[-1])
    pretrained = enter_stage(first.model, stage_two, settings)
    moved = [name for name, value in full.model.state_dict().items()
             if ".upper." in name and not torch.equal(value, pretrained.state_dict()[name])]
    assert moved and all(name.startswith(("image_tower.upper.upper.", "text_tower.upper.model.encoder.layer.5."))
                         for name in moved)
    assert set(full.test_metrics) >= {"rsum", "i2t_r1", "t2i_meanr"}
    # Deterministic: the same seed gives the same Stage I model.
    again = run_schedule(settings, [stage_one], config, inputs)
    assert again.test_metrics == first.test_metrics
