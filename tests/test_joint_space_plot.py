"""xmr.plots.plot_joint_space_tsne (icone2024 Figs. 4-5): one panel per space, every point drawn, the silhouette
in the title."""
import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
import torch  # noqa: E402

from xmr.metrics import joint_space_silhouette  # noqa: E402
from xmr.plots import plot_joint_space_tsne  # noqa: E402


def test_joint_space_tsne_draws_every_point_and_titles_the_silhouette(generator):
    pytest.importorskip("sklearn")
    centres = torch.randn(3, 8, generator=generator) * 5
    tight = (centres, centres.repeat_interleave(5, dim=0) + 0.01 * torch.randn(15, 8, generator=generator))
    mixed = (torch.randn(3, 8, generator=generator), torch.randn(15, 8, generator=generator))
    figure = plot_joint_space_tsne({"tight": tight, "mixed": mixed})
    axes = [axis for axis in figure.axes if axis.collections]
    assert len(axes) == 2
    for axis, (image, text) in zip(axes, (tight, mixed)):
        assert sum(len(points.get_offsets()) for points in axis.collections) == 3 + 15  # o per image, x per caption
        assert f"{joint_space_silhouette(image, text):.2f}" in axis.get_title()
