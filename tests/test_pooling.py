"""Pooling of region/token features: sort_regions and GPO (VSE-infinity) against plain loops, and Tower's pooling."""
import pytest
import torch

from xmr.encoders import GPO, ProjectionHead, Tower, masked_mean, positional_encoding, sort_regions


@pytest.fixture
def regions():
    """(5, 7, 3) features, sets of 7, 3, 1, 5 and 7 positions; the fourth set's mask is not a prefix."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(5, 7, 3, generator=generator)
    mask = torch.arange(7) < torch.tensor([7, 3, 1, 5, 7])[:, None]
    mask[3] = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    return features, mask


def reference_gpo(features, mask, theta):
    """sum_k theta[b, k] * (k-th largest of the valid values of dimension d), with Python's sorted()."""
    pooled = torch.zeros(features.shape[0], features.shape[2], dtype=torch.float64)
    for b in range(features.shape[0]):
        for d in range(features.shape[2]):
            values = sorted((float(features[b, r, d]) for r in range(features.shape[1]) if mask[b, r]), reverse=True)
            pooled[b, d] = sum(float(theta[b, k]) * value for k, value in enumerate(values))
    return pooled


def test_sort_regions_orders_each_dimension_and_puts_the_padding_last(regions):
    features, mask = regions
    values, sorted_mask = sort_regions(features, mask)
    counts = mask.sum(dim=1)
    assert torch.equal(sorted_mask, torch.arange(7) < counts[:, None])
    for b in range(5):
        for d in range(3):
            expected = sorted(features[b, mask[b], d].tolist(), reverse=True) + [0.0] * (7 - int(counts[b]))
            assert values[b, :, d].tolist() == pytest.approx(expected)


def test_sort_regions_numpy_and_torch_paths_agree_and_the_torch_path_carries_gradients(regions):
    features, mask = regions
    leaf = features.clone().requires_grad_()
    with_grad, _ = sort_regions(leaf, mask)  # torch.sort
    torch.testing.assert_close(with_grad.detach(), sort_regions(features, mask)[0])  # numpy
    with_grad[:, 0].sum().backward()  # the gradient of each dimension's max lands on its arg-max
    assert torch.equal(leaf.grad.sum(dim=1), torch.ones(5, 3))


def test_sorted_inputs_are_recognised_and_returned_unchanged(regions):
    features, mask = regions
    once, once_mask = sort_regions(features, mask)
    twice, twice_mask = sort_regions(once, once_mask)
    assert torch.equal(twice, once) and torch.equal(twice_mask, once_mask)
    swapped = once.clone()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]  # one pair out of order: sorted again
    assert torch.equal(sort_regions(swapped, once_mask)[0], once)


def test_gpo_matches_the_loop_reference_and_its_weights_are_a_distribution_per_set(regions):
    features, mask = regions
    torch.manual_seed(0)
    gpo = GPO()
    lengths = mask.sum(dim=1)
    theta = gpo.weights(lengths, 7).detach()
    torch.testing.assert_close(theta.sum(dim=1), torch.ones(5))
    assert float(theta[torch.arange(7) >= lengths[:, None]].abs().max()) == 0.0
    torch.testing.assert_close(gpo(features, mask).double(), reference_gpo(features, mask, theta))


def test_gpo_weights_depend_only_on_the_set_size():
    """Packing: the backward GRU direction starts at each set's own last position, not at the padding."""
    torch.manual_seed(0)
    gpo = GPO()
    mixed = gpo.weights(torch.tensor([3, 7, 5]), 7)
    torch.testing.assert_close(mixed[0, :3], gpo.weights(torch.tensor([3]), 3)[0])
    torch.testing.assert_close(mixed[2, :5], gpo.weights(torch.tensor([5]), 5)[0])
    torch.testing.assert_close(mixed[1], gpo.weights(torch.tensor([7]), 7)[0])  # the unpacked fast path


def test_gpo_with_uniform_scores_is_the_masked_mean(regions):
    features, mask = regions
    gpo = GPO()
    with torch.no_grad():
        gpo.score.weight.zero_()
    torch.testing.assert_close(gpo(features, mask), masked_mean(features, mask))


def test_presorted_gpo_equals_gpo_on_the_raw_regions_and_gradients_reach_the_gru(regions):
    features, mask = regions
    torch.manual_seed(0)
    gpo = GPO()
    presorted = GPO(presorted=True)
    presorted.load_state_dict(gpo.state_dict())
    torch.testing.assert_close(presorted(*sort_regions(features, mask)), gpo(features, mask))
    gpo(features, mask).pow(2).sum().backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in gpo.parameters())


def test_positional_encoding_is_the_sinusoid():
    encoding = positional_encoding(4, 6)
    assert encoding.shape == (4, 6)
    torch.testing.assert_close(encoding[2, 0], torch.sin(torch.tensor(2.0)))
    torch.testing.assert_close(encoding[3, 3], torch.cos(torch.tensor(3.0 / 10000 ** (2 / 6))))
    with pytest.raises(ValueError, match="even"):
        positional_encoding(4, 5)


def test_tower_pools_regions_with_its_pooling_before_the_projection(regions):
    features, mask = regions
    torch.manual_seed(0)
    projection, gpo = ProjectionHead(3, 2), GPO()
    torch.testing.assert_close(Tower(projection, pooling=gpo)(features, mask), projection(gpo(features, mask)))
    torch.testing.assert_close(Tower(projection)(features, mask), projection(masked_mean(features, mask)))
    pooled = torch.randn(5, 3)  # pooled inputs skip the pooling
    torch.testing.assert_close(Tower(projection, pooling=gpo)(pooled), projection(pooled))
