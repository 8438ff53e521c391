"""A patch from ``get_patch`` as napari layer data: the image, the labels to correct and the uncertainty map, each
placed at the patch origin (``translate``) so that viewer coordinates are those of the full image.

napari is not imported here: the viewer is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bioadapt.errors import BioadaptError

IMAGE_LAYER = "bioadapt image"
LABELS_LAYER = "bioadapt labels"
UNCERTAINTY_LAYER = "bioadapt uncertainty"
METADATA_KEY = "bioadapt"


@dataclass(frozen=True)
class LayerData:
    name: str
    kind: str  # "image" or "labels"
    data: np.ndarray
    properties: dict[str, Any]  # layer attributes set on every patch (translate, colormap, blending, metadata)


def patch_layers(patch: dict[str, Any], project_id: str) -> list[LayerData]:
    """Image (channels on a leading axis when there are several), labels and uncertainty of ``patch``, bottom
    to top. The labels start from the stored correction when the patch is annotated, else from the prediction;
    their metadata names the project and patch they belong to, so a commit never goes to another patch."""
    origin = tuple(int(o) for o in patch["origin"])
    image = np.asarray(patch["image"])
    if image.shape[0] == 1:
        image = image[0]
        image_translate = origin
    else:
        image_translate = (0, *origin)
    labels = patch.get("labels")
    labels = np.array(patch["predicted_labels"] if labels is None else labels)  # a writable copy to paint on
    if not np.issubdtype(labels.dtype, np.integer):
        labels = labels.astype(np.uint32)
    where = {"project_id": project_id, "patch_id": int(patch["id"]), "origin": list(origin),
             "shape": [int(n) for n in patch["shape"]]}
    return [
        LayerData(IMAGE_LAYER, "image", image, {"translate": image_translate, "metadata": {METADATA_KEY: where}}),
        LayerData(UNCERTAINTY_LAYER, "image", np.asarray(patch["uncertainty"], dtype=np.float32),
                  {"translate": origin, "colormap": "magma", "blending": "additive", "opacity": 0.6,
                   "metadata": {METADATA_KEY: where}}),
        LayerData(LABELS_LAYER, "labels", labels, {"translate": origin, "opacity": 0.5,
                                                   "metadata": {METADATA_KEY: where}}),
    ]


def patch_of(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The project and patch a layer was loaded for (from its metadata); None for a layer bioadapt did not load."""
    return metadata.get(METADATA_KEY)


def show_patch(viewer: Any, layers: list[LayerData]) -> None:
    """Put a patch's layers into a napari viewer, make the labels the active layer and move the camera to the
    patch."""
    labels = put_layers(viewer, layers)[-1]
    viewer.layers.selection.active = labels
    viewer.fit_to_view(layers=[labels], margin=0.05)


def put_layers(viewer: Any, layers: list[LayerData], *, below_others: bool = False) -> list[Any]:
    """Add layers to a napari viewer, or update bioadapt's layers of the same names (so their display settings
    stay); new layers go on top, or under every other layer with ``below_others``. Returns the layers."""
    shown = []
    for layer_data in layers:
        existing = viewer.layers[layer_data.name] if layer_data.name in viewer.layers else None
        if existing is not None and type(existing).__name__.lower() != layer_data.kind:
            viewer.layers.remove(existing)
            existing = None
        if existing is None:
            add = viewer.add_labels if layer_data.kind == "labels" else viewer.add_image
            layer = add(layer_data.data, name=layer_data.name, **layer_data.properties)
            if below_others:
                viewer.layers.move(viewer.layers.index(layer), len(shown))
        else:
            layer = existing
            layer.data = layer_data.data
            for attribute, value in layer_data.properties.items():
                setattr(layer, attribute, value)
            if layer_data.kind == "image":
                layer.reset_contrast_limits()
        shown.append(layer)
    return shown


def edited_labels(viewer: Any) -> tuple[dict[str, Any], np.ndarray]:
    """The labels layer's patch (project, patch id, origin, shape) and its current data, to submit."""
    layer = viewer.layers[LABELS_LAYER] if LABELS_LAYER in viewer.layers else None
    where = None if layer is None else patch_of(layer.metadata)
    if where is None:
        raise BioadaptError(f"no patch loaded: the {LABELS_LAYER!r} layer is missing; select a patch in the table")
    labels = np.asarray(layer.data)
    if list(labels.shape) != where["shape"]:
        raise BioadaptError(f"the {LABELS_LAYER!r} layer has shape {list(labels.shape)}, not the patch's "
                            f"{where['shape']}: reload the patch")
    return where, labels
