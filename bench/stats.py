"""Shared by bench/floor.sh and bench/common.sh's `paired`: the median of a sample
and a 90% bootstrap interval for it, for benchmark rounds on a noisy VM."""

import random
import statistics


def median_interval(xs, rng, resamples=2000):
    """(median, 5th, 95th percentile) of the medians of `resamples`
    resamples of xs, drawn with `rng` (seeded by the caller, so the same
    samples give the same interval)."""
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    return statistics.median(xs), meds[resamples // 20], meds[resamples - resamples // 20 - 1]
