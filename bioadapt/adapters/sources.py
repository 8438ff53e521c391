"""Where a bioimage.io model comes from (an rdf.yaml, a package folder or .zip, a URL or a zoo id), read as a
format 0.5 description.

One rewrite happens before validation: an output axis whose fixed size equals the input's fixed size on the same
axis becomes a size reference to that input axis. The two say the same for a fixed-shape model, but bioimageio.spec
refuses to convert a 0.4 description whose fixed-size output has a halo, and bioimageio.core can only tile outputs
whose size follows the input.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from bioadapt.adapters.bioimageio_weights import choose_format
from bioadapt.errors import BioadaptError

DESCRIPTION_FILES = ("rdf.yaml", "bioimageio.yaml")
SPATIAL_AXES = ("x", "y", "z")


def classify_source(source: str | Path) -> tuple[str, str]:
    """("file" | "folder" | "url" | "id", normalised source); a missing local path is an error."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        return "url", text
    path = Path(text).expanduser()
    if path.is_dir():
        found = [path / n for n in DESCRIPTION_FILES if (path / n).is_file()]
        if not found:
            raise BioadaptError(f"{path} is a folder without {' or '.join(DESCRIPTION_FILES)}; point to a "
                                "bioimage.io package folder, its rdf.yaml or its .zip")
        return "folder", str(found[0])
    if path.is_file():
        return "file", str(path)
    looks_like_path = path.suffix in (".yaml", ".yml", ".zip") or "/" in text and not text.startswith("10.")
    if looks_like_path:
        raise BioadaptError(f"model file {text} does not exist; give an existing rdf.yaml, package folder or .zip")
    return "id", text


def load_model_description(source: str | Path):
    """A bioimage.io model description in format 0.5 (0.4 descriptions are converted by bioimageio.spec)."""
    from bioimageio.spec import InvalidDescr, ValidationContext, build_description
    from bioimageio.spec.utils import open_bioimageio_yaml

    kind, where = classify_source(source)
    try:
        opened = open_bioimageio_yaml(where)
    except Exception as e:  # noqa: BLE001 - bioimageio.spec raises ValueError, OSError or httpx errors offline
        if kind in ("url", "id"):
            raise BioadaptError(
                f"could not fetch bioimage.io model {where!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                "Zoo ids and URLs need the network: download the package (.zip) where there is network and "
                "pass its local path") from e
        raise BioadaptError(f"could not read bioimage.io model {where}: {e}") from e
    context = ValidationContext(root=opened.original_root, file_name=opened.original_file_name,
                                original_source_name=opened.original_source_name, perform_io_checks=False)
    content = dict(opened.content)
    if content.get("type") not in (None, "model"):
        raise BioadaptError(f"{where} describes a {content.get('type')}, not a model")
    original = build_description(copy.deepcopy(content), context=context, format_version="discover")
    if isinstance(original, InvalidDescr):
        raise BioadaptError(f"{where} is not a valid bioimage.io model description: {_errors(original)}")
    if original.type != "model":
        raise BioadaptError(f"{where} describes a {original.type}, not a model")
    descr = build_description(outputs_on_input_grid(content), context=context, format_version="latest")
    if isinstance(descr, InvalidDescr):
        choose_format(original)  # a model that cannot run here is refused for that, the clearer reason
        raise BioadaptError(f"{where} (format {original.format_version}) cannot be converted to format 0.5, "
                            f"which bioadapt runs: {_errors(descr)}")
    return descr


def _errors(invalid: Any) -> str:
    return "; ".join(f"{'.'.join(map(str, e.loc)) or 'description'}: {e.msg}"
                     for e in invalid.validation_summary.errors[:5])


def outputs_on_input_grid(content: dict[str, Any]) -> dict[str, Any]:
    """A copy of a raw description whose outputs of the input's fixed spatial size refer to the input instead."""
    content = copy.deepcopy(content)
    inputs, outputs = content.get("inputs") or [], content.get("outputs") or []
    if len(inputs) != 1:
        return content
    if str(content.get("format_version", "")).startswith("0.4"):
        for output in outputs:
            _refer_0_4(inputs[0], output)
    else:
        for output in outputs:
            _refer_0_5(inputs[0], output)
    return content


def _refer_0_4(input_: dict, output: dict) -> None:
    axes, in_shape, out_shape = output.get("axes"), input_.get("shape"), output.get("shape")
    if axes != input_.get("axes") or not isinstance(in_shape, list) or not isinstance(out_shape, list):
        return
    if len(in_shape) != len(out_shape) or "b" not in axes:
        return
    spatial = [i for i, a in enumerate(axes) if a in SPATIAL_AXES]
    if not spatial or any(out_shape[i] != in_shape[i] for i in spatial):
        return
    scale = [1.0 if a in SPATIAL_AXES or a == "b" else 0.0 for a in axes]
    offset = [0.0 if a in SPATIAL_AXES or a == "b" else out_shape[i] / 2 for i, a in enumerate(axes)]
    output["shape"] = {"reference_tensor": input_.get("name"), "scale": scale, "offset": offset}


def _axis_id(axis: Any) -> str | None:
    """A 0.5 axis's id as written or by default (space axes default to x)."""
    if not isinstance(axis, dict):
        return None
    return axis.get("id") or {"space": "x"}.get(axis.get("type"), axis.get("type"))


def _refer_0_5(input_: dict, output: dict) -> None:
    in_axes = {_axis_id(a): a for a in input_.get("axes", [])}
    for axis in output.get("axes", []):
        axis_id = _axis_id(axis)
        if axis_id not in SPATIAL_AXES or not isinstance(axis.get("size"), int):
            continue
        source = in_axes.get(axis_id)
        if source is not None and source.get("size") == axis["size"] and source.get("scale", 1) == axis.get(
                "scale", 1):
            axis["size"] = {"tensor_id": input_.get("id", "input"), "axis_id": axis_id}
