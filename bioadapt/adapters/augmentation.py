"""Test-time augmentation as the source of a model's stochastic passes, for networks dropout cannot reach.

TorchScript without dropout layers accepts no hooks, and ONNX, TensorFlow or Keras weights run in runtimes
bioadapt cannot change; many zoo packages are TorchScript-first. Their passes differ by the input instead: pass t
sees the image under one of the eight flips and 90-degree rotations of its y-x plane (t mod 8; pass 0 is the image
itself) and, from pass 1 on, a gamma change of its contrast, and its output is mapped back. Disagreement between
such passes marks where the prediction depends on orientation and contrast, which works for any black box (TTA
uncertainty, as in Wang et al. 2019, Neurocomputing 338; MONAI Label scores with it too).

Common random numbers, as for dropout: pass t's transform depends on (round seed, t) alone, so every image of a
round sees the same T transforms, and scores differ by the images, not by the draws.
"""

from __future__ import annotations

import numpy as np

GAMMA_SIGMA = 0.15  # log-normal spread of the contrast change: gamma between about 0.75 and 1.35 for 95 % of passes
DIHEDRAL = 8


class Augmentations:
    """The T transforms of one round: ``apply(t, images)`` before the network, ``undo(t, outputs)`` after it.

    Images and outputs are (B, C, *spatial) with y and x last; a rotation swaps y and x of non-square images, and
    ``undo`` swaps them back."""

    def __init__(self, seed: int, gamma_sigma: float = GAMMA_SIGMA):
        self.seed = int(seed)
        self.gamma_sigma = gamma_sigma

    def gamma(self, t: int) -> float:
        if t == 0:
            return 1.0
        return float(np.exp(self.gamma_sigma * np.random.default_rng([self.seed, t]).standard_normal()))

    def apply(self, t: int, images: np.ndarray) -> np.ndarray:
        rotations, flipped = (t % DIHEDRAL) % 4, (t % DIHEDRAL) >= 4
        out = _with_gamma(images, self.gamma(t))
        out = np.rot90(out, rotations, axes=(-2, -1))
        return np.ascontiguousarray(out[..., ::-1] if flipped else out)

    def undo(self, t: int, outputs: np.ndarray) -> np.ndarray:
        rotations, flipped = (t % DIHEDRAL) % 4, (t % DIHEDRAL) >= 4
        out = outputs[..., ::-1] if flipped else outputs
        return np.ascontiguousarray(np.rot90(out, -rotations, axes=(-2, -1)))


def _with_gamma(images: np.ndarray, gamma: float) -> np.ndarray:
    """Each image's intensities mapped through x -> lo + (hi - lo) ((x - lo) / (hi - lo)) ** gamma, with lo and hi
    its own minimum and maximum: the range stays, the contrast changes (a gain or offset alone would be undone by
    the zero-mean-unit-variance normalisation most packages apply)."""
    if gamma == 1.0:
        return images
    axes = tuple(range(1, images.ndim))
    low = images.min(axis=axes, keepdims=True)
    span = images.max(axis=axes, keepdims=True) - low
    scaled = np.divide(images - low, span, out=np.zeros_like(images), where=span > 0)
    return (low + span * scaled ** gamma).astype(images.dtype, copy=False)
