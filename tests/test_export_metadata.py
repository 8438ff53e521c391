"""Package metadata in bioimage.io's own shapes: author, maintainer and cite entries as the spec writes them (what
community model descriptions use), as well as plain names; checked before anything is written."""

import zipfile

import pytest
import yaml
from model_factory import cell_patches, unet_package

from bioadapt.adapters import load_adapter
from bioadapt.errors import BioadaptError
from bioadapt.exporters import export_bioimageio
from bioadapt.exporters.metadata import Metadata

ADA = {"name": "Ada Lovelace", "affiliation": "Analytical Engine Society", "orcid": "0000-0002-1825-0097"}
# bioimageio.core's test asks GitHub whether a maintainer's user exists, except for the users bioimageio.spec
# knows (its KNOWN_GITHUB_USERS): one of those keeps the export test off the network
MAINTAINER = {"github_user": "constantinpape", "name": "Constantin Pape"}
CITE = {"text": "Ronneberger et al. U-Net (2015)", "doi": "10.1007/978-3-319-24574-4_28"}


def _checked(**change):
    arguments = dict(name="n", description="d", authors=["A"], license="MIT", version=None, cite=None,
                     tags=None) | change
    return Metadata.checked(**arguments)


def test_plain_names_and_spec_entries_both_become_spec_entries():
    meta = _checked(authors=["Grace Hopper", ADA], maintainers=["octocat", {"github_user": "ada", "name": "Ada"}],
                    cite=[CITE])
    assert meta.authors == ({"name": "Grace Hopper"}, ADA)
    assert meta.maintainers == ({"github_user": "octocat"}, {"github_user": "ada", "name": "Ada"})
    assert meta.cite == (CITE,)


@pytest.mark.parametrize("change, message", [
    (dict(authors=[{"name": "Ada", "age": 36}]), r"author .*\(age: Extra inputs are not permitted\)"),
    (dict(authors=[{"affiliation": "x"}]), r"author .*\(name: Field required\)"),
    (dict(authors=[{"name": "Ada", "orcid": "1234"}]), r"author .*orcid"),
    (dict(authors=[3]), r"each author must be a name or \{'name'"),
    (dict(authors={"name": "Ada"}), r"a list of names or of bioimage.io author entries"),
    (dict(maintainers=[{"name": "Ada"}]), r"maintainer .*\(github_user: Field required\)"),
    (dict(maintainers="octocat"), r"maintainers and cite are lists"),
    (dict(cite=[{"text": "x"}]), r"cite entry .*doi"),
])
def test_entries_the_spec_refuses_are_refused_with_the_field_named(change, message):
    with pytest.raises(BioadaptError, match=message):
        _checked(**change)


def test_a_real_export_carries_the_entries_and_passes_the_model_test(tmp_path):
    model = load_adapter(unet_package(tmp_path / "parent.zip", out_channels=1, weights=("pytorch_state_dict",)),
                         device="cpu")
    model.fine_tune(cell_patches("crowded", 2, seed=2), {"epochs": 1})
    out = export_bioimageio(model, tmp_path / "adapted.zip", name="adapted", description="fine-tuned",
                            authors=[ADA, "Grace Hopper"], maintainers=[MAINTAINER],
                            cite=[CITE], license="MIT")  # raises unless bioimageio.core's test passed
    with zipfile.ZipFile(out) as z:
        rdf = yaml.safe_load(z.read("rdf.yaml"))
    assert rdf["authors"] == [ADA, {"name": "Grace Hopper"}]
    assert rdf["maintainers"] == [MAINTAINER]
    assert rdf["cite"] == [CITE]
