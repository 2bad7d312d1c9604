"""CODER: coupled diversity-sensitive momentum contrastive learning (coder2022).

Wang et al., "CODER: Coupled Diversity-Sensitive Momentum Contrastive Learning for Image-Text Retrieval",
ECCV 2022. No public code exists; ``../shared/papers/METHOD_NOTES.md`` records the reading followed here.
Equation numbers are the paper's.

- **Diversity** (Eq. 3, :func:`diversity_scores`): for an anchor, ``SD`` is the (population) standard deviation
  of its cosine similarities to its *negatives* (the positive excluded, ``i != j``);
  ``div = 1 / sigmoid(eps / SD) = 1 + exp(-eps / SD)``, in [1, 2), then divided by the largest ``div`` among the
  anchors. It is a weight, not a path for gradients: detached. An anchor without negatives (or with SD = 0) has
  the smallest raw value, 1.
- **DCL** (Eqs. 4-5, :class:`DiversityContrastiveLoss`), per direction and anchor n:
  ``mu * [log(1 + sum_{q != n} exp((S_nq - gamma) / (mu * div_n))) - log(1 + S_nn)]``, averaged over anchors;
  ``loss = loss_i2t + loss_t2i``. Not InfoNCE: the positive sits outside the exponential. ``log(1 + S_nn)`` is
  -inf at S_nn = -1, so ``1 + S_nn`` is clamped at ``positive_floor`` (the clamped region has zero gradient).
  ``diversity=False`` is Eq. (4) (div = 1, "IE" in Table 3; ``constant_diversity`` c sets div = c for every
  anchor, the implicit form at temperature mu * c). ``form="infonce_margin"`` is a flagged alternative
  reading (positive inside the softmax, negatives offset by +gamma); not the paper's formula.
  ``form="multi_similarity"`` keeps the printed negative term, which is the Multi-Similarity loss's (Wang et al.,
  CVPR 2019) with beta = 1 / (mu * div_n) and lambda = gamma, and replaces the printed pull ``-mu log(1 + S_nn)``
  by that loss's positive term ``(1 / alpha) log(1 + exp(-alpha (S_nn - gamma)))`` (``ms_alpha``; MS's alpha = 2).
- **Same-image candidates** (the paper is silent): with five captions per image, another caption of the anchor's
  image can sit in the batch or in a bank. Given ids (``pair_ids``, ``bank_ids``; :class:`CODERModel` passes the
  image index when ``exclude_same_image``) such candidates are neither negatives nor part of the diversity.
- **M-DCL** (Eq. 6, :meth:`DiversityContrastiveLoss.with_memory`): image anchors against the momentum text keys
  of the current batch (positive on the diagonal, the other keys negatives) plus the text bank (negatives), and
  the same for text anchors. The printed ``L_DCL(V, B_w)`` would also make bank entries anchors, which have no
  positive in the batch: we keep the anchor-side terms only. With a bank, ``div`` is the mean of the batch-level
  and the bank-level values (each normalised as in Eq. 3), "MB" in Table 3; ``bank_diversity=False`` uses the
  batch level only. With an empty bank and keys equal to the features, M-DCL equals the in-batch DCL.
- **Memory banks** (Sec. 3.2, :class:`MomentumQueue`, :func:`momentum_encoder`, :func:`momentum_update`):
  MoCo-style FIFO queues of momentum keys (size 4096) and key encoders updated as
  ``theta_k <- m theta_k + (1 - m) theta_q`` with m = 0.995, never touched by the optimiser.
- **PGC** (Eq. 7, :func:`xmr.cluster.kmeans`, :class:`PrototypeClassificationLoss`): Euclidean k-means (the
  paper cites plain K-means, Jain 2010) with seeded k-means++ initialisation and a fixed number of Lloyd
  iterations, on the training device; a linear head ``P^C`` (K x F, no bias) predicts the cluster of both concept
  features with cross-entropy; ``loss = L_cls(P_v, Z) + L_cls(P_w, Z)``.
- **Concept branch** (Eq. 2, :class:`ConceptBranch`): g concept words mined from the training captions
  (:func:`mine_concepts`), word vectors (the paper: GloVe-300; here the input word-piece embeddings of
  all-MiniLM-L6-v2, :func:`concept_word_vectors`), a 2-layer GCN over the thresholded co-occurrence graph
  (CVSE, Wang et al. 2020: conditional probabilities binarised at 0.3; we then use Kipf's symmetric
  normalisation with self loops), and the softmax query ``a = softmax(lambda q W Y^T)``, ``v^C = a Y``.
- **Aggregators** (Eq. 1 and the concept queries, Sec. 3.2; the paper does not name them): ``aggregation="mean"``
  reads pooled backbone features (the mean of EfficientNet-Lite0's 7 x 7 grid, the masked mean of MiniLM's
  tokens) with linear heads; ``"gpo"`` gives each aggregator its own GPO (VSE-infinity, :class:`xmr.encoders.GPO`)
  over the region/token features before the linear head (VSE-infinity projects each region first).
- **Objective and inference** (Eq. 8, Sec. 3.5, :class:`CODERModel`):
  ``L = 3 L_DCL^I + L_M-DCL^I + L_DCL^C + L_PGC``; ``S = beta S_instance + (1 - beta) S_concept``, beta = 0.9.
  The printed ``L_DCL^C = L_DCL(V^C, W^C) + L_DCL(W^C, V^C)`` counts both directions twice, since L_DCL already
  holds both (Eq. 5); we count them once, like the instance level. PGC clusters, per training image, v^I plus the
  mean w^I of its captions (pseudo labels are indexed by a batch's ``image_index``), once per epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..cluster import KMeansResult, kmeans
from ..data import CaptionInputs, PairedFeatures
from ..encoders import GPO, ProjectionHead, Tower, count_trainable_parameters, sort_regions
from ..losses import check_feature_pairs
from ..outcome import Outcome
from ..train import RetrievalValidator, TrainConfig, encode, evaluate_retrieval_per_query, fit

PAPER_ID = "coder2022"


# ---------------------------------------------------------------------------------------------------------------
# Diversity (Eq. 3) and the diversity-sensitive contrastive loss (Eqs. 4-6)
# ---------------------------------------------------------------------------------------------------------------

def raw_diversity(sims: torch.Tensor, negative_mask: torch.Tensor | None = None, eps: float = 0.1) -> torch.Tensor:
    """Eq. (3) before the max normalisation: ``1 / sigmoid(eps / SD)`` per anchor (row), detached, in [1, 2).

    ``sims`` (N, M) are an anchor's similarities to the candidates; ``negative_mask`` (N, M) marks the negatives
    (default: everything but the diagonal). SD is the population standard deviation over the negatives; a row
    without negatives counts as SD = 0 (diversity 1, the minimum).
    """
    sims = sims.detach()
    if negative_mask is None:
        negative_mask = ~torch.eye(*sims.shape, dtype=torch.bool, device=sims.device)
    weights = negative_mask.to(sims.dtype)  # (N, M)
    count = weights.sum(dim=1).clamp_min(1.0)  # (N,)
    mean = (sims * weights).sum(dim=1) / count  # (N,) E(S_ij)
    variance = ((sims - mean[:, None]).pow(2) * weights).sum(dim=1) / count  # E(S^2) - E(S)^2, centred form
    sd = variance.clamp_min(0.0).sqrt()  # (N,)
    return 1.0 + torch.exp(-eps / sd)  # 1 / sigmoid(x) = 1 + exp(-x); SD = 0 gives exp(-inf) = 0


def diversity_scores(sims: torch.Tensor, negative_mask: torch.Tensor | None = None, eps: float = 0.1) -> torch.Tensor:
    """Eq. (3): :func:`raw_diversity` divided by its maximum over the anchors (N,), in (0.5, 1]."""
    raw = raw_diversity(sims, negative_mask, eps)
    return raw / raw.max()


class DiversityContrastiveLoss(nn.Module):
    """Diversity-sensitive contrastive loss (Eq. 5; ``diversity=False``: the implicit form, Eq. 4).

    ``forward(image_features, text_features)`` takes (B, D) L2-normalised pairs (row i of each is a positive
    pair) and returns ``{"loss", "loss_i2t", "loss_t2i"}`` with ``loss = loss_i2t + loss_t2i`` (Eq. 5 adds the
    directions). Optional ``image_bank`` / ``text_bank`` (Q, D) enter only the diversity estimate (Table 3 "MB"
    without M-DCL); :meth:`with_memory` is M-DCL (Eq. 6), where the banks are also negatives.
    ``mu`` is the temperature, ``gamma`` the margin, ``eps`` the diversity scale of Eq. (3).

    ``form="infonce_margin"`` is a flagged alternative reading (not the paper's formula): the positive goes inside
    the softmax and negatives must beat it by the margin, ``mu * [log(exp(S_nn / t) + sum_{q != n}
    exp((S_nq + gamma) / t)) - S_nn / t]`` with ``t = mu * div_n`` (InfoNCE with a CosFace-style margin). The
    literal form's only pull on a positive is ``-mu log(1 + S_nn)``, weak next to the push of many negatives.
    ``form="multi_similarity"`` keeps the printed negative term and pulls the positive with the Multi-Similarity
    loss's positive term: ``mu log(1 + sum_q exp((S_nq - gamma) / t)) + (1 / ms_alpha) log(1 + exp(-ms_alpha
    (S_nn - gamma)))``. ``constant_diversity`` is the div of every anchor when ``diversity=False``.

    ``pair_ids`` (B,) and ``bank_ids`` (Q,) (e.g. image indices) make candidates that share the anchor's id
    neither negatives nor part of its diversity: another caption of the same image in the batch or the bank is
    not a negative. The paper says nothing about this; without ids every non-diagonal candidate is a negative.
    """

    FORMS = ("literal", "infonce_margin", "multi_similarity")

    def __init__(self, mu: float = 0.1, gamma: float = 0.3, eps: float = 0.1, diversity: bool = True,
                 bank_diversity: bool = True, positive_floor: float = 1e-6, form: str = "literal",
                 ms_alpha: float = 2.0, constant_diversity: float = 1.0):
        super().__init__()
        if not (mu > 0 and eps > 0 and positive_floor > 0 and ms_alpha > 0 and constant_diversity > 0):
            raise ValueError("mu, eps, positive_floor, ms_alpha and constant_diversity must be positive, got "
                             f"{mu}, {eps}, {positive_floor}, {ms_alpha}, {constant_diversity}")
        self.ms_alpha, self.constant_diversity = ms_alpha, constant_diversity
        if form not in self.FORMS:
            raise ValueError(f"form must be one of {self.FORMS}, got {form!r}")
        self.form = form
        self.mu, self.gamma, self.eps = mu, gamma, eps
        self.diversity, self.bank_diversity, self.positive_floor = diversity, bank_diversity, positive_floor

    def anchor_diversity(self, sims: torch.Tensor, bank_sims: torch.Tensor | None = None,
                         negative_mask: torch.Tensor | None = None,
                         bank_negative_mask: torch.Tensor | None = None) -> torch.Tensor:
        """div_n (N,) of the anchors (rows) of ``sims`` (N, N), positives on the diagonal; with ``bank_sims``
        (N, Q), Q > 0, and ``bank_diversity`` the mean of the batch-level and bank-level values (Eq. 6 note)."""
        if not self.diversity:
            return torch.full((len(sims),), self.constant_diversity, dtype=sims.dtype, device=sims.device)
        div = diversity_scores(sims, negative_mask, self.eps)  # (N,)
        if bank_sims is not None and bank_sims.shape[1] > 0 and self.bank_diversity:
            if bank_negative_mask is None:
                bank_negative_mask = torch.ones_like(bank_sims, dtype=torch.bool)
            div = (div + diversity_scores(bank_sims, bank_negative_mask, self.eps)) / 2
        return div

    def direction(self, sims: torch.Tensor, bank_sims: torch.Tensor | None = None, bank_negatives: bool = False,
                  negative_mask: torch.Tensor | None = None,
                  bank_negative_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One direction of Eq. (5): anchors are the rows of ``sims`` (N, N), positives on the diagonal.

        ``bank_sims`` (N, Q) are the anchors' similarities to a memory bank: used for diversity, and as extra
        negatives when ``bank_negatives``. ``negative_mask`` (N, N) / ``bank_negative_mask`` (N, Q) mark the
        negatives (default: every off-diagonal entry / every bank entry). Returns the loss (a scalar: ``mu``
        times the mean over anchors) and the anchors' diversity (N,).
        """
        if negative_mask is None:
            negative_mask = ~torch.eye(len(sims), dtype=torch.bool, device=sims.device)
        div = self.anchor_diversity(sims, bank_sims, negative_mask, bank_negative_mask)  # (N,)
        temperature = self.mu * div[:, None]  # (N, 1)
        positives = sims.diagonal()  # (N,)
        printed_negatives = self.form != "infonce_margin"  # literal and multi_similarity: Eq. (5)'s negative term
        shift = -self.gamma if printed_negatives else self.gamma  # negatives' offset inside exp
        logits = ((sims + shift) / temperature).masked_fill(~negative_mask, -torch.inf)  # (N, N)
        if printed_negatives:
            first = torch.zeros_like(positives)[:, None]  # the "+ 1" inside the log is exp(0)
        else:
            first = (positives / temperature[:, 0])[:, None]  # the positive's own logit
        columns = [first, logits]
        if bank_negatives and bank_sims is not None:
            bank_logits = (bank_sims + shift) / temperature  # (N, Q)
            if bank_negative_mask is not None:
                bank_logits = bank_logits.masked_fill(~bank_negative_mask, -torch.inf)
            columns.append(bank_logits)
        negative_term = torch.logsumexp(torch.cat(columns, dim=1), dim=1)  # log(1 + sum_q exp(...)), (N,)
        if self.form == "multi_similarity":  # MS's pull: (1 / alpha) softplus(-alpha (S_nn - gamma)), (N,)
            pull = F.softplus(-self.ms_alpha * (positives - self.gamma)) / self.ms_alpha
            return (self.mu * negative_term + pull).mean(), div
        if self.form == "literal":
            positive_term = torch.log((1 + positives).clamp_min(self.positive_floor))  # log(1 + S_nn), (N,)
        else:
            positive_term = positives / temperature[:, 0]  # (N,)
        return self.mu * (negative_term - positive_term).mean(), div

    @staticmethod
    def _masks(pair_ids: torch.Tensor | None, bank_ids: torch.Tensor | None):
        """(B, B) in-batch and (B, Q) bank negative masks from ids; None where no ids are given."""
        if pair_ids is None:
            return None, None
        batch_mask = pair_ids[:, None] != pair_ids[None, :]  # (B, B); the diagonal is False
        bank_mask = pair_ids[:, None] != bank_ids[None, :] if bank_ids is not None else None  # (B, Q)
        return batch_mask, bank_mask

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                image_bank: torch.Tensor | None = None, text_bank: torch.Tensor | None = None,
                pair_ids: torch.Tensor | None = None,
                bank_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        check_feature_pairs(image_features, text_features)
        sims = image_features @ text_features.T  # (B, B): S_nq = cos(v_n, w_q)
        text_bank_sims = image_features @ text_bank.T if text_bank is not None else None  # (B, Q)
        image_bank_sims = text_features @ image_bank.T if image_bank is not None else None  # (B, Q)
        batch_mask, bank_mask = self._masks(pair_ids, bank_ids)
        loss_i2t, _ = self.direction(sims, text_bank_sims, False, batch_mask, bank_mask)
        loss_t2i, _ = self.direction(sims.T, image_bank_sims, False, batch_mask, bank_mask)
        return {"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}

    def with_memory(self, image_features: torch.Tensor, text_features: torch.Tensor, image_keys: torch.Tensor,
                    text_keys: torch.Tensor, image_bank: torch.Tensor, text_bank: torch.Tensor,
                    pair_ids: torch.Tensor | None = None,
                    bank_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """M-DCL (Eq. 6): image queries (B, D) against [text keys (B, D); text bank (Q, D)], and text queries
        against [image keys; image bank]; key n is the positive of query n. Keys and banks are constants."""
        check_feature_pairs(image_features, text_features)
        check_feature_pairs(image_keys, text_keys)
        image_keys, text_keys = image_keys.detach(), text_keys.detach()
        image_bank, text_bank = image_bank.detach(), text_bank.detach()
        batch_mask, bank_mask = self._masks(pair_ids, bank_ids)
        loss_i2t, _ = self.direction(image_features @ text_keys.T, image_features @ text_bank.T, True,
                                     batch_mask, bank_mask)
        loss_t2i, _ = self.direction(text_features @ image_keys.T, text_features @ image_bank.T, True,
                                     batch_mask, bank_mask)
        return {"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


# ---------------------------------------------------------------------------------------------------------------
# Coupled memory banks: momentum encoders and queues (Sec. 3.2, Eq. 6)
# ---------------------------------------------------------------------------------------------------------------

class MomentumQueue(nn.Module):
    """A FIFO ring buffer of ``size`` keys of dimension ``dim`` (MoCo's queue), with an id per key (e.g. the
    image index; -1 when none is given), stored as buffers (so it moves with ``.to(device)`` and is saved in
    checkpoints) and never part of the autograd graph.

    :meth:`enqueue` overwrites the oldest keys; :meth:`contents` returns the filled keys oldest first, as a copy
    (a loss may use it while the queue is updated before ``backward``), and :meth:`ids` their ids.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"size and dim must be positive, got {size} and {dim}")
        self.size = size
        self.register_buffer("keys", torch.zeros(size, dim))  # (size, dim)
        self.register_buffer("key_ids", torch.full((size,), -1, dtype=torch.long))  # (size,)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # number of valid keys

    def __len__(self) -> int:
        return int(self.filled)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Append (B, dim) keys (and their (B,) ids), dropping the oldest beyond ``size`` (of a batch larger
        than the queue, only its last ``size`` keys are kept)."""
        if ids is None:
            ids = torch.full((len(keys),), -1, dtype=torch.long)
        if len(ids) != len(keys):
            raise ValueError(f"{len(ids)} ids for {len(keys)} keys")
        keys, ids = keys.detach()[-self.size:].to(self.keys.dtype), ids[-self.size:].to(self.key_ids.device)
        slots = (int(self.pointer) + torch.arange(len(keys), device=self.keys.device)) % self.size  # (b,)
        self.keys[slots] = keys
        self.key_ids[slots] = ids.long()
        self.pointer.fill_((int(self.pointer) + len(keys)) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + len(keys)))

    def _order(self, values: torch.Tensor) -> torch.Tensor:
        filled, pointer = int(self.filled), int(self.pointer)
        if filled < self.size:
            return values[:filled].clone()
        return torch.cat([values[pointer:], values[:pointer]]).clone()

    def contents(self) -> torch.Tensor:
        """The filled keys (len(self), dim), oldest first; a detached copy."""
        return self._order(self.keys)

    def ids(self) -> torch.Tensor:
        """The ids of :meth:`contents` (len(self),)."""
        return self._order(self.key_ids)

    @torch.no_grad()
    def reset(self) -> None:
        self.keys.zero_()
        self.key_ids.fill_(-1)
        self.pointer.zero_()
        self.filled.zero_()


def momentum_encoder(query_encoder: nn.Module) -> nn.Module:
    """A key encoder: a copy of ``query_encoder`` with ``requires_grad=False`` (the optimiser never sees it)."""
    key_encoder = copy.deepcopy(query_encoder)
    key_encoder.requires_grad_(False)
    return key_encoder


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, momentum: float = 0.995) -> None:
    """MoCo's update ``theta_k <- m theta_k + (1 - m) theta_q`` for every parameter; buffers are copied."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for key, query in zip(key_encoder.parameters(), query_encoder.parameters(), strict=True):
        key.mul_(momentum).add_(query.detach(), alpha=1.0 - momentum)
    for key, query in zip(key_encoder.buffers(), query_encoder.buffers(), strict=True):
        key.copy_(query)


# ---------------------------------------------------------------------------------------------------------------
# Prototype-guided classification (Eq. 7): the prototype head (k-means: xmr.cluster)
# ---------------------------------------------------------------------------------------------------------------

class PrototypeClassificationLoss(nn.Module):
    """Prototype-guided classification (Eq. 7): ``P_v = softmax(P^C v^C)``, ``P_w = softmax(P^C w^C)`` with one
    head ``P^C`` (K x F, no bias) for both modalities; ``loss = CE(P_v, Z) + CE(P_w, Z)``, batch means."""

    def __init__(self, dim: int, num_clusters: int):
        super().__init__()
        self.head = nn.Linear(dim, num_clusters, bias=False)  # P^C: weight (K, F)

    def forward(self, image_concepts: torch.Tensor, text_concepts: torch.Tensor,
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
        check_feature_pairs(image_concepts, text_concepts)
        loss_image = F.cross_entropy(self.head(image_concepts), labels)
        loss_text = F.cross_entropy(self.head(text_concepts), labels)
        return {"loss": loss_image + loss_text, "loss_image": loss_image, "loss_text": loss_text}


# ---------------------------------------------------------------------------------------------------------------
# The concept branch (Eq. 2): vocabulary, co-occurrence graph, word vectors, GCN, softmax query
# ---------------------------------------------------------------------------------------------------------------

# Function words and words too generic to be concepts; the paper does not list its filter (CVSE keeps frequent
# nouns, verbs and adjectives found with a tagger, which we do not have offline).
STOPWORDS = frozenset("""
a an the and or but of in on at to for from by with without into onto over under near next behind above below
up down out off through across along around between while as is are was were be been being has have had do does
did it its this that these those there here their they them he she his her him its who whom which what where when
some one two three four five several many other another each all both very his its s t not no than then too
""".split())


def caption_words(caption: str) -> list[str]:
    """Lower-case alphabetic words of a caption."""
    return re.findall(r"[a-z]+", caption.lower())


def mine_concepts(captions: Sequence[str], size: int = 400, stopwords: frozenset[str] = STOPWORDS,
                  min_length: int = 2) -> list[str]:
    """The ``size`` words found in the most captions (stopwords and words shorter than ``min_length`` removed;
    ties broken alphabetically): the concept vocabulary (Sec. 3.2, g = 400)."""
    document_frequency = Counter()
    for caption in captions:
        document_frequency.update({word for word in caption_words(caption)
                                   if len(word) >= min_length and word not in stopwords})
    ranked = sorted(document_frequency.items(), key=lambda item: (-item[1], item[0]))
    return [word for word, _ in ranked[:size]]


def concept_cooccurrence(captions: Sequence[str], concepts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per concept, the number of captions containing it (g,), and per pair the number containing both (g, g)."""
    index = {concept: i for i, concept in enumerate(concepts)}
    counts = torch.zeros(len(concepts), dtype=torch.float64)
    together = torch.zeros(len(concepts), len(concepts), dtype=torch.float64)
    for caption in captions:
        present = sorted({index[word] for word in caption_words(caption) if word in index})
        if present:
            ids = torch.tensor(present)
            counts[ids] += 1
            together[ids[:, None], ids[None, :]] += 1
    return counts, together


def concept_adjacency(captions: Sequence[str], concepts: Sequence[str], threshold: float = 0.3) -> torch.Tensor:
    """The normalised graph of the GCN (g, g), float32.

    CVSE's statistical graph: ``P(j | i) = N_ij / N_i`` binarised at ``threshold`` (0.3 in CVSE); we symmetrise
    it (an edge when either conditional passes), add self loops and normalise as Kipf & Welling:
    ``D^-1/2 (A + I) D^-1/2``. (CVSE/ML-GCN re-weight the binary graph instead; the paper defers to its
    supplement, which we do not have.)
    """
    counts, together = concept_cooccurrence(captions, concepts)
    conditional = together / counts.clamp_min(1)[:, None]  # (g, g): row i is P(. | i)
    edges = conditional >= threshold
    edges = (edges | edges.T).double()
    edges.fill_diagonal_(1.0)  # the self loop I
    inverse_sqrt_degree = edges.sum(1).rsqrt()  # (g,)
    return (inverse_sqrt_degree[:, None] * edges * inverse_sqrt_degree[None, :]).float()


@torch.no_grad()
def concept_word_vectors(concepts: Sequence[str], backbone=None) -> torch.Tensor:
    """(g, 384) word vectors: the mean of each concept's word-piece *input* embeddings in all-MiniLM-L6-v2
    (:class:`xmr.encoders.TextBackbone`; the paper uses GloVe-300, which is not available offline)."""
    if backbone is None:
        from ..encoders import TextBackbone

        backbone = TextBackbone(trainable_top=0)
    table = backbone.model.embeddings.word_embeddings.weight  # (vocabulary, 384)
    vectors = []
    for concept in concepts:
        ids = backbone.tokenizer(concept, add_special_tokens=False)["input_ids"]
        vectors.append(table[torch.tensor(ids)].mean(dim=0))
    return torch.stack(vectors).float()


class ConceptGCN(nn.Module):
    """Two graph convolutions (Kipf & Welling 2017) over the concept graph, as in CVSE/ML-GCN:
    ``Y = A LeakyReLU(A X W1) W2`` with ``A`` the normalised adjacency, X (g, d_word) -> Y (g, F)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.first = nn.Linear(in_dim, hidden_dim, bias=False)
        self.second = nn.Linear(hidden_dim, out_dim, bias=False)
        self.activation = nn.LeakyReLU(0.2)

    def forward(self, word_vectors: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(adjacency @ self.first(word_vectors))  # (g, hidden)
        return adjacency @ self.second(hidden)  # (g, F)


class ConceptBranch(nn.Module):
    """Concept-level representations (Eq. 2): queries from another pair of aggregators, softmax scores over the
    g concept features ``Y`` of the GCN, and ``v^C = sum_i a_i y_i``.

    ``a = softmax(smoothness * (q W) Y^T)`` with ``q`` the (B, F) query of an image (``image_query``) or a caption
    (``text_query``) and ``W`` a learnt F x F matrix per modality; ``smoothness`` is the paper's lambda, whose
    value is not given (10 here). The word vectors and adjacency are buffers (fixed), the GCN is trained.
    """

    def __init__(self, word_vectors: torch.Tensor, adjacency: torch.Tensor, image_dim: int, text_dim: int,
                 embed_dim: int, smoothness: float = 10.0):
        super().__init__()
        if adjacency.shape != (len(word_vectors), len(word_vectors)):
            size = len(word_vectors)
            raise ValueError(f"adjacency must be ({size}, {size}), got {tuple(adjacency.shape)}")
        self.register_buffer("word_vectors", word_vectors.float())  # X (g, d_word)
        self.register_buffer("adjacency", adjacency.float())  # (g, g)
        self.gcn = ConceptGCN(word_vectors.shape[1], embed_dim)
        self.image_query = ProjectionHead(image_dim, embed_dim)  # the second visual aggregator
        self.text_query = ProjectionHead(text_dim, embed_dim)  # the second textual aggregator
        self.image_bilinear = nn.Linear(embed_dim, embed_dim, bias=False)  # W^v
        self.text_bilinear = nn.Linear(embed_dim, embed_dim, bias=False)  # W^w
        self.smoothness = smoothness

    def concept_features(self) -> torch.Tensor:
        return self.gcn(self.word_vectors, self.adjacency)  # Y (g, F)

    def scores(self, queries: torch.Tensor, bilinear: nn.Module, concepts: torch.Tensor) -> torch.Tensor:
        """Eq. (2)'s a: (B, g) softmax over concepts of ``smoothness * q^T W y_i``."""
        return torch.softmax(self.smoothness * bilinear(queries) @ concepts.T, dim=1)

    def encode_image(self, image_features: torch.Tensor, concepts: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone image features (B, D_image) -> v^C (B, F), not normalised; ``concepts`` reuses a Y."""
        concepts = self.concept_features() if concepts is None else concepts
        return self.scores(self.image_query(image_features), self.image_bilinear, concepts) @ concepts

    def encode_text(self, text_features: torch.Tensor, concepts: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone caption features (B, D_text) -> w^C (B, F), not normalised; ``concepts`` reuses a Y."""
        concepts = self.concept_features() if concepts is None else concepts
        return self.scores(self.text_query(text_features), self.text_bilinear, concepts) @ concepts


def build_concept_branch(captions: Sequence[str], image_dim: int, text_dim: int, embed_dim: int,
                         num_concepts: int = 400, threshold: float = 0.3, smoothness: float = 10.0,
                         word_vectors: torch.Tensor | None = None, backbone=None) -> tuple[ConceptBranch, list[str]]:
    """Mine the vocabulary from the training ``captions``, build the graph and the word vectors (of
    ``backbone``'s input embeddings unless ``word_vectors`` (g, d) are given); returns the branch and the words."""
    concepts = mine_concepts(captions, num_concepts)
    if word_vectors is None:
        word_vectors = concept_word_vectors(concepts, backbone)
    elif len(word_vectors) != len(concepts):
        raise ValueError(f"{len(word_vectors)} word vectors for {len(concepts)} concepts")
    adjacency = concept_adjacency(captions, concepts, threshold)
    return ConceptBranch(word_vectors, adjacency, image_dim, text_dim, embed_dim, smoothness), concepts


# ---------------------------------------------------------------------------------------------------------------
# The model: Eq. (8) for training, the fused similarity for inference
# ---------------------------------------------------------------------------------------------------------------

AGGREGATIONS = ("mean", "gpo")


@dataclass
class CODERSettings:
    """CODER's switches and hyper-parameters; the defaults are the paper's (Sec. 4.2) unless marked."""

    embed_dim: int = 1024  # F
    aggregation: str = "mean"  # g_vis, g_text (Eq. 1; not given): "mean" of the regions/tokens, or "gpo" (VSE-inf)
    mu: float = 0.1  # DCL temperature (Eq. 5)
    gamma: float = 0.3  # DCL margin (Eq. 5)
    eps: float = 0.1  # diversity scale (Eq. 3)
    form: str = "literal"  # DCL as printed; "infonce_margin" / "multi_similarity": flagged readings (see the loss)
    ms_alpha: float = 2.0  # alpha of the Multi-Similarity pull (form="multi_similarity"; MS paper: 2)
    diversity: bool = True  # explicit diversity, Eq. (5); False: implicit, Eq. (4)
    constant_diversity: float = 1.0  # div of every anchor when diversity=False (1: Eq. 4); temperature mu * c
    memory_bank: bool = True  # keep momentum encoders and queues
    memory_loss: bool = True  # the M-DCL term (Eq. 6); needs memory_bank
    bank_diversity: bool = True  # the banks enter the diversity estimate ("MB", Table 3)
    queue_size: int = 4096
    momentum: float = 0.995
    exclude_same_image: bool = True  # other captions of the anchor's image are not negatives (paper: silent)
    instance_weight: float = 3.0  # lambda of Eq. (8)
    concepts: bool = True  # the concept branch and L_DCL^C
    num_concepts: int = 400  # g
    concept_threshold: float = 0.3  # co-occurrence graph threshold (CVSE; not in the paper)
    smoothness: float = 10.0  # lambda of Eq. (2) (not given in the paper)
    prototypes: bool = True  # L_PGC (Eq. 7); needs concepts
    num_clusters: int = 10000  # K (F30K: 10000 for ~29.8k images); scale it to the training set
    kmeans_iterations: int = 20  # not given in the paper
    kmeans_init: str = "k-means++"  # the first clustering's initialisation ("random": K distinct points, cheaper)
    fusion_weight: float = 0.9  # beta (Sec. 4.2)
    seed: int = 0  # k-means seeds

    def __post_init__(self):
        if self.memory_loss and not self.memory_bank:
            raise ValueError("memory_loss (M-DCL) needs memory_bank=True")
        if self.prototypes and not self.concepts:
            raise ValueError("prototypes (PGC) classify the concept features: they need concepts=True")
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise ValueError(f"fusion_weight must be in [0, 1], got {self.fusion_weight}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")


class CODERModel(nn.Module):
    """The CODER objective (Eq. 8) on top of two backbone towers, for :func:`xmr.train.fit`.

    ``image_backbone`` / ``text_backbone`` are :class:`xmr.encoders.Tower` s with an identity projection: they
    turn a batch's cached inputs into backbone features (finishing a trainable backbone top when they have one).
    The aggregators of Eq. (1) (``image_head``, ``text_head``) map those to v^I, w^I in R^F, and two more (the
    concept queries of Eq. 2) feed the concept branch. ``settings.aggregation`` picks them (the paper does not
    say which it uses): ``"mean"`` reads the pooled backbone features (the mean of the 7 x 7 grid, the masked mean
    of the tokens) with linear heads and the concept branch on the same pooled features; ``"gpo"`` gives each
    aggregator its own :class:`xmr.encoders.GPO` over the region/token features (sorted once per batch), followed
    by the linear head; this needs region/token inputs (B, L, D). The momentum copies of the instance
    aggregators produce the keys that fill the two queues (with a trainable backbone top the keys share the
    query backbone, detached: the momentum copy covers the aggregators only). ``concept_branch`` (Eq. 2) is
    optional.

    ``training_losses`` returns ``loss = lambda L_DCL^I + L_M-DCL^I + L_DCL^C + L_PGC`` and each term.
    ``encode_image`` / ``encode_text`` return ``[sqrt(beta) v^I, sqrt(1 - beta) v^C]`` (each part L2-normalised),
    so a dot product is the fused similarity ``beta S_instance + (1 - beta) S_concept`` (Sec. 3.5) and
    :class:`xmr.train.RetrievalValidator` scores it unchanged; without concepts it is ``v^I``.
    PGC needs :meth:`set_clustering_inputs` (the training split); :meth:`on_epoch_start` re-clusters. DCL uses
    cosine similarities (normalised features); the prototype head reads v^C, w^C as Eq. (7) writes them
    (unnormalised). ``exclude_same_image`` passes a batch's ``image_index`` as ids to every DCL term and to the
    queues.

    Under ``torchrun`` (:mod:`xmr.distributed`) the model gathers the global batch itself
    (``gathers_global_batch``): the backbone features and image ids of every rank are gathered right after the
    backbones, so every term, the momentum keys and the queues see the global batch, and each rank enqueues the
    same keys; k-means runs on every rank from the same (synchronised) parameters and rank 0's labels and
    centroids are broadcast, so the pseudo labels agree.
    """

    gathers_global_batch = True  # training_losses gathers the global batch (see xmr.distributed)

    def __init__(self, image_backbone: Tower, text_backbone: Tower, image_dim: int, text_dim: int,
                 settings: CODERSettings, concept_branch: ConceptBranch | None = None):
        super().__init__()
        if settings.concepts and concept_branch is None:
            raise ValueError("settings.concepts is True: pass a concept_branch (see build_concept_branch)")
        self.settings = settings
        self.image_backbone, self.text_backbone = image_backbone, text_backbone
        pooled = settings.aggregation == "mean"  # else "gpo": every aggregator reads presorted regions
        self.image_head = Tower(ProjectionHead(image_dim, settings.embed_dim),
                                pooling=None if pooled else GPO(presorted=True))  # g_vis -> v^I
        self.text_head = Tower(ProjectionHead(text_dim, settings.embed_dim),
                               pooling=None if pooled else GPO(presorted=True))  # g_text -> w^I
        # The concept queries' own aggregators (Sec. 3.2, "another group"); with "mean": the pooled features.
        self.image_concept_pooling = None if pooled else GPO(presorted=True)
        self.text_concept_pooling = None if pooled else GPO(presorted=True)
        self.dcl = DiversityContrastiveLoss(settings.mu, settings.gamma, settings.eps, settings.diversity,
                                            settings.bank_diversity, form=settings.form, ms_alpha=settings.ms_alpha,
                                            constant_diversity=settings.constant_diversity)
        if settings.memory_bank:
            self.image_key_head = momentum_encoder(self.image_head)  # momentum copies: keys for the queues
            self.text_key_head = momentum_encoder(self.text_head)
            self.image_queue = MomentumQueue(settings.queue_size, settings.embed_dim)  # B_v^I
            self.text_queue = MomentumQueue(settings.queue_size, settings.embed_dim)  # B_w^I
        self.concept_branch = concept_branch if settings.concepts else None
        if settings.prototypes:
            self.prototype_loss = PrototypeClassificationLoss(settings.embed_dim, settings.num_clusters)
        # (num_images,) pseudo labels, -1 until the first k-means; sized by set_clustering_inputs, so a checkpoint
        # loads into a model that was given the same training inputs.
        self.register_buffer("prototype_labels", torch.zeros(0, dtype=torch.long))
        # (K, F) the last k-means centroids: the next epoch's clustering starts from them once clustered is set.
        num_centroids = settings.num_clusters if settings.prototypes else 0
        self.register_buffer("prototype_centroids", torch.zeros(num_centroids, settings.embed_dim))
        self.register_buffer("clustered", torch.zeros((), dtype=torch.bool))
        self._clustering_inputs = None
        self.last_clustering: KMeansResult | None = None

    # --- encoding -------------------------------------------------------------------------------------------
    def _aggregator_inputs(self, tower: Tower, inputs: torch.Tensor,
                           mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.settings.aggregation == "mean":
            return tower(inputs, mask), None
        regions = tower.regions(inputs, mask)
        if regions.dim() != 3:
            raise ValueError("aggregation='gpo' reads region/token features (B, L, D), got pooled "
                             f"{tuple(regions.shape)}: load them with load_caption_inputs(..., regions=True)")
        return sort_regions(regions, mask)

    def image_backbone_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the image aggregators of Eq. (1)/(2) read: ``(features, mask)``. With ``"mean"`` aggregation the
        pooled backbone features (B, D) and None; with ``"gpo"`` the regions (B, L, D) sorted per dimension
        (:func:`xmr.encoders.sort_regions`; every GPO of the model reads them presorted) and their sorted mask."""
        return self._aggregator_inputs(self.image_backbone, images, None)

    def text_backbone_features(self, texts: torch.Tensor,
                               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the caption aggregators of Eq. (1)/(2) read: ``(features, mask)``, as
        :meth:`image_backbone_features` for the tokens (B, L, D) and their ``mask`` (B, L)."""
        return self._aggregator_inputs(self.text_backbone, texts, mask)

    @staticmethod
    def _concept_query(pooling: nn.Module | None, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return features if pooling is None else pooling(features, mask)

    def _fuse(self, instance: torch.Tensor, concept: torch.Tensor | None) -> torch.Tensor:
        instance = F.normalize(instance, dim=-1)
        if concept is None:
            return instance
        beta = self.settings.fusion_weight
        return torch.cat([beta ** 0.5 * instance, (1 - beta) ** 0.5 * F.normalize(concept, dim=-1)], dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        features, mask = self.image_backbone_features(images)
        concept = None
        if self.concept_branch is not None:
            query = self._concept_query(self.image_concept_pooling, features, mask)  # (B, D_image)
            concept = self.concept_branch.encode_image(query)
        return self._fuse(self.image_head(features, mask), concept)

    def encode_text(self, texts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        features, mask = self.text_backbone_features(texts, mask)
        concept = None
        if self.concept_branch is not None:
            query = self._concept_query(self.text_concept_pooling, features, mask)  # (B, D_text)
            concept = self.concept_branch.encode_text(query)
        return self._fuse(self.text_head(features, mask), concept)

    def encode_image_instances(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised instance features v^I (B, F) (no concepts)."""
        return F.normalize(self.image_head(*self.image_backbone_features(images)), dim=-1)

    def encode_text_instances(self, texts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised instance features w^I (B, F) (no concepts)."""
        return F.normalize(self.text_head(*self.text_backbone_features(texts, mask)), dim=-1)

    def encode_instances(self, images: torch.Tensor, texts: torch.Tensor,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised instance features v^I, w^I (B, F) of images and captions (no concepts)."""
        return self.encode_image_instances(images), self.encode_text_instances(texts, mask)

    # --- training -------------------------------------------------------------------------------------------
    def training_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        settings = self.settings
        # (B, D) pooled features, or (B, L, D) sorted regions/tokens with their masks (see image_backbone_features)
        image_features, image_mask = self.image_backbone_features(batch["image"])
        text_features, text_mask = self.text_backbone_features(batch["text"], batch.get("text_mask"))
        # The global batch under torchrun (every rank's rows, rank order; gradients scaled as in
        # xmr.distributed); unchanged in a single process. From here on B is the global batch.
        (image_features, text_features, image_mask, text_mask, image_index), _ = distributed.gather_loss_inputs(
            (image_features, text_features, image_mask, text_mask, batch.get("image_index")), {})
        image_instance = F.normalize(self.image_head(image_features, image_mask), dim=-1)  # v^I (B, F)
        text_instance = F.normalize(self.text_head(text_features, text_mask), dim=-1)  # w^I (B, F)
        losses = {}
        image_bank = text_bank = bank_ids = None
        if settings.memory_bank:
            with torch.no_grad():
                momentum_update(self.image_key_head, self.image_head, settings.momentum)
                momentum_update(self.text_key_head, self.text_head, settings.momentum)
                image_keys = F.normalize(self.image_key_head(image_features.detach(), image_mask), dim=-1)  # (B, F)
                text_keys = F.normalize(self.text_key_head(text_features.detach(), text_mask), dim=-1)  # (B, F)
            image_bank = self.image_queue.contents().to(image_instance.dtype)  # (Q, F)
            text_bank = self.text_queue.contents().to(image_instance.dtype)  # (Q, F)
            bank_ids = self.image_queue.ids()  # (Q,) the image index of each key (both queues move in step)
        pair_ids = image_index if settings.exclude_same_image else None  # (B,) or None
        pair_ids = pair_ids.to(image_instance.device) if pair_ids is not None else None
        if pair_ids is None:
            bank_ids = None
        instance = self.dcl(image_instance, text_instance, image_bank, text_bank, pair_ids, bank_ids)
        losses["dcl_instance"] = instance["loss"]
        total = settings.instance_weight * instance["loss"]
        if settings.memory_loss:
            memory = self.dcl.with_memory(image_instance, text_instance, image_keys.to(image_instance.dtype),
                                          text_keys.to(image_instance.dtype), image_bank, text_bank, pair_ids,
                                          bank_ids)
            losses["m_dcl"] = memory["loss"]
            total = total + memory["loss"]
        if self.concept_branch is not None:
            concepts = self.concept_branch.concept_features()  # Y (g, F), once per step
            image_query = self._concept_query(self.image_concept_pooling, image_features, image_mask)
            text_query = self._concept_query(self.text_concept_pooling, text_features, text_mask)
            image_concept = self.concept_branch.encode_image(image_query, concepts)  # v^C (B, F)
            text_concept = self.concept_branch.encode_text(text_query, concepts)  # w^C (B, F)
            concept = self.dcl(F.normalize(image_concept, dim=-1), F.normalize(text_concept, dim=-1),
                               pair_ids=pair_ids)  # cosine similarities
            losses["dcl_concept"] = concept["loss"]
            total = total + concept["loss"]
            if settings.prototypes and len(self.prototype_labels) > 0:
                labels = self.prototype_labels[image_index.to(self.prototype_labels.device)]  # (B,)
                if bool((labels >= 0).all()):  # -1: not clustered yet
                    prototype = self.prototype_loss(image_concept, text_concept, labels)  # P^C v^C, as Eq. (7)
                    losses["pgc"] = prototype["loss"]
                    total = total + prototype["loss"]
        if settings.memory_bank:  # after the losses: they read copies of the queues
            self.image_queue.enqueue(image_keys, image_index)
            self.text_queue.enqueue(text_keys, image_index)
        return {"loss": total, **losses}

    # --- prototypes (Eq. 7) -----------------------------------------------------------------------------------
    def set_clustering_inputs(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                              captions_per_image: int = 5) -> None:
        """The training split's cached inputs (images (N, ...), captions (N * captions_per_image, ...)), which
        :meth:`on_epoch_start` clusters; a batch's ``image_index`` picks its pseudo label."""
        if text.shape[0] != image.shape[0] * captions_per_image:
            raise ValueError(f"{image.shape[0]} images need {image.shape[0] * captions_per_image} captions")
        self._clustering_inputs = (image, text, text_mask, captions_per_image)
        if len(self.prototype_labels) != len(image):
            self.prototype_labels = torch.full((len(image),), -1, dtype=torch.long, device=self.prototype_labels.device)

    @torch.no_grad()
    def prototype_features(self, batch_size: int = 512) -> torch.Tensor:
        """Per training image, v^I + the mean w^I of its captions (N, F): what k-means clusters (Sec. 3.4)."""
        image, text, text_mask, per_image = self._clustering_inputs
        device = next(self.image_head.parameters()).device
        was_training = self.training
        self.eval()
        image_instance = encode(self.encode_image_instances, image, None, batch_size, device)  # (N, F)
        text_instance = encode(self.encode_text_instances, text, text_mask, batch_size, device)  # (N * 5, F)
        self.train(was_training)
        return image_instance + text_instance.view(len(image_instance), per_image, -1).mean(dim=1)

    def on_epoch_start(self, epoch: int) -> None:
        """Re-cluster the training set with the current instance features (PGC's "online" clustering, done once
        per epoch) and store the pseudo labels. The first clustering is seeded k-means++; later ones start from
        the previous centroids, so a cluster keeps its id (and the prototype head's row) across epochs."""
        if not self.settings.prototypes:
            return
        if self._clustering_inputs is None:
            raise RuntimeError("PGC needs the training inputs: call set_clustering_inputs(...) before fit")
        features = self.prototype_features()
        previous = self.prototype_centroids if bool(self.clustered) else None
        self.last_clustering = kmeans(features, self.settings.num_clusters, self.settings.kmeans_iterations,
                                      init=self.settings.kmeans_init, seed=self.settings.seed * 1_000 + epoch,
                                      initial_centroids=previous)
        self.prototype_labels = self.last_clustering.labels.to(features.device)
        self.prototype_centroids.copy_(self.last_clustering.centroids)
        distributed.broadcast_tensors(self.prototype_labels, self.prototype_centroids)  # rank 0's, under torchrun
        self.clustered.fill_(True)


def build_coder_model(settings: CODERSettings, captions: Sequence[str] | None = None,
                      image_dim: int | None = None, text_dim: int | None = None, image_top: int = 0,
                      text_top: int = 0, word_vectors: torch.Tensor | None = None, text_backbone=None) -> CODERModel:
    """A :class:`CODERModel` on the project's backbones, its concept branch mined from the training ``captions``
    when ``settings.concepts``. ``image_top`` / ``text_top`` > 0 train the backbones' top stages on the cached
    activations below them; the feature dims default to EfficientNet-Lite0 / MiniLM's (what those tops output)."""
    from ..encoders import IMAGE_FEATURE_DIM, TEXT_FEATURE_DIM, ImageBackbone, TextBackbone

    image_dim, text_dim = image_dim or IMAGE_FEATURE_DIM, text_dim or TEXT_FEATURE_DIM
    branch = None
    if settings.concepts:
        if captions is None:
            raise ValueError("the concept branch is mined from the training captions: pass captions=")
        branch, _ = build_concept_branch(captions, image_dim, text_dim, settings.embed_dim, settings.num_concepts,
                                         settings.concept_threshold, settings.smoothness, word_vectors, text_backbone)
    image_upper = ImageBackbone(trainable_top=image_top) if image_top else None
    text_upper = TextBackbone(trainable_top=text_top) if text_top else None
    return CODERModel(Tower(nn.Identity(), image_upper), Tower(nn.Identity(), text_upper), image_dim, text_dim,
                      settings, branch)


def run_coder(settings: CODERSettings, config: TrainConfig, train: CaptionInputs, validation: CaptionInputs,
              test: CaptionInputs, captions: Sequence[str], word_vectors: torch.Tensor | None = None,
              caption_choice: str = "all", image_top: int = 0, text_top: int = 0) -> Outcome:
    """Build a CODER model (seeded by ``config.seed``, which also seeds k-means), train it on ``train`` with
    :func:`xmr.train.fit` on Eq. (8) (``caption_choice="all"``: an epoch over every caption; ``"random"``: one
    caption per image per epoch), restore the best validation epoch and evaluate it on ``test`` with the fused
    similarity (Sec. 3.5). The inputs are what :func:`xmr.features.load_caption_inputs` gives for ``image_top`` /
    ``text_top`` (> 0: the backbones' top stages are trained too, on the cached activations below them).
    ``captions`` are the training captions the concepts are mined from; ``word_vectors`` their precomputed vectors
    (see :func:`concept_word_vectors`), shared between runs. The outcome's parameters are the settings (with the
    config's seed), the config, ``caption_choice``, ``image_top`` and ``text_top``."""
    torch.manual_seed(config.seed)
    settings = dataclasses.replace(settings, seed=config.seed)
    image_dim = None if image_top else train.image.shape[-1]  # frozen inputs: their own dims
    text_dim = None if text_top else train.text.shape[-1]
    model = build_coder_model(settings, captions, image_dim, text_dim, image_top, text_top,
                              word_vectors=word_vectors)
    if settings.prototypes:
        model.set_clustering_inputs(train.image, train.text, train.text_mask, train.captions_per_image)
    pairs = PairedFeatures(train.image, train.text, train.text_mask, train.captions_per_image,
                           caption_choice=caption_choice, seed=config.seed)
    training = fit(model, pairs, config, validate=RetrievalValidator.for_split(validation))
    test_metrics, per_query = evaluate_retrieval_per_query(model, test)
    parameters = {**dataclasses.asdict(settings), **dataclasses.asdict(config), "caption_choice": caption_choice,
                  "image_top": image_top, "text_top": text_top}
    return Outcome(model, parameters, {"train": training}, test_metrics, per_query,
                   count_trainable_parameters(model), str(config.resolved_device()))
