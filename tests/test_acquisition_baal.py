"""Our per-pixel BALD against baal 2.1's BALD on the same Monte-Carlo samples.

baal wants [batch, class, *spatial, iterations] (passes LAST) and, with reduction="none",
``BALD().get_uncertainties`` returns the per-pixel map [batch, *spatial]. Calling the heuristic itself
(``BALD()(x)`` or ``get_ranks``) returns a ranking of the batch instead, and refuses maps.

Tolerance: both see the same float32 probabilities, baal computes in float64 and we in float32, so the
gap is float32 rounding of entropies of order 1 summed over a few classes and passes (a few 1e-7);
1e-5 leaves room for that (the largest gap seen is 1.3e-7) and is far below any real error: dropping the
expected-entropy term shifts BALD by 0.6 to 0.8 nats on these samples, log base 2 instead of e by 44 %.
"""

import math

import numpy as np
import pytest
from conftest import import_or_missing

from bioadapt.active import bald

baal_heuristics = import_or_missing("baal.active.heuristics", "baal (test extra)",
                                   "pip install -c constraints.txt -e '.[dev]'")

TOLERANCE = 1e-5


def baal_bald_softmax(samples: np.ndarray) -> np.ndarray:
    """baal's BALD map for softmax samples (T, C, *spatial) -> (*spatial)."""
    passes_last = np.moveaxis(samples.astype(np.float64), 0, -1)[None]  # (1, C, *spatial, T)
    return baal_heuristics.BALD(reduction="none").get_uncertainties(passes_last)[0]


def baal_bald_sigmoid(samples: np.ndarray) -> np.ndarray:
    """baal's BALD map for sigmoid channels: each channel as classes (1 - p, p), channels in baal's batch
    axis, then averaged over channels like ours. Given a bare (1, 1, ..., T) channel, baal keeps only the
    -p log p half of each entropy and returns a different, smaller value, without a warning."""
    probs = samples.astype(np.float64)
    two_classes = np.stack([1 - probs, probs], axis=2)  # (T, C, 2, *spatial)
    passes_last = np.moveaxis(two_classes, 0, -1)  # (C, 2, *spatial, T): channels as baal's batch
    return baal_heuristics.BALD(reduction="none").get_uncertainties(passes_last).mean(0)


def softmax_samples(rng, passes: int, classes: int, shape=(6, 7)) -> np.ndarray:
    logits = rng.normal(0, 2, size=(passes, classes, *shape))
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return (exp / exp.sum(1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("classes", [2, 3])
def test_bald_matches_baal_for_softmax(rng, classes):
    samples = softmax_samples(rng, passes=5, classes=classes)
    ours, theirs = bald(samples, "softmax"), baal_bald_softmax(samples)
    assert ours.shape == theirs.shape == samples.shape[2:]
    assert theirs.mean() > 0.05  # the samples disagree, so a missing term would show
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("channels", [1, 2])
def test_bald_matches_baal_for_sigmoid_channels(rng, channels):
    samples = rng.random((5, channels, 6, 7)).astype(np.float32)
    ours, theirs = bald(samples, "sigmoid"), baal_bald_sigmoid(samples)
    assert ours.shape == theirs.shape == samples.shape[2:]
    assert theirs.mean() > 0.05
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)


def test_known_values_agree_with_baal():
    identical = np.tile(np.array([0.3, 0.7], dtype=np.float32)[None, :, None, None], (8, 1, 2, 2))
    split = np.zeros((8, 2, 2, 2), dtype=np.float32)
    split[:4, 0] = 1.0  # half the passes say class 0 for sure, half class 1
    split[4:, 1] = 1.0
    for samples, expected in [(identical, 0.0), (split, math.log(2))]:
        np.testing.assert_allclose(bald(samples), expected, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(baal_bald_softmax(samples), expected, rtol=0, atol=TOLERANCE)
