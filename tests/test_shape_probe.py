"""Which fixed-shape networks may score and train on smaller inputs: only those whose outputs, inside the halo,
do not change when the input is cut smaller (``bioadapt.adapters.shape_probe``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bioadapt.adapters.shape_probe import convolutional_grid


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Pooled(nn.Module):
    """Two levels of 2 x 2 pooling and back: valid on inputs in steps of 4 pixels."""

    def __init__(self, global_mean: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.down = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.up = nn.Sequential(nn.Upsample(scale_factor=4), nn.Conv2d(4, 1, 3, padding=1))
        self.global_mean = global_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.down(x)
        if self.global_mean:  # a style vector, as Cellpose's: every pixel sees the whole input
            features = features + features.mean((2, 3), keepdim=True)
        return self.up(features)


class Flattened(nn.Module):
    """A dense layer over the whole image: runs only at its one size."""

    def __init__(self, size: int):
        super().__init__()
        self.dense = nn.Linear(size * size, size * size)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x.flatten(1)).reshape(x.shape)


def test_a_pooling_network_takes_its_step_from_its_smallest_window_up():
    grid = convolutional_grid(Pooled(), fixed=(64, 64), halo=(12, 12), channels=1)
    assert grid is not None
    assert [s.step for s in grid.sizes] == [4, 4]
    assert grid.smallest == (28, 28)  # on 64's step-4 lattice, with 4 pixels inside two halos of 12
    assert grid.at_least((40, 41)) == (40, 44)


def test_a_network_that_sees_the_whole_input_or_only_runs_at_its_size_keeps_it():
    assert convolutional_grid(Pooled(global_mean=True), fixed=(64, 64), halo=(12, 12), channels=1) is None
    assert convolutional_grid(Flattened(32), fixed=(32, 32), halo=(4, 4), channels=1) is None


def test_a_receptive_field_beyond_the_halo_keeps_the_fixed_shape():
    assert convolutional_grid(Pooled(), fixed=(64, 64), halo=(0, 0), channels=1) is None
