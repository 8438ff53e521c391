"""References a worker process opens by itself: an image (URI, axes, channels and the fsspec options that reach it,
credentials included) and a labelled region (an image window with its corrected labels)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bioadapt.data.image import Image, open_image
from bioadapt.data.labels import LabelStore
from bioadapt.errors import BioadaptError


@dataclass(frozen=True)
class ImageRef:
    """What a worker needs to open an image itself; ``storage_options`` go to fsspec (e.g. s3 key, secret and
    endpoint)."""

    uri: str
    axes: str | None = None
    channels: tuple[int, ...] | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def open(self) -> Image:
        try:
            return open_image(self.uri, self.axes, list(self.channels) if self.channels else None,
                              storage_options=self.storage_options or None)
        except Exception as e:
            raise BioadaptError(f"{os.uname().nodename} cannot open image {self.uri!r}: {e}. On a cluster, image "
                                "URIs must be reachable from every worker (shared storage, s3://, http://)") from e


@dataclass(frozen=True)
class LabelledRegion:
    """An annotated window a worker reads itself: image, label store and window."""

    image: ImageRef
    label_store: str
    origin: tuple[int, ...]
    shape: tuple[int, ...]

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """(float32 pixels (C, *spatial), int64 labels (*spatial))."""
        pixels = self.image.open().read(self.origin, self.shape, dtype="float32")
        return pixels, LabelStore.open(self.label_store).read(self.origin, self.shape).astype(np.int64)
