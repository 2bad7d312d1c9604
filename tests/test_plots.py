"""Figures draw what they claim: one line per run, the true item marked, ranks in score order."""
import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402

from xmr.data import make_synthetic_image_captions  # noqa: E402
from xmr.plots import plot_sweep, plot_training_curves, show_image_to_text, show_text_to_image, top_k_indices  # noqa: E402


def test_training_curves_one_line_per_run():
    histories = {"a": [{"epoch": 1, "train_loss": 2.0, "val_rsum": 10},
                       {"epoch": 2, "train_loss": 1.0, "val_rsum": 20}],
                 "b": [{"epoch": 1, "train_loss": 3.0, "val_rsum": 5}]}
    figure = plot_training_curves(histories)
    assert [len(axis.lines) for axis in figure.axes] == [2, 2]


def test_sweep_mean_over_seeds_and_paper_reference():
    frame = pd.DataFrame({"size": [64, 64, 128, 128], "seed": [0, 1, 0, 1], "rsum": [10.0, 20.0, 30.0, 50.0],
                          "loss": ["x"] * 4})
    figure = plot_sweep(frame, "size", ["rsum"], hue="loss", reference={"rsum": {64: 1.0, 128: 2.0}})
    ours = figure.axes[0].lines[0]
    assert list(ours.get_ydata()) == [15.0, 40.0]
    assert len(figure.axes) == 2  # the paper's curve on a twin axis


def test_retrieval_examples_mark_the_truth(tmp_path):
    split = make_synthetic_image_captions(tmp_path, num_images=6)
    figure = show_text_to_image(split.captions[0], split.image_paths, ranked=[3, 0, 1, 2, 4], true_images=[0])
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == ["1", "2 (true)", "3", "4", "5"]
    figure = show_image_to_text(split.image_paths[0], split.captions, ranked=[7, 0, 1, 9, 2], true_captions=range(5))
    colours = [text.get_color() for text in figure.axes[1].texts]
    assert colours == ["black", "green", "green", "black", "green"]
    assert top_k_indices([0.1, 0.9, 0.5, 0.9], k=3) == [1, 3, 2]
