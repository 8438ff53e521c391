"""Acquisition on MC-dropout samples, patch scores (numpy; torch tensors accepted), segmentation metrics."""

from bioadapt.active.acquisition import (ACQUISITIONS, bald, mean_std, predictive_entropy, random_scores,
                                         variation_ratios)
from bioadapt.active.metrics import (MatchResult, average_precision, dice, f1_score, match_instances,
                                     summarize_matches)
from bioadapt.active.reduce import patch_score
from bioadapt.active.selection import SELECTIONS, select, select_diverse, select_top

#: What scoring computes and how patches are picked when the caller does not say (the service's defaults).
DEFAULT_ACQUISITION = "bald"
DEFAULT_SELECTION = "top"

__all__ = ["ACQUISITIONS", "DEFAULT_ACQUISITION", "DEFAULT_SELECTION", "SELECTIONS", "MatchResult",
           "average_precision", "bald", "dice", "f1_score", "match_instances", "mean_std", "patch_score",
           "predictive_entropy", "random_scores", "select", "select_diverse", "select_top", "summarize_matches",
           "variation_ratios"]
