"""Acquisition maths against an independent slow reference, known values, stability, numpy/torch parity."""

import math

import numpy as np
import pytest
import torch

from bioadapt.active import (bald, mean_std, patch_score, predictive_entropy, random_scores,
                             variation_ratios)
from bioadapt.errors import BioadaptError


def _softmax_samples(rng, passes=6, classes=3, shape=(4, 5)):
    logits = rng.normal(0, 2, size=(passes, classes, *shape))
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return (exp / exp.sum(1, keepdims=True)).astype(np.float32)


def _reference_bald(samples, activation):
    """BALD pixel by pixel with explicit loops, straight from DESIGN.md's formula."""
    passes, channels = samples.shape[:2]
    out = np.zeros(samples.shape[2:])
    for index in np.ndindex(*samples.shape[2:]):
        groups = [[samples[t, :][(slice(None), *index)] for t in range(passes)]] if activation == "softmax" else \
            [[np.array([1 - samples[t, c][index], samples[t, c][index]]) for t in range(passes)]
             for c in range(channels)]
        values = []
        for per_pass in groups:
            def entropy(p):
                return -sum(float(v) * math.log(float(v)) for v in p if v > 0)
            mean = [sum(float(p[k]) for p in per_pass) / passes for k in range(len(per_pass[0]))]
            values.append(entropy(mean) - sum(entropy(p) for p in per_pass) / passes)
        out[index] = sum(values) / len(values)
    return out


def test_bald_matches_the_slow_reference_for_softmax(rng):
    samples = _softmax_samples(rng)
    np.testing.assert_allclose(bald(samples, "softmax"), _reference_bald(samples, "softmax"), atol=1e-5)


def test_bald_matches_the_slow_reference_for_sigmoid_channels(rng):
    samples = rng.random((5, 2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(bald(samples, "sigmoid"), _reference_bald(samples, "sigmoid"), atol=1e-5)


def test_known_values():
    identical = np.tile(np.array([0.3, 0.7], dtype=np.float32)[None, :, None, None], (8, 1, 2, 2))
    np.testing.assert_allclose(bald(identical), 0.0, atol=1e-7)
    split = np.zeros((8, 2, 2, 2), dtype=np.float32)
    split[:4, 0] = 1.0
    split[4:, 1] = 1.0
    np.testing.assert_allclose(bald(split), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(predictive_entropy(split), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(variation_ratios(split), 0.5)
    np.testing.assert_allclose(mean_std(split), 0.5)


def test_single_sigmoid_channel_equals_two_softmax_classes(rng):
    foreground = rng.random((6, 1, 8, 8)).astype(np.float32)
    two_class = np.concatenate([1 - foreground, foreground], axis=1)
    for function in (bald, predictive_entropy, variation_ratios, mean_std):
        np.testing.assert_allclose(function(foreground, "sigmoid"), function(two_class, "softmax"), atol=1e-6)


def test_no_nan_at_zero_and_one_and_float32_out():
    samples = np.zeros((4, 3, 2, 2), dtype=np.float16)
    samples[:, 0] = 1
    for function in (bald, predictive_entropy, variation_ratios, mean_std):
        result = function(samples)
        assert result.dtype == np.float32 and np.isfinite(result).all()


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_torch_input_gives_the_same_maps_as_numpy(rng, activation):
    samples = _softmax_samples(rng) if activation == "softmax" else rng.random((5, 2, 6, 6)).astype(np.float32)
    for function in (bald, predictive_entropy, variation_ratios, mean_std):
        from_torch = function(torch.from_numpy(samples), activation)
        assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.float32
        np.testing.assert_allclose(from_torch.numpy(), function(samples, activation), atol=1e-6)


def test_3d_samples(rng):
    samples = _softmax_samples(rng, passes=4, classes=2, shape=(3, 4, 5))
    assert bald(samples).shape == (3, 4, 5)


def test_logits_and_wrong_activation_are_refused(rng):
    with pytest.raises(BioadaptError, match="not logits"):
        bald(rng.normal(0, 3, size=(4, 2, 3, 3)))
    with pytest.raises(BioadaptError, match="must sum to 1 over C"):
        bald(rng.random((4, 3, 3, 3)), "softmax")
    with pytest.raises(BioadaptError, match="activation must be"):
        bald(_softmax_samples(rng), "relu")
    with pytest.raises(BioadaptError, match=r"shape \(T, C, \*spatial\)"):
        bald(np.ones((4, 2)))


def test_random_scores_are_seeded_and_shaped(rng):
    samples = _softmax_samples(rng)
    np.testing.assert_array_equal(random_scores(samples, seed=3), random_scores(samples, seed=3))
    assert random_scores(samples).shape == samples.shape[2:]


def test_patch_score_reductions_find_uncertainty_in_a_few_pixels():
    few_hot = np.zeros((100, 100), dtype=np.float32)
    few_hot[:5, :5] = 0.69  # one ambiguous cell
    spread = np.full((100, 100), 0.05, dtype=np.float32)
    assert patch_score(few_hot) < patch_score(spread)  # the mean misses it
    assert patch_score(few_hot, reduce="max") > patch_score(spread, reduce="max")
    assert patch_score(few_hot, reduce="quantile", quantile=0.999) > patch_score(spread, reduce="quantile",
                                                                                 quantile=0.999)
    mask = np.zeros((100, 100), dtype=bool)
    mask[:10, :10] = True
    assert patch_score(few_hot, mask) == pytest.approx(0.69 * 25 / 100)
    assert patch_score(torch.from_numpy(few_hot), torch.from_numpy(mask)) == pytest.approx(0.1725)


def test_patch_score_bad_input():
    with pytest.raises(BioadaptError, match="excludes every pixel"):
        patch_score(np.ones((4, 4)), np.zeros((4, 4), dtype=bool))
    with pytest.raises(BioadaptError, match="does not match"):
        patch_score(np.ones((4, 4)), np.ones((3, 3), dtype=bool))
    with pytest.raises(BioadaptError, match="reduce must be"):
        patch_score(np.ones((4, 4)), reduce="median")
