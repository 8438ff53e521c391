"""Acquisition functions on MC-dropout samples and patch scores (numpy; torch tensors accepted)."""

from bioadapt.active.acquisition import (ACQUISITIONS, bald, mean_std, predictive_entropy, random_scores,
                                         variation_ratios)
from bioadapt.active.reduce import patch_score

__all__ = ["ACQUISITIONS", "bald", "mean_std", "patch_score", "predictive_entropy", "random_scores",
           "variation_ratios"]
