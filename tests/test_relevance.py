"""Flickr8k's human relevance judgements: the loaders (fake files and the real ones) and the metrics built on them,
each against a plain-loop reference (and scipy's Kendall tau-b)."""
import math
import re

import pytest
import torch
from scipy import stats

from xmr.claims import metric_from_caption_ranks
from xmr.data import (
    CaptionInputs,
    CrowdJudgements,
    DatasetFormatError,
    ExpertJudgements,
    load_crowd_judgements,
    load_expert_judgements,
    load_flickr8k,
)
from xmr.metrics import (
    extended_r_precision,
    extended_ranks,
    human_relevance_evaluation,
    judged_kendall_tau,
    retrieval_ranks,
    share_of_errors_judged_relevant,
)

CAPTIONS = 5


# ---------------------------------------------------------------------------------------------------------------
# Plain-loop references
# ---------------------------------------------------------------------------------------------------------------

def positives_of(n_images, extra, cpi=CAPTIONS):
    """({image: set of positive captions}, {caption: set of positive images})."""
    by_image = {i: set(range(i * cpi, (i + 1) * cpi)) for i in range(n_images)}
    by_caption = {j: {j // cpi} for j in range(n_images * cpi)}
    for i, j in extra:
        by_image[i].add(j)
        by_caption[j].add(i)
    return by_image, by_caption


def naive_rank(scores, positives):
    best = max(scores[p] for p in positives)
    return sum(1 for g, s in enumerate(scores) if g not in positives and s >= best)


def naive_r_precision(scores, positives):
    # the pessimistic order written out: descending score, negatives before positives of the same score
    order = sorted(range(len(scores)), key=lambda g: (-scores[g], g in positives))
    return sum(1 for g in order[:len(positives)] if g in positives) / len(positives)


def naive_extended(sims, extra, cpi=CAPTIONS):
    rows = sims.tolist()
    by_image, by_caption = positives_of(len(rows), extra, cpi)
    columns = [list(column) for column in zip(*rows)]
    return ([naive_rank(rows[i], by_image[i]) for i in range(len(rows))],
            [naive_rank(columns[j], by_caption[j]) for j in range(len(columns))],
            [naive_r_precision(rows[i], by_image[i]) for i in range(len(rows))],
            [naive_r_precision(columns[j], by_caption[j]) for j in range(len(columns))])


def naive_tau_b(x, y):
    concordant = discordant = untied_x = untied_y = 0
    for a in range(len(x)):
        for b in range(a + 1, len(x)):
            dx, dy = (x[a] > x[b]) - (x[a] < x[b]), (y[a] > y[b]) - (y[a] < y[b])
            concordant += dx * dy > 0
            discordant += dx * dy < 0
            untied_x += dx != 0
            untied_y += dy != 0
    if untied_y == 0:
        return math.nan
    if untied_x == 0:
        return 0.0
    return (concordant - discordant) / math.sqrt(untied_x * untied_y)


def naive_errors(sims, pairs, relevant, cpi=CAPTIONS):
    """{image: (relevant, judged)} for the error queries only."""
    judged_pairs = set(pairs)
    relevant_pairs = {pair for pair, flag in zip(pairs, relevant) if flag}
    result = {}
    for i, row in enumerate(sims.tolist()):
        own = set(range(i * cpi, (i + 1) * cpi))
        best_own = max(row[j] for j in own)
        others = [j for j in range(len(row)) if j not in own]
        best_other = max(row[j] for j in others)
        if best_other < best_own:
            continue
        top = [j for j in others if row[j] == best_other]
        result[i] = (all((i, j) in relevant_pairs for j in top), all((i, j) in judged_pairs for j in top))
    return result


def make_expert(n_images, pairs, scores):
    scores = torch.tensor(scores, dtype=torch.int64).reshape(-1, 3)
    return ExpertJudgements(source=None, split="test", num_images=n_images, captions_per_image=CAPTIONS,
                            image_index=torch.tensor([p[0] for p in pairs], dtype=torch.int64),
                            caption_index=torch.tensor([p[1] for p in pairs], dtype=torch.int64),
                            num_outside_split=0, scores=scores,
                            mean_score=scores.sum(1).to(torch.float64) / 3)


def make_crowd(n_images, pairs, yes, no):
    yes, no = torch.tensor(yes), torch.tensor(no)
    return CrowdJudgements(source=None, split="test", num_images=n_images, captions_per_image=CAPTIONS,
                           image_index=torch.tensor([p[0] for p in pairs], dtype=torch.int64),
                           caption_index=torch.tensor([p[1] for p in pairs], dtype=torch.int64),
                           num_outside_split=0, yes_proportion=yes.double() / (yes + no).double(),
                           yes_count=yes, no_count=no)


def random_case(seed, n_images=7, n_pairs=40, levels=4):
    """Sims with many ties (integer levels), and random judged pairs with expert scores (repeats removed)."""
    generator = torch.Generator().manual_seed(seed)
    sims = torch.randint(0, levels, (n_images, n_images * CAPTIONS), generator=generator).to(torch.float32)
    images = torch.randint(0, n_images, (n_pairs,), generator=generator).tolist()
    captions = torch.randint(0, n_images * CAPTIONS, (n_pairs,), generator=generator).tolist()
    pairs = list(dict.fromkeys(zip(images, captions)))
    scores = torch.randint(1, 5, (len(pairs), 3), generator=generator)
    return sims, pairs, make_expert(n_images, pairs, scores.tolist())


# ---------------------------------------------------------------------------------------------------------------
# Extended-positive ranks and R-precision
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extended_ranks_and_r_precision_match_naive_loops(seed, dtype):
    sims, pairs, _ = random_case(seed, levels=3 if seed % 2 else 1000)
    sims = sims.to(dtype)
    expected = naive_extended(sims, pairs)
    i2t, t2i = extended_ranks(sims, pairs)
    assert i2t.dtype == t2i.dtype == torch.int64
    assert i2t.tolist() == expected[0] and t2i.tolist() == expected[1]
    i2t_precision, t2i_precision = extended_r_precision(sims, torch.tensor(pairs))
    assert i2t_precision.dtype == torch.float64
    assert i2t_precision.tolist() == pytest.approx(expected[2], abs=1e-12)
    assert t2i_precision.tolist() == pytest.approx(expected[3], abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_extended_ranks_without_extra_positives_are_retrieval_ranks(ties):
    sims, _, _ = random_case(3, n_images=9, levels=3 if ties else 10**6)
    for empty in ([], torch.zeros(0, 2, dtype=torch.int64)):
        got = extended_ranks(sims, empty)
        reference = retrieval_ranks(sims)
        assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])


def test_extended_chunked_equals_unchunked():
    sims, pairs, _ = random_case(4, n_images=11, n_pairs=80)
    whole = extended_ranks(sims, pairs) + extended_r_precision(sims, pairs)
    chunked = extended_ranks(sims, pairs, chunk_size=2) + extended_r_precision(sims, pairs, chunk_size=3)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_extended_hand_case():
    # 2 images, 2 captions each; image 0 is judged relevant to caption 2 (of image 1)
    sims = torch.tensor([[0.1, 0.2, 0.9, 0.2],
                         [0.5, 0.3, 0.4, 0.6]])
    i2t, t2i = extended_ranks(sims, [(0, 2)], captions_per_image=2)
    # image 0: positives {0, 1, 2}, best 0.9 -> rank 0 (it would be 2 without the extra pair)
    # image 1: positives {2, 3}, best 0.6 -> rank 0
    assert i2t.tolist() == [0, 0]
    assert retrieval_ranks(sims, captions_per_image=2)[0].tolist() == [2, 0]
    # caption 2: positives {image 0, image 1} -> rank 0; caption 1: image 1 scores 0.3 >= 0.2 -> rank 1
    assert t2i.tolist() == [1, 1, 0, 0]
    i2t_precision, t2i_precision = extended_r_precision(sims, [(0, 2)], captions_per_image=2)
    # image 0, R = 3: pessimistic order 2 (0.9), 3 (0.2, negative first), 1 (0.2), ... -> 2 of 3
    assert i2t_precision.tolist() == pytest.approx([2 / 3, 0.5])  # image 1, R = 2: captions 3 (0.6), 0 (0.5)
    assert t2i_precision.tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])


