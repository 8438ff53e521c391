"""Scoring: each patch read from its image by a model actor, T MC-dropout passes, a per-pixel acquisition map and
the patch's score, the model's segmentation (into the prediction store), the map a person reads (into the image's
uncertainty OME-Zarr: ``bioadapt.active.maps.DEFAULT_MAP``, where the passes' own segmentations disagree with the
model's objects, or ``FALLBACK_MAP`` for models whose passes give none); then the patches to annotate picked from
the project's whole pool of pending patches.

Random mode draws new, non-overlapping patches inside the mask; grid mode scores every tile inside the mask (a
whole slide: thousands of patches), and both stream each shard's results into the database and the stores as
they arrive. The maths (acquisition, patch score, selection: the strategies of ``bioadapt.active.STRATEGIES``)
is ``bioadapt.active``'s; this module schedules it: it scores with what the strategy needs (its acquisition map,
its patch score, the model's features of each patch when its selection reads them) and selects by its name.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bioadapt.active import DEFAULT_ACQUISITION, DEFAULT_STRATEGY, STRATEGIES, Strategy
from bioadapt.adapters.base import DEFAULT_MC_PASSES
from bioadapt.data import ImageRef
from bioadapt.errors import BioadaptError
from bioadapt.service import schemas as s
from bioadapt.service.context import Caller, ServiceContext
from bioadapt.service.jobs import JobRunner


SHARD_SIZE = 32
TOP = 20  # highest-scoring patches a score job's result lists
OVERVIEW_EVERY_S = 10.0  # how often a running job refreshes the uncertainty overview of its image
RECOVER_S = 120.0  # how long a job with every actor lost waits for one to come back (Ray restarts them)
Patches = Sequence[tuple[int, Sequence[int]]]  # (patch id, level-0 origin)


@dataclass(frozen=True)
class ScoreRequest:
    """What a model actor needs to score patches of one image."""

    image: ImageRef
    patch_shape: tuple[int, ...]
    passes: int = DEFAULT_MC_PASSES
    acquisition: str = DEFAULT_ACQUISITION
    reduce: str = "mean"  # see bioadapt.active.patch_score
    seed: int = 0
    predictions: str | None = None  # LabelStore path for the model's segmentation of each patch
    uncertainty: str | None = None  # UncertaintyStore path for the per-pixel acquisition maps
    mask: str | None = None  # the image's sampling mask (label image name or "auto"): scores count pixels inside it
    features: bool = False  # also return the model's pooled features of each patch (for selection rules)


def strategy_of(args: s.Score | s.SelectPatches, model_info: dict[str, Any]) -> tuple[str, Strategy, str]:
    """The strategy a call names (by default ``DEFAULT_STRATEGY``, or one that reads no features for a model that
    gives none), with the caller's acquisition map in place of its own when given, and the key its patch scores
    are stored under: (name, strategy, key)."""
    features = bool(model_info.get("patch_features"))
    name = args.strategy or (DEFAULT_STRATEGY if features else s.FEATURELESS_STRATEGY)
    strategy = STRATEGIES[name]
    if strategy.needs_features and not features:
        usable = sorted(n for n, other in STRATEGIES.items() if not other.needs_features)
        raise BioadaptError(f"strategy {name!r} picks by the model's features of each patch, which "
                            f"{model_info.get('name', 'this model')} does not give; use one of {usable}")
    acquisition = args.acquisition or strategy.acquisition
    return name, Strategy(acquisition, strategy.reduce, strategy.selection), score_key(acquisition, strategy.reduce)


def score_key(acquisition: str, reduce: str) -> str:
    """Where a patch's score of one acquisition map and one reduction is kept (``patches.scores``)."""
    return acquisition if reduce == "mean" else f"{acquisition}:{reduce}"


def patch_seed(seed: int, patch_id: int) -> int:
    """One seed per patch for the random baseline, so its scores do not depend on how patches are sharded."""
    return (seed * 1_000_003 + patch_id) % (2**31)


