"""The synthetic cell generator: instance labels that match the image, touching cells, styles that differ."""

import numpy as np
import pytest
from scipy import ndimage

from bioadapt.data.synthetic import STYLES, synthetic_cells
from bioadapt.errors import BioadaptError


def test_same_seed_same_image_other_seed_other_image():
    a = synthetic_cells((128, 128), "nuclei", seed=1)
    b = synthetic_cells((128, 128), "nuclei", seed=1)
    c = synthetic_cells((128, 128), "nuclei", seed=2)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_cells_are_brighter_than_background_and_labels_are_instances(style):
    sample = synthetic_cells((256, 256), style, seed=3)
    assert sample.image.shape == (1, 256, 256) and sample.image.dtype == np.uint16
    ids = np.unique(sample.labels)
    assert ids[0] == 0 and len(ids) > 10
    for label in ids[1:5]:  # every instance is one connected object
        assert ndimage.label(sample.labels == label)[1] == 1
    inside = sample.image[0][sample.labels > 0].mean()
    outside = sample.image[0][ndimage.binary_dilation(sample.labels > 0, iterations=4) == 0].mean()
    assert inside > 1.3 * outside


def test_crowded_style_has_touching_cells():
    labels = synthetic_cells((256, 256), "crowded", seed=0).labels
    right, down = labels[:, 1:] != labels[:, :-1], labels[1:] != labels[:-1]
    touching = (right & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)).sum() + \
        (down & (labels[1:] > 0) & (labels[:-1] > 0)).sum()
    assert touching > 100  # pixels where two different cells meet without background between them


def test_styles_differ_in_shape_and_signal():
    nuclei = synthetic_cells((512, 512), "nuclei", seed=0)
    cytoplasm = synthetic_cells((512, 512), "cytoplasm", seed=0)
    dim = synthetic_cells((512, 512), "dim", seed=0)

    def elongation(labels):
        ratios = []
        for region in ndimage.find_objects(labels):
            if region is not None:
                h, w = (s.stop - s.start for s in region)
                ratios.append(max(h, w) / max(1, min(h, w)))
        return np.median(ratios)

    assert elongation(cytoplasm.labels) > elongation(nuclei.labels) + 0.3
    assert dim.image[0][dim.labels > 0].mean() < 0.5 * nuclei.image[0][nuclei.labels > 0].mean()


def test_two_channels_3d_and_tissue():
    sample = synthetic_cells((12, 64, 64), "nuclei", seed=0, n_channels=2)
    assert sample.image.shape == (2, 12, 64, 64) and sample.labels.shape == (12, 64, 64) and sample.axes == "czyx"
    assert sample.labels.max() > 1
    confined = synthetic_cells((256, 256), "nuclei", seed=0, tissue_fraction=0.3)
    assert 0.25 < confined.tissue.mean() < 0.35
    assert (confined.labels[~confined.tissue] > 0).mean() < 0.05  # cells only spill over the tissue edge


def test_unknown_style_is_an_error():
    with pytest.raises(BioadaptError, match="unknown synthetic style 'plants'"):
        synthetic_cells((64, 64), "plants")