def test_extended_ties_are_pessimistic():
    sims = torch.zeros(3, 3 * CAPTIONS)
    extra = [(0, 7)]
    i2t, t2i = extended_ranks(sims, extra)
    # all equal: every negative counts
    assert i2t.tolist() == [3 * CAPTIONS - 6, 3 * CAPTIONS - 5, 3 * CAPTIONS - 5]
    assert t2i.tolist() == [2] * 7 + [1] + [2] * 7
    i2t_precision, t2i_precision = extended_r_precision(sims, extra)
    assert i2t_precision.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("extra, message", [
    ([(0, 15)], "caption indices outside"),
    ([(-1, 0)], "image indices outside"),
    ([(0.0, 1.0)], "integer"),
    ([(0, 1, 2)], r"\(E, 2\)"),
])
def test_extended_rejects_bad_pairs(extra, message):
    with pytest.raises(ValueError, match=message):
        extended_ranks(torch.zeros(3, 15), extra)


def test_extended_rejects_non_finite():
    sims = torch.zeros(2, 10)
    sims[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        extended_r_precision(sims, [])


# ---------------------------------------------------------------------------------------------------------------
# Kendall tau-b
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_judged_tau_matches_naive_loop_and_scipy(seed):
    sims, pairs, expert = random_case(seed, n_images=8, n_pairs=60, levels=3)
    tau = judged_kendall_tau(sims, expert)
    assert tau.dtype == torch.float64 and tau.shape == (8,)
    human = dict(zip(pairs, expert.mean_score.tolist()))
    defined = 0
    for i in range(8):
        judged = [j for (image, j) in pairs if image == i]
        x = [float(sims[i, j]) for j in judged]
        y = [human[i, j] for j in judged]
        expected = naive_tau_b(x, y) if len(judged) >= 2 else math.nan
        if math.isnan(expected):
            assert math.isnan(tau[i])
            continue
        assert float(tau[i]) == pytest.approx(expected, abs=1e-12)
        if len(set(x)) > 1:
            defined += 1
            assert float(tau[i]) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic, abs=1e-12)
    assert defined > 0
    # chunking does not change anything
    assert torch.equal(judged_kendall_tau(sims, expert, chunk_size=1).isnan(), tau.isnan())
    assert torch.allclose(judged_kendall_tau(sims, expert, chunk_size=1).nan_to_num(), tau.nan_to_num())