# -- the worker body ------------------------------------------------------------------------------------------
def score_patches(adapter: Any, request: ScoreRequest, patches: Patches, *, stop: threading.Event | None = None,
                  progress: Callable[..., None] | None = None) -> list[dict[str, Any]]:
    """Score (patch id, origin) pairs: read, MC passes, acquisition map, patch score (over the pixels inside the
    sampling mask), segmentation, writes; with ``request.features`` each result also carries the model's features
    of the patch (for the selection rules that read them)."""
    from bioadapt.active import ACQUISITIONS, patch_score
    from bioadapt.active.maps import DEFAULT_MAP, FALLBACK_MAP, NEEDS_PASS_LABELS, readable_map
    from bioadapt.active.shapes import nonconvex_profile, pool_nonconvex
    from bioadapt.data import LabelStore, UncertaintyStore
    from bioadapt.data.sampling import resolve_mask

    if request.acquisition not in ACQUISITIONS:
        raise BioadaptError(f"unknown acquisition {request.acquisition!r}; known: {sorted(ACQUISITIONS)}")
    image = request.image.open()
    sampling_mask = resolve_mask(image, request.mask)
    predictions = LabelStore.open(request.predictions) if request.predictions else None
    uncertainty = UncertaintyStore.open(request.uncertainty) if request.uncertainty else None
    info = adapter.describe()
    activation = info.activation
    shown = DEFAULT_MAP if info.segments_passes or DEFAULT_MAP not in NEEDS_PASS_LABELS else FALLBACK_MAP
    function = ACQUISITIONS[request.acquisition]
    results = []
    for patch_id, origin in patches:
        if stop is not None and stop.is_set():
            break
        started = time.perf_counter()
        pixels = image.read(origin, request.patch_shape, dtype="float32")
        if not np.isfinite(pixels).all():
            raise BioadaptError(f"patch {patch_id} at {list(origin)} of {request.image.uri} holds NaN or infinite "
                                "pixels; fill them (or exclude that region with a sampling mask) before scoring")
        # one MC seed for the whole round: every patch sees the same dropout masks (common random numbers),
        # so score differences come from the patches, not from the masks each happened to draw
        samples = adapter.mc_proba(pixels[None], passes=request.passes, seed=request.seed)[:, 0]
        score_map = function(samples, activation=activation,
                             **({"seed": patch_seed(request.seed, patch_id)} if request.acquisition == "random"
                                else {}))
        labels = adapter.segment(pixels[None])[0]
        if predictions is not None:
            predictions.write(origin, labels.astype(np.uint32), author="bioadapt-model")
        if uncertainty is not None:
            passes = adapter.segment_samples(samples[:, None])[:, 0] if shown in NEEDS_PASS_LABELS else None
            uncertainty.write(origin, readable_map(shown, score_map, labels, passes))
        inside = None if sampling_mask is None else sampling_mask.window(origin, request.patch_shape)
        if inside is not None and not inside.any():  # a window that only grazes the mask
            inside = None
        if request.reduce == "nonconvex":  # the selection scores the pool from every patch's profile
            profile = nonconvex_profile(labels, inside)
            extra, score = {"scores": profile}, pool_nonconvex([profile])[0]  # alone: patch_score's count
        else:
            extra, score = {}, patch_score(score_map, inside, reduce=request.reduce, labels=labels)
        result = {"patch_id": int(patch_id), "origin": [int(o) for o in origin], "score": score,
                  "objects": int(len(np.unique(labels)) - 1), **extra}
        if request.features:
            result["features"] = _features(adapter, pixels)
        results.append(result | {"seconds": round(time.perf_counter() - started, 4)})
        if progress is not None:
            progress(done=len(results))
    return results


def patch_features_of(adapter: Any, request: ScoreRequest, patches: Patches, *,
                      stop: threading.Event | None = None, progress: Callable[..., None] | None = None
                      ) -> list[dict[str, Any]]:
    """The model's pooled features of (patch id, origin) pairs: one deterministic forward pass each, no MC
    passes, no writes."""
    image = request.image.open()
    results = []
    for patch_id, origin in patches:
        if stop is not None and stop.is_set():
            break
        pixels = image.read(origin, request.patch_shape, dtype="float32")
        results.append({"patch_id": int(patch_id), "features": _features(adapter, pixels)})
        if progress is not None:
            progress(done=len(results))
    return results


def _features(adapter: Any, pixels: np.ndarray) -> list[float]:
    """The model's pooled features of one patch, as the store keeps them."""
    return [float(v) for v in adapter.patch_features(pixels[None])[0]]


