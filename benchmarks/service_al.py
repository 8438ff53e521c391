r"""Label efficiency on the path a user takes: a simulated annotator drives a real `bioadapt serve` (embedded Hypha
server, local Ray) through the Python client, round by round, and each new version segments separate test fields.

Per data set (benchmarks/al_data.py's whole-field sets: pools and test sets of whole images, never overlapping),
base model and (strategy, seed), one project holds the pool's fields and the test fields, and each round up to
the next budget of labelled patches:

1. ``score`` with the strategy, every other argument the service's default except where the data cannot hold it
   (below). Scoring must not draw patches from the test fields, so it is called once per pool field
   (``image_id``) with the share of ``n_patches`` the service itself gives each image of a call over several
   (``n // images``, one more for the first ``n % images``); the draws, the masks (one MC seed per round), the
   scores and the selection (each call selects over the project's whole pending pool) are those of one call over
   the pool fields;
2. take the service's own selection: the first patches ``list_patches`` gives (``select`` = this round's labels);
3. submit their ground truth (the simulated annotator);
4. ``fine_tune`` with the service's defaults (the adapter's: 100 epochs, lr 3e-4, batch 4, 25 % validation,
   cosine schedule, early stopping); the service holds out every 4th annotated patch and judges the version
   against its parent on them;
5. ``predict`` (return_array) every test field with the project's default version; F1 at IoU 0.5 pooled over the
   test fields (``bioadapt.active.metrics``): ``test_f1``, what a user gets. A version the service did not make the
   default (``undecided``: fewer than 3 held-out patches; ``worse``) predicts them too: ``version_f1``. The
   version's and its parent's (tp, fp, fn) on each held-out patch are kept (``holdout_per_patch``): the report
   judges other verdict rules on them (``FEW_PATCH_RULES``).

A round-0 row holds the base model's (version 0's) test F1. Settings the data cannot hold at the service's
default: ``patch_shape`` 256 x 256 (a 520 x 696 BBBC039 field holds 2 random non-overlapping 256 x 256 windows,
10-12 of 128 x 128) and ``n_patches`` 64 per round (each round draws new patches; 64 per round would fill the
BBBC039 pool by the third round): 128 x 128 and 32 per round for both sets (``--patch-size``,
``--patches-per-round``).

Bases: ``nuclei_broad``, the zoo's unet2d_nuclei_broad with its real trained weights (its TorchScript's state
dict in tests/zoo_architectures' architecture, so that MC dropout's hooks reach it; fixed 512 x 512 input, which
its network does not need: scoring and training run a 128-pixel patch as 192 x 192, ``shape_probe``; rows in the
``*_fixed512`` files ran before that, every patch as a 512 x 512 pass), and ``demo``, the demo's small U-Net
trained on synthetic nuclei (``demo_deep``: the same with twice the width and one more pooling,
al_data.DEEP_UNET; so far only in bench_epoch_curves.py).

Rows are appended to ``benchmarks/results/service_al_<dataset>_<base>.jsonl`` as rounds finish; a run already on
record is skipped, so a run cut short can be resumed. ``report`` writes ``service_al.md``, ``service_al.json``
and ``service_al.png`` from every file found.

    nice -n 10 python benchmarks/service_al.py run --dataset bbbc039 --base demo --seeds 0,1,2 --budgets 2,4,8,16
    python benchmarks/service_al.py report

Fine-tuning settings sent instead of the defaults (``--epochs``, ``--learning-rate``, ``--val-metric``) go to a file
of their own, and the report pairs it with the same set's default-settings runs by strategy and seed; the best-
epoch study ran (with ``BIOADAPT_SHARED_DATA`` holding ``kromp_nuclei/``, one strategy per process):

    python benchmarks/service_al.py run --dataset kromp --base nuclei_broad --strategies random \
        --seeds 0,1,2,3,4,5,6,7,8 --budgets 2,4,8,16 --val-metric f1

and the same with ``--dataset bbbc039``, and with ``--strategies typical_half_nonconvex_then_typical`` (the shape
count of bioadapt.active.shapes; seeds 0-4 and 5-8 in two processes). With a third strategy in a file, the report
also gives it minus the default strategy.

Since fine-tunes with fewer than 3 held-out patches are judged by cross-validation (``fine_tune(cross_validate=
True)``, the default), runs go to files with the ``cv`` prefix; the report sets each against the same strategies and
seeds of the file without it (one process per strategy; the default strategy's seeds in two):

    python benchmarks/service_al.py run --dataset kromp --base nuclei_broad --strategies random \
        --seeds 0,1,2,3,4,5,6,7,8 --budgets 2,4,8,16 --val-metric f1 --out benchmarks/results/service_al_cv

Since a fine-tune chooses its best epoch on the training patches its starting weights never trained on, runs go to
files with the ``fresh`` prefix (``--out benchmarks/results/service_al_fresh``, the same commands), set against the
``cv`` ones (without those, against the runs before cross-validated verdicts).

The 32-label rounds (BBBC039: both strategies; Kromp: random) ran the same commands with ``--budgets 2,4,8,16,32``
into the same files: the rounds on record were recomputed (their F1 matched the record in every round) and only the
32-label rows appended. The demo base under the same rules, and with the best epoch chosen by Dice or without early
stopping (random only; the ``patience0`` file holds 2 whole seeds):

    python benchmarks/service_al.py run --dataset bbbc039 --base demo --strategies \
        random,typical_half_nonconvex_then_typical --seeds 0,1,2,3,4,5,6,7,8 --out benchmarks/results/service_al_fresh
    python benchmarks/service_al.py run --dataset bbbc039 --base demo --strategies random \
        --seeds 0,1,2,3,4,5,6,7,8 --val-metric dice --out benchmarks/results/service_al_fresh
    python benchmarks/service_al.py run --dataset bbbc039 --base demo --strategies random --seeds 0,1 \
        --patience 0 --out benchmarks/results/service_al_fresh

The runs that judged the 2-patch rules (rounds to 8 labels; ``--out`` gives their files the ``to8`` prefix):

    python benchmarks/service_al.py run --dataset bbbc039 --base demo --seeds 0,1,2,3,4,5,6,7,8 --budgets 2,4,8 --out \
        benchmarks/results/service_al_to8

The demo base with the learning rate ``bioadapt demo`` sends (3e-3; the service's default 3e-4 leaves it where it
started, bench_epoch_curves.py), both strategies, one process each:

    python benchmarks/service_al.py run --dataset bbbc039 --base demo --strategies random \
        --seeds 0,1,2,3,4,5,6,7,8 --budgets 2,4,8,16,32 --learning-rate 0.003 --out benchmarks/results/service_al_fresh

and the same with ``--strategies typical_half_nonconvex_then_typical``, and with ``--dataset usiigaci`` (random
only). Without epoch selection (every patch trains, the last epoch is kept; a pilot of 2 seeds so far):

    python benchmarks/service_al.py run --dataset kromp --base nuclei_broad --strategies random \
        --seeds 0,1,2,3,4,5,6,7,8 --budgets 2,4,8,16,32 --val-fraction 0 --out benchmarks/results/service_al_fresh
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from al_data import FIELD_SETS, Field, base_model, pooled_f1, whole_fields, write_fields  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "service_al"
BASES = ("nuclei_broad", "demo", "demo_deep")
PATCH = 128
PATCHES_PER_ROUND = 32
REFERENCE_BUDGET = 16  # "labels needed" reach random's F1 at this budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bioadapt.active import DEFAULT_STRATEGY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--dataset", choices=FIELD_SETS, default="bbbc039")
    parser.add_argument("--base", choices=BASES, default="nuclei_broad")
    parser.add_argument("--strategies", default=f"random,{DEFAULT_STRATEGY}", help="names of STRATEGIES")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="2,4,8,16,32", help="labelled patches after each round")
    parser.add_argument("--patch-size", type=int, default=PATCH)
    parser.add_argument("--patches-per-round", type=int, default=PATCHES_PER_ROUND, help="score's n_patches")
    parser.add_argument("--epochs", type=int, default=None, help="sent to fine_tune (default: not sent, so the "
                        "adapter's default applies); results go to a file of their own")
    parser.add_argument("--learning-rate", type=float, default=None, help="sent to fine_tune, as --epochs")
    parser.add_argument("--val-metric", choices=("dice", "f1"), default=None, help="sent to fine_tune's params "
                        "(what picks the best epoch), as --epochs")
    parser.add_argument("--patience", type=int, default=None, help="sent to fine_tune's params (epochs without a "
                        "better held-out score that end a run; 0: never stop early), as --epochs")
    parser.add_argument("--val-fraction", type=float, default=None, help="sent to fine_tune's params (the share of "
                        "training patches that choose the best epoch; 0: none, the run's last epoch is kept and "
                        "every patch trains), as --epochs")
    parser.add_argument("--workdir", default=None, help="keeps the OME-Zarrs and base models (default: temporary)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--default", default=None, help="report: the strategy judged against random (default: "
                        "bioadapt.active.DEFAULT_STRATEGY)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "report":
        report(args)
        return
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bioadapt-service-al-") as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        run(args, workdir)


# -- data and models ---------------------------------------------------------------------------------------------
@dataclass
class Setup:
    pool: list[Field]
    test: list[Field]
    paths: dict[str, Path]  # field name -> OME-Zarr
    model: Path


def prepare(dataset: str, base: str, workdir: Path) -> Setup:
    pool, test = whole_fields(dataset)
    paths = write_fields(pool + test, workdir / dataset)
    return Setup(pool, test, paths, base_package(base, workdir))


def base_package(base: str, workdir: Path) -> Path:
    """The base model's package: the demo's U-Net (al_data.base_model), or unet2d_nuclei_broad's real weights in
    this project's architecture (tests/zoo_corpus.runnable)."""
    if base in ("demo", "demo_deep"):
        return base_model(workdir, deep=base == "demo_deep")
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from zoo_corpus import BY_NAME, runnable

    description = BY_NAME["nuclei-broad-state-dict"]
    folder = workdir / description.name
    return folder / "bioimageio.yaml" if folder.exists() else runnable(description, workdir)


