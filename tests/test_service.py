"""The bioadapt Hypha service end to end: real `bioadapt serve` subprocesses registered on a real Hypha server,
joined to the test session's Ray, called through the Python client (no mocks).

One service (user "svc") and one project (alice's) are shared by most tests, in file order: the loop annotates
8 patches and fine-tunes version 1; later tests use the patches still pending.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from model_factory import unet_package
from service_helpers import (SERVICE_WS, ServiceProcess, client_for, only_file, project_folder, ray_cpus_free,
                             wait_until)

from bioadapt.active import DEFAULT_STRATEGY, STRATEGIES
from bioadapt.data import LabelStore, UncertaintyStore
from bioadapt.data.synthetic import write_synthetic_ome_zarr
from bioadapt.errors import AccessDenied, BioadaptError
from bioadapt.service.client import BioadaptClient, connect
from bioadapt.service.hypha_server import mint_token
from bioadapt.service.jobs import INTERRUPTED, LEASE_VARIABLE, RENEW_VARIABLE

ray = pytest.importorskip("ray")

PATCH = [64, 64]


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The allowed input folder (image, model, a symlink leading out of it) and a folder outside it."""
    root = tmp_path_factory.mktemp("service-files")
    allowed, outside = root / "inputs", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    write_synthetic_ome_zarr(allowed / "image.ome.zarr", (512, 512), "crowded", seed=0)
    write_synthetic_ome_zarr(allowed / "small.ome.zarr", (128, 128), "crowded", seed=1)
    write_synthetic_ome_zarr(outside / "image.ome.zarr", (128, 128), "crowded", seed=2)
    model = unet_package(allowed / "model.zip", features=4, weights=("pytorch_state_dict",))
    (allowed / "escape.ome.zarr").symlink_to(outside / "image.ome.zarr")
    truth = np.asarray(zarr.open_group(str(allowed / "image.ome.zarr"), mode="r")["labels/ground_truth/0"][:])
    return {"root": root, "allowed": allowed, "outside": outside, "image": allowed / "image.ome.zarr",
            "small": allowed / "small.ome.zarr", "model": model, "truth": truth}


@pytest.fixture(scope="module")
def service(hypha_server, ray_cluster, inputs):
    process = ServiceProcess(hypha_server, ray_cluster, "svc", inputs["root"] / "data", [inputs["allowed"]])
    info = process.start()
    assert info["workspace"] == SERVICE_WS and info["service_id"] == f"{SERVICE_WS}/bioadapt"
    try:
        yield process
    finally:
        code = process.stop()
        assert code is not None, "the service did not exit"
        assert code in (0, -signal.SIGTERM), f"the service exited with {code}:\n{process.output()}"
        assert not (process.data_dir / "connection.json").exists(), "a clean stop removes connection.json"


@pytest.fixture(scope="module")
def alice(hypha_server, service):
    client = client_for(hypha_server, "alice")
    yield client
    client.disconnect()


@pytest.fixture(scope="module")
def bob(hypha_server, service):
    client = client_for(hypha_server, "bob")
    yield client
    client.disconnect()


@pytest.fixture(scope="module")
def project(alice, inputs, service):
    """alice's project with one image, 24 patches of 64 x 64 scored (4 MC passes) with a progress callback."""
    model = alice.load_model(str(inputs["model"]))
    created = alice.create_project("shared", model["id"], [{"uri": str(inputs["image"])}])
    events: list[dict] = []
    started = alice.score(created["id"], n_patches=24, patch_shape=PATCH, mc_passes=4, seed=0,
                          progress=events.append)
    job = alice.wait(started["job_id"], progress=False, timeout_s=120)
    assert job["state"] == "done", job
    image = created["images"][0]
    assert "folder" not in created  # the service sends no path of its own
    folder = project_folder(service, created["id"]) / "images" / image["id"]
    return {"id": created["id"], "model": model, "image": image, "folder": folder, "score_job": started,
            "score_result": job, "events": events}


def _labels_for(truth: np.ndarray, patch: dict) -> np.ndarray:
    (y, x), (h, w) = patch["origin"], patch["shape"]
    return truth[y:y + h, x:x + w]


