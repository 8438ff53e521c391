"""Expected numerical warnings are silenced where they arise, not globally: a sigmoid model with large logits
(bioimageio.core's sigmoid post-processing computes 1 / (1 + exp(-x)), whose exp overflows to inf and gives the
right 0) predicts, samples and segments without a RuntimeWarning, and its probabilities stay finite."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from model_factory import cell_patches, unet_package

from bioadapt.adapters import load_adapter
from bioadapt.adapters.unet import UNet


def test_large_logits_through_cores_sigmoid_raise_no_overflow_warning(tmp_path):
    torch.manual_seed(0)
    module = UNet(in_channels=1, out_channels=2, dims=2, features=4, depth=2, batchnorm=False, dropout=0.0).eval()
    with torch.no_grad():  # logits in the thousands: exp(-x) overflows float32 wherever x < -88
        last = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.weight.mul_(1e4)
    model = load_adapter(unet_package(tmp_path / "loud.zip", module=module, weights=("pytorch_state_dict",)),
                         device="cpu")
    image = cell_patches("nuclei", 1, size=64)[0][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        proba = model.predict_proba(image)
        model.mc_proba(image, passes=2)
        model.segment(image)
    assert proba.min() < 1e-30 and proba.max() == 1.0 and np.isfinite(proba).all()  # saturated, finite
    with np.errstate(over="raise"):  # the silencing is local: numpy's state outside is untouched
        try:
            np.exp(np.float32(100))
        except FloatingPointError:
            pass
        else:
            raise AssertionError("np.errstate leaked out of the adapter")
