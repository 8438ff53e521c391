"""Where a bioimage.io model comes from: an rdf.yaml, a package folder or .zip, a URL or a zoo id."""

from __future__ import annotations

from pathlib import Path

from bioadapt.errors import BioadaptError

DESCRIPTION_FILES = ("rdf.yaml", "bioimageio.yaml")


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
    """A bioimage.io model description in format 0.5 (0.4 packages are converted by bioimageio.spec)."""
    from bioimageio.spec import InvalidDescr
    from bioimageio.spec import load_model_description as spec_load

    kind, where = classify_source(source)
    try:
        descr = spec_load(where, format_version="latest", perform_io_checks=False)
    except Exception as e:  # bioimageio.spec raises ValueError, OSError or httpx errors when offline
        if kind in ("url", "id"):
            raise BioadaptError(
                f"could not fetch bioimage.io model {where!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                "Zoo ids and URLs need the network: download the package (.zip) where there is network and "
                "pass its local path") from e
        raise BioadaptError(f"could not read bioimage.io model {where}: {e}") from e
    if isinstance(descr, InvalidDescr):
        errors = "; ".join(f"{'.'.join(map(str, err.loc))}: {err.msg}" for err in descr.validation_summary.errors[:5])
        raise BioadaptError(f"{where} is not a valid bioimage.io model description: {errors}")
    if descr.type != "model":
        raise BioadaptError(f"{where} describes a {descr.type}, not a model")
    return descr