# -- 2. the loop --------------------------------------------------------------------------------------------
def test_full_loop_through_the_client(alice, project, inputs, service, tmp_path):
    p = project["id"]
    assert project["score_job"]["patches"] == 24
    assert project["score_result"]["progress"]["done"] == project["score_result"]["progress"]["total"] == 24
    # the progress callback passed to score received live events
    events = wait_until(lambda: [e for e in project["events"] if e.get("done") == 24 and e["state"] == "done"],
                         10, f"final progress event (got {project['events']})")
    assert events[0]["job_id"] == project["score_job"]["job_id"]
    assert any(e.get("done", 0) < 24 for e in project["events"]), "only the final event arrived"

    # the service's default strategy scored with what it needs (the model's features) and picked by its rule
    result = project["score_result"]["result"]
    assert (result["strategy"], result["selection"]) == (DEFAULT_STRATEGY, STRATEGIES[DEFAULT_STRATEGY].selection)
    picked = alice.list_patches(p, limit=100)  # the picks first, in their order
    assert [q["selection_rank"] for q in picked] == list(range(1, 25)) and result["selected"] == 24
    ranked = alice.list_patches(p, order="score", limit=100)
    assert len(ranked) == 24 and {q["id"] for q in picked} == {q["id"] for q in ranked}
    scores = [q["score"] for q in ranked]
    known = [s for s in scores if s is not None]
    assert known == sorted(known, reverse=True) and scores[:len(known)] == known  # descending, None last
    assert all(q["status"] == "pending" and q["shape"] == PATCH for q in ranked)

    top = ranked[0]
    got = alice.get_patch(p, top["id"])
    assert got["image"].shape == (1, *PATCH)
    assert got["predicted_labels"].shape == tuple(PATCH) and got["uncertainty"].shape == tuple(PATCH)
    assert "labels" not in got
    # what get_patch returned is what the scoring actors wrote into the project's Zarr stores
    stored_uncertainty = UncertaintyStore.open(project["folder"] / "uncertainty.ome.zarr").read(top["origin"], PATCH)
    assert np.isfinite(stored_uncertainty).all()
    np.testing.assert_array_equal(got["uncertainty"], stored_uncertainty)
    stored_predictions = LabelStore.open(project["folder"] / "predictions.ome.zarr", "model").read(top["origin"],
                                                                                                  PATCH)
    np.testing.assert_array_equal(got["predicted_labels"], stored_predictions)
    # the stored map is the readable default (pass disagreement), one value per object of the model, not the
    # acquisition map the score was reduced from
    objects = [i for i in np.unique(stored_predictions) if i]
    assert objects and all(np.ptp(stored_uncertainty[stored_predictions == i]) < 1e-6 for i in objects)

    # corrections from the ground truth for the 8 most uncertain patches (a quarter is held out)
    for q in ranked[:8]:
        answer = alice.submit_labels(p, q["id"], _labels_for(inputs["truth"], q))
        assert answer["status"] == "annotated" and answer["annotator"] == "alice"
    again = alice.get_patch(p, top["id"])
    np.testing.assert_array_equal(again["labels"], _labels_for(inputs["truth"], top))
    counts = alice.get_project(p)["patches"]
    assert counts == {"pending": 16, "annotated": 8, "skipped": 0}

    tuning_events: list[dict] = []
    tuned = alice.fine_tune(p, epochs=3, learning_rate=1e-3, batch_size=2, progress=tuning_events.append)
    assert tuned["base_version"] == 0 and tuned["patches"] == 6
    job = alice.wait(tuned["job_id"], progress=False, timeout_s=120)
    assert job["state"] == "done" and job["result"]["version"] == 1, job
    # 2 held-out patches cannot judge it alone: the job cross-validated it over all 8 annotated patches, and the
    # project takes it as its default unless that found it worse
    verdict = job["result"]["verdict"]
    assert (verdict["judged_by"], verdict["patches"]) == ("cross-validation", 8), verdict
    assert job["result"]["default_version"] == (0 if verdict["verdict"] == "worse" else 1), job
    assert tuned["cross_validation_fine_tunes"] == 3
    wait_until(lambda: any(e["state"] == "done" and e.get("epoch") == 3 for e in tuning_events), 10,
                f"the fine-tune's last progress event (got {tuning_events})")
    versions = alice.get_project(p)["versions"]
    assert [(v["number"], v["parent"]) for v in versions] == [(0, None), (1, 0)]
    assert "path" not in versions[1] and "path" not in job["result"]
    assert only_file(project_folder(service, p) / "versions", "*.pt").is_file()

    # evaluate, predict and export are jobs too: started at once, followed with wait, progress on the way
    evaluation_events: list[dict] = []
    started = alice.evaluate(p, progress=evaluation_events.append)
    assert started["versions"] == [0, 1] and started["patches"] == 2
    job = alice.wait(started, progress=False, timeout_s=120)
    assert job["kind"] == "evaluate" and job["state"] == "done", job
    evaluated = job["result"]
    assert evaluated["holdout_patches"] == 2 and set(evaluated["versions"]) == {"0", "1"}
    for metrics in evaluated["versions"].values():
        assert 0 <= metrics["f1"] <= 1 and 0 <= metrics["ap"] <= 1
    wait_until(lambda: any(e["state"] == "done" for e in evaluation_events), 10, "evaluate's last progress event")
    assert alice.get_project(p)["versions"][1]["metrics"]["holdout"] == evaluated["versions"]["1"]

    region = alice.wait(alice.predict(p, project["image"]["id"], top["origin"], PATCH, version=1,
                                      return_array=True), progress=False, timeout_s=120)
    assert region["state"] == "done" and region["result"]["version"] == 1, region
    labels = alice.job_output(region["id"], "labels")
    assert labels.shape == tuple(PATCH) and np.issubdtype(labels.dtype, np.integer)

    job = alice.wait(alice.export_model(p, version=1, authors=["Alice"], license="CC-BY-4.0"), progress=False,
                     timeout_s=300)
    assert job["kind"] == "export" and job["state"] == "done", job
    exported = job["result"]
    assert exported["outputs"] == ["package"] and "path" not in exported  # fetched by name, wherever the caller is
    package = tmp_path / "downloaded.zip"
    package.write_bytes(alice.job_output(job["id"], "package"))
    assert exported["version"] == 1 and package.stat().st_size == exported["size"]
    assert package.read_bytes() == only_file(project_folder(service, p) / "exports", "*.zip").read_bytes()
    from bioimageio.core import test_model

    summary = test_model(package)
    assert summary.status == "passed", summary.format()