def test_judged_tau_hand_cases():
    # image 0: 3 judged captions, model order agrees with humans -> 1; image 1: reversed -> -1;
    # image 2: one judged caption -> NaN; image 3: humans tie everything -> NaN; image 4: model ties -> 0
    pairs = [(0, 3), (0, 8), (0, 12), (1, 0), (1, 9), (2, 1), (3, 2), (3, 4), (4, 5), (4, 6)]
    scores = [[1, 1, 1], [2, 2, 3], [4, 4, 4], [1, 2, 1], [3, 3, 3], [4, 4, 4], [2, 2, 2], [2, 2, 2],
              [1, 1, 1], [4, 4, 4]]
    expert = make_expert(5, pairs, scores)
    sims = torch.zeros(5, 25)
    sims[0, 3], sims[0, 8], sims[0, 12] = 0.1, 0.2, 0.3
    sims[1, 0], sims[1, 9] = 0.9, 0.1
    tau = judged_kendall_tau(sims, expert)
    assert tau[:2].tolist() == [1.0, -1.0]
    assert math.isnan(tau[2]) and math.isnan(tau[3])
    assert tau[4].item() == 0.0
    # with ties on both sides: x = (1, 1, 2), y = (1, 2, 2): C = 1, D = 0, n0 = 3, n1 = n2 = 1 -> 1 / 2
    expert = make_expert(1, [(0, 0), (0, 1), (0, 2)], [[1] * 3, [2] * 3, [2] * 3])
    assert judged_kendall_tau(torch.tensor([[1.0, 1.0, 2.0, 0.0, 0.0]]), expert).item() == pytest.approx(0.5)
    assert stats.kendalltau([1, 1, 2], [1, 2, 2], variant="b").statistic == pytest.approx(0.5)
    expected = stats.kendalltau([1, 2, 1], [1, 2, 2], variant="b").statistic
    assert judged_kendall_tau(torch.tensor([[1.0, 2.0, 1.0, 0.0, 0.0]]), expert).item() == pytest.approx(expected)


