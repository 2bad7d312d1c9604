"""shi2024's Eq. (5), R@K = relevant items in the top K / all relevant items (xmr.metrics.relevant_fraction_recall),
against a naive loop: sort each query's gallery, other items before relevant ones at equal scores (pessimistic
ties), and count the relevant items in the first K."""
import pytest
import torch

from xmr.metrics import relevant_fraction_per_image, relevant_fraction_recall, retrieval_metrics


def naive_eq5(sims, captions_per_image, cutoffs=(1, 5, 10)):
    n_images, n_captions = sims.shape
    metrics = {}
    for k in cutoffs:
        i2t = []
        for image in range(n_images):
            relevant = set(range(image * captions_per_image, (image + 1) * captions_per_image))
            order = sorted(range(n_captions), key=lambda j: (-float(sims[image, j]), j in relevant))
            i2t.append(sum(j in relevant for j in order[:k]) / len(relevant))
        t2i = []
        for caption in range(n_captions):
            order = sorted(range(n_images), key=lambda i: (-float(sims[i, caption]),
                                                         i == caption // captions_per_image))
            t2i.append(float(caption // captions_per_image in order[:k]))
        metrics[f"i2t_r{k}"] = 100.0 * sum(i2t) / len(i2t)
        metrics[f"t2i_r{k}"] = 100.0 * sum(t2i) / len(t2i)
    metrics["rsum"] = sum(metrics.values())
    return metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("captions_per_image", [1, 3, 5])
def test_matches_a_naive_loop(dtype, captions_per_image):
    generator = torch.Generator().manual_seed(captions_per_image)
    sims = torch.randn(13, 13 * captions_per_image, generator=generator, dtype=dtype)
    metrics, query_means = relevant_fraction_recall(sims, captions_per_image, chunk_size=4)
    assert metrics == pytest.approx(naive_eq5(sims, captions_per_image))
    for key, values in query_means.items():
        assert sum(values) / len(values) == pytest.approx(metrics[key])


def test_ties_are_pessimistic_and_match_the_loop():
    sims = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 1.0],  # image 0: its captions 0-1 tie with captions 2, 4, 5
                         [0.5, 0.5, 0.2, 0.2, 0.9, 0.1],
                         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # all equal: the worst case
    metrics, _ = relevant_fraction_recall(sims, captions_per_image=2)
    assert metrics == pytest.approx(naive_eq5(sims, 2))
    units = relevant_fraction_per_image(sims, captions_per_image=2, cutoffs=(1, 4, 5))
    # image 0: three other captions score as high as its own, so its two sit at positions 3 and 4
    assert units["i2t_r1"].tolist() == [0.0, 0.0, 0.0]
    assert units["i2t_r4"][0] == 50.0 and units["i2t_r5"][0] == 100.0
    assert units["i2t_r5"][2] == 50.0 and units["i2t_r4"][2] == 0.0  # image 2: positions 4 and 5


def test_hand_computed_case_differs_from_the_hit_rate_for_i2t_only():
    # image 0 ranks captions 0, 2, 1, 3: one of its two captions in the top 1, both in the top 3
    sims = torch.tensor([[0.9, 0.5, 0.7, 0.1],
                         [0.1, 0.2, 0.8, 0.9]])  # image 1 ranks 3, 2 first: both of its captions on top
    units = relevant_fraction_per_image(sims, captions_per_image=2, cutoffs=(1, 2, 3))
    assert units["i2t_r1"].tolist() == [50.0, 50.0]
    assert units["i2t_r2"].tolist() == [50.0, 100.0]
    assert units["i2t_r3"].tolist() == [100.0, 100.0]
    hit_rate = retrieval_metrics(sims, captions_per_image=2)
    metrics, _ = relevant_fraction_recall(sims, captions_per_image=2)
    assert hit_rate["i2t_r1"] == 100.0 and metrics["i2t_r1"] == 50.0
    for key in ("t2i_r1", "t2i_r5", "t2i_r10"):
        assert metrics[key] == pytest.approx(hit_rate[key])


def test_one_caption_per_image_is_the_hit_rate():
    sims = torch.randn(20, 20, generator=torch.Generator().manual_seed(0))
    metrics, _ = relevant_fraction_recall(sims, captions_per_image=1)
    hit_rate = retrieval_metrics(sims, captions_per_image=1)
    assert {key: metrics[key] for key in metrics} == pytest.approx({key: hit_rate[key] for key in metrics})


def test_chunking_does_not_change_the_result():
    sims = torch.randn(17, 85, generator=torch.Generator().manual_seed(3))
    one, _ = relevant_fraction_recall(sims, 5, chunk_size=1)
    all_at_once, _ = relevant_fraction_recall(sims, 5, chunk_size=100)
    assert one == pytest.approx(all_at_once)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        relevant_fraction_recall(torch.randn(3, 7), captions_per_image=5)
    with pytest.raises(ValueError):
        relevant_fraction_recall(torch.tensor([[float("nan"), 0.0]]), captions_per_image=2)