# -- the driver -----------------------------------------------------------------------------------------------
def submit(context: ServiceContext, caller: Caller, args: s.Score,
           progress: Callable[[dict], Any] | None = None) -> dict[str, Any]:
    """Check the call (project, version, images, patch shape) and start the job; patches are drawn in the job."""
    project = context.owned_project(caller, args.project_id)
    version = context.version(project, args.version)
    rows = [context.image_row(project, args.image_id)] if args.image_id else context.store.images(project["id"])
    if not rows:
        raise BioadaptError(f"project {project['id']!r} has no images; add one with add_image")
    if math.prod(args.patch_shape) > context.max_patch_pixels:
        raise BioadaptError(f"patches of {args.patch_shape} exceed {context.max_patch_pixels} pixels; use smaller "
                            "patches")
    strategy_of(args, project["model_info"])  # refused now when the model cannot serve the strategy
    if args.stride is not None and (args.mode != "grid" or len(args.stride) != len(args.patch_shape)):
        raise BioadaptError(f"stride {args.stride} applies to mode='grid' only, with one value per patch axis")
    for row in rows:  # every image checked before the job starts
        image = context.opened_image(row)
        if len(args.patch_shape) != len(image.spatial_axes):
            raise BioadaptError(f"patch_shape {args.patch_shape} has {len(args.patch_shape)} dimensions; the "
                                f"image has spatial axes {image.spatial_axes!r}")
        if any(p > n for p, n in zip(args.patch_shape, image.spatial_shape)):
            raise BioadaptError(f"patch_shape {args.patch_shape} must fit in the image's spatial shape "
                                f"{list(image.spatial_shape)} ({row['uri']})")
    runner = context.start_job("score", lambda job: _score(context, job, project, version, rows, args), caller,
                               project, progress)
    return {"job_id": runner.job.id, "patches": args.n_patches or (s.DEFAULT_RANDOM_PATCHES
                                                                   if args.mode == "random" else None)}


def _score(context: ServiceContext, runner: JobRunner, project: dict[str, Any], version: dict[str, Any],
           rows: list[dict[str, Any]], args: s.Score) -> dict[str, Any]:
    runner.report(stage="drawing patches")
    plan = _plan(context, project, rows, args)
    total = sum(len(todo) for _, todo in plan)
    if total == 0:
        raise BioadaptError("no new patch fits: the image (or its mask) is covered by earlier patches or too "
                            "small for this patch shape")
    runner.report(stage="scoring", done=0, total=total)
    name, strategy, key = strategy_of(args, project["model_info"])
    spec = context.model_spec(project, version)
    actors = context.pool.lease(spec, min(context.pool_size(args.actors), math.ceil(total / SHARD_SIZE)),
                                cancelled=runner.cancelled)
    scored, top = 0, []  # the job's count and its 20 highest scores (a whole slide's results stay in the store)
    healthy = False
    try:
        for row, todo in plan:
            if runner.cancelled.is_set() or not actors:
                break
            request = ScoreRequest(image=context.image_ref(row), patch_shape=tuple(args.patch_shape),
                                   passes=args.mc_passes, acquisition=strategy.acquisition, reduce=strategy.reduce,
                                   seed=args.seed, predictions=row["predictions"], uncertainty=row["uncertainty"],
                                   mask=row["mask"], features=strategy.needs_features)
            commit = _Commit(context, project["id"], row, args, key, version["number"])
            try:
                results = score_shards(runner, actors, request, todo, on_shard=commit, done_before=scored,
                                       total=total)
                scored, top = scored + len(results), heapq.nlargest(TOP, top + results, key=lambda r: r["score"])
            finally:
                commit.overview()  # the overview shows every map written, also when the job stops early
        if strategy.needs_features and actors and not runner.cancelled.is_set():
            runner.report(stage="features of the annotated patches")
            _refresh_labelled_features(context, project["id"], actors[0])
        healthy = True
    finally:
        context.pool.release(spec, actors, healthy=healthy)
    runner.report(stage="selecting")
    picked = select_pending(context, project["id"], strategy.selection, key, args.select, seed=args.seed)
    return {"scored": scored, "version": version["number"], "strategy": name,
            "acquisition": strategy.acquisition, "reduce": strategy.reduce, "mode": args.mode,
            "selection": strategy.selection, "selected": len(picked), "top": top}


