"""One way to state a paper's claim and judge it from our runs' result files.

A claim compares two arms of runs (``better`` claimed to beat ``worse`` on one metric) or the shape of a curve
over an ordered grid. :func:`compare` puts an interval on the gap between two arms that accounts for both sources
of noise, the seed each model was trained with and the test queries it was evaluated on; :func:`judge` turns a
:class:`Claim` into a :class:`Verdict` with one of :data:`VERDICTS`. The derivation, the formulas and the
references are on the book page "The evaluation protocol", section "Judging a claim".

Run records are result-file dicts (schema version 2): ``run_name``, ``metrics``, ``training`` (``stopped_by`` in
``"plateau"``, ``"budget"``, ``"closed_form"``) and ``per_query`` (``caption_ranks``, ``extended_ranks`` and/or
``query_means``). :func:`judge_both` judges a caption-retrieval claim under the standard protocol and with
Flickr8k's human judgements as extra positives (metrics ``expert_<metric>``, ``crowd_<metric>``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

#: The interval lies above 0 (the claimed side).
HELD = "held"
#: The interval lies below 0.
REVERSED = "reversed"
#: The interval contains 0.
WITHIN_NOISE = "within noise"
#: Within noise or reversed while a run of the claimed-better arm stopped at its epoch budget; or one seed.
NOT_ESTABLISHED = "not established at this budget"
#: A claim we cannot test (data, hardware, a missing detail); see :func:`untestable`.
NOT_TESTABLE = "not testable here"
#: Every verdict, in this order.
VERDICTS = (HELD, REVERSED, WITHIN_NOISE, NOT_ESTABLISHED, NOT_TESTABLE)
#: The kinds of claim, two arms (``"greater"``) or the shape of a curve over an ordered grid.
DIRECTIONS = ("greater", "peak", "interior peak")
#: Values of a run record's ``training.stopped_by``.
STOPPED_BY = ("plateau", "budget", "closed_form")

#: Metrics where a smaller value is better, besides every name ending in ``medr``, ``meanr`` or ``_s`` (seconds).
LOWER_IS_BETTER = frozenset({"i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr"})

_CAPTION_METRIC = re.compile(r"^(?:rsum|(i2t|t2i)_(?:r(\d+)|medr|meanr))$")
_SLUG = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
_BOOT_BLOCK_ELEMENTS = 4_000_000  # gathered values per block when a metric is not a mean over units (MedR)


def lower_is_better(metric: str) -> bool:
    """True for metrics in :data:`LOWER_IS_BETTER` or named ``*medr`` / ``*meanr`` / ``*_s`` (a time)."""
    return metric in LOWER_IS_BETTER or metric.endswith(("medr", "meanr", "_s"))


# ---------------------------------------------------------------------------------------------------------------
# Per-run metrics from per-query data
# ---------------------------------------------------------------------------------------------------------------

def _name(record: Mapping) -> str:
    return repr(record.get("run_name", "<unnamed run>"))


def _caption_arrays(record: Mapping, block: Mapping, where: str = "caption_ranks") -> tuple[np.ndarray, np.ndarray]:
    """``(i2t (N,), t2i (N, c))`` 0-based ranks of a caption-ranks ``block`` (found at ``where`` in ``record``'s
    per_query), t2i grouped by image (caption j -> image j // c)."""
    per_image = block.get("captions_per_image")
    if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1:
        raise ValueError(f"run {_name(record)}: {where}.captions_per_image must be a positive integer, "
                         f"got {per_image!r}")
    i2t = np.asarray(block["i2t"])
    t2i = np.asarray(block["t2i"])
    if i2t.ndim != 1 or t2i.ndim != 1 or len(i2t) == 0 or len(t2i) != len(i2t) * per_image:
        raise ValueError(f"run {_name(record)}: {where} needs i2t of N ranks and t2i of N * "
                         f"{per_image} ranks, got {i2t.shape} and {t2i.shape}")
    return i2t, t2i.reshape(len(i2t), per_image)


def _ranks_block(per_query: Mapping, metric: str) -> tuple[Mapping, str, str] | None:
    """``(block, where, caption metric)`` of the ranks ``metric`` is computed from: ``caption_ranks`` for the
    standard metrics, ``extended_ranks[<source>]`` for ``<source>_<metric>`` (human judgements as positives)."""
    if _CAPTION_METRIC.match(metric) and "caption_ranks" in per_query:
        return per_query["caption_ranks"], "caption_ranks", metric
    source, _, rest = metric.partition("_")
    block = (per_query.get("extended_ranks") or {}).get(source)
    if block is not None and _CAPTION_METRIC.match(rest):
        return block, f"extended_ranks.{source}", rest
    return None


def _caption_unit_values(i2t: np.ndarray, t2i: np.ndarray, metric: str) -> np.ndarray | None:
    """Per-image values whose mean is ``metric`` (recalls, rsum, MeanR); None for MedR, which is no mean."""
    match = _CAPTION_METRIC.match(metric)
    direction, cutoff = match.groups()
    if metric == "rsum":
        return sum(_caption_unit_values(i2t, t2i, f"{side}_r{k}") for side in ("i2t", "t2i") for k in (1, 5, 10))
    ranks = i2t[:, None] if direction == "i2t" else t2i  # (N, 1) or (N, c): each image's own queries
    if cutoff is not None:
        return 100.0 * (ranks < int(cutoff)).mean(axis=1)
    if metric.endswith("meanr"):
        return ranks.mean(axis=1) + 1.0
    return None


def _medr(ranks: np.ndarray) -> np.ndarray:
    """``floor(median) + 1`` over the last axis (numpy median: mean of the two middle values)."""
    return np.floor(np.median(ranks, axis=-1)) + 1.0


def metric_from_caption_ranks(caption_ranks: Mapping, metric: str) -> float:
    """``metric`` (``i2t_r1`` ... ``t2i_medr``, ``rsum``) from a ``per_query["caption_ranks"]`` block.

    R@K = 100 * mean(rank < K), MeanR = mean(rank) + 1, MedR = floor(median(rank)) + 1 (ranks 0-based), as
    :mod:`xmr.metrics` computes them from the similarity matrix.
    """
    if not _CAPTION_METRIC.match(metric):
        raise ValueError(f"{metric!r} cannot be computed from caption ranks")
    i2t, t2i = _caption_arrays({}, caption_ranks)
    values = _caption_unit_values(i2t, t2i, metric)
    if values is not None:
        return float(values.mean())
    return float(_medr(i2t if metric.startswith("i2t") else t2i.ravel()))


@dataclass(frozen=True)
class _PerQuery:
    """One run's metric as a function of a resample of its test units."""

    units: np.ndarray | None  # (U,) values whose mean is the metric, or None
    ranks: np.ndarray | None  # (U,) or (U, c) ranks for MedR

    @property
    def n_units(self) -> int:
        return len(self.units if self.units is not None else self.ranks)

    def value(self) -> float:
        if self.units is not None:
            return float(self.units.mean())
        return float(_medr(self.ranks.reshape(-1)))

    def resampled(self, indices: np.ndarray) -> np.ndarray:
        """The metric on each row of ``indices`` (B, U) -> (B,)."""
        if self.units is not None:
            return self.units[indices].mean(axis=1)
        per_row = indices.shape[1] * (self.ranks.size // len(self.ranks))
        block = max(1, _BOOT_BLOCK_ELEMENTS // per_row)
        return np.concatenate([_medr(self.ranks[indices[start:start + block]].reshape(-1, per_row))
                               for start in range(0, len(indices), block)])


def _per_query(record: Mapping, metric: str) -> _PerQuery:
    per_query = record.get("per_query") or {}
    query_means = per_query.get("query_means") or {}
    if metric in query_means:
        units = np.asarray(query_means[metric], dtype=float)
        if units.ndim != 1 or len(units) == 0:
            raise ValueError(f"run {_name(record)}: per_query.query_means[{metric!r}] must be a non-empty list")
        return _PerQuery(units, None)
    found = _ranks_block(per_query, metric)
    if found is not None:
        block, where, caption_metric = found
        i2t, t2i = _caption_arrays(record, block, where)
        units = _caption_unit_values(i2t, t2i, caption_metric)
        if units is not None:
            return _PerQuery(units, None)
        return _PerQuery(None, i2t if caption_metric.startswith("i2t") else t2i)
    have = sorted(query_means) + (["caption_ranks"] if "caption_ranks" in per_query else []) + \
        [f"extended_ranks.{source}" for source in per_query.get("extended_ranks") or {}]
    raise ValueError(f"run {_name(record)}: {metric!r} cannot be computed from its per_query data (has: "
                     f"{have or 'nothing'}); pass per_query=False for a seed-only interval")


def _training(record: Mapping) -> str | None:
    stopped_by = (record.get("training") or {}).get("stopped_by")
    if stopped_by is not None and stopped_by not in STOPPED_BY:
        raise ValueError(f"run {_name(record)}: training.stopped_by must be one of {STOPPED_BY}, got {stopped_by!r}")
    return stopped_by


# ---------------------------------------------------------------------------------------------------------------
# Two arms
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """The gap between two arms and its interval; see :func:`compare`.

    ``gap``, ``low``, ``high`` are signed so that positive favours the claimed-better arm; ``mean_better`` and
    ``mean_worse`` are the arms' plain metric means. ``seed_std_*`` is None for an arm of one stochastic run,
    0 for a closed-form arm; ``query_std`` is None without per-query data; ``df`` is ``inf`` for the normal
    quantile (None in :meth:`as_dict`); ``low``/``high`` are None when no interval exists.
    """

    gap: float
    low: float | None
    high: float | None
    verdict: str
    reason: str
    n_better: int
    n_worse: int
    seed_std_better: float | None
    seed_std_worse: float | None
    query_std: float | None
    df: float | None
    method: str
    metric: str = ""
    confidence: float = 0.95
    mean_better: float = math.nan
    mean_worse: float = math.nan

    def as_dict(self) -> dict:
        """The fields as JSON-able values (non-finite floats become None)."""
        def clean(value):
            return None if isinstance(value, float) and not math.isfinite(value) else value
        return {name: clean(getattr(self, name)) for name in self.__dataclass_fields__}


def _check_arm(runs, arm: str) -> list[Mapping]:
    if isinstance(runs, Mapping):
        raise ValueError(f"arm {arm!r} must be a list of run records, got one record")
    runs = list(runs)
    if not runs:
        raise ValueError(f"arm {arm!r} is empty: a comparison needs at least one run in each arm")
    for run in runs:
        if not isinstance(run, Mapping):
            raise ValueError(f"arm {arm!r} holds a {type(run).__name__}, not a run record (dict)")
    return runs


def _seed_term(values: np.ndarray, closed_form: bool) -> tuple[float | None, float | None]:
    """``(s, s^2 / n)`` for one arm: ``(0, 0)`` closed form, ``(None, None)`` one stochastic run."""
    if closed_form:
        return 0.0, 0.0
    if len(values) < 2:
        return None, None
    std = float(np.std(values, ddof=1))
    return std, std ** 2 / len(values)


def _quantile(confidence: float, df: float) -> float:
    level = (1 + confidence) / 2
    return float(stats.norm.ppf(level) if math.isinf(df) else stats.t.ppf(level, df))


def _names(runs: Sequence[Mapping]) -> str:
    return ", ".join(_name(run) for run in runs)


def compare(better_runs: Sequence[Mapping], worse_runs: Sequence[Mapping], metric: str = "rsum",
            confidence: float = 0.95, n_boot: int = 2000, seed: int = 0, per_query: bool = True) -> Comparison:
    """Interval on ``mean(better) - mean(worse)``: Welch seed variance + paired query bootstrap.

    ``V = s_B^2/n_B + s_W^2/n_W + var(gap*)`` with ``gap*`` recomputed on ``n_boot`` resamples of the test units
    (images for caption ranks, list entries for ``query_means``; one index draw
    ``default_rng(seed).integers(0, U, (n_boot, U))`` shared by every run), Welch–Satterthwaite ``df`` with the
    query term given infinite df, interval ``gap ± t_{(1+confidence)/2, df} sqrt(V)``. Closed-form arms add no
    seed term. ``per_query=False`` uses ``record["metrics"]`` and the seed term only (Welch's interval).
    Verdict rules: :data:`VERDICTS` and the book page.
    """
    better_runs, worse_runs = _check_arm(better_runs, "better"), _check_arm(worse_runs, "worse")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number strictly between 0 and 1, got {confidence!r}")
    if per_query and (isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 2):
        raise ValueError(f"n_boot must be an integer >= 2, got {n_boot!r}")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a non-empty string, got {metric!r}")
    sign = -1.0 if lower_is_better(metric) else 1.0
    runs = better_runs + worse_runs
    stopped = [_training(run) for run in runs]

    if per_query:
        curves = [_per_query(run, metric) for run in runs]
        counts = {curve.n_units for curve in curves}
        if len(counts) > 1:
            listing = "; ".join(f"{_name(run)}: {curve.n_units}" for run, curve in zip(runs, curves))
            raise ValueError(f"runs hold different numbers of test units for {metric!r} ({listing}); a paired "
                             f"bootstrap needs both arms evaluated on the same test queries")
        values = np.array([curve.value() for curve in curves])
    else:
        missing = [_name(run) for run in runs if metric not in (run.get("metrics") or {})]
        if missing:
            raise ValueError(f"metric {metric!r} missing from the metrics of run(s) {', '.join(missing)}")
        values = np.array([float(run["metrics"][metric]) for run in runs])
    n_better = len(better_runs)
    better, worse = values[:n_better], values[n_better:]
    mean_better, mean_worse = float(better.mean()), float(worse.mean())
    gap = sign * (mean_better - mean_worse)

    closed = [all(s == "closed_form" for s in arm) for arm in (stopped[:n_better], stopped[n_better:])]
    std_better, term_better = _seed_term(better, closed[0])
    std_worse, term_worse = _seed_term(worse, closed[1])
    single = [(arm, arm_runs) for arm, term, arm_runs in
              (("better", term_better, better_runs), ("worse", term_worse, worse_runs)) if term is None]

    query_var = None
    if per_query:
        indices = np.random.default_rng(seed).integers(0, curves[0].n_units, size=(n_boot, curves[0].n_units))
        if all(curve.units is not None for curve in curves):  # a mean over units: gather the unit gaps once
            unit_gap = (np.mean([curve.units for curve in curves[:n_better]], axis=0)
                        - np.mean([curve.units for curve in curves[n_better:]], axis=0))
            block = max(1, _BOOT_BLOCK_ELEMENTS // len(unit_gap))
            resampled_gaps = np.concatenate([unit_gap[indices[start:start + block]].mean(axis=1)
                                             for start in range(0, n_boot, block)])
        else:
            resampled = np.array([curve.resampled(indices) for curve in curves])  # (runs, n_boot)
            resampled_gaps = resampled[:n_better].mean(axis=0) - resampled[n_better:].mean(axis=0)
        query_var = float(np.var(resampled_gaps, ddof=1))
    query_std = None if query_var is None else math.sqrt(query_var)

    common = dict(gap=gap, n_better=n_better, n_worse=len(worse_runs), seed_std_better=std_better,
                  seed_std_worse=std_worse, query_std=query_std, metric=metric, confidence=float(confidence),
                  mean_better=mean_better, mean_worse=mean_worse)
    percent = f"{100 * confidence:g}%"
    if single:
        arms = " and ".join(f"{arm!r} (run {_names(arm_runs)})" for arm, arm_runs in single)
        reason = f"one seed in arm {arms}; the seed variance cannot be estimated"
        if query_var is None:
            return Comparison(low=None, high=None, verdict=NOT_ESTABLISHED, reason=reason, df=None,
                              method="none: one seed and per_query=False", **common)
        half = _quantile(confidence, math.inf) * query_std
        return Comparison(low=gap - half, high=gap + half, verdict=NOT_ESTABLISHED,
                          reason=reason + " (the interval shown is the query-only one)", df=math.inf,
                          method=f"query bootstrap only (n_boot={n_boot}); seed variance unknown", **common)

    seed_var = term_better + term_worse
    total = seed_var + (query_var or 0.0)
    denominator = sum(term ** 2 / (n - 1) for term, n, is_closed in
                      ((term_better, n_better, closed[0]), (term_worse, len(worse_runs), closed[1])) if not is_closed)
    df = total ** 2 / denominator if denominator > 0 else math.inf
    half = _quantile(confidence, df) * math.sqrt(total)
    low, high = gap - half, gap + half
    if per_query:
        method = f"seed (Welch) + query (paired bootstrap, n_boot={n_boot})"
    else:
        method = "seed only (Welch; per_query=False)"

    interval = f"the {percent} interval [{low:.3g}, {high:.3g}]"
    if low > 0:
        verdict, reason = HELD, f"{interval} lies above 0"
        budget = [run for run, s in zip(worse_runs, stopped[n_better:]) if s == "budget"]
        if budget:
            reason += (f"; but run(s) {_names(budget)} of the other arm stopped at the epoch budget, so the gap "
                       f"may be an under-training artefact")
    else:
        verdict = REVERSED if high < 0 else WITHIN_NOISE
        reason = f"{interval} lies below 0" if verdict == REVERSED else f"{interval} contains 0"
        budget = [run for run, s in zip(better_runs, stopped[:n_better]) if s == "budget"]
        if budget:
            verdict = NOT_ESTABLISHED
            reason += (f"; run(s) {_names(budget)} of the claimed-better arm stopped at the epoch budget, not at "
                       f"a plateau")
    return Comparison(low=low, high=high, verdict=verdict, reason=reason, df=df, method=method, **common)


# ---------------------------------------------------------------------------------------------------------------
# Claims and verdicts
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """A paper's claim and the runs that test it.

    ``direction="greater"``: arm ``better`` beats arm ``worse`` on ``metric``. ``"peak"``: over ``arms`` (an
    ordered dict or list of ``(grid value, runs)``) the point ``claimed_peak`` beats every other point.
    ``"interior peak"``: some interior grid point beats both endpoints.
    """

    paper_id: str
    claim_id: str
    source: str
    statement: str
    paper_value: str | float | None
    metric: str
    direction: str = "greater"
    better: Sequence[Mapping] = ()
    worse: Sequence[Mapping] = ()
    arms: Sequence[tuple] | Mapping | None = None
    claimed_peak: object = None
    settle_with: str | None = None  # what would settle it when not established here (a GPU parameter file)

    def __post_init__(self):
        if not isinstance(self.claim_id, str) or not _SLUG.match(self.claim_id):
            raise ValueError(f"claim_id must be a lower-case slug (letters, digits, '-', '_', '.'), "
                             f"got {self.claim_id!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"claim {self.claim_id}: direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.direction == "greater":
            if self.arms is not None:
                raise ValueError(f"claim {self.claim_id}: a 'greater' claim takes better= and worse=, not arms=")
            for name in ("better", "worse"):
                object.__setattr__(self, name, tuple(_check_arm(getattr(self, name), name)))
            return
        if self.arms is None:
            raise ValueError(f"claim {self.claim_id}: a {self.direction!r} claim needs arms= (grid value, runs)")
        grid = tuple((value, tuple(_check_arm(runs, f"grid point {value!r}"))) for value, runs in
                     (self.arms.items() if isinstance(self.arms, Mapping) else self.arms))
        object.__setattr__(self, "arms", grid)
        values = [value for value, _ in grid]
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"claim {self.claim_id}: grid values repeat: {values}")
        if self.direction == "peak":
            if len(grid) < 2 or self.claimed_peak not in values:
                raise ValueError(f"claim {self.claim_id}: claimed_peak {self.claimed_peak!r} must be one of the "
                                 f"grid values {values} (two or more)")
        elif len(grid) < 3:
            raise ValueError(f"claim {self.claim_id}: an interior peak needs three or more grid points")


@dataclass(frozen=True)
class Verdict:
    """A claim's descriptive fields, what we measured and the verdict; :meth:`as_row` is the summary schema."""

    paper_id: str
    claim_id: str
    source: str
    statement: str
    paper_value: str | float | None
    metric: str | None
    ours: str | None
    comparison: Comparison | None
    verdict: str
    reason: str
    comparisons: tuple = field(default=())

    def as_row(self) -> dict:
        """``claim_id, source, statement, paper_value, our_value, gap, interval, verdict, reason, metric, n_seeds``."""
        c = self.comparison
        interval = None if c is None or c.low is None else [float(c.low), float(c.high)]
        return {"claim_id": self.claim_id, "source": self.source, "statement": self.statement,
                "paper_value": self.paper_value, "our_value": self.ours,
                "gap": None if c is None else float(c.gap), "interval": interval, "verdict": self.verdict,
                "reason": self.reason, "metric": self.metric,
                "n_seeds": None if c is None else [c.n_better, c.n_worse]}


def format_ours(mean_better: float, mean_worse: float, digits: int = 1, labels: tuple[str, str] | None = None) -> str:
    """``"412.3 vs 405.1"`` (or ``"412.3 (a) vs 405.1 (b)"`` with ``labels``)."""
    if labels is None:
        return f"{mean_better:.{digits}f} vs {mean_worse:.{digits}f}"
    return f"{mean_better:.{digits}f} ({labels[0]}) vs {mean_worse:.{digits}f} ({labels[1]})"


def untestable(paper_id: str, claim_id: str, source: str, statement: str, paper_value: str | float | None,
               reason: str) -> Verdict:
    """A claim we cannot test here (data, hardware, a missing detail): verdict :data:`NOT_TESTABLE`."""
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"claim {claim_id}: say why it cannot be tested")
    return Verdict(paper_id=paper_id, claim_id=claim_id, source=source, statement=statement,
                   paper_value=paper_value, metric=None, ours=None, comparison=None, verdict=NOT_TESTABLE,
                   reason=reason)


def _flip(c: Comparison) -> Comparison:
    """The same comparison with the arms swapped."""
    return Comparison(gap=-c.gap, low=None if c.high is None else -c.high, high=None if c.low is None else -c.low,
                      verdict=c.verdict, reason=c.reason, n_better=c.n_worse, n_worse=c.n_better,
                      seed_std_better=c.seed_std_worse, seed_std_worse=c.seed_std_better, query_std=c.query_std,
                      df=c.df, method=c.method, metric=c.metric, confidence=c.confidence,
                      mean_better=c.mean_worse, mean_worse=c.mean_better)


def _interval(c: Comparison) -> str:
    return f"{100 * c.confidence:g}% interval [{c.low:.3g}, {c.high:.3g}]"


def _shape(claim: Claim, options: dict) -> tuple[Comparison, tuple, str, str, tuple]:
    """``(decisive comparison, all comparisons, verdict, reason, (its first, second grid value))`` of a shape.

    Peak: held if the claimed peak beats every other point (each pair at ``confidence``: an intersection-union
    test needs no correction); reversed if another point beats it at the Bonferroni level ``1 - alpha / (k-1)``.
    Interior peak: held if the best interior point by mean beats both endpoints at ``1 - alpha / m`` (m interior
    points, for choosing it); reversed if an endpoint beats every interior point at ``1 - alpha / 2``.
    The single-seed and budget rules apply to the point claimed better (the claimed or best interior peak).
    """
    confidence = options.get("confidence", 0.95)
    alpha = 1 - confidence
    grid = {value: list(runs) for value, runs in claim.arms}
    values = list(grid)
    sign = -1.0 if lower_is_better(claim.metric) else 1.0

    def pair(a, b, level):
        return compare(grid[a], grid[b], claim.metric, **{**options, "confidence": level})

    if claim.direction == "peak":
        top, rivals = claim.claimed_peak, [v for v in values if v != claim.claimed_peak]
        wins = {rival: pair(top, rival, confidence) for rival in rivals}
        losses = {rival: pair(top, rival, 1 - alpha / len(rivals)) if len(rivals) > 1 else wins[rival]
                  for rival in rivals}
        reversed_by = [rival for rival in rivals if losses[rival].high is not None and losses[rival].high < 0]
        reversal = None
        if reversed_by:
            rival = min(reversed_by, key=lambda r: losses[r].high)
            reversal = (losses[rival], f"{rival!r} beats the claimed peak {top!r}: {_interval(losses[rival])}",
                        (top, rival))
        pairs = [((top, r), wins[r]) for r in rivals] + [((top, r), c) for r, c in losses.items() if c is not wins[r]]
        label = f"the claimed peak {top!r}"
    else:
        interior, ends = values[1:-1], (values[0], values[-1])
        means = {v: np.mean([_point_value(run, claim.metric, options) for run in grid[v]]) for v in interior}
        top = max(interior, key=lambda v: sign * means[v])
        rivals = list(ends)
        wins = {end: pair(top, end, 1 - alpha / len(interior)) for end in ends}
        reversal, pairs = None, [((top, end), wins[end]) for end in ends]
        for end in ends:
            beaten = {point: pair(end, point, 1 - alpha / 2) for point in interior}
            pairs += [((end, point), c) for point, c in beaten.items()]
            if reversal is None and all(c.low is not None and c.low > 0 for c in beaten.values()):
                point = min(interior, key=lambda p: beaten[p].low)
                reversal = (_flip(beaten[point]), f"the endpoint {end!r} beats every interior point; closest: "
                            f"{point!r}, {_interval(_flip(beaten[point]))}", (point, end))
        label = f"the best interior point {top!r}"

    # the decisive rival: the one with the lowest interval bound; an undetermined one (the smallest gap) first
    closest = min(rivals, key=lambda r: (wins[r].low is not None,
                                         wins[r].low if wins[r].low is not None else wins[r].gap))
    everything = tuple(c for _, c in pairs)
    unknown = [(names, c) for names, c in pairs if c.seed_std_better is None or c.seed_std_worse is None]
    if unknown:  # name the decisive pair when it is among the undetermined ones
        (a, b), first = next(((n, c) for n, c in unknown if n == (top, closest)), unknown[0])
        reason = f"{a!r} vs {b!r}: {first.reason}"
        undetermined, compared = {n for n, _ in unknown}, {n for n, _ in pairs}
        if len(undetermined) > 1:
            reason += f" ({len(undetermined)} of {len(compared)} pairs cannot be judged)"
        return wins[closest], everything, NOT_ESTABLISHED, reason, (top, closest)
    if reversal is not None:
        decisive, reason, shown = reversal
        verdict = REVERSED
    elif all(wins[r].low > 0 for r in rivals):
        decisive, shown = wins[closest], (top, closest)
        verdict, reason = HELD, f"{label} beats every rival; closest {closest!r}: {_interval(decisive)}"
    else:
        decisive, shown = wins[closest], (top, closest)
        verdict, reason = WITHIN_NOISE, f"{label} vs {closest!r}: {_interval(decisive)} contains 0"
        if decisive.high < 0:  # the rival is ahead on its own, short of the reversal rule
            rule = (f"a rival to win at {1 - alpha / len(rivals):.3g} (Bonferroni, {len(rivals)} rivals)"
                    if claim.direction == "peak"
                    else f"an endpoint to beat every interior point at {1 - alpha / 2:.3g}")
            reason = (f"{label} vs {closest!r}: {_interval(decisive)} lies below 0, but a reversal needs {rule}, "
                      "and none does")
    if verdict == HELD:
        budget = [run for rival in rivals for run in grid[rival] if _training(run) == "budget"]
        if budget:
            reason += (f"; but run(s) {_names(budget)} of the other points stopped at the epoch budget, so the gap "
                       f"may be an under-training artefact")
    else:
        budget = [run for run in grid[top] if _training(run) == "budget"]
        if budget:
            verdict = NOT_ESTABLISHED
            reason += f"; run(s) {_names(budget)} of {label} stopped at the epoch budget, not at a plateau"
    return decisive, everything, verdict, reason, shown


def _point_value(run: Mapping, metric: str, options: dict) -> float:
    if options.get("per_query", True):
        return _per_query(run, metric).value()
    if metric not in (run.get("metrics") or {}):
        raise ValueError(f"metric {metric!r} missing from the metrics of run {_name(run)}")
    return float(run["metrics"][metric])


def judge(claim: Claim, digits: int = 1, **options) -> Verdict:
    """Judge ``claim``; ``options`` go to :func:`compare` (``confidence``, ``n_boot``, ``seed``, ``per_query``).

    Two arms: :func:`compare`'s verdict. Shapes: pairwise :func:`compare` combined as in ``_shape`` and on the
    book page; the reported gap and interval are those of the decisive pair, oriented so positive favours the claim.
    """
    if not isinstance(claim, Claim):
        raise ValueError(f"judge takes a Claim, got {type(claim).__name__}")
    describe = dict(paper_id=claim.paper_id, claim_id=claim.claim_id, source=claim.source,
                    statement=claim.statement, paper_value=claim.paper_value, metric=claim.metric)
    if claim.direction == "greater":
        c = compare(claim.better, claim.worse, claim.metric, **options)
        ours, verdict, reason, pairs = format_ours(c.mean_better, c.mean_worse, digits), c.verdict, c.reason, (c,)
    else:
        c, pairs, verdict, reason, (first, second) = _shape(claim, options)
        ours = format_ours(c.mean_better, c.mean_worse, digits, (str(first), str(second)))
    if verdict == NOT_ESTABLISHED and claim.settle_with:
        reason = f"{reason}; {claim.settle_with} would settle it" if reason else f"{claim.settle_with} would settle it"
    return Verdict(**describe, ours=ours, comparison=c, verdict=verdict, reason=reason, comparisons=pairs)


HUMAN_SOURCES = ("expert", "crowd")


def under_human_judgements(claim: Claim, source: str = "expert") -> Claim:
    """``claim`` with the pairs Flickr8k's ``source`` judgements call relevant counted as positives: the metric
    ``<source>_<metric>`` from each run's ``per_query["extended_ranks"][source]``, the id ``<id>-<source>``."""
    if source not in HUMAN_SOURCES:
        raise ValueError(f"source must be one of {HUMAN_SOURCES}, got {source!r}")
    if claim.metric is None or not _CAPTION_METRIC.match(claim.metric):
        raise ValueError(f"claim {claim.claim_id!r}: only caption-retrieval metrics have a human-judged form, "
                         f"not {claim.metric!r}")
    return dataclasses.replace(claim, claim_id=f"{claim.claim_id}-{source}", metric=f"{source}_{claim.metric}",
                               statement=f"{claim.statement} [{source}-judged positives]")


def judge_both(claim: Claim, source: str = "expert", **options) -> list[Verdict]:
    """``[standard, human]``: :func:`judge` of ``claim`` and of :func:`under_human_judgements` of it. When one
    holds and the other does not, both reasons say that the protocols disagree."""
    standard, human = judge(claim, **options), judge(under_human_judgements(claim, source), **options)
    if (standard.verdict == HELD) != (human.verdict == HELD):
        note = (f"; the protocols disagree: {standard.verdict} with the paired captions only, {human.verdict} with "
                f"{source}-judged positives")
        standard = dataclasses.replace(standard, reason=standard.reason + note)
        human = dataclasses.replace(human, reason=human.reason + note)
    return [standard, human]


def verdict_table(verdicts: Iterable[Verdict], digits: int = 2):
    """A :class:`pandas.DataFrame`, one row per claim, the interval as ``"[lo, hi]"``."""
    import pandas as pd

    rows = []
    for verdict in verdicts:
        row = verdict.as_row()
        interval = row["interval"]
        rows.append({"paper_id": verdict.paper_id, "claim_id": row["claim_id"], "source": row["source"],
                     "statement": row["statement"], "paper": row["paper_value"], "ours": row["our_value"],
                     "metric": row["metric"],
                     "gap": None if row["gap"] is None else round(row["gap"], digits),
                     "interval": "" if interval is None else f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]",
                     "seeds": "" if row["n_seeds"] is None else f"{row['n_seeds'][0]} vs {row['n_seeds'][1]}",
                     "verdict": row["verdict"], "reason": row["reason"]})
    columns = ["paper_id", "claim_id", "source", "statement", "paper", "ours", "metric", "gap", "interval",
               "seeds", "verdict", "reason"]
    return pd.DataFrame(rows, columns=columns)
