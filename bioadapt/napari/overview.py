"""A whole image's uncertainty overview in the viewer: the image's coarse level and its uncertainty map (the mean
acquisition per pixel, from the service's multiscale uncertainty OME-Zarr) laid over the image's full-resolution
coordinates, under the patch layers, so the patches sit where they belong on the slide. A checkbox shows or hides
it; it is refreshed after each scoring job."""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QWidget

from bioadapt.napari.layers import LayerData, put_layers
from bioadapt.napari.session import Session

OVERVIEW_IMAGE_LAYER = "bioadapt overview image"
OVERVIEW_LAYER = "bioadapt uncertainty overview"


def overview_layers(answer: dict[str, Any]) -> list[LayerData]:
    """Layers from ``get_overview``'s answer, bottom to top: the image's coarse level (when the image has one)
    and the uncertainty (NaN, never scored, shown as 0). A coarse pixel covering level-0 pixels i*f .. i*f+f-1 is
    centred at i*f + (f-1)/2: napari puts pixel centres at ``translate + i * scale``."""
    layers = []
    if answer.get("image") is not None:
        image = np.asarray(answer["image"])
        factors = answer["image_factors"]
        if image.shape[0] == 1:
            image, scale, translate = image[0], factors, [(f - 1) / 2 for f in factors]
        else:
            scale, translate = [1, *factors], [0, *[(f - 1) / 2 for f in factors]]
        layers.append(LayerData(OVERVIEW_IMAGE_LAYER, "image", image,
                                {"scale": scale, "translate": translate, "colormap": "gray"}))
    factors = answer["uncertainty_factors"]
    uncertainty = np.nan_to_num(np.asarray(answer["uncertainty"], dtype=np.float32), nan=0.0)
    layers.append(LayerData(OVERVIEW_LAYER, "image", uncertainty,
                            {"scale": factors, "translate": [(f - 1) / 2 for f in factors], "colormap": "magma",
                             "blending": "additive", "opacity": 0.7}))
    return layers


class OverviewToggle(QWidget):
    """'Uncertainty overview' checkbox: shows the overview of the image of ``current_image()`` (an image id, or
    None for the project's first image)."""

    def __init__(self, session: Session, viewer: Any, current_image: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self.viewer = viewer
        self.current_image = current_image
        self.checkbox = QCheckBox("Uncertainty overview")
        self.checkbox.setToolTip("show the whole image with its uncertainty (mean acquisition score per pixel) under "
                                 "the patches")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.checkbox)
        self.checkbox.toggled.connect(lambda on: session.act("showing the overview", self.refresh if on else
                                                             self.hide))
        session.patches_changed.connect(self._update)  # a scoring job ended
        session.project_changed.connect(lambda project: (self.hide(), self._update()))

    def _update(self) -> None:
        if self.checkbox.isChecked() and self.session.project is not None:
            self.session.act("showing the overview", self.refresh)

    def refresh(self) -> None:
        client, project_id = self.session.need_project()
        images = self.session.project.get("images") or []
        image_id = self.current_image() or (images[0]["id"] if images else None)
        if image_id is None:
            return
        self.session.background.run("reading the overview", lambda: client.get_overview(project_id, image_id),
                                    self._arrived)

    def _arrived(self, answer: dict[str, Any]) -> None:
        if self.checkbox.isChecked():
            put_layers(self.viewer, overview_layers(answer), below_others=True)
            self.session.say(f"uncertainty overview of {self.session.image_name(answer['image_id'])}: "
                             f"{100 * answer['scored_fraction']:.1f}% scored")

    def hide(self) -> None:
        for name in (OVERVIEW_LAYER, OVERVIEW_IMAGE_LAYER):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