def test_cancelling_a_long_fine_tune(alice, project):
    p = project["id"]
    before = alice.get_project(p)["versions"]
    started = alice.fine_tune(p, epochs=1000)
    wait_until(lambda: alice.job_status(started["job_id"])["progress"].get("epoch", 0) >= 1, 60,
                "the long fine-tune trains", poll_s=0.2)
    asked = time.monotonic()
    answer = alice.cancel_job(started["job_id"])
    assert answer["cancel_requested"] and answer["state"] == "running"
    job = wait_until(lambda: (j := alice.job_status(started["job_id"]))["state"] in ("done", "failed", "cancelled")
                      and j, 5, "cancelled", poll_s=0.1)
    assert job["state"] == "cancelled", job
    assert time.monotonic() - asked < 5
    assert job["progress"]["epoch"] < 1000
    assert alice.get_project(p)["versions"] == before
    # cancelling a finished job changes nothing, and says so
    assert alice.cancel_job(started["job_id"]) == {"job_id": started["job_id"], "state": "cancelled",
                                                   "cancel_requested": False}
    wait_until(ray_cpus_free, 30, "the fine-tune actor released its CPU")


# -- 3. users -----------------------------------------------------------------------------------------------
def test_other_users_cannot_touch_a_project(alice, bob, project, inputs, hypha_server):
    p, image_id = project["id"], project["image"]["id"]
    pending = alice.list_patches(p, status="pending", limit=1)[0]
    job_id = project["score_job"]["job_id"]
    before = alice.get_project(p)
    denied = {
        "get_project": lambda: bob.get_project(p),
        "list_patches": lambda: bob.list_patches(p),
        "get_patch": lambda: bob.get_patch(p, pending["id"]),
        "submit_labels": lambda: bob.submit_labels(p, pending["id"], np.ones(PATCH, np.uint16)),
        "skip_patch": lambda: bob.skip_patch(p, pending["id"]),
        "score": lambda: bob.score(p, n_patches=1, patch_shape=PATCH, mc_passes=2),
        "fine_tune": lambda: bob.fine_tune(p, epochs=1),
        "evaluate": lambda: bob.evaluate(p),
        "predict": lambda: bob.predict(p, image_id, [0, 0], PATCH, return_array=True),
        "export_model": lambda: bob.export_model(p),
        "delete_project": lambda: bob.delete_project(p),
        "add_image": lambda: bob.add_image(p, str(inputs["small"])),
        "list_jobs": lambda: bob.list_jobs(p),
        "job_status": lambda: bob.job_status(job_id),
        "cancel_job": lambda: bob.cancel_job(job_id),
    }
    for name, call in denied.items():  # answered as if alice's ids did not exist (tests/test_service_attacks.py)
        with pytest.raises(BioadaptError, match=r"no (project|job) '[0-9a-f]+'") as refused:
            call()
            pytest.fail(f"bob's {name} went through")
        assert not isinstance(refused.value, AccessDenied), f"{name}: {refused.value}"
    # alice's model id is, for bob, what an unknown id is: a model source that does not load
    with pytest.raises(BioadaptError) as refused:
        bob.create_project("mine", project["model"]["id"])
    assert str(refused.value).replace(project["model"]["id"], "<id>") == \
        str(pytest.raises(BioadaptError, bob.create_project, "mine", "0123456789ab").value).replace(
            "0123456789ab", "<id>")
    assert p not in [q["id"] for q in bob.list_projects()]
    assert bob.list_models() == [] and bob.list_jobs() == []
    assert p in [q["id"] for q in alice.list_projects()]
    after = alice.get_project(p)
    assert after == before  # nothing bob tried changed the project
    assert alice.get_patch(p, pending["id"])["status"] == "pending"

    # no token: neither connecting into the service's workspace nor reaching the service from elsewhere works
    with pytest.raises(BioadaptError, match="cannot connect"):
        connect(hypha_server.url, workspace=SERVICE_WS)
    with pytest.raises(BioadaptError, match="no service"):
        connect(hypha_server.url, service_id=f"{SERVICE_WS}/bioadapt")
    # a signed-in user without a grant on the workspace is refused too
    dave = mint_token("dave", jwt_secret=hypha_server.jwt_secret)
    with pytest.raises(BioadaptError, match="cannot connect"):
        connect(hypha_server.url, token=dave, workspace=SERVICE_WS)


