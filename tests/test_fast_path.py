"""The fast path of fine-tuning on cached activations (issue #18) equals the plain one, and is off by default.

``TrainConfig.channels_last`` only changes the memory layout of the convolutions: in float32 the loss and the
gradients agree with the default layout within float32 rounding (oneDNN's NHWC kernels sum in another order, so
the bits may differ). ``TrainConfig.mixed_precision_cpu`` computes the forward pass in bfloat16 (8 bits of
mantissa): loss and gradients agree with float32 within bfloat16's tolerance, and not within float32's.
"""
import pytest
import torch

from xmr.data.paired import PairedFeatures
from xmr.encoders import DualEncoder, ImageBackbone, ProjectionHead, TextBackbone, Tower
from xmr.losses import InfoNCELoss
from xmr.train import TrainConfig, fit, training_autocast

BATCH = 8


@pytest.fixture(scope="module")
def image_top() -> DualEncoder:  # EfficientNet-Lite0's top stage on cached (B, 192, 7, 7) activations
    torch.manual_seed(0)
    return DualEncoder(Tower(ProjectionHead(1280, 32), ImageBackbone(trainable_top=1)),
                       Tower(ProjectionHead(384, 32)), InfoNCELoss())


@pytest.fixture(scope="module")
def text_top() -> DualEncoder:  # MiniLM's top layer on cached (B, L, 384) token states
    torch.manual_seed(0)
    return DualEncoder(Tower(ProjectionHead(1280, 32)), Tower(ProjectionHead(384, 32), TextBackbone(trainable_top=1)),
                       InfoNCELoss())


def is_nhwc(weight: torch.Tensor) -> bool:
    """Whether a (O, I, 1, 1) convolution weight has channels_last strides (a 1x1 weight is both contiguous and
    channels_last to ``is_contiguous``, but oneDNN follows its strides)."""
    return weight.stride(3) == weight.shape[1] > 1


def image_batch(generator: torch.Generator) -> dict:
    return {"image": torch.randn(BATCH, 192, 7, 7, generator=generator).half(),  # the cache stores float16
            "text": torch.randn(BATCH, 384, generator=generator)}


def text_batch(generator: torch.Generator) -> dict:
    mask = (torch.arange(12) < torch.randint(4, 13, (BATCH, 1), generator=generator)).long()
    return {"image": torch.randn(BATCH, 1280, generator=generator),
            "text": torch.randn(BATCH, 12, 384, generator=generator).half(), "text_mask": mask}


def loss_and_gradients(model: DualEncoder, batch: dict, config: TrainConfig) -> tuple[torch.Tensor, dict]:
    """One training step's loss and gradients, with ``config``'s autocast and layout (the model is left as found)."""
    model.zero_grad(set_to_none=True)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        with training_autocast(config, torch.device("cpu")):
            loss = model.training_losses(batch)["loss"]
        loss.backward()
    finally:
        model.to(memory_format=torch.contiguous_format)
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), gradients


def relative_errors(reference: dict, other: dict, floor: float = 0.0) -> dict:
    """Each gradient's relative error; ``floor`` (a fraction of the norm of all gradients) bounds the
    denominators, for gradients that are zero in exact arithmetic (a key bias: softmax ignores a shift)."""
    assert reference.keys() == other.keys() and reference
    total = torch.cat([value.flatten() for value in reference.values()]).norm()
    return {name: float((other[name] - value).norm() / value.norm().clamp_min(max(floor * total, 1e-12)))
            for name, value in reference.items()}


def test_fast_path_is_off_by_default():
    config = TrainConfig()
    assert not config.mixed_precision_cpu and not config.channels_last
    with training_autocast(config, torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    with training_autocast(TrainConfig(mixed_precision_cpu=True), torch.device("cpu")):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    with training_autocast(TrainConfig(mixed_precision_cpu=True, mixed_precision=False), torch.device("cuda")):
        assert not torch.is_autocast_enabled("cuda")  # on CUDA only mixed_precision counts, as before


def test_channels_last_float32_equals_the_default_layout(image_top, generator):
    batch = image_batch(generator)
    loss, gradients = loss_and_gradients(image_top, batch, TrainConfig())
    fast_loss, fast_gradients = loss_and_gradients(image_top, batch, TrainConfig(channels_last=True))
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-6)
    assert max(relative_errors(gradients, fast_gradients).values()) < 1e-4  # float32 rounding, another sum order