def test_judged_tau_rejects_mismatched_sims():
    _, _, expert = random_case(0, n_images=7)
    with pytest.raises(ValueError, match="do not fit sims"):
        judged_kendall_tau(torch.zeros(6, 30), expert)


def test_judged_tau_of_crowd_uses_yes_proportion():
    crowd = make_crowd(2, [(0, 0), (0, 6), (0, 7)], yes=[3, 1, 2], no=[0, 2, 1])
    sims = torch.zeros(2, 10)
    sims[0, 0], sims[0, 6], sims[0, 7] = 0.3, 0.1, 0.2
    assert judged_kendall_tau(sims, crowd)[0].item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# Share of errors judged relevant
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [None, 2.0])
def test_share_of_errors_matches_naive_loop(seed, threshold):
    sims, pairs, _ = random_case(seed, n_images=8, n_pairs=60, levels=3 if seed % 2 else 1000)
    # judge every caption at each image's top score too (all of a tie), so that judged top-1 errors occur
    on_top = (sims == sims.amax(dim=1, keepdim=True)).nonzero().tolist()
    pairs = list(dict.fromkeys(pairs + [(i, j) for i, j in on_top]))
    scores = torch.randint(1, 5, (len(pairs), 3), generator=torch.Generator().manual_seed(seed))
    expert = make_expert(8, pairs, scores.tolist())
    result = share_of_errors_judged_relevant(sims, expert, threshold)
    expected = naive_errors(sims, pairs, expert.is_relevant(threshold).tolist())
    for i in range(8):
        if i in expected:
            assert result.judged_relevant[i].item() == float(expected[i][0])
            assert result.judged[i].item() == float(expected[i][1])
        else:
            assert math.isnan(result.judged_relevant[i]) and math.isnan(result.judged[i])
    assert expected and any(judged for _, judged in expected.values())
    assert result.share == pytest.approx(sum(flag for flag, _ in expected.values()) / len(expected))
    chunked = share_of_errors_judged_relevant(sims, expert, threshold, chunk_size=3)
    assert torch.equal(chunked.judged_relevant.nan_to_num(-1), result.judged_relevant.nan_to_num(-1))


def test_share_of_errors_hand_case():
    # 3 images x 5 captions. image 0: correct (own caption on top). image 1: top-1 caption 0, judged relevant.
    # image 2: top-1 tie between captions 1 (relevant) and 3 (judged not relevant) -> pessimistic: not relevant
    sims = torch.zeros(3, 15)
    sims[0, 2] = 1.0
    sims[1, 0] = 1.0
    sims[2, 1] = sims[2, 3] = 1.0
    expert = make_expert(3, [(1, 0), (2, 1), (2, 3)], [[4, 4, 3], [3, 3, 3], [2, 2, 3]])
    result = share_of_errors_judged_relevant(sims, expert)
    assert math.isnan(result.judged_relevant[0])
    assert result.judged_relevant[1:].tolist() == [1.0, 0.0]
    assert result.judged[1:].tolist() == [1.0, 1.0]
    assert result.share == 0.5
    # a looser threshold makes caption 3 relevant too
    assert share_of_errors_judged_relevant(sims, expert, threshold=2.0).share == 1.0
    # no error at all: share is NaN
    perfect = torch.zeros(3, 15)
    perfect[torch.arange(3), torch.arange(3) * 5] = 1.0
    assert math.isnan(share_of_errors_judged_relevant(perfect, expert).share)


def test_crowd_threshold_is_a_strict_majority():
    crowd = make_crowd(2, [(0, 5), (0, 6), (0, 7)], yes=[2, 3, 2], no=[2, 1, 4])
    assert crowd.is_relevant().tolist() == [False, True, False]
    assert crowd.is_relevant(0.25).tolist() == [True, True, True]
    assert crowd.relevant_pairs().tolist() == [[0, 6]]


# ---------------------------------------------------------------------------------------------------------------
# The evaluation bundle
# ---------------------------------------------------------------------------------------------------------------