# -- 5. concurrency -----------------------------------------------------------------------------------------
def test_eight_clients_label_eight_patches_at_once(alice, project, hypha_server):
    p = project["id"]
    targets = alice.list_patches(p, status="pending", order="id", limit=8)
    assert len(targets) == 8
    annotated_before = alice.get_project(p)["patches"]["annotated"]
    clients = [client_for(hypha_server, "alice") for _ in range(8)]
    rng = np.random.default_rng(7)
    labels = [rng.integers(0, 50, PATCH, dtype=np.uint16) + 1000 * (i + 1) for i in range(8)]
    barrier = threading.Barrier(8)
    results: list = [None] * 8

    def submit(i: int) -> None:
        barrier.wait()
        try:
            results[i] = clients[i].submit_labels(p, targets[i]["id"], labels[i])
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for client in clients:
            client.disconnect()
    assert all(isinstance(r, dict) and r["status"] == "annotated" for r in results), results
    for target, sent in zip(targets, labels):
        got = alice.get_patch(p, target["id"])
        assert got["status"] == "annotated"
        np.testing.assert_array_equal(got["labels"], sent)
    assert alice.get_project(p)["patches"]["annotated"] == annotated_before + 8


# -- 6. bad input -------------------------------------------------------------------------------------------
def _state(client: BioadaptClient, project: dict, data_dir: Path) -> dict:
    """What bad calls must not change: projects, models, patches, versions, jobs, the label store, folders."""
    p = project["id"]
    labels = LabelStore.open(project["folder"] / "labels.ome.zarr", "corrections")
    return {"projects": [(q["id"], q["patches"]) for q in client.list_projects()],
            "models": [m["id"] for m in client.list_models()],
            "patches": client.list_patches(p, order="id", limit=10_000),
            "project": client.get_project(p), "jobs": [j["id"] for j in client.list_jobs()],
            "labels": labels.read((0, 0), labels.spatial_shape).tobytes(),
            "folders": sorted(str(f.relative_to(data_dir)) for f in (data_dir / "projects").iterdir())}


def _difference(before, after) -> str:
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        return "; ".join(f"{k}: {before.get(k)!r:.300} -> {after.get(k)!r:.300}" for k in keys)
    return f"{before!r:.300} -> {after!r:.300}"


