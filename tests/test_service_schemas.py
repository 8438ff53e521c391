"""The service's argument schemas, without a service: fine-tuning parameters follow the adapters' own parameter
records, every integer refuses booleans, every text refuses control and format characters."""

from __future__ import annotations

import typing
from dataclasses import fields

import pytest
from pydantic import ValidationError

from bioadapt.adapters.base import FineTuneParams
from bioadapt.errors import BioadaptError
from bioadapt.service import schemas as s


def _adapter_params(kind: str) -> set[str]:
    if kind == "cellpose":
        from bioadapt.adapters.cellpose import CellposeTrainParams

        return {f.name for f in fields(CellposeTrainParams)}
    return {f.name for f in fields(FineTuneParams)}


@pytest.mark.parametrize("kind", sorted(s.TUNING))
def test_tuning_schemas_name_exactly_the_adapters_parameters(kind):
    """A parameter the adapter gains or drops must appear or go here too (fine_tune's own three excepted)."""
    pytest.importorskip("cellpose") if kind == "cellpose" else None
    assert set(s.TUNING[kind].model_fields) | set(s.TUNED_BY_FINE_TUNE) == _adapter_params(kind)


def _int_fields(model: type) -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        arguments = typing.get_args(info.annotation) or (info.annotation,)
        if int in arguments or any(typing.get_origin(a) is typing.Annotated and typing.get_args(a)[0] is int
                                   for a in arguments):
            names.append(name)
    return names


def test_no_integer_argument_takes_a_boolean():
    checked = 0
    for name, function in s.FUNCTIONS.items():
        model = function.args
        for field in _int_fields(model):
            required = {k: "x" for k, info in model.model_fields.items() if info.is_required() and k != field}
            if "origin" in required or "shape" in required:
                required.update(origin=[0, 0], shape=[8, 8])
            if "model" in required:
                required["model"] = "m"
            with pytest.raises(ValidationError, match=field):
                model.model_validate({**required, field: True})
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("text", ["a\x00b", "gpj.\u202eexe", "tab\there", "zero\u200bwidth", "bell\x07"])
def test_names_and_uris_refuse_control_and_format_characters(text):
    for model, values in ((s.CreateProject, {"name": text, "model": "m"}),
                          (s.AddImage, {"project_id": "p", "uri": text}),
                          (s.GetProject, {"project_id": text})):
        with pytest.raises(ValidationError, match="printable"):
            model.model_validate(values)


def test_descriptions_keep_their_lines_and_names_are_not_blank():
    assert s.CreateProject.model_validate({"name": "liver", "model": "m", "description": "a\n\tb"}).description
    with pytest.raises(ValidationError, match="blank"):
        s.CreateProject.model_validate({"name": "   ", "model": "m"})
    assert s.CreateProject.model_validate({"name": "Zellkern – été 細胞", "model": "m"}).name


@pytest.mark.parametrize("params, message", [
    ({"bogus": 1}, r"params\.bogus: Extra inputs"),
    ({"val_fraction": 5}, r"params\.val_fraction: Input should be less than 1"),
    ({"seed": "x"}, r"params\.seed: Input should be a valid integer"),
    ({"seed": True}, r"params\.seed: Input should be a valid integer"),
    ({"epochs": -5}, r"params\.epochs: give epochs as fine_tune's own argument"),
    ({"augment": "yes"}, r"params\.augment: Input should be a valid boolean"),
    ({"val_metric": "iou"}, r"params\.val_metric: Input should be 'dice' or 'f1'"),
])
def test_fine_tuning_parameters_are_checked_at_the_door(params, message):
    with pytest.raises(BioadaptError, match=message):
        s.tuning_params("bioimageio", params)


def test_fine_tuning_parameters_pass_only_what_was_set():
    assert s.tuning_params("bioimageio", {"seed": 3, "augment": False}) == {"seed": 3, "augment": False}
    assert s.tuning_params("bioimageio", {"val_metric": "f1"}) == {"val_metric": "f1"}
    assert s.tuning_params("cellpose", {"bsize": 128}) == {"bsize": 128}
    with pytest.raises(BioadaptError, match=r"params\.augment: Extra inputs"):  # not a Cellpose parameter
        s.tuning_params("cellpose", {"augment": True})


def test_the_registry_names_a_handler_for_every_function(tmp_path):
    """Each function of ``schemas.FUNCTIONS`` is either a task (a module with ``submit``) or a method of the
    service, and the service, its Hypha face and the client offer exactly the registry's functions."""
    import importlib
    import inspect

    from bioadapt.service.api import BioadaptService
    from bioadapt.service.client import BioadaptClient
    from bioadapt.service.hypha_service import build_service

    api = BioadaptService(tmp_path / "data")
    try:
        published = {key for key, value in build_service(api).items() if callable(value)}
    finally:
        api.close()
    assert published == set(s.FUNCTIONS)

    for name, function in s.FUNCTIONS.items():
        if function.task is not None:
            submit = importlib.import_module(f"bioadapt.service.tasks.{function.task}").submit
            assert list(inspect.signature(submit).parameters) == ["context", "caller", "args", "progress"], name
        assert callable(getattr(BioadaptService, name)) and callable(getattr(BioadaptClient, name)), name
    assert set(s.JOB_FUNCTIONS) == {"score", "fine_tune", "evaluate", "predict", "export_model"}
    assert s.SLOW_FUNCTIONS >= set(s.JOB_FUNCTIONS)
