"""One interface over bioimage.io and Cellpose models: probabilities, MC-dropout samples, segmentation,
fine-tuning and weights (see ``Adapter``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bioadapt.adapters.base import Adapter, FineTuneParams, FineTuneResult, ModelInfo
from bioadapt.errors import BioadaptError

__all__ = ["Adapter", "FineTuneParams", "FineTuneResult", "ModelInfo", "load_adapter"]


def load_adapter(source: str | Path, device: str = "auto", dropout_p: float = 0.05, threads: int | None = None,
                 **options: Any) -> Adapter:
    """Load a model behind the adapter interface.

    ``threads``: torch's CPU thread count for this process (``torch.set_num_threads``; process-wide), or None
    to leave it as it is (torch's default: one per core; Ray actors get OMP_NUM_THREADS from their CPU share).

    ``source``: an rdf.yaml, a bioimage.io package folder or .zip, a URL or a bioimage.io zoo id (the last two
    need the network), or ``cellpose:<builtin name or weights path>``. ``options`` go to the adapter:
    for bioimage.io models ``mc_scope`` ("full" or "head"), ``output_activation`` ("sigmoid"/"softmax", for
    models that do not declare it), ``weights_format``, ``dropout_kind``, ``memory_budget`` (bytes); for
    Cellpose ``mc_scope``, ``channels`` (Cellpose's [cytoplasm, nucleus] pair, default [0, 0]), ``diameter``,
    ``flow_threshold``, ``cellprob_threshold``, ``min_size``, ``dropout_kind``, ``memory_budget``.
    """
    if threads is not None:
        if threads < 1:
            raise BioadaptError(f"threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(int(threads))
    text = str(source)
    if text.startswith("cellpose:"):
        try:
            from bioadapt.adapters.cellpose import CellposeAdapter
        except ImportError as e:  # Cellpose 4 imports torchvision, which fails next to a mismatched torch
            raise BioadaptError(f"Cellpose cannot be imported here ({e}); install cellpose with a torch and "
                                "torchvision that match (see constraints.txt)") from e
        return CellposeAdapter.load(text.removeprefix("cellpose:"), device=device, dropout_p=dropout_p, **options)
    from bioadapt.adapters.bioimageio import BioimageioAdapter

    return BioimageioAdapter.load(source, device=device, dropout_p=dropout_p, **options)