def test_bad_input_is_refused_and_changes_nothing(alice, project, inputs, service):
    p, image_id = project["id"], project["image"]["id"]
    pending, spare = alice.list_patches(p, status="pending", order="id", limit=2)
    annotated = (alice.list_patches(p, status="annotated", limit=1)  # when run alone, annotate one here
                 or [alice.submit_labels(p, spare["id"], _labels_for(inputs["truth"], spare))])[0]
    allowed, outside = inputs["allowed"], inputs["outside"]
    before = _state(alice, project, service.data_dir)
    nan = float("nan")
    cases = {
        # schema: missing, wrong types, unknown fields, out of range (NaN included)
        "missing field": (lambda: alice._call("get_patch", project_id=p), r"patch_id: Field required"),
        "missing model": (lambda: alice._call("create_project", name="x"), r"model: Field required"),
        "wrong type": (lambda: alice._call("score", project_id=p, n_patches="many"), r"n_patches: Input should be"),
        "wrong id type": (lambda: alice._call("get_patch", project_id=p, patch_id="first"), r"patch_id: Input"),
        "list for a string": (lambda: alice._call("get_project", project_id=["a"]), r"project_id: Input should"),
        "unknown field": (lambda: alice._call("score", project_id=p, bogus=1), r"bogus: Extra inputs"),
        "unknown image field": (lambda: alice._call("create_project", name="x", model=project["model"]["id"],
                                                    images=[{"uri": str(inputs["small"]), "colour": 1}]),
                                r"images\.0\.colour: Extra inputs"),
        "progress not callable": (lambda: alice._call("score", project_id=p, progress=5), "progress must be a"),
        "NaN learning rate": (lambda: alice.fine_tune(p, learning_rate=nan),
                              r"learning_rate: Input should be a finite number"),
        "NaN dropout": (lambda: alice.load_model(str(inputs["model"]), dropout_p=nan),
                        r"dropout_p: Input should be a finite number"),
        "NaN holdout": (lambda: alice.create_project("x", project["model"]["id"], holdout_fraction=nan),
                        r"holdout_fraction: Input should be a finite number"),
        "zero epochs": (lambda: alice.fine_tune(p, epochs=0), r"epochs: Input should be greater"),
        "unknown acquisition": (lambda: alice.score(p, acquisition="guess"), r"acquisition: Input should be"),
        # labels
        "labels not an array": (lambda: alice.submit_labels(p, pending["id"], [[1, 2], [3, 4]]),
                                "numpy integer array"),
        "labels of the wrong shape": (lambda: alice.submit_labels(p, pending["id"], np.zeros((32, 64), np.uint16)),
                                      r"shape \[32, 64\] do not match the patch's shape \[64, 64\]"),
        "labels with a channel axis": (lambda: alice.submit_labels(p, pending["id"], np.zeros((1, 64, 64), np.uint8)),
                                       "do not match the patch's shape"),
        "float labels": (lambda: alice.submit_labels(p, pending["id"], np.ones(PATCH, np.float32)), "float32"),
        "negative labels": (lambda: alice.submit_labels(p, annotated["id"], -np.ones(PATCH, np.int32)),
                            "must not be negative"),
        "labels over uint32": (lambda: alice.submit_labels(p, pending["id"], np.full(PATCH, 2**40, np.int64)),
                               "uint32"),
        # unknown ids
        "unknown project": (lambda: alice.get_project("nope"), "no project 'nope'"),
        "unknown project (score)": (lambda: alice.score("nope"), "no project 'nope'"),
        "unknown patch": (lambda: alice.get_patch(p, 99999), "no patch 99999"),
        "unknown patch (labels)": (lambda: alice.submit_labels(p, 99999, np.zeros(PATCH, np.uint8)),
                                   "no patch 99999"),
        "unknown job": (lambda: alice.job_status("nojob"), "no job 'nojob'"),
        "unknown job (cancel)": (lambda: alice.cancel_job("nojob"), "no job 'nojob'"),
        "unknown image": (lambda: alice.score(p, image_id="noimage", patch_shape=PATCH), "no image 'noimage'"),
        "unknown version (score)": (lambda: alice.score(p, version=9, patch_shape=PATCH), "no model version 9"),
        "unknown version (evaluate)": (lambda: alice.evaluate(p, versions=[0, 9]),
                                       "no model version 9|no held-out annotated patches"),
        "unknown version (export)": (lambda: alice.export_model(p, version=9), "no model version 9"),
        "unknown model": (lambda: alice.create_project("x", "no-such-model-anywhere"), "no-such-model-anywhere"),
        # paths
        "image outside": (lambda: alice.add_image(p, str(outside / "image.ome.zarr")), "outside the folders"),
        "file:// outside": (lambda: alice.add_image(p, (outside / "image.ome.zarr").as_uri()), "outside the folders"),
        "dot-dot": (lambda: alice.add_image(p, f"{allowed}/../outside/image.ome.zarr"), "contains '..'"),
        "dot-dot back in": (lambda: alice.add_image(p, f"{allowed}/../inputs/small.ome.zarr"), "contains '..'"),
        "relative path": (lambda: alice.add_image(p, "inputs/small.ome.zarr"), "is relative"),
        "symlink leading out": (lambda: alice.add_image(p, str(allowed / "escape.ome.zarr")), "outside the folders"),
        "model outside": (lambda: alice.load_model(str(outside / "model.zip")), "outside the folders"),
        "ftp scheme": (lambda: alice.add_image(p, "ftp://example.org/x.zarr"), "scheme 'ftp'"),
        "missing image": (lambda: alice.add_image(p, str(allowed / "absent.ome.zarr")), "absent.ome.zarr"),
        "not an image": (lambda: alice.add_image(p, str(inputs["model"])), "model.zip"),
        "wrong channels": (lambda: alice.add_image(p, str(inputs["small"]), channels=[3]),
                           r"channels \[3\] do not exist"),
        "unknown mask": (lambda: alice.add_image(p, str(inputs["small"]), mask="tissue"), "no label image 'tissue'"),
        # shapes and windows
        "oversized patch": (lambda: alice.score(p, patch_shape=[4096, 4096]), "exceed 4194304 pixels"),
        "3D patch of a 2D image": (lambda: alice.score(p, patch_shape=[8, 64, 64]), "has 3 dimensions"),
        "patch larger than the image": (lambda: alice.score(p, patch_shape=[1024, 1024]), "fit in the image"),
        "prediction outside the image": (lambda: alice.predict(p, image_id, [500, 500], PATCH, return_array=True),
                                         "lies outside image"),
        "prediction too big to return": (lambda: alice.predict(p, image_id, [0, 0], [4096, 4096], return_array=True),
                                         "transfer limit"),
        "skipping an annotated patch": (lambda: alice.skip_patch(p, annotated["id"]), "already annotated"),
        # a bad image never leaves a project, nor the model given by its source, behind
        "project with a missing image": (lambda: alice.create_project("bad", str(inputs["model"]),
                                                                      [{"uri": str(allowed / "absent.ome.zarr")}]),
                                         "absent.ome.zarr"),
        "project with an image outside": (lambda: alice.create_project("bad", str(inputs["model"]),
                                                                       [{"uri": str(inputs["small"])},
                                                                        {"uri": str(outside / "image.ome.zarr")}]),
                                          "outside the folders"),
    }
    failures = []
    for name, (call, pattern) in cases.items():
        try:
            answer = call()
        except BioadaptError as e:
            if not str(e) or not re.search(pattern, str(e)):
                failures.append(f"{name}: message {str(e)!r} does not match {pattern!r}")
            if isinstance(e, AccessDenied):
                failures.append(f"{name}: AccessDenied instead of BioadaptError: {e}")
        except Exception as e:  # noqa: BLE001 - collected and reported
            failures.append(f"{name}: {type(e).__name__} instead of BioadaptError: {e}")
        else:
            failures.append(f"{name}: no error, answered {answer!r:.200}")
    after = _state(alice, project, service.data_dir)
    for key in before:
        if before[key] != after[key]:
            failures.append(f"state changed: {key}: {_difference(before[key], after[key])}")
    assert not failures, "\n".join(failures)
    assert alice.get_patch(p, pending["id"])["status"] == "pending"  # the service still answers


