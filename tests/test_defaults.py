"""Each default is declared once, where it belongs (a model's in its adapter, the service's in its schemas), and
everything else reads it from there: the service's schemas, the clients, the page (through the schema the
service publishes) and the demo. A search over the package and the page for a literal value given to each
setting finds exactly its declarations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("bioadapt/**/*.py"), ROOT / "web" / "index.html", *ROOT.glob("web/js/*.js")])
# the name, its annotation, then a number: "= 16", ": int = 16", "= Field(16", "= (256, 256)", "=[256, 256]"
OPTION = r"[^)]*\bdefault=\d"  # a command-line option's default
VALUE = r"\s*(?::\s*[\w.|\[\] ]+?)?\s*=\s*(?:Field\(\s*)?[(\[]?\s*\d"

# setting -> (what gives it a literal value, where that may happen: file and the declaration itself)
DECLARED = {
    "MC passes": (rf"(?:\bpasses|\bmc_passes|MC_PASSES)\b{VALUE}|id=\"mc-passes\"[^>]*\bvalue=|--mc-passes\"{OPTION}",
                  {("bioadapt/adapters/base.py", "DEFAULT_MC_PASSES = 16")}),
    "dropout p": (rf"(?:\bdropout_p|DROPOUT_P|\bp: float)\b{VALUE}",
                  {("bioadapt/adapters/base.py", "DEFAULT_DROPOUT_P = 0.05")}),
    "learning rate": (rf"(?:learning_rate|LEARNING_RATE|\blr)\b{VALUE}|id=\"learning-rate\"[^>]*\bvalue=",
                      {("bioadapt/adapters/base.py", "learning_rate: float = 3e-4"),  # bioimage.io models
                       ("bioadapt/adapters/cellpose.py", "learning_rate: float = 0.005 if GENERATION < 4 else 1e-5"),
                       ("bioadapt/demo.py", "LEARNING_RATE = 3e-3")}),  # the demo's own: a setting, not a default
    "patch size": (rf"(?:patch_shape|patch_size|PATCH_SHAPE|PATCH_SIZE)\b{VALUE}|id=\"patch-size\"[^>]*\bvalue="
                   rf"|--patch-size\"{OPTION}",
                   {("bioadapt/service/schemas.py", "DEFAULT_PATCH_SHAPE = (256, 256)")}),
    "random patches": (rf"(?:n_patches|RANDOM_PATCHES)\b{VALUE}|id=\"n-patches\"[^>]*\bvalue=|--patches\"{OPTION}",
                       {("bioadapt/service/schemas.py", "DEFAULT_RANDOM_PATCHES = 64")}),
    "patches selected": (rf"(?:\bselect|DEFAULT_SELECT)\b{VALUE}",
                         {("bioadapt/service/schemas.py", "DEFAULT_SELECT = 32")}),
}


def _given(pattern: str) -> set[tuple[str, str]]:
    found = set()
    for path in SOURCES:
        for line in path.read_text().splitlines():
            code = line.split("#")[0] if path.suffix == ".py" else line
            if re.search(pattern, code):
                found.add((str(path.relative_to(ROOT)), code.strip()))
    return found


@pytest.mark.parametrize("setting", DECLARED)
def test_each_default_is_declared_once(setting):
    pattern, declarations = DECLARED[setting]
    assert _given(pattern) == declarations


def test_the_service_and_the_clients_read_the_declared_defaults():
    from bioadapt.adapters import DEFAULT_DROPOUT_P, DEFAULT_MC_PASSES, FineTuneParams
    from bioadapt.service import schemas as s
    from bioadapt.service.client import defaults
    from bioadapt.service.tasks.score import ScoreRequest

    score = defaults("score")
    assert (score["mc_passes"], score["patch_shape"], score["select"]) == (DEFAULT_MC_PASSES,
                                                                          list(s.DEFAULT_PATCH_SHAPE),
                                                                          s.DEFAULT_SELECT)
    assert defaults("load_model")["dropout_p"] == DEFAULT_DROPOUT_P
    assert ScoreRequest(image=None, patch_shape=(8, 8)).passes == DEFAULT_MC_PASSES
    published = s.function_schema("score")["parameters"]["properties"]  # what the page reads
    assert (published["mc_passes"]["default"], published["patch_shape"]["default"],
            published["n_patches"]["random_default"]) == (DEFAULT_MC_PASSES, list(s.DEFAULT_PATCH_SHAPE),
                                                          s.DEFAULT_RANDOM_PATCHES)
    assert defaults("fine_tune")["learning_rate"] is None and FineTuneParams().learning_rate > 0  # the adapter's
