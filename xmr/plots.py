"""Figures the notebooks share: training curves, sweeps with seed spread, retrieval examples, a t-SNE of a joint
space."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from .data import load_image
from .metrics import joint_space_silhouette


def plot_training_curves(histories: Mapping[str, Sequence[dict]], metrics: Sequence[str] = ("train_loss", "val_rsum"),
                         titles: Sequence[str] | None = None):
    """One panel per metric, one line per run; ``histories`` maps a label to a :class:`~xmr.train.TrainResult`
    history."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for axis, metric, title in zip(axes[0], metrics, titles or metrics):
        for label, history in histories.items():
            rows = [row for row in history if metric in row]
            axis.plot([row["epoch"] for row in rows], [row[metric] for row in rows], marker="o", ms=3, label=label)
        axis.set(xlabel="epoch", title=title)
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sweep(frame, x: str, metrics: Sequence[str], hue: str | None = None, logx: bool = False,
               reference: Mapping[str, Mapping] | None = None, title: str = ""):
    """Mean and min-max band over seeds of each metric against ``x`` (a pandas frame, one row per run).

    ``reference`` optionally maps a metric to ``{x: value}`` printed by the paper, drawn dashed on a twin axis
    (the paper's numbers are on another dataset: compare shapes, not heights).
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.4), squeeze=False)
    groups = frame.groupby(hue) if hue else [(None, frame)]
    for axis, metric in zip(axes[0], metrics):
        for label, group in groups:
            summary = group.groupby(x)[metric].agg(["mean", "min", "max"]).sort_index()
            axis.plot(summary.index, summary["mean"], marker="o", label=label if hue else "ours")
            axis.fill_between(summary.index, summary["min"], summary["max"], alpha=0.2)
        if reference and metric in reference:
            twin = axis.twinx()
            points = sorted(reference[metric].items())
            twin.plot([p[0] for p in points], [p[1] for p in points], "k--", marker="x", label="paper")
            twin.set_ylabel("paper (COCO 5K)", fontsize=8)
            twin.legend(loc="lower right", fontsize=8)
        if logx:
            axis.set_xscale("log", base=2)
        axis.set(xlabel=x, ylabel=metric)
        axis.grid(alpha=0.3)
    if hue:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_text_to_image(query: str, image_paths: Sequence, ranked: Sequence[int], true_images: Sequence[int] = (),
                       top_k: int = 5):
    """The query caption above its top-k images; a ground-truth image gets a thick green frame."""
    fig, axes = plt.subplots(1, top_k, figsize=(2.4 * top_k, 2.9))
    for rank, (axis, index) in enumerate(zip(axes, ranked[:top_k]), start=1):
        axis.imshow(load_image(image_paths[index]))
        correct = index in set(true_images)
        axis.set_title(f"{rank}" + (" (true)" if correct else ""), color="green" if correct else "black")
        axis.set_xticks([]), axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set(edgecolor="green" if correct else "lightgray", linewidth=5 if correct else 1)
    fig.suptitle("\n".join(textwrap.wrap(f'"{query}"', 90)), fontsize=10)
    fig.tight_layout()
    return fig


def show_image_to_text(image_path, captions: Sequence[str], ranked: Sequence[int], true_captions: Sequence[int] = (),
                       top_k: int = 5):
    """The query image beside its top-k captions; ground-truth captions in bold green."""
    fig, (image_axis, text_axis) = plt.subplots(1, 2, figsize=(11, 2.8), gridspec_kw={"width_ratios": [1, 3.2]})
    image_axis.imshow(load_image(image_path))
    image_axis.axis("off")
    text_axis.axis("off")
    truth = set(true_captions)
    for rank, index in enumerate(ranked[:top_k]):
        correct = index in truth
        line = "\n   ".join(textwrap.wrap(captions[index], 80))
        text_axis.text(0, 1 - rank / top_k, f"{rank + 1}. {line}", va="top", fontsize=9,
                       color="green" if correct else "black", fontweight="bold" if correct else "normal")
    fig.tight_layout()
    return fig


def top_k_indices(scores, k: int = 5) -> list[int]:
    """Indices of the k highest scores (a 1-D tensor or array), best first."""
    return [int(i) for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]]


def plot_joint_space_tsne(panels: Mapping[str, tuple[torch.Tensor, torch.Tensor]], captions_per_image: int = 5,
                          seed: int = 0, perplexity: float = 15.0):
    """One t-SNE panel per entry of ``panels`` (title -> (image_features (N, D), text_features (N*k, D))).

    Colour = instance group (an image and its captions), marker = modality (o image, x caption), as in icone2024
    Figs. 4-5. Each title adds the groups' :func:`xmr.metrics.joint_space_silhouette` in the joint space itself
    (cosine, before t-SNE). Returns the figure.
    """
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    colours = plt.get_cmap("tab20")
    for axis, (title, (image_features, text_features)) in zip(axes[0], panels.items()):
        num_images = len(image_features)
        groups = np.concatenate([np.arange(num_images), np.arange(len(text_features)) // captions_per_image])
        points = F.normalize(torch.cat([image_features.float(), text_features.float()]).cpu(), dim=-1).numpy()
        silhouette = joint_space_silhouette(image_features, text_features, captions_per_image)
        embedded = TSNE(n_components=2, perplexity=min(perplexity, (len(points) - 1) / 3), init="pca",
                        random_state=seed).fit_transform(points)
        for group in range(num_images):
            colour = colours(group % 20)
            captions = num_images + np.flatnonzero(groups[num_images:] == group)
            axis.scatter(*embedded[group], color=colour, marker="o", s=70, edgecolors="black", linewidths=0.6)
            axis.scatter(embedded[captions, 0], embedded[captions, 1], color=colour, marker="x", s=30)
        axis.set_title(f"{title}\nsilhouette of the groups: {silhouette:.2f}", fontsize=10)
        axis.set_xticks([]), axis.set_yticks([])
    handles = [plt.Line2D([], [], color="gray", marker="o", linestyle="", markeredgecolor="black", label="image"),
               plt.Line2D([], [], color="gray", marker="x", linestyle="", label="caption")]
    axes[0][-1].legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
