"""Acquisition functions on Monte-Carlo samples: one signature, one per-pixel map each.

``samples`` has shape (T, C, *spatial): T stochastic passes of probabilities. With ``activation="softmax"``
the C channels are classes that sum to one; with ``"sigmoid"`` they are C independent Bernoulli channels,
each scored as the two classes (p, 1 - p) and averaged over channels. Every function returns a float32
map of shape ``spatial``, as a numpy array or a torch tensor (on the input's device) to match the input.
Entropies are in nats; 0 log 0 is taken as 0, so probabilities of exactly 0 or 1 give no NaN.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from bioadapt.errors import BioadaptError

Activation = Literal["softmax", "sigmoid"]
SUM_TOLERANCE = 1e-2  # float16 probabilities are off by ~1e-3; logits are off by far more


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _check(samples: Any, activation: str):
    """float32 samples (numpy or torch), checked to be probabilities of the given kind."""
    if activation not in ("softmax", "sigmoid"):
        raise BioadaptError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    samples = samples.detach().float() if _is_torch(samples) else np.asarray(samples, dtype=np.float32)
    low, high = float(samples.min()), float(samples.max())
    if samples.ndim < 3:
        raise BioadaptError(f"samples must have shape (T, C, *spatial), got {tuple(samples.shape)}")
    if low < -1e-4 or high > 1 + 1e-4:
        raise BioadaptError(f"samples range from {low:.3g} to {high:.3g}: acquisition needs probabilities in [0, 1], "
                            "not logits; apply the model's output activation first")
    if activation == "softmax":
        sums = samples.sum(1)
        worst = float(abs(sums - 1).max())
        if worst > SUM_TOLERANCE:
            raise BioadaptError(f"softmax samples must sum to 1 over C (axis 1) but are off by up to {worst:.3g}; "
                                "use activation='sigmoid' for independent channels")
    return samples.clamp(0, 1) if _is_torch(samples) else np.clip(samples, 0, 1)


def _bernoulli(samples):
    """Sigmoid channels as two-class probabilities: (T, C, *s) -> (T, 2, C, *s)."""
    if _is_torch(samples):
        import torch

        return torch.stack([1 - samples, samples], dim=1)
    return np.stack([1 - samples, samples], axis=1)


def _entropy(p, axis: int):
    """-sum p log p over ``axis`` with 0 log 0 = 0."""
    if _is_torch(p):
        return -(p * p.clamp_min(1e-30).log()).sum(axis)
    return -(p * np.log(np.maximum(p, 1e-30))).sum(axis)


def _classes(samples, activation: str):
    """Class probabilities with the class axis at 1: (T, K, *s), K=C for softmax, (T, 2, C, *s) for sigmoid."""
    return _bernoulli(samples) if activation == "sigmoid" else samples


def _channel_mean(values, activation: str):
    """Sigmoid maps carry a leading channel axis: average it away."""
    return values.mean(0) if activation == "sigmoid" else values


def _float32(values):
    return values.float() if _is_torch(values) else values.astype(np.float32, copy=False)


def predictive_entropy(samples: Any, activation: Activation = "softmax"):
    """H[mean_t p_t]: total uncertainty of the averaged prediction."""
    probs = _classes(_check(samples, activation), activation)
    return _float32(_channel_mean(_entropy(probs.mean(0), axis=0), activation))


def bald(samples: Any, activation: Activation = "softmax"):
    """BALD = H[mean_t p_t] - mean_t H[p_t]: the mutual information between prediction and weights."""
    probs = _classes(_check(samples, activation), activation)
    mutual = _entropy(probs.mean(0), axis=0) - _entropy(probs, axis=1).mean(0)
    mutual = mutual.clamp_min(0) if _is_torch(mutual) else np.maximum(mutual, 0)  # rounding can dip below 0
    return _float32(_channel_mean(mutual, activation))


def variation_ratios(samples: Any, activation: Activation = "softmax"):
    """1 - (passes that vote for the modal class) / T."""
    probs = _check(samples, activation)
    passes = probs.shape[0]
    if activation == "sigmoid":
        foreground_votes = (probs > 0.5).sum(0)  # (C, *s)
        agreeing = _maximum(foreground_votes, passes - foreground_votes)
        return _float32((1 - agreeing / passes).mean(0))
    winners = probs.argmax(1)  # (T, *s)
    votes = [(winners == k).sum(0) for k in range(probs.shape[1])]
    agreeing = votes[0]
    for count in votes[1:]:
        agreeing = _maximum(agreeing, count)
    return _float32(1 - agreeing / passes)


def _maximum(a, b):
    if _is_torch(a):
        import torch

        return torch.maximum(a, b if _is_torch(b) else torch.as_tensor(b, device=a.device))
    return np.maximum(a, b)


def mean_std(samples: Any, activation: Activation = "softmax"):
    """Standard deviation over passes, averaged over classes (softmax) or channels (sigmoid)."""
    probs = _check(samples, activation)
    std = probs.std(0, correction=0) if _is_torch(probs) else probs.std(0)
    return _float32(std.mean(0))


def random_scores(samples: Any, activation: Activation = "softmax", seed: int | None = None):
    """Uniform random scores of the samples' spatial shape: the baseline every strategy must beat."""
    spatial = tuple(samples.shape[2:])
    values = np.random.default_rng(seed).random(spatial, dtype=np.float32)
    if _is_torch(samples):
        import torch

        return torch.from_numpy(values).to(samples.device)
    return values


ACQUISITIONS = {"bald": bald, "predictive_entropy": predictive_entropy, "variation_ratios": variation_ratios,
                "mean_std": mean_std, "random": random_scores}
