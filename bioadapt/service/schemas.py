"""The service's functions: their arguments as pydantic models, and the registry of functions (``FUNCTIONS``:
name -> arguments -> task). The models give each function its JSON schema (for ImJoy, napari, the page and LLM
agents), validate every call (Hypha publishes schemas but does not check calls), and are the one place that
declares each function's parameters and defaults: the Python client's methods are made from them, and a parameter
the caller leaves out keeps the default declared here (or, for model settings, the adapter's own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from bioadapt.active import ACQUISITIONS, DEFAULT_STRATEGY, STRATEGIES
from bioadapt.adapters.base import DEFAULT_DROPOUT_P, DEFAULT_MC_PASSES, DROPOUT_KINDS, MC_SCOPES
from bioadapt.errors import BioadaptError

Acquisition = Literal[tuple(ACQUISITIONS)]  # per-pixel maps, by their names in bioadapt.active
StrategyName = Literal[tuple(STRATEGIES)]  # acquisition + patch score + selection over the pool (bioadapt.active)
PatchOrder = Literal["selection", "score", "id", "created", "annotated"]
PatchStatus = Literal["pending", "annotated", "skipped"]
# The service's own defaults (the model's are the adapters': bioadapt.adapters.base). Clients read them from the
# argument models below, or from the JSON schemas the service publishes (the page).
DEFAULT_RANDOM_PATCHES = 64  # patches a random-mode score draws without n_patches
DEFAULT_PATCH_SHAPE = (256, 256)
DEFAULT_SELECT = 32  # patches picked for annotation
MAX_PATCHES = 100_000
FEATURELESS_STRATEGY = "bald"  # the default strategy for models without patch features (Cellpose)
MAX_INT = 2**53  # ids, offsets, seeds, coordinates: what a database integer and a JavaScript number both hold


def _printable(allowed: str = ""):
    """A check that text is printable: no control characters (NUL, escapes) nor format characters (right-to-left
    overrides, zero-width marks) that make a name read differently from what it is; ``allowed``: exceptions."""

    def check(value: str) -> str:
        bad = sorted({c for c in value if not c.isprintable() and c not in allowed})
        if bad:
            shown = ", ".join(repr(c) for c in bad[:5])
            raise ValueError(f"must be printable text; it contains control or format characters ({shown})")
        return value

    return AfterValidator(check)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank (only spaces)")
    return value


Name = Annotated[str, Field(min_length=1, max_length=200), _printable(), AfterValidator(_not_blank)]
Text = Annotated[str, Field(max_length=10_000), _printable("\n\t")]  # descriptions: lines and tabs allowed
Uri = Annotated[str, Field(min_length=1, max_length=4096), _printable()]
Id = Annotated[str, Field(min_length=1, max_length=64), _printable()]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Shape = list[Annotated[int, Field(ge=1, le=MAX_INT)]]
Origin = list[Count]


class Args(BaseModel):
    # strict: True is not 1, "5" is not 5, 1 is not True; NaN is refused as "finite number", not as a bound
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class LoadModel(Args):
    """Load a model (a bioimage.io package: rdf.yaml, folder, .zip, URL or zoo id; or 'cellpose:<builtin name
    or weights path>'), check that it runs, and register it for your projects."""

    source: Uri = Field(description="bioimage.io package path/URL/zoo id, or cellpose:<name or weights path>")
    dropout_p: float = Field(DEFAULT_DROPOUT_P, gt=0, lt=1,
                             description="MC-dropout probability where dropout is added")
    mc_scope: Literal[MC_SCOPES] | None = Field(
        None, description="layers MC dropout runs over: 'full' (the whole network, T full passes), 'partial' (the "
                          "last mc_depth activation calls; the network before them runs once) or 'head' (only "
                          "the output layer's input); default: the model family's")
    mc_depth: int | None = Field(None, ge=1, le=10_000, description="mc_scope='partial': how many activation "
                                 "calls, counted from the network's end, get dropout; default: the model family's")
    dropout_kind: Literal[DROPOUT_KINDS] | None = Field(
        None, description="'element' (a mask value per feature element) or 'channel' (whole feature channels); "
                          "default: the model family's")
    sample_source: Literal["auto", "dropout", "tta"] | None = Field(
        None, description="where MC passes differ: dropout, or test-time augmentation (flips, rotations, contrast) "
                          "for networks dropout cannot reach (TorchScript without dropout layers, ONNX); default: "
                          "dropout where it can")
    output_activation: Literal["sigmoid", "softmax"] | None = Field(
        None, description="the model's output activation, when the package does not declare it")


class ImageSpec(Args):
    uri: Uri = Field(description="Zarr / OME-Zarr: local path inside the allowed folders, file://, http(s)://, s3://")
    axes: Id | None = Field(None, description="axes of a plain Zarr array, e.g. 'cyx'; OME-Zarr declares its own")
    channels: list[Annotated[int, Field(ge=0, le=65_535)]] | None = Field(
        None, description="channels to feed the model (default: all)")
    mask: Id | None = Field(None, description="sampling mask: 'auto' (foreground of the coarsest level) or the name "
                                              "of a label image inside the OME-Zarr (e.g. 'tissue')")
    storage_options: dict[str, Any] | None = Field(
        None, description="fsspec options to reach a remote image, e.g. {'key': ..., 'secret': ..., 'client_kwargs': "
                          "{'endpoint_url': ...}} for s3://; kept with the project, never shown back")


class CreateProject(Args):
    """Create a project: a model (a model id from load_model, or a source) and the images to adapt it to."""

    name: Name
    model: Uri = Field(description="model id returned by load_model, or a model source")
    images: list[ImageSpec] = Field(default_factory=list, max_length=1000)
    description: Text = ""
    holdout_fraction: float = Field(0.25, ge=0, lt=1, description="share of annotated patches kept for evaluation")


class ProjectRef(Args):
    project_id: Id


class ListProjects(Args):
    """Your projects (other users' projects are never listed)."""


class ListModels(Args):
    """The models you loaded."""


class GetProject(ProjectRef):
    """A project: model, versions, images, patch counts."""


class DeleteProject(ProjectRef):
    """Delete a project with its labels, predictions, model versions and exports."""


class AddImage(ImageSpec, ProjectRef):
    """Add an image to a project."""


class Score(ProjectRef):
    """Score patches with MC dropout on Ray actors, then pick the ones to annotate from the whole pool of pending
    patches (list_patches gives them first); returns a job id (wait for it, or pass a progress callback).
    mode 'random': new patches drawn at random inside the mask, not overlapping earlier ones. mode 'grid': every
    tile inside the mask (a whole slide), with an uncertainty overview of the image (get_overview)."""

    n_patches: int | None = Field(None, ge=1, le=MAX_PATCHES, description=f"random: how many patches (default "
                                  f"{DEFAULT_RANDOM_PATCHES}); grid: at most this many tiles (default: every tile)",
                                  json_schema_extra={"random_default": DEFAULT_RANDOM_PATCHES})
    patch_shape: Shape = Field(list(DEFAULT_PATCH_SHAPE), min_length=2, max_length=3)  # copied per call
    mc_passes: int = Field(DEFAULT_MC_PASSES, ge=2, le=256, description="MC-dropout passes (T) per patch")
    strategy: StrategyName | None = Field(None, description="how patches are scored and the ones to annotate "
                                          "picked: a name of bioadapt.active.STRATEGIES (acquisition map, patch "
                                          f"score, selection over the pool); default {DEFAULT_STRATEGY!r}, or "
                                          f"{FEATURELESS_STRATEGY!r} for models that give no patch features")
    acquisition: Acquisition | None = Field(None, description="another acquisition map than the strategy's")
    image_id: Id | None = Field(None, description="default: every image of the project")
    version: Count | None = Field(None, description="model version (default: the project's default, the latest "
                                  "version its held-out patches judged not worse)")
    seed: Count = 0
    rescore_pending: bool = Field(False, description="random: also re-score earlier patches still waiting for "
                                                     "labels (grid mode re-scores pending tiles always)")
    actors: int | None = Field(None, ge=1, le=1024, description="at most this many model actors")
    mode: Literal["random", "grid"] = "random"
    stride: Shape | None = Field(None, min_length=2, max_length=3, description="grid: tile step (default: the "
                                                                               "patch shape)")
    select: int = Field(DEFAULT_SELECT, ge=1, le=MAX_PATCHES, description="how many patches to pick for annotation")


class SelectPatches(ProjectRef):
    """Pick the patches to annotate again from every pending scored patch of the project (no new scoring);
    list_patches gives them first."""

    strategy: StrategyName | None = Field(None, description="a name of bioadapt.active.STRATEGIES (default: as "
                                                             "for score)")
    select: int = Field(DEFAULT_SELECT, ge=1, le=MAX_PATCHES)
    acquisition: Acquisition | None = Field(None, description="rank by this acquisition's scores (default: the "
                                                              "strategy's)")
    seed: Count = 0


class GetOverview(ProjectRef):
    """An image's uncertainty overview (a coarse level of its uncertainty OME-Zarr: mean acquisition per pixel,
    NaN where nothing was scored) and the image's own level of about the same size, with the level-0 pixels per
    overview pixel, to lay both over the whole image."""

    image_id: Id
    max_pixels: int = Field(1024 * 1024, ge=1, le=16 * 1024 * 1024)


class ListPatches(ProjectRef):
    """Patches of a project: by default the ones picked for annotation first (in their order), then the rest by
    score."""

    order: PatchOrder = "selection"
    status: PatchStatus | None = None
    image_id: Id | None = None
    limit: int = Field(50, ge=1, le=10_000)
    offset: Count = 0


class PatchRef(ProjectRef):
    patch_id: int = Field(ge=1, le=MAX_INT)


class GetPatch(PatchRef):
    """A patch: image (C, [Z], Y, X), predicted labels, uncertainty map, score, origin; and the corrected labels
    once annotated."""


class SubmitLabels(PatchRef):
    """Store corrected labels for a patch (an integer array of the patch's spatial shape; 0 = background)."""

    labels: Any = Field(description="numpy integer array, shape = the patch's spatial shape")


class SkipPatch(PatchRef):
    """Mark a patch as skipped (it will not be offered again nor trained on)."""


class BioimageioTuning(Args):
    """Fine-tuning parameters of bioimage.io models beyond fine_tune's own (the adapter's ``FineTuneParams``;
    unset ones keep the adapter's defaults)."""

    weight_decay: float | None = Field(None, ge=0, le=1)
    val_fraction: float | None = Field(None, ge=0, lt=1)
    augment: bool | None = None
    freeze_batchnorm: bool | None = None
    lr_schedule: Literal["cosine", "constant"] | None = Field(
        None, description="cosine: the learning rate falls to 0 over the run (default); constant: it stays")
    patience: int | None = Field(None, ge=0, le=10_000, description="early stopping: end the run after this many "
                                 "epochs without a better score on its validation patches (0: never; default: a "
                                 "quarter of the run, at least 5; the best weights are kept either way)")
    val_metric: Literal["dice", "f1"] | None = Field(
        None, description="what picks the best epoch on the validation patches: f1 (objects at IoU 0.5, as "
        "versions are judged; the default for instance models) or dice (pixels; the default for semantic ones)")
    seed: Count | None = None


class CellposeTuning(Args):
    """Fine-tuning parameters of Cellpose models beyond fine_tune's own (the adapter's ``CellposeTrainParams``;
    unset ones keep the adapter's defaults)."""

    weight_decay: float | None = Field(None, ge=0, le=1)
    val_fraction: float | None = Field(None, ge=0, lt=1)
    bsize: int | None = Field(None, ge=16, le=4096, description="training crop side")
    min_train_masks: int | None = Field(None, ge=0, le=100_000)
    rescale: bool | None = None
    seed: Count | None = None


TUNING: dict[str, type[Args]] = {"bioimageio": BioimageioTuning, "cellpose": CellposeTuning}
TUNED_BY_FINE_TUNE = ("epochs", "learning_rate", "batch_size")  # fine_tune's own arguments, not params


def tuning_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` checked against the schema of the model kind; only those set, for the adapter."""
    given = [name for name in TUNED_BY_FINE_TUNE if name in params]
    if given:
        raise BioadaptError(f"fine_tune: invalid arguments: params.{given[0]}: give {given[0]} as fine_tune's own "
                            f"argument ({given[0]}=...), not inside params")
    try:
        return TUNING[kind].model_validate(params).model_dump(exclude_none=True)
    except ValidationError as e:
        raise BioadaptError(validation_message("fine_tune", e, prefix="params.")) from None


def validation_message(name: str, error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming where it is ("params.seed: Input should be a valid integer")."""
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "arguments"
        problems.append(f"{prefix}{where}: {item['msg']}")
    return f"{name}: invalid arguments: " + "; ".join(problems)


class FineTune(ProjectRef):
    """Fine-tune on every annotated training patch on a Ray actor; returns a job id. A new model version
    appears when the job is done; cancel keeps the previous versions untouched. Parameters left out keep the
    adapter's own defaults (e.g. Cellpose's train_seg learning rate and weight decay)."""

    epochs: int | None = Field(None, ge=1, le=10_000, description="default: the adapter's")
    learning_rate: float | None = Field(None, gt=0, le=1, description="default: the adapter's")
    batch_size: int | None = Field(None, ge=1, le=1024, description="default: the adapter's")
    base_version: Count | None = Field(None, description="version to start from (default: the project's default "
                                       "version)")
    cross_validate: bool = Field(True, description="while fewer than 3 annotated patches are held out, judge the "
                                 "version by cross-validation over the held-out patches and the training patches "
                                 "the parent never trained on (as many folds as the held-out share makes: 3 extra "
                                 "fine-tunes at a quarter, their weights thrown away); false: such versions stay "
                                 "undecided, used only when named")
    params: dict[str, Any] = Field(default_factory=dict, description="more fine-tuning parameters, by the "
                                   "project's model kind (unset ones keep the adapter's defaults): "
                                   + "; ".join(f"{kind}: {', '.join(model.model_fields)}"
                                               for kind, model in TUNING.items()))


class JobRef(Args):
    job_id: Id


class JobStatus(JobRef):
    """A job: kind, state (queued, running, done, failed, cancelled), progress, timings, error."""


class CancelJob(JobRef):
    """Ask a running job to stop (within a couple of seconds)."""


class JobOutput(JobRef):
    """A file a finished job made (its result lists them under 'outputs'): an array (predict's labels) or bytes
    (export's package)."""

    name: Id


class ListJobs(Args):
    """Your jobs, optionally of one project."""

    project_id: Id | None = None


class Evaluate(ProjectRef):
    """Compare model versions on the held-out annotated patches: F1 and AP at IoU 0.5 for instance models, Dice
    for semantic ones; returns a job id (the metrics are its result)."""

    versions: list[Count] | None = Field(None, max_length=100, description="default: version 0, the "
                                                                          "project's default and the latest")


class Predict(ProjectRef):
    """Segment a region of a project image with a model version; returns a job id. The labels go to the image's
    prediction store, or, with return_array (small regions), to the job's output 'labels' (job_output)."""

    image_id: Id
    origin: Origin
    shape: Shape
    version: Count | None = None
    return_array: bool = Field(False, description="keep the labels as the job's output instead of writing them "
                                                   "(small regions only)")


class ExportModel(ProjectRef):
    """Export a model version as a bioimage.io package (format 0.5) that passes bioimageio.core's test; returns a
    job id. The package is the job's output 'package' (job_output), and stays in the project's folder."""

    version: Count | None = Field(None, description="default: the project's default version")
    name: Name | None = None
    description: Text | None = None
    authors: list[Name] = Field(default_factory=list, max_length=100)
    license: Name | None = None


@dataclass(frozen=True)
class Function:
    """One service function: its arguments (their model gives its JSON schema and validates its calls); ``task``:
    the module of ``bioadapt.service.tasks`` whose ``submit(context, caller, args, progress)`` runs it as a job,
    or None for a call ``BioadaptService`` answers itself (its method of the same name); ``slow``: it may take
    long (opening images, loading models, reading pixels), so it runs in its own threads and counts against the
    caller's slow calls. Jobs are slow: their submission checks images and draws."""

    args: type[Args]
    task: str | None = None
    slow: bool = False

    @property
    def is_slow(self) -> bool:
        return self.slow or self.task is not None


#: The registry of the service's functions, from which the service (``api``), its Hypha face
#: (``hypha_service``) and the Python client (``client``) make theirs. A new task: its module in
#: ``service/tasks/`` and one line here, with its arguments' model above.
FUNCTIONS: dict[str, Function] = {
    "load_model": Function(LoadModel, slow=True), "list_models": Function(ListModels),
    "create_project": Function(CreateProject, slow=True), "list_projects": Function(ListProjects),
    "get_project": Function(GetProject), "delete_project": Function(DeleteProject, slow=True),
    "add_image": Function(AddImage, slow=True), "score": Function(Score, task="score"),
    "select_patches": Function(SelectPatches, slow=True), "list_patches": Function(ListPatches),
    "get_patch": Function(GetPatch, slow=True), "get_overview": Function(GetOverview, slow=True),
    "submit_labels": Function(SubmitLabels), "skip_patch": Function(SkipPatch),
    "fine_tune": Function(FineTune, task="fine_tune"), "job_status": Function(JobStatus),
    "list_jobs": Function(ListJobs), "cancel_job": Function(CancelJob), "job_output": Function(JobOutput, slow=True),
    "evaluate": Function(Evaluate, task="evaluate"), "predict": Function(Predict, task="predict"),
    "export_model": Function(ExportModel, task="export"),
}
#: Functions that start a job (they return {"job_id", ...} at once and take an optional progress callback).
JOB_FUNCTIONS = tuple(name for name, function in FUNCTIONS.items() if function.task is not None)
SLOW_FUNCTIONS = frozenset(name for name, function in FUNCTIONS.items() if function.is_slow)


def function_schema(name: str) -> dict[str, Any]:
    """The schema Hypha publishes for a function: name, description, JSON-schema parameters."""
    model = FUNCTIONS[name].args
    parameters = model.model_json_schema()
    parameters.pop("title", None)
    description = parameters.pop("description", (model.__doc__ or "").strip())
    if name in JOB_FUNCTIONS:
        parameters.setdefault("properties", {})["progress"] = {
            "description": "optional callback receiving progress dicts while the job runs: an object "
                           "{_rintf: true, on_progress: function} (a bare function is dropped when the call "
                           "returns)"}
    return {"name": name, "description": description, "parameters": parameters}