def test_score_writes_no_patch_when_a_later_image_cannot_take_the_patch_shape(alice, project, inputs, service):
    """Two images, the second smaller than the patch: the call fails and the first image gets no patches."""
    created = alice.create_project("two images", project["model"]["id"],
                                   [{"uri": str(inputs["image"])}, {"uri": str(inputs["small"])}])
    try:
        with pytest.raises(BioadaptError, match="256"):
            alice.score(created["id"], n_patches=4, patch_shape=[256, 256])
        assert alice.get_project(created["id"])["patches"] == {"pending": 0, "annotated": 0, "skipped": 0}
        assert alice.list_patches(created["id"]) == []
    finally:
        alice.delete_project(created["id"])
    assert created["id"] not in [q["id"] for q in alice.list_projects()]
    assert not project_folder(service, created["id"]).exists()


# -- 4. restart ---------------------------------------------------------------------------------------------
def test_a_killed_service_restarts_with_everything_committed(hypha_server, ray_cluster, inputs, tmp_path):
    wait_until(ray_cpus_free, 30, "Ray idle before the restart test")
    lease_s = 2.0  # a killed service's jobs are failed once their lease lapses: short here, 30 s by default
    process = ServiceProcess(hypha_server, ray_cluster, "svc2", tmp_path / "data2", [inputs["allowed"]],
                             env={LEASE_VARIABLE: str(lease_s), RENEW_VARIABLE: "0.5"})
    workspace = "ws-user-svc2"
    carol = None
    try:
        info = process.start()
        assert info["workspace"] == workspace
        carol = client_for(hypha_server, "carol", workspace)
        model = carol.load_model(str(inputs["model"]))
        p = carol.create_project("restart", model["id"], [{"uri": str(inputs["image"])}])["id"]
        job = carol.wait(carol.score(p, n_patches=8, patch_shape=PATCH, mc_passes=2)["job_id"], progress=False,
                         timeout_s=120)
        assert job["state"] == "done", job
        scored = carol.list_patches(p, order="id")
        assert len(scored) == 8 and all(q["score"] is not None for q in scored)
        sent = {}
        for q in scored[:4]:
            sent[q["id"]] = _labels_for(inputs["truth"], q)
            carol.submit_labels(p, q["id"], sent[q["id"]])
        long_job = carol.fine_tune(p, epochs=1000)["job_id"]
        wait_until(lambda: carol.job_status(long_job)["state"] == "running", 30, "fine-tune running")
        for q in scored[4:6]:  # more labels while it trains, then the kill between two submissions
            sent[q["id"]] = _labels_for(inputs["truth"], q)
            carol.submit_labels(p, q["id"], sent[q["id"]])
        process.kill()
        assert process.process.returncode == -signal.SIGKILL
        # the killed driver's fine-tune actor goes with it
        wait_until(ray_cpus_free, 30, "Ray released the killed service's actor", poll_s=0.2)
        time.sleep(lease_s)  # the job's lease, renewed by the killed process only, has lapsed

        info = process.start()
        assert info["interrupted_jobs_marked_failed"] == 1
        # the same client object re-fetches the service on its next call
        status = carol.job_status(long_job)
        assert status["state"] == "failed" and status["error"] == INTERRUPTED, status
        after = carol.list_patches(p, order="id")
        assert [(q["id"], q["score"], q["origin"]) for q in after] == \
            [(q["id"], q["score"], q["origin"]) for q in scored]
        for q in after:
            if q["id"] in sent:
                got = carol.get_patch(p, q["id"])
                assert got["status"] == "annotated"
                np.testing.assert_array_equal(got["labels"], sent[q["id"]])
            else:
                assert q["status"] == "pending"
        assert carol.get_project(p)["versions"][-1]["number"] == 0  # no version from the interrupted job
        # a fresh connection works too, and the service keeps working: a new job runs to the end
        fresh = client_for(hypha_server, "carol", workspace)
        try:
            job = fresh.wait(fresh.fine_tune(p, epochs=1)["job_id"], progress=False, timeout_s=120)
            assert job["state"] == "done" and job["result"]["version"] == 2, job  # 1: the killed job's, failed
        finally:
            fresh.disconnect()
    finally:
        if carol is not None:
            carol.disconnect()
        code = process.stop()
    assert code in (0, -signal.SIGTERM), process.output()
    assert not (process.data_dir / "connection.json").exists()
    wait_until(ray_cpus_free, 30, "nothing left running on Ray")
    with pytest.raises(BioadaptError, match="no service"):  # the stopped service unregistered
        client_for(hypha_server, "carol", workspace)
