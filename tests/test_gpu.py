"""The bioimage.io adapter on a CUDA GPU (bioadapt's U-Net packaged for bioimage.io): every path runs on the
GPU and agrees with the CPU. Skips without CUDA; benchmarks/gpu/run.sh runs it on a GPU machine. The Cellpose
networks' GPU test is in test_adapters_cellpose.py."""

import numpy as np
import pytest
import torch

from bioadapt.adapters import load_adapter
from model_factory import cell_patches, unet_package

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_unet_on_the_gpu_matches_the_cpu_and_trains(tmp_path):
    package = unet_package(tmp_path / "unet.zip", dropout=0.1)
    gpu, cpu = load_adapter(package, device="cuda"), load_adapter(package, device="cpu")
    assert next(gpu.module.parameters()).is_cuda
    pairs = cell_patches("crowded", 6, seed=2)
    images = np.stack([p[0] for p in pairs])
    np.testing.assert_allclose(gpu.predict_proba(images), cpu.predict_proba(images), atol=1e-3)
    for scope in ("full", "partial", "head"):
        samples = gpu.mc_proba(images, passes=4, seed=1, scope=scope)
        np.testing.assert_allclose(samples, cpu.mc_proba(images, passes=4, seed=1, scope=scope), atol=1e-3)
        assert np.abs(samples[0] - samples[1]).max() > 1e-4
    assert gpu.segment(images).shape == images.shape[:1] + images.shape[2:]
    result = gpu.fine_tune(pairs, {"epochs": 2, "batch_size": 2})
    assert result.epochs_run == 2 and next(gpu.module.parameters()).is_cuda