# -- the service -------------------------------------------------------------------------------------------------
@contextmanager
def served(workdir: Path) -> Iterator[Any]:
    """`bioadapt serve` as a child process (embedded Hypha, local Ray) that may read ``workdir``, and a client;
    the process is stopped by its id."""
    from bioadapt.service.client import connect
    from bioadapt.service.serve_process import ServeProcess

    service = ServeProcess(workdir / "service", ["--allow-path", str(workdir), "--port", "0", "--user", "bench"],
                           log_path=workdir / "serve.log", env={"OMP_NUM_THREADS": "1"})
    try:
        info = service.start()
        print(f"service {info['service_id']} at {info['server_url']} (Ray {info['ray']}); log {service.log_path}",
              flush=True)
        with connect(info["server_url"], token=info["token"], workspace=info["workspace"]) as svc:
            yield svc
    finally:
        service.stop(timeout_s=60)


class Run:
    """One (strategy, seed) through the service: a project of the pool and test fields, round by round."""

    def __init__(self, svc: Any, setup: Setup, model_id: str, args: argparse.Namespace, strategy: str, seed: int):
        self.svc, self.setup, self.args, self.strategy, self.seed = svc, setup, args, strategy, seed
        fields = setup.pool + setup.test
        project = svc.create_project(f"service_al {args.dataset} {args.base} {strategy} seed {seed}", model_id,
                                     [{"uri": str(setup.paths[f.name])} for f in fields])
        self.project_id = project["id"]
        by_uri = {image["uri"]: image["id"] for image in project["images"]}
        self.image_ids = {f.name: by_uri[str(setup.paths[f.name])] for f in fields}
        self.truths = {f.name: f.truth for f in setup.pool}
        self.names = {image_id: name for name, image_id in self.image_ids.items()}
        self.labelled = 0

    def score(self, select: int) -> dict[str, Any]:
        """Score new patches of every pool field (the service's per-image shares of n_patches), the last call's
        selection over the whole pending pool being the round's. A field with no room left for a new patch is
        passed over (one call over the pool would fail on it) and named in the answer; the round then selects
        again once every other field is scored."""
        from bioadapt.errors import BioadaptError

        pool = [f.name for f in self.setup.pool]
        n = self.args.patches_per_round
        shares = [n // len(pool) + (i < n % len(pool)) for i in range(len(pool))]
        scored, full, selection = 0, [], None
        for name, share in zip(pool, shares):
            try:
                job = self.svc.score(self.project_id, n_patches=share, patch_shape=[self.args.patch_size] * 2,
                                     strategy=self.strategy, image_id=self.image_ids[name], seed=self.seed,
                                     select=select)
                result = self.svc.wait(job, progress=False)["result"]
            except BioadaptError as e:
                if "fits" not in str(e):
                    raise
                full.append(name)
                continue
            scored, selection = scored + result["scored"], result["selection"]
        if full:
            self.svc.select_patches(self.project_id, strategy=self.strategy, select=select, seed=self.seed)
        return {"scored": scored, "selection": selection, "full_fields": full}

    def annotate(self, k: int) -> list[dict[str, Any]]:
        """The simulated annotator: the ground truth of the first ``k`` patches of the service's selection."""
        picks = self.svc.list_patches(self.project_id, limit=k)
        for patch in picks:
            window = tuple(slice(o, o + s) for o, s in zip(patch["origin"], patch["shape"]))
            truth = self.truths[self.names[patch["image_id"]]][window]
            self.svc.submit_labels(self.project_id, patch["id"], truth.astype(np.uint32))
        self.labelled += len(picks)
        return picks

    def fine_tune(self) -> dict[str, Any]:
        """A fine-tune with the service's defaults, but for the settings the benchmark was told to send."""
        job = self.svc.fine_tune(self.project_id, **tuning(self.args))
        return self.svc.wait(job, progress=False)["result"]

    def test_f1(self, version: int | None = None) -> dict[str, Any]:
        """F1 at IoU 0.5 of ``version`` (default: the project's default version) on the test fields, pooled."""
        predictions, version_used = [], None
        for field in self.setup.test:
            job = self.svc.wait(self.svc.predict(self.project_id, self.image_ids[field.name], [0, 0],
                                                 list(field.truth.shape), version=version, return_array=True),
                                progress=False)
            predictions.append(np.asarray(self.svc.job_output(job["id"], "labels")))
            version_used = job["result"]["version"]
        return {**pooled_f1(predictions, [f.truth for f in self.setup.test]), "version": version_used}

    def holdout_per_patch(self, version: int) -> dict[str, Any]:
        """The version's and its parent's counts on each held-out patch ((tp, fp, fn) per patch), as the verdict
        saw them: so that another verdict rule can be judged on the runs on record."""
        project = self.svc.get_project(self.project_id)
        metrics = next(v["metrics"] for v in project["versions"] if v["number"] == version)
        crossed = metrics.get("cross_validation") or {}
        return {"parent": (metrics.get("parent_holdout") or {}).get("per_patch"),
                "version": (metrics.get("holdout") or {}).get("per_patch"),
                **({"cross_validation": {"folds": crossed["folds"], "training": crossed["training"],
                                         "parent": crossed["parent"]["per_patch"],
                                         "version": crossed["version"]["per_patch"]}} if crossed else {})}

    def close(self) -> None:
        self.svc.delete_project(self.project_id)


def tuning(args: argparse.Namespace) -> dict[str, Any]:
    """The fine_tune arguments the benchmark sends: none by default (the service's defaults)."""
    given = {"epochs": args.epochs, "learning_rate": args.learning_rate}
    sent: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    params = {name: value for name in ("val_metric", "patience", "val_fraction")
              if (value := getattr(args, name, None)) is not None}
    if params:
        sent["params"] = params
    return sent


def results_file(args: argparse.Namespace) -> Path:
    """service_al_<dataset>_<base>.jsonl; with fine-tuning settings sent, their values are part of the name."""
    sent = tuning(args)
    name = "".join(f"_{'e' if name == 'epochs' else 'lr'}{sent[name]:g}" for name in ("epochs", "learning_rate")
                   if name in sent)
    short = {"val_metric": "val", "val_fraction": "valfrac"}
    name += "".join(f"_{short.get(key, key)}{value:g}" if isinstance(value, float) else f"_{short.get(key, key)}{value}"
                    for key, value in sent.get("params", {}).items())
    return Path(f"{args.out}_{args.dataset}_{args.base}{name}.jsonl")


def run(args: argparse.Namespace, workdir: Path) -> None:
    setup = prepare(args.dataset, args.base, workdir)
    out = results_file(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    budgets = sorted(int(b) for b in args.budgets.split(","))
    done = {(r["strategy"], r["seed"], r["labels"]) for r in read_rows(out)}
    print(f"{args.dataset}: pool {len(setup.pool)} fields, test {len(setup.test)} fields; base {args.base} "
          f"({setup.model})", flush=True)
    with served(workdir) as svc:
        model = svc.load_model(str(setup.model))
        for seed in [int(s) for s in args.seeds.split(",")]:
            for strategy in [s for s in args.strategies.split(",") if s]:
                if all((strategy, seed, b) in done for b in [0, *budgets]):
                    print(f"{strategy} seed {seed}: on record", flush=True)
                    continue
                retried(lambda: one_run(Run(svc, setup, model["id"], args, strategy, seed), budgets, out, done))


LOW_MEMORY = ("OutOfMemoryError", "running low on memory")  # Ray's words when it kills a worker to save the machine
RETRIES, RETRY_WAIT_S = 3, 120


def retried(attempt: Any) -> None:
    """Run ``attempt``; when Ray killed a worker because the shared machine ran low on memory (other work's), wait
    and run it again from its start (rounds on record are recomputed, not appended again)."""
    from bioadapt.errors import BioadaptError

    for retry in range(RETRIES + 1):
        try:
            return attempt()
        except (BioadaptError, RuntimeError) as e:
            if retry == RETRIES or not any(word in str(e) for word in LOW_MEMORY):
                raise
            print(f"a worker was killed for lack of memory; again in {RETRY_WAIT_S} s", flush=True)
            time.sleep(RETRY_WAIT_S)


def one_run(run_: Run, budgets: list[int], out: Path, done: set) -> None:
    """Round 0 (the base model) and one round per budget; each round's row appended to ``out`` unless on record
    (a resumed run recomputes its earlier rounds to reach the later ones)."""
    common = {"dataset": run_.args.dataset, "base": run_.args.base, "strategy": run_.strategy, "seed": run_.seed,
              "patch_size": run_.args.patch_size, "patches_per_round": run_.args.patches_per_round,
              "fine_tune_sent": tuning(run_.args),
              "pool_fields": [f.name for f in run_.setup.pool], "test_fields": [f.name for f in run_.setup.test],
              "commit": _commit()}
    try:
        started = time.perf_counter()
        base = run_.test_f1(version=0)
        _record(out, done, {**common, "labels": 0, "version": 0, "default_version": 0, "verdict": None,
                            "test_f1": base["f1"], "test": base, "seconds": round(time.perf_counter() - started, 1),
                            "date": time.strftime("%Y-%m-%d %H:%M")})
        for budget in budgets:
            _record(out, done, {**common, **one_round(run_, budget)})
    finally:
        run_.close()


def one_round(run_: Run, budget: int) -> dict[str, Any]:
    """Score, pick, label, fine-tune, predict the test fields: the round's row."""
    seconds, started = {}, time.perf_counter()
    k = budget - run_.labelled
    scoring = run_.score(select=k)
    seconds["score"] = time.perf_counter() - started
    picks = run_.annotate(k)
    seconds["label"] = time.perf_counter() - started - sum(seconds.values())
    tuned = run_.fine_tune()
    seconds["fine_tune"] = time.perf_counter() - started - sum(seconds.values())
    test = run_.test_f1()
    # a version the service did not make the default (undecided, worse) is what a user gets only by naming it:
    # its own test F1 shows what the round's labels taught
    latest = test if tuned["version"] == tuned["default_version"] else run_.test_f1(version=tuned["version"])
    seconds["predict"] = time.perf_counter() - started - sum(seconds.values())
    training = tuned["result"] or {}
    return {"labels": run_.labelled, "version": tuned["version"], "default_version": tuned["default_version"],
            "verdict": tuned["verdict"]["verdict"], "verdict_reason": tuned["verdict"].get("reason"),
            "judged_by": tuned["verdict"].get("judged_by", "held-out patches"),
            "holdout_per_patch": run_.holdout_per_patch(tuned["version"]),
            "test_f1": test["f1"], "test": test, "version_f1": latest["f1"], "scored": scoring["scored"],
            "selection": scoring["selection"],
            "full_fields": scoring["full_fields"],
            "picks": [[run_.names[p["image_id"]], p["origin"], round(float(p["score"] or 0), 5)] for p in picks],
            "epochs_run": training.get("epochs_run"), "best_epoch": training.get("best_epoch"),
            **{key: training.get(key)
               for key in ("n_train", "n_val", "val_patches", "initial_val_score", "best_val_score")},
            "seconds": round(time.perf_counter() - started, 1),
            "stage_seconds": {key: round(value, 1) for key, value in seconds.items()},
            "date": time.strftime("%Y-%m-%d %H:%M")}


def _record(out: Path, done: set, row: dict[str, Any]) -> None:
    key = (row["strategy"], row["seed"], row["labels"])
    note = " (on record already)" if key in done else ""
    print(f"{row['strategy']:<40} seed {row['seed']} labels {row['labels']:>2}: test F1 {row['test_f1']:.3f} "
          f"v{row['version']} ({row['verdict']}; default v{row['default_version']}) {row['seconds']:.0f} s{note}",
          flush=True)
    if not note:
        with out.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        done.add(key)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# -- report ------------------------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def paired_interval(differences: list[float]) -> dict[str, Any]:
    """Mean of paired differences with its 95 % t interval (n - 1 degrees of freedom); no interval for n < 2."""
    from scipy import stats

    values = np.asarray(differences, dtype=float)
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def by_seed(rows: list[dict[str, Any]], strategy: str, labels: int, key: str = "test_f1") -> dict[int, float]:
    """``key``: "test_f1" (the project's default version) or "version_f1" (the round's new version, named; the
    base model's row has only test_f1)."""
    return {r["seed"]: r.get(key, r["test_f1"]) for r in rows if r["strategy"] == strategy and r["labels"] == labels}


def paired(rows: list[dict[str, Any]], a: tuple[str, int], b: tuple[str, int], key: str = "test_f1"
           ) -> dict[str, Any]:
    """F1 of (strategy, labels) ``a`` minus ``b``, paired by seed (seeds that have both)."""
    first, second = by_seed(rows, *a, key=key), by_seed(rows, *b, key=key)
    return paired_interval([first[s] - second[s] for s in sorted(first.keys() & second.keys())])


def excludes_zero(interval: dict[str, Any]) -> str:
    """'above' / 'below' 0 when the 95 % interval excludes it, 'noise' when it holds it, '-' without one."""
    if interval["low"] is None:
        return "-"
    return "above" if interval["low"] > 0 else "below" if interval["high"] < 0 else "noise"


def curve(rows: list[dict[str, Any]], strategy: str) -> dict[int, float]:
    """Mean test F1 per budget (labels > 0) of a strategy."""
    budgets = sorted({r["labels"] for r in rows if r["strategy"] == strategy and r["labels"] > 0})
    return {b: float(np.mean(list(by_seed(rows, strategy, b).values()))) for b in budgets}


def labels_needed(points: dict[int, float], target: float) -> int | None:
    """The smallest budget from which the curve stays at or above ``target`` at every larger budget run (not its
    first crossing); None when its last point is below."""
    needed = None
    for budget in sorted(points, reverse=True):
        if points[budget] < target:
            break
        needed = budget
    return needed


def informative(rows: list[dict[str, Any]], key: str = "test_f1") -> dict[str, Any]:
    """Random's F1 at the largest budget run (32 by the design) minus at 2, paired by seed: the set judges
    strategies only when the interval lies above 0. Where the 2-label version is undecided, the default at 2
    labels is the base model: "test_f1" then asks whether 32 labels beat the base, "version_f1" whether they beat
    what 2 labels taught."""
    budgets = sorted({r["labels"] for r in rows if r["strategy"] == "random" and r["labels"] > 0})
    if len(budgets) < 2:
        return {"informative": None, "from": None, "to": None, "interval": None}
    interval = paired(rows, ("random", budgets[-1]), ("random", budgets[0]), key)
    return {"informative": excludes_zero(interval) == "above" if interval["low"] is not None else None,
            "from": budgets[0], "to": budgets[-1], "interval": interval}


def summarize(rows: list[dict[str, Any]], default: str) -> dict[str, Any]:
    """One (data set, base): curves, paired differences to random and to the base model, labels needed, whether
    the set is informative."""
    strategies = sorted({r["strategy"] for r in rows}, key=lambda s: (s != "random", s != default, s))
    budgets = sorted({r["labels"] for r in rows})
    table = _f1_table(rows, strategies, budgets)
    random_curve = curve(rows, "random")
    target = random_curve.get(REFERENCE_BUDGET)
    later = [b for b in random_curve if b > REFERENCE_BUDGET]
    # labels needed over the budgets every strategy ran: a strategy with one more (dipping) point is not judged
    # on a longer curve than the others
    curves = {strategy: curve(rows, strategy) for strategy in strategies}
    common = sorted(set.intersection(*(set(points) for points in curves.values())))
    summary = {"strategies": strategies, "budgets": budgets, "seeds": sorted({r["seed"] for r in rows}),
               "table": table, "informative": informative(rows), "random_f1_at_16": target,
               "needed_budgets": common,
               # random's own curve after the reference: a dip there leaves every strategy "not reached"
               "random_after_16": {b: paired(rows, ("random", b), ("random", REFERENCE_BUDGET)) for b in later},
               "vs_random": {}, "vs_base": {}, "labels_needed": {}, "verdicts": {}, "kept_start": {},
               "few_patch_rule": {}}
    for strategy in strategies:
        summary["vs_base"][strategy] = {b: paired(rows, (strategy, b), (strategy, 0)) for b in budgets if b}
        common_curve = {b: f1 for b, f1 in curves[strategy].items() if b in common}
        summary["labels_needed"][strategy] = None if target is None else labels_needed(common_curve, target)
        summary["verdicts"][strategy] = _verdict_counts(rows, strategy)
        summary["kept_start"][strategy] = _kept_start(rows, strategy)
        summary["few_patch_rule"][strategy] = few_patch_rule(rows, strategy)
        if strategy != "random":
            summary["vs_random"][strategy] = {b: paired(rows, (strategy, b), ("random", b)) for b in budgets if b}
        if strategy not in ("random", default) and default in strategies:
            summary.setdefault("vs_default", {})[strategy] = {b: paired(rows, (strategy, b), (default, b))
                                                              for b in budgets if b}
    if any("version_f1" in r for r in rows):  # rows since undecided versions stopped becoming the default
        summary["version_table"] = _f1_table(rows, strategies, budgets, "version_f1")
        summary["version_informative"] = informative(rows, "version_f1")
        summary["version_vs_random"] = {s: {b: paired(rows, (s, b), ("random", b), "version_f1") for b in budgets
                                            if b} for s in strategies if s != "random"}
    return summary


def _f1_table(rows: list[dict[str, Any]], strategies: list[str], budgets: list[int], key: str = "test_f1"
              ) -> dict[str, dict[int, dict[str, float]]]:
    """Per strategy and budget: mean, std and number of seeds of ``key``."""
    return {s: {b: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                for b in budgets if (v := list(by_seed(rows, s, b, key).values()))} for s in strategies}


def _verdict_counts(rows: list[dict[str, Any]], strategy: str) -> dict[int, dict[str, int]]:
    counts: dict[int, dict[str, int]] = {}
    for r in rows:
        if r["strategy"] == strategy and r["labels"]:
            counts.setdefault(r["labels"], {}).setdefault(r["verdict"], 0)
            counts[r["labels"]][r["verdict"]] += 1
    return counts


def _kept_start(rows: list[dict[str, Any]], strategy: str) -> dict[int, list[int]]:
    """Per budget: [fine-tunes whose validation split kept the starting weights (best epoch 0), fine-tunes]."""
    counts: dict[int, list[int]] = {}
    for r in rows:
        if r["strategy"] == strategy and r["labels"] and r.get("best_epoch") is not None:
            counts.setdefault(r["labels"], [0, 0])[1] += 1
            counts[r["labels"]][0] += r["best_epoch"] == 0
    return counts


FEW_PATCH_RULES = {  # per-patch F1 differences (version minus parent) on 2 held-out patches -> promoted
    "loses on none": lambda d: bool((d >= 0).all()),  # ties count as not losing: wins nothing, loses nothing too
    "wins one, loses none": lambda d: bool((d >= 0).all() and (d > 0).any()),
    "wins each": lambda d: bool((d > 0).all()),
}


def few_patch_rule(rows: list[dict[str, Any]], strategy: str) -> dict[str, dict[int, dict[str, Any]]]:
    """Rules the service does not apply, judged on the rows that record counts per held-out patch: a version
    left undecided with 2 held-out patches (8 labels) and at least ``MIN_OBJECTS`` objects in them would become
    the default when ``FEW_PATCH_RULES`` says so. Per rule and budget: the versions it would judge, how many it
    would promote, and the user's test F1 under it minus today's over the versions judged (the promoted version's
    own test F1 where promoted, else no change; later rounds, which would start from it, are not simulated)."""
    from bioadapt.active.verdict import MIN_OBJECTS
    from bioadapt.active.verdict import pooled_f1 as f1_of_counts  # axis -1 on unsummed rows: F1 of each patch

    judged: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        counts = r.get("holdout_per_patch") or {}
        parent, version = counts.get("parent"), counts.get("version")
        if r["strategy"] != strategy or r.get("verdict") != "undecided" or not parent or len(parent) < 2:
            continue
        parent_counts, version_counts = np.asarray(parent, float), np.asarray(version, float)
        if parent_counts[:, [0, 2]].sum() < MIN_OBJECTS:
            continue
        differences = f1_of_counts(version_counts, axis=-1) - f1_of_counts(parent_counts, axis=-1)
        for name, promotes in FEW_PATCH_RULES.items():
            promoted = promotes(differences)
            entry = judged.setdefault(name, {}).setdefault(r["labels"], {"judged": 0, "promoted": 0, "gains": []})
            entry["judged"] += 1
            entry["promoted"] += promoted
            entry["gains"].append((r["version_f1"] - r["test_f1"]) if promoted else 0.0)
    for by_budget in judged.values():
        for entry in by_budget.values():
            entry["gain"] = paired_interval(entry.pop("gains"))
    return judged


FORMER_DEFAULT = "typical_half_object_bald_then_typical"  # DEFAULT_STRATEGY until 2026-12-07
# file prefixes (--out service_al_cv, ...) of runs after a change to the service, each set against the same
# strategies and seeds of the runs before it: (its prefix, the earlier prefix, what changed since, what they did); the
# first earlier file found is the one
FRESH_SPLIT = ("fine-tunes chose their best epoch on patches the starting weights never trained on", "a random quarter "
               "of the training patches, patches the parent had learnt among them")
UNDECIDED = "versions of 2-8 labels undecided, never the default"
BEFORE = (("cv_", "", "before cross-validated verdicts", UNDECIDED),
          ("fresh_", "cv_", f"before {FRESH_SPLIT[0]}", FRESH_SPLIT[1]),
          ("fresh_", "", f"before cross-validated verdicts and before {FRESH_SPLIT[0]}",
           f"{UNDECIDED}; {FRESH_SPLIT[1]}"))


def against_defaults(rows: list[dict[str, Any]], reference_rows: list[dict[str, Any]], reference: str
                     ) -> dict[str, Any]:
    """Runs that sent fine-tuning settings minus the same set's runs with the service's defaults, paired by
    (strategy, seed): the rounds pick the same patches while the undecided versions leave the base as the default,
    so what differs is what fine-tuning made of them. Per strategy and budget, for the user's F1 and the named
    version's."""
    out: dict[str, Any] = {"reference": reference}
    for key in ("test_f1", "version_f1"):
        table = out.setdefault(key, {})
        for strategy in sorted({r["strategy"] for r in rows} & {r["strategy"] for r in reference_rows}):
            budgets = sorted({r["labels"] for r in rows if r["strategy"] == strategy and r["labels"]})
            changed, before = ({b: by_seed(given, strategy, b, key) for b in budgets}
                               for given in (rows, reference_rows))
            table[strategy] = {b: paired_interval([changed[b][seed] - before[b][seed]
                                                   for seed in sorted(changed[b].keys() & before[b].keys())])
                               for b in budgets}
    return out


def report(args: argparse.Namespace) -> None:
    from bioadapt.active import DEFAULT_STRATEGY

    default = args.default or DEFAULT_STRATEGY
    out = Path(args.out)
    summaries = {}
    for path in sorted(out.parent.glob(f"{out.name}_*.jsonl")):
        rows = read_rows(path)
        if rows:
            summaries[path.stem.removeprefix(out.name + "_")] = {"rows": rows, **summarize(rows, default)}
    for name, s in summaries.items():
        reference = next((other for other in summaries if other != name and name.startswith(other + "_")
                          and not summaries[other]["rows"][0].get("fine_tune_sent")), None)
        if reference and s["rows"][0].get("fine_tune_sent"):
            s["against_defaults"] = against_defaults(s["rows"], summaries[reference]["rows"], reference)
        for prefix, earlier, what, how in BEFORE:
            if name.startswith(prefix) and (before := earlier + name.removeprefix(prefix)) in summaries:
                s["against_before"] = {**against_defaults(s["rows"], summaries[before]["rows"], before),
                                       "what": what, "how": how}
                break
    text = "\n".join([f"(default) marks {default}, the service's default strategy today; until 2026-12-07 it was "
                      f"{FORMER_DEFAULT}.\n"]
                     + [_markdown(name, s, default) for name, s in summaries.items()])
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({name: {k: v for k, v in s.items() if k != "rows"}
                                                    for name, s in summaries.items()}, indent=1, default=str) + "\n")
    plot(summaries, default, out.with_suffix(".png"))
    print(text)


def _cell(interval: dict[str, Any]) -> str:
    if interval["low"] is None:
        return f"{interval['mean']:+.3f} (n={interval['n']})" if interval["n"] else ""
    return f"{interval['mean']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}] {excludes_zero(interval)}"


def _sent(sent: dict[str, Any] | None, rows: list[dict[str, Any]]) -> str:
    """The defaults changed over time: they are those of the commits the rows ran at."""
    commits = ", ".join(sorted({r["commit"][:7] for r in rows}))
    if not sent:
        return f"with the service's defaults (commits {commits})"
    words = [f"{name} {value:g}" for name, value in sent.items() if name != "params"]
    words += [f"params.{name} {value}" for name, value in sent.get("params", {}).items()]
    return "with " + ", ".join(words) + f" (the rest the service's defaults, commits {commits})"


def _markdown(name: str, s: dict[str, Any], default: str) -> str:
    rows, budgets = s["rows"], [b for b in s["budgets"] if b]
    first = rows[0]
    info = s["informative"]
    if info["informative"] is None:
        verdict = "not judged (random needs two budgets and two seeds)"
    elif info["to"] < REFERENCE_BUDGET:
        verdict = (f"not judged: its rounds stop at {info['to']} labels, before the reference budget of "
                   f"{REFERENCE_BUDGET} (the design asks for 32 vs 2); these runs study the verdict, not strategies")
    else:
        word = "INFORMATIVE" if info["informative"] else "uninformative: no conclusion about strategies from it"
        verdict = (f"{word} (random's F1 at {info['to']} minus at {info['from']}: {_cell(info['interval'])}"
                   + ("" if info["to"] == 32 else "; the design asks for 32 vs 2, and 32 was not run") + ")")
    lines = [f"## {name}", "",
             f"Pool {len(first['pool_fields'])} fields, test {len(first['test_fields'])} fields; patches "
             f"{first['patch_size']} x {first['patch_size']}, {first['patches_per_round']} new per round; fine_tune "
             f"{_sent(first.get('fine_tune_sent'), rows)}; seeds "
             f"{s['seeds']}; base model (version 0) test F1 {np.mean([r['test_f1'] for r in rows if not r['labels']]):.3f}.",
             "", f"Data set: {verdict}.", "",
             "Test F1 at IoU 0.5 (mean ± std over seeds, n):", "",
             "| strategy | " + " | ".join(f"{b}" for b in s["budgets"]) + " |", "| --- |" + " --- |" * len(s["budgets"])]
    for strategy in s["strategies"]:
        mark = " (default)" if strategy == default else ""
        cells = [f"{c['mean']:.3f} ± {c['std']:.3f} ({c['n']})" if (c := s["table"][strategy].get(b)) else ""
                 for b in s["budgets"]]
        lines.append(f"| {strategy}{mark} | " + " | ".join(cells) + " |")
    lines += ["", "Paired by seed, mean difference [95 % t interval]; 'noise' where the interval holds 0:", "",
              "| comparison | " + " | ".join(str(b) for b in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
    for strategy, intervals in s["vs_random"].items():
        lines.append(f"| {strategy} minus random | " + " | ".join(_cell(intervals[b]) for b in budgets) + " |")
    for strategy, intervals in s.get("vs_default", {}).items():
        lines.append(f"| {strategy} minus {default} | " + " | ".join(_cell(intervals[b]) for b in budgets) + " |")
    for strategy, intervals in s["vs_base"].items():
        lines.append(f"| {strategy} minus the base model | " + " | ".join(_cell(intervals[b]) for b in budgets) + " |")
    if "version_table" in s:
        lines += ["", "Each round's new version, named (what its labels taught, whether or not the service made it "
                  "the default): mean test F1 (n), and paired minus random:", "",
                  "| strategy | " + " | ".join(str(b) for b in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
        for strategy, cells in s["version_table"].items():
            lines.append(f"| {strategy} | " + " | ".join(
                f"{c['mean']:.3f} ({c['n']})" if (c := cells.get(b)) else "" for b in budgets) + " |")
        for strategy, intervals in s["version_vs_random"].items():
            lines.append(f"| {strategy} minus random | " + " | ".join(_cell(intervals[b]) for b in budgets) + " |")
        if (named := s["version_informative"])["interval"] is not None:
            lines += ["", f"Random's new version at {named['to']} minus at {named['from']} labels: "
                      f"{_cell(named['interval'])}."]
    target = s["random_f1_at_16"]
    lines += ["", f"Labels needed (the smallest budget from which the mean curve stays at or above random's F1 at "
              f"{REFERENCE_BUDGET}" + (f", {target:.3f}" if target is not None else ", not run")
              + (f"; over the budgets every strategy ran, {common[0]}-{common[-1]}" if (common := s["needed_budgets"])
                 else "") + "):", ""]
    lines += [f"- {strategy}: {needed if needed is not None else 'not reached' if target is not None else '-'}"
              for strategy, needed in s["labels_needed"].items()]
    lines += [f"- random's own F1 at {b} minus at {REFERENCE_BUDGET}: {_cell(interval)}"
              for b, interval in s.get("random_after_16", {}).items() if interval["n"]]
    crossed = sum(r.get("judged_by") == "cross-validation" for r in rows)
    lines += ["", "Verdicts of the fine-tuned versions against their parents (held-out patches"
              + (f"; {crossed} of them by cross-validation" if crossed else "") + "), per budget:", ""]
    lines += [f"- {strategy}: " + "; ".join(f"{b}: " + ", ".join(f"{v} {n}" for v, n in sorted(c.items()))
                                           for b, c in sorted(counts.items()))
              for strategy, counts in s["verdicts"].items()]
    lines += ["", "Fine-tunes whose validation split kept the starting weights (best epoch 0), per budget:", ""]
    lines += [f"- {strategy}: " + "; ".join(f"{b}: {kept} of {n}" for b, (kept, n) in sorted(counts.items()))
              for strategy, counts in s["kept_start"].items() if counts]
    if any(s["few_patch_rule"].values()):
        lines += ["", "Not the service's rules, judged on the runs that record counts per held-out patch: a version "
                  "undecided on 2 held-out patches (at least 10 objects) becomes the default when its F1 against "
                  "its parent's, patch by patch, follows the rule. Versions judged, promoted, and the user's test "
                  "F1 under the rule minus today's (mean over the versions judged, 95 % t interval):", ""]
        lines += [f"- {strategy}, {name}: " + "; ".join(
                  f"{b} labels: {e['promoted']} of {e['judged']} promoted, {_cell(e['gain'])}"
                  for b, e in sorted(by_budget.items()))
                  for strategy, rules in s["few_patch_rule"].items() for name, by_budget in rules.items()]
    if "against_defaults" in s:
        against = s["against_defaults"]
        lines += ["", f"Minus the runs with the service's defaults ({against['reference']}), paired by strategy and "
                  "seed; the user's F1, then the named version's:", "",
                  "| strategy, F1 | " + " | ".join(str(b) for b in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
        for key, what in (("test_f1", "user's"), ("version_f1", "version's")):
            for strategy, intervals in against[key].items():
                lines.append(f"| {strategy}, {what} | " + " | ".join(
                    _cell(intervals[b]) if b in intervals else "" for b in budgets) + " |")
    if "against_before" in s:
        against = s["against_before"]
        lines += ["", f"Minus the same strategies and seeds {against['what']} ({against['reference']}: "
                  f"{against['how']}), paired by strategy and seed; the user's F1, then the named version's:", "",
                  "| strategy, F1 | " + " | ".join(str(b) for b in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
        for key, what in (("test_f1", "user's"), ("version_f1", "version's")):
            for strategy, intervals in against[key].items():
                lines.append(f"| {strategy}, {what} | " + " | ".join(
                    _cell(intervals[b]) if b in intervals else "" for b in budgets) + " |")
    lines += ["", "Seconds per round (median over runs): " + ", ".join(
        f"{b} labels {np.median([r['seconds'] for r in rows if r['labels'] == b]):.0f}" for b in budgets) + ".", ""]
    return "\n".join(lines)


def plot(summaries: dict[str, Any], default: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summaries:
        return
    figure, axes = plt.subplots(1, len(summaries), figsize=(5.6 * len(summaries), 4.2), squeeze=False)
    for axis, (name, s) in zip(axes[0], summaries.items()):
        for strategy in s["strategies"]:
            points = sorted((b, c) for b, c in s["table"][strategy].items())
            budgets = [max(b, 1) for b, _ in points]  # the base model (0 labels) drawn at 1 on the log axis
            mean = np.array([c["mean"] for _, c in points])
            std = np.array([c["std"] for _, c in points])
            line, = axis.plot(budgets, mean, marker="o", linewidth=2.2 if strategy in ("random", default) else 1.2,
                              label=strategy + (" (default)" if strategy == default else ""))
            axis.fill_between(budgets, mean - std, mean + std, alpha=0.12, color=line.get_color())
        axis.set_xscale("log", base=2)
        ticks = [max(b, 1) for b in s["budgets"]]
        axis.set_xticks(ticks, [str(b) for b in s["budgets"]])
        axis.set_xlabel("labelled patches (0: the base model)")
        axis.set_ylabel("test F1 at IoU 0.5")
        axis.set_title(f"{name} (band: ± 1 std over seeds {s['seeds']})", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
