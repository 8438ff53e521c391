"""One interface over bioimage.io and Cellpose models: probabilities, MC-dropout samples, segmentation,
fine-tuning and weights (see ``Adapter``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bioadapt.adapters.base import (DEFAULT_DROPOUT_P, DEFAULT_MC_PASSES, Adapter, FineTuneParams, FineTuneResult,
                                    ModelInfo)
from bioadapt.errors import BioadaptError

__all__ = ["DEFAULT_DROPOUT_P", "DEFAULT_MC_PASSES", "Adapter", "FineTuneParams", "FineTuneResult", "ModelInfo",
           "load_adapter"]


def load_adapter(source: str | Path, device: str = "auto", dropout_p: float = DEFAULT_DROPOUT_P,
                 threads: int | None = None, **options: Any) -> Adapter:
    """Load a model behind the adapter interface.

    ``threads``: torch's CPU thread count for this process (``torch.set_num_threads``; process-wide), or None
    to leave it as it is (torch's default: one per core; Ray actors get OMP_NUM_THREADS from their CPU share).

    ``source``: an rdf.yaml, a bioimage.io package folder or .zip, a URL or a bioimage.io zoo id (the last two
    need the network), or ``cellpose:<builtin name or weights path>``. ``options`` go to the adapter:
    for bioimage.io models ``mc_scope`` ("full", "partial" or "head"; default "partial" where hooks reach the
    network), ``mc_depth`` (dropout sites from the network's end that "partial" keeps stochastic),
    ``output_activation`` ("sigmoid"/"softmax", for models that do not declare it), ``weights_format``
    (default: trainable before inference-only, local files before remote ones), ``dropout_kind``,
    ``memory_budget`` (bytes; larger images go in blocks), ``output_targets`` ("foreground",
    "foreground_boundaries", "affinities", "semantic" or "classes", for outputs whose meaning the description
    does not say) and ``affinity_offsets`` (one offset per affinity channel, where the description's config has
    none) and ``sample_source`` ("auto": MC dropout where it can reach the network, else test-time augmentation;
    "dropout"; "tta") and ``fixed_shape`` ("probe": a fixed input shape the torch network gives the same outputs
    without is left for smaller inputs in scoring and training; "keep"); for Cellpose ``mc_scope``, ``mc_depth``, ``channels`` (Cellpose 3's [cytoplasm, nucleus]
    pair, default [0, 0]), ``diameter``, ``flow_threshold``, ``cellprob_threshold``, ``min_size``,
    ``input_channels``, ``dropout_kind``, ``memory_budget``, ``bfloat16`` (Cellpose 4; default: on GPUs only).
    """
    if threads is not None:
        if threads < 1:
            raise BioadaptError(f"threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(int(threads))
    text = str(source)
    if text.startswith("cellpose:"):
        from bioadapt.adapters.cellpose import CellposeAdapter  # Cellpose itself is imported (and checked) by load

        return CellposeAdapter.load(text.removeprefix("cellpose:"), device=device, dropout_p=dropout_p, **options)
    from bioadapt.adapters.bioimageio import BioimageioAdapter

    return BioimageioAdapter.load(source, device=device, dropout_p=dropout_p, **options)
