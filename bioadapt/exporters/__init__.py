"""Fine-tuned models as new, valid bioimage.io packages (``export_bioimageio``), and fresh networks as
packages (``fresh.package_new_model``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bioadapt.errors import BioadaptError

__all__ = ["export_bioimageio"]


def export_bioimageio(model: Any, out: str | Path, *, name: str, description: str,
                      authors: Sequence[str | Mapping[str, Any]], license: str | None = None, version: str | None = None,
                      cite: Sequence[Mapping[str, Any]] | None = None, tags: Sequence[str] | None = None,
                      training: Mapping[str, Any] | None = None, as_folder: bool = False,
                      maintainers: Sequence[str | Mapping[str, Any]] | None = None) -> Path:
    """Write ``model`` (a fine-tuned adapter) as a bioimage.io package (format 0.5) that passes bioimageio.core's
    model test; returns ``out``. Metadata is checked before anything is written, and the package is built and
    tested in a temporary place before it is moved to ``out``.

    ``authors``: names (``["Ada Lovelace"]``) or bioimage.io author entries (``[{"name": "Ada Lovelace",
    "affiliation": "...", "orcid": "..."}]``); ``maintainers``: GitHub user names or maintainer entries
    (``{"github_user": ..., "name": ...}``; bioimageio.core's test asks GitHub whether the user exists, so it needs
    the network unless bioimageio.spec already knows the user); ``cite``: entries with ``text`` and a ``doi`` or ``url``.

    ``training`` (optional): ``regions`` (list of {image, origin, shape}), ``label_store`` (path or URI),
    ``metrics`` (e.g. F1 before/after), ``test_input`` (an annotated patch (C, *spatial); default: one the
    adapter kept from its last fine-tuning).
    """
    from bioadapt.adapters.bioimageio import BioimageioAdapter
    from bioadapt.exporters.metadata import Metadata

    meta = Metadata.checked(name, description, authors, license, version, cite, tags, maintainers)
    out = Path(out).expanduser().resolve()
    if not as_folder and out.suffix != ".zip":
        raise BioadaptError(f"{out} should end in .zip (or pass as_folder=True)")
    if not out.parent.is_dir():
        raise BioadaptError(f"the folder {out.parent} does not exist; create it first")
    if isinstance(model, BioimageioAdapter):
        from bioadapt.exporters.bioimageio_export import export_fine_tuned_bioimageio

        return export_fine_tuned_bioimageio(model, out, meta, training or {}, as_folder)
    from bioadapt.adapters.cellpose import CellposeAdapter

    if isinstance(model, CellposeAdapter):
        from bioadapt.exporters.cellpose_export import export_fine_tuned_cellpose

        return export_fine_tuned_cellpose(model, out, meta, training or {}, as_folder)
    raise BioadaptError(f"cannot export {type(model).__name__}: export_bioimageio takes bioimage.io and Cellpose "
                        "adapters")
