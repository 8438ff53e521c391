"""Acquisition on MC-dropout samples, patch scores (numpy; torch tensors accepted), patch selection over a scored
pool, segmentation metrics."""

from bioadapt.active.acquisition import (ACQUISITIONS, bald, mean_std, predictive_entropy, random_scores,
                                         variation_ratios)
from bioadapt.active.coreset import select_coreset
from bioadapt.active.maps import DEFAULT_MAP, MAPS, readable_map
from bioadapt.active.metrics import (MatchResult, average_precision, best_iou, dice, f1_score, match_instances,
                                     summarize_matches)
from bioadapt.active.objects import object_patch_score, object_regions, object_scores
from bioadapt.active.reduce import patch_score
from bioadapt.active.selection import select_diverse, select_top
from bioadapt.active.strategies import (DEFAULT_ACQUISITION, DEFAULT_REDUCE, DEFAULT_SELECTION, DEFAULT_STRATEGY,
                                        SELECTIONS, STRATEGIES, Strategy, select)
from bioadapt.active.typicality import select_typical, select_typical_half_top, typicality

__all__ = ["ACQUISITIONS", "DEFAULT_ACQUISITION", "DEFAULT_MAP", "DEFAULT_REDUCE", "DEFAULT_SELECTION",
           "DEFAULT_STRATEGY", "MAPS", "MatchResult", "SELECTIONS", "STRATEGIES", "Strategy", "average_precision",
           "bald", "best_iou", "dice", "f1_score", "match_instances", "mean_std", "object_patch_score",
           "object_regions", "object_scores", "patch_score", "predictive_entropy", "random_scores", "readable_map",
           "select", "select_coreset", "select_diverse", "select_top", "select_typical", "select_typical_half_top",
           "summarize_matches", "typicality", "variation_ratios"]