def test_human_relevance_evaluation_metrics_are_means_of_their_lists():
    sims, pairs, expert = random_case(1, n_images=8, n_pairs=80, levels=4)
    crowd = make_crowd(8, pairs, yes=[k % 4 for k in range(len(pairs))], no=[1] * len(pairs))
    assert 0 < int(crowd.is_relevant().sum()) < len(pairs)
    metrics, per_query = human_relevance_evaluation(sims, expert, crowd)
    query_means, extended = per_query["query_means"], per_query["extended_ranks"]
    for source in ("expert", "crowd"):
        extra = (expert if source == "expert" else crowd).relevant_pairs()
        ranks = extended_ranks(sims, extra)
        assert extended[source] == {"captions_per_image": 5, "i2t": ranks[0].tolist(), "t2i": ranks[1].tolist()}
        assert metrics[f"{source}_i2t_r5"] == pytest.approx(100 * (ranks[0] < 5).double().mean().item())
        assert metrics[f"{source}_t2i_r1"] == pytest.approx(100 * (ranks[1] < 1).double().mean().item())
        assert metrics[f"{source}_rsum"] == pytest.approx(sum(metrics[f"{source}_{d}_r{k}"]
                                                              for d in ("i2t", "t2i") for k in (1, 5, 10)))
        # the claims API recomputes every recall metric from the stored ranks
        for name in ("i2t_r1", "t2i_r10", "rsum", "i2t_medr"):
            assert metric_from_caption_ranks(extended[source], name) == pytest.approx(metrics[f"{source}_{name}"])
    assert len(query_means["expert_tau_b"]) == int((~judged_kendall_tau(sims, expert).isnan()).sum())
    for name, value in metrics.items():
        if value is None:
            assert name not in query_means
        elif name in query_means:
            assert value == pytest.approx(sum(query_means[name]) / len(query_means[name]), abs=1e-12)
            assert all(not math.isnan(item) for item in query_means[name])
    assert set(query_means) <= set(metrics)


def test_human_relevance_evaluation_empty_subset_is_none():
    sims = torch.zeros(2, 10)
    sims[0, 0] = sims[1, 5] = 1.0  # no error query
    expert = make_expert(2, [(0, 1), (0, 7)], [[4, 4, 4], [1, 1, 1]])
    metrics, per_query = human_relevance_evaluation(sims, expert, None)
    assert metrics["expert_errors_judged_relevant"] is None
    assert "expert_errors_judged_relevant" not in per_query["query_means"]
    assert not any(name.startswith("crowd") for name in metrics)
    with pytest.raises(ValueError, match="expert or crowd"):
        human_relevance_evaluation(sims, None, None)


# ---------------------------------------------------------------------------------------------------------------
# Loaders on fake files
# ---------------------------------------------------------------------------------------------------------------

TEST_IMAGES = ["a.jpg", "b.jpg", "c.jpg"]


def make_fake_judgements(root, expert_lines=None, crowd_lines=None):
    directory = root / "flickr8k"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Flickr_8k.testImages.txt").write_text("\n".join(TEST_IMAGES) + "\n")
    (directory / "Flickr_8k.trainImages.txt").write_text("t1.jpg\nt2.jpg\n")
    (directory / "Flickr_8k.devImages.txt").write_text("d1.jpg\n")
    if expert_lines is None:
        expert_lines = ["a.jpg\tb.jpg#2\t1\t2\t2", "a.jpg\ta.jpg#0\t4\t4\t3", "c.jpg\tb.jpg#4\t3\t3\t3",
                        "", "t1.jpg\ta.jpg#1\t1\t1\t1"]
    if crowd_lines is None:
        crowd_lines = ["b.jpg\tc.jpg#1\t0.666666666666667\t2\t1", "c.jpg\tc.jpg#3\t0.5\t2\t2",
                       "d1.jpg\tt2.jpg#0\t0\t0\t3"]
    (directory / "ExpertAnnotations.txt").write_text("\n".join(expert_lines) + "\n")
    (directory / "CrowdFlowerAnnotations.txt").write_text("\n".join(crowd_lines) + "\n")
    return directory