def _refresh_labelled_features(context: ServiceContext, project_id: str, actor: Any) -> None:
    """The annotated patches' features under the model that just scored the pool: selection rules that read
    features (typicality, core-set) compare the pending patches with the annotated ones, and features an earlier
    model version gave sit in another feature space. One forward pass per annotated patch, on one actor."""
    import ray

    from bioadapt.service.execution import remote_cause

    images = {row["id"]: row for row in context.store.images(project_id)}
    groups: dict[tuple[str, tuple[int, ...]], list[tuple[int, list[int]]]] = {}
    for row in context.store.patches(project_id, status="annotated", order="id"):
        if row["image_id"] in images:
            groups.setdefault((row["image_id"], tuple(row["shape"])), []).append((row["id"], row["origin"]))
    for (image_id, shape), patches in groups.items():
        request = ScoreRequest(image=context.image_ref(images[image_id]), patch_shape=shape, features=True)
        try:
            features = ray.get(actor.run.remote(patch_features_of, request, patches))
        except ray.exceptions.RayError as e:
            raise BioadaptError(f"the scores are stored, but the annotated patches' features could not be computed "
                                f"({remote_cause(e)}); score again before selecting") from e
        context.store.record_features(project_id, features)


def _plan(context: ServiceContext, project: dict[str, Any], rows: list[dict[str, Any]], args: s.Score
          ) -> list[tuple[dict[str, Any], list[tuple[int, list[int]]]]]:
    """(image row, [(patch id, origin)]) to score: windows drawn for every image first, then written in one
    transaction; one draw per project at a time in this process, and the store drops a window that overlaps one
    another replica stored meanwhile."""
    with context.draw_locks[project["id"]]:
        seen = context.store.last_patch_id(project["id"])
        drawn = _draw(context, project, rows, args)
        added = context.store.add_drawn(project["id"], {row["id"]: [(w.origin, w.shape) for w in windows]
                                                        for row, windows, _ in drawn}, seen=seen)
    return [(row, todo + [(i, list(w.origin)) for i, w in zip(added[row["id"]], windows) if i is not None])
            for row, windows, todo in drawn]


