"""IConE: instance loss plus InfoNCE, trained in two stages (icone2024).

Zeng et al., "Image-Text Cross-Modal Retrieval with Instance Contrastive Embedding", Electronics 13(2):300, 2024.
No public code exists; ``../shared/papers/METHOD_NOTES.md`` records the reading followed here. Equation
numbers are the paper's.

- **Instance loss** (Eqs. 1-5, :class:`InstanceLoss`). Every training image with its captions is one class
  ("image/text group", z = number of training images). ONE linear classifier ``W_share`` (no bias, Eq. 1) is
  shared by both modalities: ``L_ins = CE(W_share^T f_v, c) + CE(W_share^T f_t, c)``, each a batch mean.
  Dual-Path (Zheng et al. 2020), which the loss comes from, puts dropout before the shared layer (``dropout``).
- **Contrastive loss** (Eqs. 6-8): symmetric InfoNCE on cosine similarities with ``tau = 0.05``, reusing
  :class:`xmr.losses.InfoNCELoss`; Eq. (8) *adds* the two directions, so ``L_v-t = loss_i2t + loss_t2i``
  (twice :class:`~xmr.losses.InfoNCELoss`'s averaged ``"loss"``). Eq. (6) as printed has no ``/ tau`` in its
  denominator, a typo (Eq. 7 has it); ``literal_eq6=True`` runs the printed image-to-text direction.
- **Objective** (Eq. 9, :class:`IConELoss`): ``L = lambda1 L_ins + lambda2 L_v-t``. The instance loss acts on
  the joint-space features ``f`` before L2 normalisation (Eq. 1 applies ``W_share`` to the features; the cosine
  of Eq. 6 normalises them), InfoNCE on the normalised ones.
- **Two stages** (Sec. 3.4, :class:`Stage`, :func:`run_schedule`): Stage I freezes the encoders and trains the
  projection heads and ``W_share`` with the instance loss only (lambda = (1, 0), Adam 1e-4, 25 epochs);
  Stage II trains end to end with both losses (lambda = (1, 1), Adam 1e-5, 15 epochs). Each stage keeps its
  epoch with the best validation Rsum (Sec. 4.3).

The encoders are the project's (:mod:`xmr.encoders`). Frozen encoders give exactly their cached pooled features,
so Stage I trains on those (fast); a stage that fine-tunes the top ``k`` stages/layers of an encoder reads the
cached activations below them (:func:`xmr.features.load_caption_inputs` with ``image_top=k, text_top=k``).
:func:`enter_stage` is the switch: it builds the next stage's model (towers with the stage's trainable tops) and
carries every trained parameter of the previous one over (projection heads, ``W_share``, tops trained before);
the tops it adds start from the pretrained weights, which is what the frozen encoder of the previous stage
computed.

Also here: a text encoder trained from scratch (:class:`ScratchTextEncoder`, a GRU over word pieces, the paper's
Table 4 "GRU" rows). The paper's Figs. 4-5 are :func:`xmr.plots.plot_joint_space_tsne` and
:func:`xmr.metrics.joint_space_silhouette`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import CaptionInputs, PairedFeatures
from ..encoders import DualEncoder, ProjectionHead, Tower, count_trainable_parameters, masked_mean
from ..experiment import DualEncoderSettings, build_dual_encoder
from ..losses import InfoNCELoss
from ..outcome import Outcome
from ..train import RetrievalValidator, TrainConfig, TrainResult, evaluate_retrieval_per_query, fit

PAPER_ID = "icone2024"


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------

class InstanceLoss(nn.Module):
    """Instance loss with one classifier shared by both modalities (Eqs. 1-5; Dual-Path, Zheng et al. 2020).

    ``W_share`` is ``classifier.weight`` (num_classes, dim), no bias: ``P_v = softmax(W_share^T f_v)`` (Eq. 1),
    ``L_v = -log P_v(c)`` (Eq. 2), the same for text with the *same* weights (Eqs. 3-4), and
    ``L_ins = L_v + L_t`` (Eq. 5), each term a mean over the batch. ``dropout`` is applied to both modalities'
    features before the shared layer, as in Dual-Path (the paper does not state it).
    """

    def __init__(self, num_classes: int, dim: int, dropout: float = 0.0):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be positive, got {num_classes} and {dim}")
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes, bias=False)  # W_share^T as a layer: weight (z, d)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if image_features.shape != text_features.shape or image_features.dim() != 2:
            raise ValueError(f"expected two (B, D) tensors of the same shape, got {tuple(image_features.shape)} "
                             f"and {tuple(text_features.shape)}")
        if labels.shape != image_features.shape[:1]:
            raise ValueError(f"expected one class id per pair, got labels of shape {tuple(labels.shape)}")
        image_logits = self.classifier(self.dropout(image_features))  # (B, z)
        text_logits = self.classifier(self.dropout(text_features))  # (B, z)
        image_loss = F.cross_entropy(image_logits, labels)  # Eq. (2), mean over the batch
        text_loss = F.cross_entropy(text_logits, labels)  # Eq. (4)
        return {"loss": image_loss + text_loss, "image": image_loss, "text": text_loss}


def literal_eq6_image_to_text(image_features: torch.Tensor, text_features: torch.Tensor,
                              temperature: float) -> torch.Tensor:
    """Eq. (6) exactly as printed: ``-mean_i log(exp(S_ii / tau) / sum_j exp(S_ij))`` (no ``/ tau`` below).

    Not a softmax: the denominator barely depends on the temperature-scaled positive, so the term rewards
    raising ``S_ii`` almost linearly and hardly pushes negatives away. Kept only to show the typo's effect.
    """
    sims = image_features @ text_features.T  # (B, B)
    return (torch.logsumexp(sims, dim=1) - sims.diagonal() / temperature).mean()


class IConELoss(nn.Module):
    """The IConE objective ``L = lambda1 L_ins + lambda2 L_v-t`` (Eq. 9).

    ``forward(image_features, text_features, labels)`` takes the joint-space features *before* L2 normalisation
    (B, D) and the instance class of each pair (B,). ``L_ins`` is :class:`InstanceLoss` on them; ``L_v-t`` is
    :class:`xmr.losses.InfoNCELoss` on their normalised versions with the two directions added (Eq. 8). A term
    whose weight is 0 is still computed, without gradient, so training curves show both. Returns ``"loss"``,
    ``"instance"`` and ``"contrastive"`` (unweighted).
    """

    def __init__(self, instance_loss: InstanceLoss, temperature: float = 0.05, instance_weight: float = 1.0,
                 contrastive_weight: float = 1.0, literal_eq6: bool = False):
        super().__init__()
        if instance_weight < 0 or contrastive_weight < 0 or instance_weight + contrastive_weight == 0:
            raise ValueError(f"loss weights must be non-negative and not both 0, got ({instance_weight}, "
                             f"{contrastive_weight})")
        self.instance_loss = instance_loss
        self.contrastive_loss = InfoNCELoss(temperature=temperature)
        self.instance_weight, self.contrastive_weight = float(instance_weight), float(contrastive_weight)
        self.literal_eq6 = literal_eq6

    @property
    def temperature(self) -> float:
        return self.contrastive_loss.temperature

    def _contrastive(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        terms = self.contrastive_loss(image_features, text_features)
        image_to_text = (literal_eq6_image_to_text(image_features, text_features, self.temperature)
                         if self.literal_eq6 else terms["loss_i2t"])
        return image_to_text + terms["loss_t2i"]  # Eq. (8): L_v2t + L_t2v

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.instance_weight > 0):
            instance = self.instance_loss(image_features, text_features, labels)["loss"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.contrastive_weight > 0):
            contrastive = self._contrastive(image_features, text_features)
        total = sum(weight * term for weight, term in ((self.instance_weight, instance),
                                                        (self.contrastive_weight, contrastive)) if weight > 0)
        return {"loss": total, "instance": instance.detach() if self.instance_weight == 0 else instance,
                "contrastive": contrastive.detach() if self.contrastive_weight == 0 else contrastive}


# ---------------------------------------------------------------------------------------------------------------
# Model and the stage switch
# ---------------------------------------------------------------------------------------------------------------

class ScratchTextEncoder(nn.Module):
    """A text encoder with no pretraining, for the paper's Table 4 rows with weaker text encoders.

    Word-piece embeddings (MiniLM's tokenizer ids, ``vocab_size`` of them) learned from scratch, then either
    ``kind="mean"``: their mean over the caption (a bag of words, out_dim = word_dim), or ``kind="gru"``: a
    one-layer bidirectional GRU over them and the mean of its states (out_dim = 2 * hidden_dim; the paper's
    "GRU" rows, VSE++'s text side). It plugs into :class:`xmr.encoders.Tower` as the ``upper`` part with
    ``forward_upper(token_ids, mask)``; :class:`~xmr.encoders.Tower` casts its inputs to float, so the ids are
    cast back (exact below 2**24).
    """

    trainable_top = 0  # no pretrained part: nothing to freeze or unfreeze, everything always trains
    KINDS = ("mean", "gru")

    def __init__(self, vocab_size: int, kind: str = "gru", word_dim: int = 300, hidden_dim: int = 512):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, hidden_dim, batch_first=True, bidirectional=True) if kind == "gru" else None
        self.out_dim = 2 * hidden_dim if kind == "gru" else word_dim

    def forward_upper(self, token_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.embedding(token_ids.long())  # (B, L, word_dim)
        if self.gru is not None:
            lengths = mask.sum(dim=1).clamp_min(1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(hidden, lengths, batch_first=True, enforce_sorted=False)
            hidden, _ = self.gru(packed)
            hidden, _ = nn.utils.rnn.pad_packed_sequence(hidden, batch_first=True, total_length=token_ids.shape[1])
        return {"tokens": hidden, "pooled": masked_mean(hidden, mask)}  # (B, L, out_dim), (B, out_dim)


@dataclass
class IConESettings:
    """The model side of IConE (the schedule is a list of :class:`Stage`)."""

    embed_dim: int = 512  # the joint space; the paper's W_share columns are 2048-d (Dual-Path's ResNet-50)
    projection: str = "linear"
    dropout: float = 0.0  # before W_share; not stated in the paper
    temperature: float = 0.05  # paper: 0.05 (Sec. 4.3)
    literal_eq6: bool = False  # True: Eq. (6) as printed, without / tau in its denominator
    text_encoder: str = "pretrained"  # "pretrained" (all-MiniLM-L6-v2) | "scratch" (ScratchTextEncoder)
    scratch_kind: str = "gru"  # ScratchTextEncoder kind: "mean" (bag of words) | "gru"
    scratch_vocab_size: int = 30522  # MiniLM's word pieces, for text_encoder="scratch"
    scratch_word_dim: int = 300
    scratch_hidden_dim: int = 512


@dataclass(frozen=True)
class Stage:
    """One stage of the schedule: its loss weights (Eq. 9), optimisation, and what of the encoders trains.

    ``image_top`` / ``text_top`` count the trainable top stages/layers of each encoder (0 = frozen; 7 and 6 =
    the whole EfficientNet-Lite0 / MiniLM above the stem). A scratch text encoder always trains. ``captions``
    is what an epoch is (:class:`xmr.data.PairedFeatures`): ``"random"`` (one caption per image) or ``"all"``.
    """

    name: str
    epochs: int
    lr: float
    instance_weight: float
    contrastive_weight: float
    image_top: int = 0
    text_top: int = 0
    captions: str = "random"

    @property
    def tops(self) -> tuple[int, int]:
        return self.image_top, self.text_top


def paper_stages(stage_one_epochs: int = 25, stage_two_epochs: int = 15, image_top: int = 7,
                 text_top: int = 6) -> tuple[Stage, Stage]:
    """Sec. 3.4 / 4.3: Stage I frozen, L_ins only, 1e-4; Stage II end to end (or the top stages), both, 1e-5."""
    return (Stage("I", stage_one_epochs, 1e-4, 1.0, 0.0),
            Stage("II", stage_two_epochs, 1e-5, 1.0, 1.0, image_top, text_top))


class IConEModel(DualEncoder):
    """A :class:`xmr.encoders.DualEncoder` trained with :class:`IConELoss`, which needs the instance class.

    ``training_losses(batch)`` passes the towers' outputs before normalisation and ``batch["image_index"]``
    (the training image = the instance class, from :class:`xmr.data.PairedFeatures`) to the loss.
    Retrieval uses the inherited L2-normalised ``encode_image`` / ``encode_text``.
    """

    def __init__(self, image_tower: Tower, text_tower: Tower, loss: IConELoss):
        super().__init__(image_tower, text_tower, loss)

    @property
    def num_classes(self) -> int:
        return self.loss.instance_loss.classifier.out_features

    @property
    def tops(self) -> tuple[int, int]:
        """Trainable top stages/layers of the (image, text) encoders; 0 = frozen (or no pretrained part)."""
        return tuple(getattr(tower.upper, "trainable_top", 0) if tower.upper is not None else 0
                     for tower in (self.image_tower, self.text_tower))

    def training_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image_features = self.image_tower(batch["image"])  # (B, D) f_v, before normalisation
        text_features = self.text_tower(batch["text"], batch.get("text_mask"))  # (B, D) f_t
        return self.loss(image_features, text_features, batch["image_index"])


def build_icone_model(settings: IConESettings, num_classes: int, stage: Stage) -> IConEModel:
    """A fresh IConE model for ``stage``: pretrained encoder tops (trainable where the stage says so), new
    projection heads to ``settings.embed_dim``, a new ``W_share`` over ``num_classes`` instance classes."""
    if settings.text_encoder not in ("pretrained", "scratch"):
        raise ValueError(f"text_encoder must be 'pretrained' or 'scratch', got {settings.text_encoder!r}")
    loss = IConELoss(InstanceLoss(num_classes, settings.embed_dim, settings.dropout), settings.temperature,
                     stage.instance_weight, stage.contrastive_weight, settings.literal_eq6)
    scratch = settings.text_encoder == "scratch"
    towers = build_dual_encoder(DualEncoderSettings(embed_dim=settings.embed_dim, projection=settings.projection,
                                                    image_top=stage.image_top,
                                                    text_top=0 if scratch else stage.text_top), loss=loss)
    text_tower = towers.text_tower
    if scratch:
        encoder = ScratchTextEncoder(settings.scratch_vocab_size, settings.scratch_kind, settings.scratch_word_dim,
                                     settings.scratch_hidden_dim)
        text_tower = Tower(ProjectionHead(encoder.out_dim, settings.embed_dim, settings.projection), encoder)
    return IConEModel(towers.image_tower, text_tower, loss)


def enter_stage(model: IConEModel, stage: Stage, settings: IConESettings) -> IConEModel:
    """The stage switch: a new model for ``stage`` that carries over everything ``model`` has trained.

    The new model's towers have the stage's trainable tops; the projection heads, ``W_share`` and any tops or
    scratch encoder that ``model`` trained are copied; tops that ``model`` kept frozen start from the pretrained
    weights, i.e. from exactly what ``model`` computed. ``model`` itself is not changed. The loss takes the
    stage's weights and ``settings``' temperature. A stage cannot freeze or change tops that were trained.
    """
    for modality, before, after in zip(("image", "text"), model.tops, stage.tops):
        if before not in (0, after):  # a scratch text encoder reports 0: it is always carried over
            raise ValueError(f"the {modality} encoder was trained with its top {before}; a stage with top "
                             f"{after} would drop or refreeze trained weights")
    new = build_icone_model(settings, model.num_classes, stage)
    new.to(next(model.parameters()).device)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    not_pretrained = [key for key in missing if ".upper." not in key]  # only pretrained tops may be missing
    if unexpected or not_pretrained:
        raise RuntimeError(f"stage switch: unexpected {unexpected}, missing trained parameters {not_pretrained}")
    return new


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------

InputsByTops = Callable[[tuple[int, int]], Mapping[str, CaptionInputs]]


@dataclass
class IConEOutcome(Outcome):
    """A :func:`run_schedule` :class:`~xmr.outcome.Outcome` that keeps its schedule, so that another run can
    continue it (``start=``). ``stages`` is keyed by position and name (``"1_I"``, ``"2_II"``): names repeat when
    Stage II variants continue one shared Stage I."""

    schedule: list[Stage] = field(default_factory=list)  # every stage trained, in order


def train_stage(model: IConEModel, stage: Stage, config: TrainConfig, train: CaptionInputs,
                validation: CaptionInputs) -> TrainResult:
    """Train ``model`` for one stage (``config`` with the stage's epochs and learning rate) and restore the
    epoch with the best validation Rsum."""
    pairs = PairedFeatures(train.image, train.text, train.text_mask, train.captions_per_image,
                           caption_choice=stage.captions, seed=config.seed)
    stage_config = dataclasses.replace(config, max_epochs=stage.epochs, lr=stage.lr)
    return fit(model, pairs, stage_config, validate=RetrievalValidator.for_split(validation))


def run_schedule(settings: IConESettings, stages: Sequence[Stage], config: TrainConfig, inputs: InputsByTops,
                 start: IConEOutcome | None = None) -> IConEOutcome:
    """Train ``stages`` in turn, switching models with :func:`enter_stage`, and evaluate on the test split.

    ``inputs(tops)`` returns the ``"train"``, ``"dev"`` and ``"test"`` :class:`~xmr.data.paired.CaptionInputs` for a
    stage's (image_top, text_top). ``start`` continues from an earlier outcome (e.g. one Stage I model shared by
    several Stage II variants), whose stages the result includes; it is not changed. The seed of ``config`` seeds
    the new parameters. The outcome's parameters are ``settings``, ``config`` and every stage (``"stages"``).
    """
    if not stages:
        raise ValueError("no stage to train")
    model = start.model if start is not None else None
    schedule, results = (list(start.schedule), list(start.stages.values())) if start is not None else ([], [])
    for stage in stages:
        data = inputs(stage.tops)  # may build backbones (random initialisation before loading weights): seed after
        torch.manual_seed(config.seed)
        if model is None:
            model = build_icone_model(settings, len(data["train"].image), stage)
        else:
            model = enter_stage(model, stage, settings)
        results.append(train_stage(model, stage, config, data["train"], data["dev"]))
        schedule.append(stage)
    test = inputs(stages[-1].tops)["test"]
    metrics, per_query = evaluate_retrieval_per_query(model, test)
    parameters = {**dataclasses.asdict(settings), **dataclasses.asdict(config),
                  "stages": [dataclasses.asdict(stage) for stage in schedule]}
    trained = {f"{index}_{stage.name}": result for index, (stage, result) in enumerate(zip(schedule, results), 1)}
    return IConEOutcome(model, parameters, trained, metrics, per_query, count_trainable_parameters(model),
                        str(config.resolved_device()), schedule=schedule)


def run_baseline(loss: str, loss_options: Mapping, settings: IConESettings, stage: Stage, config: TrainConfig,
                 inputs: InputsByTops) -> Outcome:
    """A single-loss dual encoder (``xmr.losses.make_loss(loss, **loss_options)``, e.g. VSE++'s
    ``"max_triplet"``) trained like one IConE stage: the same heads and tops, data (``stage.captions``), epoch
    budget, learning rate and plateau rule (``stage``'s loss weights are not used). The paper's baselines run
    in our setting, so that they are compared with IConE on equal terms."""
    data = inputs(stage.tops)
    torch.manual_seed(config.seed)
    model = build_dual_encoder(DualEncoderSettings(loss=loss, loss_options=dict(loss_options),
                                                   embed_dim=settings.embed_dim, projection=settings.projection,
                                                   image_top=stage.image_top, text_top=stage.text_top))
    result = train_stage(model, stage, config, data["train"], data["dev"])
    metrics, per_query = evaluate_retrieval_per_query(model, data["test"])
    parameters = {"loss": loss, "loss_options": dict(loss_options), **dataclasses.asdict(settings),
                  **dataclasses.asdict(config), "stages": [dataclasses.asdict(stage)]}
    return Outcome(model, parameters, {f"1_{stage.name}": result}, metrics, per_query,
                   count_trainable_parameters(model), str(config.resolved_device()))


def tokenized_caption_inputs(split, image: torch.Tensor, tokenizer: Callable) -> CaptionInputs:
    """Inputs for a scratch text encoder: ``image`` inputs as cached, captions as word-piece ids (5N, L) and
    their mask; ``tokenizer`` is e.g. ``TextBackbone().tokenize``."""
    tokens = tokenizer(list(split.captions))
    return CaptionInputs(image, tokens["input_ids"], tokens["attention_mask"], split.captions_per_image)


__all__ = ["PAPER_ID", "InstanceLoss", "IConELoss", "IConEModel", "IConEOutcome", "IConESettings", "Stage",
           "ScratchTextEncoder", "build_icone_model", "enter_stage", "literal_eq6_image_to_text", "paper_stages",
           "run_baseline", "run_schedule", "tokenized_caption_inputs", "train_stage"]