def test_fake_loaders_index_the_split(tmp_path):
    make_fake_judgements(tmp_path)
    expert = load_expert_judgements(root=tmp_path)
    assert expert.image_index.tolist() == [0, 0, 2]
    assert expert.caption_index.tolist() == [1 * 5 + 2, 0, 1 * 5 + 4]
    assert expert.scores.tolist() == [[1, 2, 2], [4, 4, 3], [3, 3, 3]]
    assert expert.mean_score.tolist() == pytest.approx([5 / 3, 11 / 3, 3.0])
    assert expert.num_outside_split == 1 and expert.num_pairs == 3 and expert.num_images == 3
    assert expert.is_relevant().tolist() == [False, True, True]
    assert expert.is_paired().tolist() == [False, True, False]
    assert expert.pairs_per_image().tolist() == [2, 0, 1]
    crowd = load_crowd_judgements("test", tmp_path / "flickr8k")  # root may be the dataset folder itself
    assert crowd.image_index.tolist() == [1, 2] and crowd.caption_index.tolist() == [2 * 5 + 1, 2 * 5 + 3]
    assert crowd.yes_proportion.tolist() == [2 / 3, 0.5]
    assert crowd.yes_count.tolist() == [2, 2] and crowd.no_count.tolist() == [1, 2]
    assert crowd.num_outside_split == 1
    assert crowd.relevant_pairs().tolist() == [[1, 11]]


