"""The rules the bioimage.io adapter reads from a description: valid input shapes of every kind, outputs on the
input's grid (else one sentence), and the training targets each output layout needs."""

import numpy as np
import pytest

from bioadapt.adapters.segmentation import labels_from_probabilities
from bioadapt.adapters.shapes import AxisSize, InputGrid
from bioadapt.adapters.targets import Targets, affinity_targets, choose_targets
from bioadapt.errors import BioadaptError


def test_input_grid_of_fixed_parameterized_and_referenced_axes():
    grid = InputGrid([AxisSize(min=64, step=16), AxisSize(reference=0), AxisSize(min=512)])
    assert grid.smallest == (64, 64, 512)
    assert grid.is_valid((80, 80, 512)) and not grid.is_valid((80, 96, 512)) and not grid.is_valid((72, 72, 512))
    assert grid.at_least((70, 100, 300)) == (112, 112, 512)  # x follows y: y must reach 100 too
    assert grid.at_most((100, 90, 600)) == (80, 80, 512)
    assert grid.at_least((70, 70, 600)) is None  # nothing holds 600 on a fixed 512 axis
    assert grid.at_most((10, 10, 10)) == grid.smallest
    halved = InputGrid([AxisSize(min=32, step=8), AxisSize(reference=0, ratio=0.5, offset=2)])
    assert halved.smallest == (32, 18) and halved.at_least((33, 30)) == (56, 30)


def test_affinity_targets_follow_torch_em():
    labels = np.zeros((6, 6), np.int64)
    labels[:, :3], labels[:, 3:] = 1, 2
    affinities, valid = affinity_targets(labels, [(-1, 0), (0, -1), (0, -3)])
    assert affinities.shape == valid.shape == (3, 6, 6)
    assert not valid[0, 0].any() and valid[0, 1:].all()  # the row above the first lies outside the patch
    assert affinities[0].sum() == 0  # vertical neighbours share a label everywhere
    assert affinities[1][:, 3].all() and affinities[1].sum() == 6  # the boundary between columns 2 and 3
    assert affinities[2][:, 3:].all() and not valid[2][:, :3].any()
    targets = Targets("affinities", 4, ((-1, 0), (0, -1), (0, -3)))
    made, made_valid = targets.make(labels)  # a leading foreground channel, then the affinities
    assert made.shape == (4, 6, 6) and made[0].all() and made_valid[0].all()


def test_targets_are_read_from_the_outputs_or_refused_with_what_to_pass():
    offsets = [[-1, 0], [0, -1], [-3, 0], [0, -3]]
    assert choose_targets("sigmoid", 4, 2, config={"mws": {"offsets": offsets}}).kind == "affinities"
    assert choose_targets("sigmoid", 2, 2).kind == "foreground_boundaries"
    assert choose_targets("sigmoid", 4, 2).kind == "semantic"
    assert choose_targets("softmax", 3, 2).kind == "classes"
    with pytest.raises(BioadaptError, match="affinity_offsets="):
        choose_targets("sigmoid", 8, 2, wanted="affinities")
    with pytest.raises(BioadaptError, match="3 values each"):
        choose_targets("sigmoid", 2, 3, offsets=[[0, 1], [1, 0]])
    semantic = choose_targets("sigmoid", 4, 2)
    instances = np.arange(36).reshape(6, 6)
    with pytest.raises(BioadaptError, match="output_targets='affinities'"):
        semantic.make(instances)


def test_affinities_segment_into_the_objects_they_separate():
    labels = np.zeros((12, 12), np.int64)
    labels[:, :6], labels[:, 6:] = 1, 2
    targets = choose_targets("sigmoid", 2, 2, offsets=[[-1, 0], [0, -1]])
    affinities, _ = affinity_targets(labels, targets.offsets)
    segmentation = labels_from_probabilities(affinities, "sigmoid", targets)
    assert len(np.unique(segmentation)) == 2 and (segmentation[:, :5] == segmentation[0, 0]).all()