@pytest.mark.parametrize("tower", ["image_top", "text_top"])
def test_cpu_bfloat16_autocast_within_bfloat16_tolerance(tower, request, generator):
    model = request.getfixturevalue(tower)
    batch = image_batch(generator) if tower == "image_top" else text_batch(generator)
    loss, gradients = loss_and_gradients(model, batch, TrainConfig())
    fast = TrainConfig(mixed_precision_cpu=True, channels_last=tower == "image_top")
    fast_loss, fast_gradients = loss_and_gradients(model, batch, fast)
    errors = relative_errors(gradients, fast_gradients, floor=1e-2)
    torch.testing.assert_close(fast_loss, loss, rtol=2e-2, atol=2e-2)
    assert max(errors.values()) < 0.1, errors  # bfloat16: eps 2^-8 per rounding, through a few layers
    assert loss != fast_loss or max(errors.values()) > 1e-6, "the autocast step ran in float32"


def test_fit_with_the_fast_path_trains_like_the_plain_one(image_top):
    generator = torch.Generator().manual_seed(3)
    data = PairedFeatures(torch.randn(32, 192, 7, 7, generator=generator).half(),
                          torch.randn(160, 384, generator=generator))
    state = {name: value.clone() for name, value in image_top.state_dict().items()}
    losses = {}
    for name, options in {"plain": {}, "fast": {"channels_last": True, "mixed_precision_cpu": True}}.items():
        image_top.load_state_dict(state)
        config = TrainConfig(max_epochs=2, batch_size=BATCH, lr=1e-4, device="cpu", progress=False, **options)
        losses[name] = fit(image_top, data, config).step_losses
        assert is_nhwc(image_top.image_tower.upper.upper[1].weight) == bool(options)
        image_top.to(memory_format=torch.contiguous_format)
    image_top.load_state_dict(state)
    torch.testing.assert_close(torch.tensor(losses["fast"]), torch.tensor(losses["plain"]), rtol=2e-2, atol=2e-2)


def test_trimming_a_batch_padding_is_exact(text_top, generator, monkeypatch):
    """``Tower.forward`` runs MiniLM's top on the batch's longest caption, not the split's: same embedding and
    gradients as on the padded batch (the padding is masked in attention and pooling)."""
    tower = text_top.text_tower
    batch = text_batch(generator)
    inputs = torch.cat([batch["text"], torch.randn(BATCH, 5, 384, generator=generator).half()], dim=1)
    mask = torch.cat([batch["text_mask"], torch.zeros(BATCH, 5, dtype=torch.long)], dim=1)
    lengths = []
    finish = tower.upper.forward_upper
    monkeypatch.setattr(tower.upper, "forward_upper", lambda hidden, m: lengths.append(m.shape[1]) or finish(hidden, m))

    def embedding_and_gradients(run):
        tower.zero_grad(set_to_none=True)
        embedding = run()
        embedding.square().sum().backward()
        return embedding.detach(), {name: p.grad.clone() for name, p in tower.named_parameters() if p.grad is not None}

    padded, padded_gradients = embedding_and_gradients(lambda: tower.projection(tower._finish(inputs, mask)["pooled"]))
    trimmed, trimmed_gradients = embedding_and_gradients(lambda: tower(inputs, mask))
    assert lengths == [17, int(batch["text_mask"].sum(1).max())]
    torch.testing.assert_close(trimmed, padded, rtol=1e-5, atol=1e-6)
    assert max(relative_errors(padded_gradients, trimmed_gradients, floor=1e-3).values()) < 1e-4