def test_fake_loaders_other_split_keeps_nothing(tmp_path):
    make_fake_judgements(tmp_path, expert_lines=["t1.jpg\tt2.jpg#0\t1\t1\t1", "t1.jpg\ta.jpg#0\t1\t1\t1"])
    expert = load_expert_judgements("train", tmp_path)
    assert expert.num_pairs == 1 and expert.num_outside_split == 1 and expert.num_images == 2
    with pytest.raises(ValueError, match="no judged pair"):
        load_crowd_judgements("train", tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_expert_judgements("val", tmp_path)


@pytest.mark.parametrize("line, message", [
    ("a.jpg\tb.jpg#2\t1\t2", "expected 5 tab-separated fields"),
    ("a.jpg b.jpg#2 1 2 2", "expected 5 tab-separated fields"),
    ("a.jpg\tb.jpg\t1\t2\t2", "caption id 'b.jpg' is not"),
    ("a.jpg\tb.jpg#5\t1\t2\t2", "caption id 'b.jpg#5' is not"),
    ("a.jpg\tb.jpg#x\t1\t2\t2", "caption id"),
    ("a.jpg\tb.jpg#2\t1\t5\t2", "expert scores must be integers 1-4"),
    ("a.jpg\tb.jpg#2\t1\t0\t2", "expert scores must be integers 1-4"),
    ("a.jpg\tb.jpg#2\t1\ttwo\t2", "expert scores must be integers 1-4"),
    ("z.jpg\tb.jpg#2\t1\t2\t2", "image 'z.jpg' is in no Flickr8k split file"),
    ("a.jpg\tzz.jpg#2\t1\t2\t2", "caption's image 'zz.jpg' is in no Flickr8k split file"),
    ("a.jpg\ta.jpg#0\t1\t2\t2", r"listed again \(first on line 2\)"),
])
def test_malformed_expert_line_names_file_and_line(tmp_path, line, message):
    lines = ["a.jpg\tb.jpg#2\t1\t2\t2", "a.jpg\ta.jpg#0\t4\t4\t3", line]
    directory = make_fake_judgements(tmp_path, expert_lines=lines)
    with pytest.raises(DatasetFormatError, match=re.escape(f"{directory / 'ExpertAnnotations.txt'}:3: ")) as error:
        load_expert_judgements(root=tmp_path)
    assert re.search(message, str(error.value))
    assert "ExpertAnnotations.txt  (<image>.jpg" in str(error.value)  # the expected layout is shown


@pytest.mark.parametrize("line, message", [
    ("b.jpg\tc.jpg#0\t0.5\t1\t2", "proportion yes '0.5' disagrees with 1 yes / 3 votes"),
    ("b.jpg\tc.jpg#0\tnan\t1\t2", "disagrees"),
    ("b.jpg\tc.jpg#0\t0\t0\t0", "not both 0"),
    ("b.jpg\tc.jpg#0\t1\t-1\t0", "non-negative integers"),
    ("b.jpg\tc.jpg#0\t1\t3", "expected 5 tab-separated fields"),
])
def test_malformed_crowd_line_names_file_and_line(tmp_path, line, message):
    directory = make_fake_judgements(tmp_path, crowd_lines=["b.jpg\tc.jpg#1\t1\t3\t0", line])
    with pytest.raises(DatasetFormatError, match=re.escape(f"{directory / 'CrowdFlowerAnnotations.txt'}:2: ")) \
            as error:
        load_crowd_judgements(root=tmp_path)
    assert re.search(message, str(error.value))


def test_non_utf8_and_empty_files(tmp_path):
    directory = make_fake_judgements(tmp_path)
    (directory / "ExpertAnnotations.txt").write_bytes(b"a.jpg\tb.jpg#2\t1\t2\t2\nb\xff.jpg\n")
    with pytest.raises(DatasetFormatError, match=r"ExpertAnnotations.txt:2: not valid UTF-8"):
        load_expert_judgements(root=tmp_path)
    (directory / "CrowdFlowerAnnotations.txt").write_text("\n")
    with pytest.raises(DatasetFormatError, match="is empty"):
        load_crowd_judgements(root=tmp_path)


def test_missing_file_names_the_layout(tmp_path):
    directory = make_fake_judgements(tmp_path)
    (directory / "CrowdFlowerAnnotations.txt").unlink()
    with pytest.raises(FileNotFoundError, match="missing CrowdFlowerAnnotations.txt"):
        load_crowd_judgements(root=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The real files
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real(data_root):
    return {"expert": load_expert_judgements("test", data_root), "crowd": load_crowd_judgements("test", data_root),
            "split": load_flickr8k("test", data_root), "directory": data_root / "flickr8k"}


@pytest.mark.data
def test_real_counts_and_coverage(real):
    expert, crowd = real["expert"], real["crowd"]
    assert (expert.num_pairs, expert.num_outside_split) == (5822, 0)
    assert (crowd.num_pairs, crowd.num_outside_split) == (47830, 0)
    for judgements in (expert, crowd):
        assert judgements.num_images == 1000
        assert judgements.image_index.unique().numel() == 1000        # every test image is a judged query
        assert bool((judgements.caption_index % CAPTIONS == 2).all())  # only caption #2 of any image is judged
    assert (expert.caption_index // CAPTIONS).unique().numel() == 977  # captions of 977 test images
    assert (crowd.caption_index // CAPTIONS).unique().numel() == 1000
    expert_per_image, crowd_per_image = expert.pairs_per_image(), crowd.pairs_per_image()
    assert (int(expert_per_image.min()), int(expert_per_image.max())) == (2, 10)
    assert (int(crowd_per_image.min()), int(crowd_per_image.max())) == (10, 120)
    votes = crowd.yes_count + crowd.no_count
    assert (int(votes.min()), int(votes.max())) == (3, 6)
    assert torch.bincount(expert.scores.flatten(), minlength=5)[1:].tolist() == [9797, 4997, 1701, 971]
    # judged relevant under the default thresholds, and how many of those are paired captions
    assert int(expert.is_relevant().sum()) == 623 and int((expert.is_relevant() & expert.is_paired()).sum()) == 158
    assert int(expert.is_paired().sum()) == 158                       # every judged paired caption scores >= 3
    assert int(crowd.is_relevant().sum()) == 2704 and int((crowd.is_relevant() & crowd.is_paired()).sum()) == 700
    assert int(crowd.is_paired().sum()) == 721
    assert int((crowd.yes_proportion == 0.5).sum()) == 27             # ties: not a majority, not relevant
    assert int(expert.is_relevant(2.0).sum()) > 623
    expert_pairs = set(zip(expert.image_index.tolist(), expert.caption_index.tolist()))
    crowd_pairs = set(zip(crowd.image_index.tolist(), crowd.caption_index.tolist()))
    assert len(expert_pairs) == 5822 and len(crowd_pairs) == 47830 and len(expert_pairs & crowd_pairs) == 2329


@pytest.mark.data
def test_real_indices_agree_with_load_flickr8k(real):
    image_ids = real["split"].image_ids
    for name, file_name in (("expert", "ExpertAnnotations.txt"), ("crowd", "CrowdFlowerAnnotations.txt")):
        judgements = real[name]
        rows = [line.split("\t") for line in (real["directory"] / file_name).read_text().splitlines() if line]
        assert [image_ids[i] for i in judgements.image_index.tolist()] == [row[0] for row in rows]
        assert [f"{image_ids[j // CAPTIONS]}#{j % CAPTIONS}" for j in judgements.caption_index.tolist()] == \
            [row[1] for row in rows]
        if name == "expert":
            assert judgements.scores.tolist() == [[int(v) for v in row[2:]] for row in rows]
        else:
            assert judgements.yes_proportion.tolist() == pytest.approx([float(row[2]) for row in rows], abs=1e-12)


@pytest.mark.data
def test_real_sanity_random_and_oracle_sims(real):
    expert, crowd = real["expert"], real["crowd"]
    generator = torch.Generator().manual_seed(0)
    random_sims = torch.randn(1000, 5000, generator=generator)
    tau = judged_kendall_tau(random_sims, expert)
    defined = ~tau.isnan()
    assert int(defined.sum()) == 979                   # 21 test images have equal expert scores on all judged
    assert abs(float(tau[defined].mean())) < 0.05
    # the expert scores themselves as similarities (0 elsewhere): tau = 1 on every defined query
    oracle = torch.zeros(1000, 5000, dtype=torch.float64)
    oracle[expert.image_index, expert.caption_index] = expert.mean_score
    oracle_tau = judged_kendall_tau(oracle, expert)
    assert torch.equal(oracle_tau.isnan(), tau.isnan())
    assert torch.allclose(oracle_tau[defined], torch.ones(979, dtype=torch.float64))

    metrics, per_query = human_relevance_evaluation(random_sims, expert, crowd)
    assert metrics["expert_tau_b"] == pytest.approx(float(tau[defined].mean()))
    assert len(per_query["query_means"]["expert_tau_b"]) == 979
    assert len(per_query["extended_ranks"]["crowd"]["i2t"]) == 1000
    assert len(per_query["extended_ranks"]["crowd"]["t2i"]) == 5000
    # chance level: extra positives add a few captions to each query's five, so R@10 stays a few percent
    assert metrics["crowd_i2t_r10"] < 10 and metrics["expert_t2i_r10"] < 10


def test_first_images_keeps_the_pairs_within_a_subset(real):
    expert = real["expert"]
    subset = expert.first_images(100)
    inside = (expert.image_index < 100) & (expert.caption_index < 500)
    assert subset.num_images == 100 and subset.num_pairs == int(inside.sum()) > 0
    assert torch.equal(subset.mean_score, expert.mean_score[inside])
    assert torch.equal(subset.scores, expert.scores[inside])
    assert expert.first_images(1000) is expert


def test_the_test_split_carries_its_judgements_into_the_evaluation(real, data_root):
    from xmr.features import human_judgements
    from xmr.train import evaluate_retrieval_per_query

    assert human_judgements("dev", 1000, data_root) == {}
    judged = human_judgements("test", 20, data_root)
    assert set(judged) == {"expert", "crowd"} and judged["crowd"].num_images == 20
    # an identity "model" over one-hot features: image i scores 1 with its own five captions, 0 with the rest
    n = 20
    image = torch.eye(n, 6 * n)
    text = torch.zeros(n * CAPTIONS, 6 * n)
    text[torch.arange(n * CAPTIONS), torch.arange(n * CAPTIONS) // CAPTIONS] = 1.0

    class Identity(torch.nn.Module):
        def encode_image(self, x):
            return x

        def encode_text(self, x, mask=None):
            return x

        def parameters(self):
            return iter([torch.zeros(1)])

    metrics, per_query = evaluate_retrieval_per_query(Identity(), CaptionInputs(image, text, judgements=judged))
    assert set(per_query["extended_ranks"]) == {"expert", "crowd"}
    assert metrics["expert_rsum"] >= metrics["rsum"] and "crowd_i2t_rprecision" in metrics
    assert len(per_query["extended_ranks"]["crowd"]["t2i"]) == n * CAPTIONS
    plain, plain_per_query = evaluate_retrieval_per_query(Identity(), CaptionInputs(image, text))
    assert "extended_ranks" not in plain_per_query and not any(k.startswith("expert") for k in plain)