def _draw(context: ServiceContext, project: dict[str, Any], rows: list[dict[str, Any]], args: s.Score
          ) -> list[tuple[dict[str, Any], list[Any], list[tuple[int, list[int]]]]]:
    """(image row, new windows, earlier pending patches to re-score) for every image."""
    from bioadapt.data import PatchWindow, sample_patches

    wanted = args.n_patches or (s.DEFAULT_RANDOM_PATCHES if args.mode == "random" else None)
    shares = [None] * len(rows) if wanted is None else \
        [wanted // len(rows) + (i < wanted % len(rows)) for i in range(len(rows))]
    drawn = []  # (image row, new windows, earlier patches to re-score)
    for row, n in zip(rows, shares):
        image = context.opened_image(row)
        earlier = context.store.patches(project["id"], image_id=row["id"], order="id")
        mask = context.sampling_mask(image, row)
        if args.mode == "grid":
            tiles = sample_patches(image, n, args.patch_shape, mask=mask, seed=args.seed, mode="grid",
                                   stride=args.stride)
            known = {(tuple(p["origin"]), tuple(p["shape"])): p for p in earlier}
            todo = [(known[t.origin, t.shape]["id"], list(t.origin)) for t in tiles
                    if (t.origin, t.shape) in known and known[t.origin, t.shape]["status"] == "pending"]
            windows = [t for t in tiles if (t.origin, t.shape) not in known]
        else:
            avoid = [PatchWindow(tuple(p["origin"]), tuple(p["shape"])) for p in earlier]
            windows = sample_patches(image, n, args.patch_shape, mask=mask, seed=args.seed + len(earlier),
                                     avoid=avoid) if n else []
            todo = [(p["id"], p["origin"]) for p in earlier
                    if args.rescore_pending and p["status"] == "pending" and p["shape"] == args.patch_shape]
        if len(todo) + len(windows) > s.MAX_PATCHES:
            raise BioadaptError(f"{len(todo) + len(windows)} tiles of {args.patch_shape} in {row['uri']}: more than "
                                f"{s.MAX_PATCHES}; use a larger stride or patch shape, or n_patches")
        drawn.append((row, windows, todo))
    return drawn


class _Commit:
    """What happens to each finished shard: scores into the database, the image's overview refreshed every
    ``OVERVIEW_EVERY_S`` seconds over the patches scored since."""

    def __init__(self, context: ServiceContext, project_id: str, row: dict[str, Any], args: s.Score, key: str,
                 version: int):
        self.context, self.project_id, self.row, self.args, self.version = context, project_id, row, args, version
        self.key = key
        self.touched: list[tuple[list[int], list[int]]] = []
        self.refreshed = time.monotonic()

    def __call__(self, results: list[dict[str, Any]]) -> None:
        self.context.store.record_scores(self.project_id, results, self.key, self.version)
        self.touched += [(r["origin"], self.args.patch_shape) for r in results]
        if time.monotonic() - self.refreshed > OVERVIEW_EVERY_S:
            self.overview()

    def overview(self) -> None:
        from bioadapt.data import UncertaintyStore

        if self.touched:
            UncertaintyStore.open(self.row["uncertainty"]).update_overview(self.touched)
        self.touched, self.refreshed = [], time.monotonic()


def score_shards(runner: JobRunner, actors: list[Any], request: ScoreRequest, patches: Patches, *,
                 shard_size: int = SHARD_SIZE, retries: int = 2,
                 on_shard: Callable[[list[dict[str, Any]]], Any] | None = None, done_before: int = 0,
                 total: int | None = None, recover_s: float = RECOVER_S) -> list[dict[str, Any]]:
    """Score ``patches`` in shards over ``actors`` (one shard in flight per actor); ``on_shard`` gets each shard's
    results as it arrives (in the job's thread). A shard lost with its actor (its process, or its node, died) goes
    back to the queue at once, for the next actor that is free (each shard is tried ``retries`` + 1 times at most).
    The lost actor rejoins once Ray has restarted it and it answers; it leaves ``actors`` (stopped) when it is gone
    for good, or still away when the job ends: a restart can wait forever on a cluster that lost a node. The job
    waits for a lost actor only when no other one is left, up to ``recover_s``. On cancel or failure the shards in
    flight are stopped and waited for, so the actors come back idle."""
    import ray

    from bioadapt.service.execution import remote_cause

    total = total or len(patches)
    shards = [list(patches[i:i + shard_size]) for i in range(0, len(patches), shard_size)]
    pending = list(range(len(shards)))
    attempts = [0] * len(shards)
    in_flight: dict[Any, tuple[int, Any]] = {}
    away = _Away()  # actors lost mid-shard, until they answer again
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        def hand_out(actor: Any) -> None:
            if pending and not runner.cancelled.is_set():
                shard = pending.pop(0)
                in_flight[actor.run.remote(score_patches, request, shards[shard])] = (shard, actor)

        stalled_since = None  # since when no shard is in flight (every actor lost)
        while (pending or in_flight) and not runner.cancelled.is_set():
            busy = {actor for _, actor in in_flight.values()}
            for actor in actors:
                if actor not in busy and actor not in away:
                    hand_out(actor)
            if in_flight:
                stalled_since = None
            elif not actors:
                raise BioadaptError(f"every model actor died; last cause: {away.cause}")
            elif time.monotonic() - (stalled_since := stalled_since or time.monotonic()) > recover_s:
                raise BioadaptError(f"every model actor was lost and none came back within {recover_s:.0f} s (a "
                                    "node of the Ray cluster may have gone, and the others have no room for them); "
                                    f"last cause: {away.cause}")
            ready, _ = ray.wait([*in_flight, *away.pings()], num_returns=1, timeout=0.5)
            for ref in ready:
                if ref not in in_flight:
                    gone = away.answered(ref)
                    if gone is not None:
                        actors.remove(gone)
                    continue
                shard, actor = in_flight.pop(ref)
                try:
                    shard_results = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    attempts[shard] += 1
                    if attempts[shard] > retries:
                        raise BioadaptError(f"shard {shard} failed {attempts[shard]} times; last cause: "
                                            f"{remote_cause(e)}") from e
                    pending.insert(0, shard)  # to the next free actor now, not after this one's restart
                    runner.report(shards_retried=sum(attempts))
                    away.add(actor, remote_cause(e))
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise BioadaptError(f"scoring failed: {remote_cause(e)}") from e
                hand_out(actor)  # the actor computes its next shard while this one is committed
                results.extend(shard_results)
                if on_shard is not None:
                    on_shard(shard_results)
                runner.report(done=done_before + len(results), total=total,
                              patches_per_second=round(len(results) / (time.perf_counter() - started), 3))
    finally:
        _drain(in_flight, actors)
        for actor in away.actors():  # still restarting (or never will): not given back to the pool
            ray.kill(actor)
            actors.remove(actor)
    return sorted(results, key=lambda r: -r["score"])


class _Away:
    """Actors lost mid-shard: each is pinged (at most every ``PING_EVERY_S``) until it answers (it rejoins) or is
    dead for good (it leaves)."""

    PING_EVERY_S = 1.0

    def __init__(self):
        self._actors: dict[Any, tuple[Any | None, float]] = {}  # actor -> (ping in flight, when it was sent)
        self.cause = ""  # why the last one was lost

    def __contains__(self, actor: Any) -> bool:
        return actor in self._actors

    def add(self, actor: Any, cause: str) -> None:
        self._actors[actor] = (None, 0.0)
        self.cause = cause

    def actors(self) -> list[Any]:
        return list(self._actors)

    def pings(self) -> list[Any]:
        """The pings in flight, sending a new one to each actor whose last one failed long enough ago."""
        now = time.monotonic()
        for actor, (ping, sent) in list(self._actors.items()):
            if ping is None and now - sent >= self.PING_EVERY_S:
                self._actors[actor] = (actor.ping.remote(), now)
        return [ping for ping, _ in self._actors.values() if ping is not None]

    def answered(self, ping: Any) -> Any | None:
        """Handle a finished ping: the actor rejoins when it answered; returns it when it is dead for good."""
        import ray

        actor = next(a for a, (p, _) in self._actors.items() if p == ping)
        try:
            ray.get(ping)
        except ray.exceptions.ActorDiedError:
            del self._actors[actor]
            return actor
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            self._actors[actor] = (None, self._actors[actor][1])  # restarting: ask again later
            return None
        del self._actors[actor]
        return None


def _drain(in_flight: dict[Any, tuple[int, Any]], actors: list[Any], timeout_s: float = 30) -> None:
    """Stop the shards still running and wait for them; an actor that does not come back in time is killed and
    leaves ``actors``."""
    import ray

    if not in_flight:
        return
    for _, actor in in_flight.values():
        actor.stop.remote()
    _, late = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=timeout_s)
    for ref in late:
        _, actor = in_flight[ref]
        ray.kill(actor)
        if actor in actors:
            actors.remove(actor)


# -- selection ------------------------------------------------------------------------------------------------
def select_pending(context: ServiceContext, project_id: str, selection: str, key: str, k: int, *,
                   seed: int = 0) -> list[int]:
    """Pick ``k`` patches to annotate from every pending patch of the project scored under ``key`` (see
    ``score_key``) with a selection rule of ``bioadapt.active.SELECTIONS``; the annotated patches count as
    labelled (typicality and core-set rules pick away from them). Rules that read features consider the patches
    scored with features. The picks are stored, in order, for list_patches. Returns their ids."""
    from bioadapt.active import SELECTIONS, select
    from bioadapt.active.shapes import pool_nonconvex

    needs_features = SELECTIONS[selection][1]
    scored = [row for row in context.store.patches(project_id, status="pending", order="id")
              if row["scores"].get(key) is not None]
    pending = [row for row in scored if row["features"] or not needs_features]
    if scored and not pending:
        raise BioadaptError(f"selection {selection!r} picks by the model's features of each patch, and the pending "
                            "patches were scored without them: score with this strategy (rescore_pending=True "
                            "re-scores them)")
    labelled = [row for row in context.store.patches(project_id, status="annotated", order="id")
                if row["features"]] if needs_features else []
    if not pending:
        context.store.set_selection(project_id, [])
        return []
    pool = pending + labelled
    scores = [row["scores"].get(key) or 0.0 for row in pool]
    if key.endswith(":nonconvex"):  # counted at the pool's nucleus size, from each patch's profile
        scores = pool_nonconvex([row["scores"] for row in pool])
    if needs_features and len({len(row["features"]) for row in pool}) > 1:
        raise BioadaptError("the project's patches carry features of different sizes (scored by different models); "
                            "score again with rescore_pending=True")
    features = np.array([row["features"] for row in pool], dtype=np.float64) if needs_features else None
    chosen = select(selection, k, scores, features, labelled=range(len(pending), len(pool)), seed=seed)
    ids = [pool[i]["id"] for i in chosen]
    context.store.set_selection(project_id, ids)
    return ids
