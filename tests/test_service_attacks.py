"""What an attacker and a clumsy user tried against a real `bioadapt serve` (its own process, joined to the session's
Hypha server and Ray), each written as the attack, through the Python client: reading another user's data through
the service's own data folder, telling other users' ids from missing ones, one user's slow calls blocking another's
quick ones, two score calls drawing the same windows, bad input accepted at the door, and the lifecycle (deleted
projects, cancel, restarts, SIGTERM).

The service's data folder lies inside the folder it may read (as in `bioadapt demo`), so being inside an allowed
folder is not enough to reach the data folder.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from model_factory import unet_package
from service_helpers import (ServiceProcess, client_for, only_file, project_folder, ray_cpus_free, ray_env,
                             wait_until)

from bioadapt.data.synthetic import write_synthetic_ome_zarr
from bioadapt.errors import AccessDenied, BioadaptError
from bioadapt.service.client import connect
from bioadapt.service.serve_process import ServeProcess

ray = pytest.importorskip("ray")

PATCH = [32, 32]
USER, WORKSPACE = "svc-attack", "ws-user-svc-attack"
REMOTE_TIMEOUT_S = 3
MAX_JOBS_PER_USER = 3
SECRET_LINE = "jwt-secret-line-7f3a9c"


# -- a remote store that never answers --------------------------------------------------------------------
class SilentServer:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers (a hanging http store)."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(256)
        self.port = self.socket.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self.accepted:
            connection.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One folder the service may read, with the service's data folder inside it, images good and bad, a model."""
    root = tmp_path_factory.mktemp("attack-files")
    write_synthetic_ome_zarr(root / "image.ome.zarr", (512, 512), "crowded", seed=0, chunks=(1, 128, 128))
    write_synthetic_ome_zarr(root / "broken.ome.zarr", (256, 256), "crowded", seed=3, chunks=(1, 128, 128))
    nan = zarr.create_array(str(root / "nan.zarr"), shape=(128, 128), chunks=(64, 64), dtype="float32",
                            fill_value=0)
    nan[:] = np.nan
    write_synthetic_ome_zarr(root / "corrupt.ome.zarr", (128, 128), "crowded", seed=4, chunks=(1, 64, 64))
    for chunk in _chunk_files(root / "corrupt.ome.zarr" / "0"):
        chunk.write_bytes(b"\x28\xb5\x2f\xfd not a zstd frame at all")
    (root / "notes.txt").write_text(f"token: {SECRET_LINE}: x\nsecond line\n")  # YAML errors quote line 1
    model = unet_package(root / "model.zip", features=4, weights=("pytorch_state_dict",))
    truth = np.asarray(zarr.open_group(str(root / "image.ome.zarr"), mode="r")["labels/ground_truth/0"][:])
    return {"root": root, "data": root / "data", "image": root / "image.ome.zarr", "model": model, "truth": truth,
            "broken": root / "broken.ome.zarr", "nan": root / "nan.zarr", "corrupt": root / "corrupt.ome.zarr",
            "notes": root / "notes.txt"}


def _chunk_files(array_folder: Path) -> list[Path]:
    return [p for p in array_folder.rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs")]


@pytest.fixture(scope="module")
def service(hypha_server, ray_cluster, inputs):
    process = ServiceProcess(hypha_server, ray_cluster, USER, inputs["data"], [inputs["root"]],
                             env={"BIOADAPT_REMOTE_TIMEOUT_S": str(REMOTE_TIMEOUT_S),
                                  "BIOADAPT_MAX_JOBS_PER_USER": str(MAX_JOBS_PER_USER)})
    process.start()
    (inputs["data"] / "hypha-server.log").write_text(f"INFO started\n{SECRET_LINE}\n")  # what a real one holds
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def alice(hypha_server, service):
    client = client_for(hypha_server, "alice", WORKSPACE)
    yield client
    client.disconnect()


@pytest.fixture(scope="module")
def bob(hypha_server, service):
    client = client_for(hypha_server, "bob", WORKSPACE)
    yield client
    client.disconnect()


@pytest.fixture(scope="module")
def victim(alice, inputs, service):
    """alice's project: scored, 6 patches corrected, fine-tuned once and exported: files of every kind in the
    data folder."""
    model = alice.load_model(str(inputs["model"]))
    project = alice.create_project("victim", model["id"], [{"uri": str(inputs["image"])}])
    p = project["id"]
    alice.wait(alice.score(p, n_patches=8, patch_shape=PATCH, mc_passes=2)["job_id"], progress=False, timeout_s=240)
    for patch in alice.list_patches(p, order="id", limit=6):
        alice.submit_labels(p, patch["id"], _truth(inputs["truth"], patch))
    tuned = alice.wait(alice.fine_tune(p, epochs=1)["job_id"], progress=False, timeout_s=240)
    exported = alice.wait(alice.export_model(p)["job_id"], progress=False, timeout_s=240)["result"]
    image = project["images"][0]["id"]
    folder = project_folder(service, p)
    assert exported["outputs"] == ["package"]
    return {"id": p, "model": model, "image": image, "folder": folder, "job": tuned["id"],
            "labels": folder / "images" / image / "labels.ome.zarr",
            "uncertainty": folder / "images" / image / "uncertainty.ome.zarr",
            "version": only_file(folder / "versions", "*.pt"), "export": only_file(folder / "exports", "*.zip")}


@pytest.fixture(scope="module")
def bobs_project(bob, inputs):
    model = bob.load_model(str(inputs["model"]))
    return bob.create_project("bob's", model["id"], [{"uri": str(inputs["image"])}])


def _idle(client, timeout_s: float = 240) -> None:
    """Wait until none of the client's jobs is queued or running (the next test's jobs count against its limit)."""
    wait_until(lambda: not [j for j in client.list_jobs() if j["state"] in ("queued", "running")], timeout_s,
               "the user's jobs ended", poll_s=0.5)


def _truth(truth: np.ndarray, patch: dict) -> np.ndarray:
    (y, x), (h, w) = patch["origin"], patch["shape"]
    return truth[y:y + h, x:x + w]


def _refused(call) -> BioadaptError:
    """The error a call raised; fails when it went through."""
    try:
        answer = call()
    except BioadaptError as e:
        return e
    pytest.fail(f"went through: {answer!r:.300}")


def _cases(cases: dict, data_dir: Path) -> list[str]:
    """Run refused calls: each must raise a BioadaptError whose message matches, names no server folder and shows
    no file contents."""
    failures = []
    for name, (call, pattern) in cases.items():
        try:
            answer = call()
        except BioadaptError as e:
            message = str(e)
            if isinstance(e, AccessDenied) or not re.search(pattern, message):
                failures.append(f"{name}: {type(e).__name__} {message!r:.400} does not match {pattern!r}")
            if str(data_dir) in message or SECRET_LINE in message or "Traceback" in message:
                failures.append(f"{name}: the message shows the data folder or a file's contents: {message!r:.400}")
        except Exception as e:  # noqa: BLE001 - collected and reported
            failures.append(f"{name}: {type(e).__name__} instead of BioadaptError: {str(e)[-400:]!r}")
        else:
            failures.append(f"{name}: went through, answered {answer!r:.200}")
    return failures


# -- 1. isolation ---------------------------------------------------------------------------------------------
def test_nothing_in_the_data_folder_can_be_opened_as_an_image_or_a_model(bob, victim, bobs_project, inputs):
    data, p = inputs["data"], bobs_project["id"]
    link = inputs["root"] / "into-data"
    link.symlink_to(data)
    corrections = victim["labels"] / "corrections" / "0"
    cases = {
        "alice's corrections": (lambda: bob.add_image(p, str(corrections), axes="yx"), "data folder"),
        "alice's corrections by file://": (lambda: bob.add_image(p, corrections.as_uri(), axes="yx"), "data folder"),
        "alice's corrections, doubled slashes": (lambda: bob.add_image(p, str(corrections).replace("/", "//"),
                                                                       axes="yx"), "data folder"),
        "alice's corrections through a symlink": (
            lambda: bob.add_image(p, str(link / corrections.relative_to(data)), axes="yx"), "data folder"),
        "alice's uncertainty": (lambda: bob.add_image(p, str(victim["uncertainty"]), axes="yx"), "data folder"),
        "alice's label group": (lambda: bob.add_image(p, str(victim["labels"])), "data folder"),
        "a project image": (lambda: bob.create_project("x", str(inputs["model"]), [{"uri": str(corrections),
                                                                                      "axes": "yx"}]),
                            "data folder"),
        "alice's export": (lambda: bob.load_model(str(victim["export"])), "data folder"),
        "alice's weights as Cellpose's": (lambda: bob.load_model(f"cellpose:{victim['version']}"), "data folder"),
        "the server log": (lambda: bob.load_model(str(data / "hypha-server.log")), "data folder"),
        "the database": (lambda: bob.load_model(str(data / "bioadapt.sqlite")), "data folder"),
        "the data folder itself": (lambda: bob.add_image(p, str(data)), "data folder"),
    }
    failures = _cases(cases, data)
    assert not failures, "\n".join(failures)
    assert [i["id"] for i in bob.get_project(p)["images"]] == [i["id"] for i in bobs_project["images"]]
    assert [m["source"] for m in bob.list_models()] == [str(inputs["model"])]


def test_a_file_that_is_no_model_is_refused_without_showing_its_contents(bob, inputs):
    error = _refused(lambda: bob.load_model(str(inputs["notes"])))
    assert SECRET_LINE not in str(error) and "notes.txt" in str(error), str(error)


def test_another_users_ids_answer_exactly_like_missing_ones(alice, bob, victim, bobs_project):
    """bob learns nothing from alice's ids: every function answers them as it answers ids that never existed."""
    p, job, image = victim["id"], victim["job"], victim["image"]
    patch = alice.list_patches(p, limit=1)[0]["id"]
    calls = {
        "get_project": lambda q, j: bob.get_project(q),
        "list_patches": lambda q, j: bob.list_patches(q),
        "get_patch": lambda q, j: bob.get_patch(q, patch),
        "submit_labels": lambda q, j: bob.submit_labels(q, patch, np.ones(PATCH, np.uint16)),
        "skip_patch": lambda q, j: bob.skip_patch(q, patch),
        "score": lambda q, j: bob.score(q, n_patches=1, patch_shape=PATCH, mc_passes=2),
        "fine_tune": lambda q, j: bob.fine_tune(q, epochs=1),
        "evaluate": lambda q, j: bob.evaluate(q),
        "predict": lambda q, j: bob.predict(q, image, [0, 0], PATCH, return_array=True),
        "export_model": lambda q, j: bob.export_model(q),
        "delete_project": lambda q, j: bob.delete_project(q),
        "add_image": lambda q, j: bob.add_image(q, str(bobs_project["images"][0]["uri"])),
        "list_jobs": lambda q, j: bob.list_jobs(q),
        "job_status": lambda q, j: bob.job_status(j),
        "cancel_job": lambda q, j: bob.cancel_job(j),
        "job_output": lambda q, j: bob.job_output(j, "package"),
        "select_patches": lambda q, j: bob.select_patches(q),
        "get_overview": lambda q, j: bob.get_overview(q, image),
    }
    before = alice.get_project(p)
    failures = []
    for name, call in calls.items():
        missing_project, missing_job = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
        theirs = _answer(lambda: call(p, job)).replace(p, "<id>").replace(job, "<id>")
        missing = _answer(lambda: call(missing_project, missing_job)).replace(missing_project, "<id>")
        missing = missing.replace(missing_job, "<id>")
        if theirs != missing or "BioadaptError" not in theirs:
            failures.append(f"{name}: alice's id -> {theirs!r}; a missing id -> {missing!r}")
    assert not failures, "\n".join(failures)
    assert alice.get_project(p) == before


def _answer(call) -> str:
    try:
        return f"answered {call()!r:.200}"
    except Exception as e:  # noqa: BLE001 - the answer is what is compared
        return f"{type(e).__name__}: {e}"


# -- 2. fairness ----------------------------------------------------------------------------------------------
def test_hanging_remote_images_neither_block_other_users_nor_hang(alice, bob, victim, service):
    """16 add_image calls on an http store that never answers: bob's quick calls stay quick, and each hanging
    call ends after the read timeout with that cause."""
    silent = SilentServer()
    url = f"http://127.0.0.1:{silent.port}/slide.ome.zarr"
    outcomes: list = []

    def hang() -> None:
        started = time.monotonic()
        try:
            outcomes.append(("answered", alice.add_image(victim["id"], url), time.monotonic() - started))
        except Exception as e:  # noqa: BLE001 - checked below
            outcomes.append((type(e).__name__, str(e), time.monotonic() - started))

    callers = [threading.Thread(target=hang, daemon=True) for _ in range(16)]
    latencies: list[float] = []
    try:
        for thread in callers:
            thread.start()
        time.sleep(1.0)  # every hanging call is in
        probe = threading.Thread(target=lambda: [latencies.append(_timed(bob.list_projects)) for _ in range(10)],
                                 daemon=True)
        probe.start()
        probe.join(30)
        assert len(latencies) == 10, f"bob's 10 list_projects took over 30 s ({len(latencies)} answered)"
        assert max(latencies) < 2.0, f"bob's list_projects latencies {latencies}"
        for thread in callers:
            thread.join(120)
    finally:
        silent.close()
    assert len(outcomes) == 16, outcomes
    for kind, message, seconds in outcomes:
        assert kind == "BioadaptError" and re.search(r"did not answer within \d+ s", message), (kind, message)
        assert str(service.data_dir) not in message
    assert alice.get_project(victim["id"])["images"] == [i for i in alice.get_project(victim["id"])["images"]]
    assert len(alice.get_project(victim["id"])["images"]) == 1


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def test_a_remote_store_on_a_closed_port_says_so(alice, victim):
    error = _refused(lambda: alice.add_image(victim["id"], f"http://127.0.0.1:{closed_port()}/x.ome.zarr"))
    assert re.search(r"refused|cannot connect|could not connect", str(error), re.IGNORECASE), str(error)


def test_a_model_url_on_a_closed_port_says_so(alice):
    error = _refused(lambda: alice.load_model(f"http://127.0.0.1:{closed_port()}/model.zip"))
    assert re.search(r"refused|cannot connect|could not connect", str(error), re.IGNORECASE), str(error)
    assert "id map" not in str(error), str(error)


def test_one_user_runs_a_limited_number_of_jobs(alice, victim, inputs):
    _idle(alice)
    project = alice.create_project("many jobs", victim["model"]["id"], [{"uri": str(inputs["image"])}])
    started = []
    try:  # long jobs (32 patches x 256 passes), so that they still run when the next call comes
        for _ in range(MAX_JOBS_PER_USER):
            started.append(alice.score(project["id"], n_patches=32, patch_shape=PATCH, mc_passes=256)["job_id"])
        error = _refused(lambda: alice.score(project["id"], n_patches=1, patch_shape=PATCH, mc_passes=2))
        assert re.search(rf"{MAX_JOBS_PER_USER} jobs", str(error)), str(error)
    finally:
        for job in started:
            alice.cancel_job(job)
        _idle(alice)
        alice.delete_project(project["id"])
    # the jobs ended, so new ones start again
    job = alice.score(victim["id"], n_patches=1, patch_shape=PATCH, mc_passes=2)["job_id"]
    assert alice.wait(job, progress=False, timeout_s=240)["state"] == "done"


# -- 3. races ---------------------------------------------------------------------------------------------------
def _overlap(a: dict, b: dict) -> bool:
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a["origin"], a["shape"], b["origin"],
                                                                         b["shape"]))


def test_two_score_calls_at_once_never_draw_the_same_window(alice, hypha_server, victim, inputs):
    """Two clients score one project at the same moment (same seed), three times: 40 distinct, non-overlapping
    windows each time; once all are corrected no held-out window overlaps a training one."""
    _idle(alice)
    second = client_for(hypha_server, "alice", WORKSPACE)
    try:
        for attempt in range(3):
            project = alice.create_project(f"race {attempt}", victim["model"]["id"], [{"uri": str(inputs["image"])}])
            p = project["id"]
            barrier = threading.Barrier(2)
            answers: list = []

            def score(client) -> None:
                barrier.wait()
                try:
                    answers.append(client.score(p, n_patches=20, patch_shape=PATCH, mc_passes=2, seed=0,
                                                acquisition="random"))
                except Exception as e:  # noqa: BLE001 - reported below
                    answers.append(e)

            threads = [threading.Thread(target=score, args=(c,)) for c in (alice, second)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert all(isinstance(a, dict) for a in answers), answers
            for answer in answers:
                alice.wait(answer["job_id"], progress=False, timeout_s=240)
            patches = alice.list_patches(p, order="id", limit=1000)
            assert len(patches) == 40
            overlapping = [(a["origin"], b["origin"]) for i, a in enumerate(patches) for b in patches[i + 1:]
                           if _overlap(a, b)]
            assert not overlapping, f"attempt {attempt}: {len(overlapping)} overlapping pairs: {overlapping[:5]}"
            for patch in patches:
                alice.submit_labels(p, patch["id"], _truth(inputs["truth"], patch))
            annotated = alice.list_patches(p, status="annotated", limit=1000)
            held = [q for q in annotated if q["split"] == "holdout"]
            trains = [q for q in annotated if q["split"] == "train"]
            assert len(held) == 10 and len(trains) == 30
            assert not [(h["id"], t["id"]) for h in held for t in trains if _overlap(h, t)]
            alice.delete_project(p)
    finally:
        second.disconnect()


# -- 4 and 5. validation at the door -------------------------------------------------------------------------
def test_bad_input_is_refused_at_the_door(alice, victim, inputs, service):
    p = victim["id"]
    pending = alice.list_patches(p, status="pending", limit=1)[0]["id"]
    jobs_before = [j["id"] for j in alice.list_jobs()]
    projects_before = [q["id"] for q in alice.list_projects()]
    model = victim["model"]["id"]
    cases = {
        # (4) unclear errors
        "labels of object dtype": (lambda: alice.submit_labels(p, pending, np.array([[1, "a"]] * 16, dtype=object)),
                                   "integer"),
        "a NUL byte in a URI": (lambda: alice.add_image(p, f"{inputs['image']}\x00.txt"), r"uri: .*control"),
        "patch id 2^64-1": (lambda: alice._call("get_patch", project_id=p, patch_id=2**64 - 1),
                            r"patch_id: Input should be less than"),
        "offset 2^64-1": (lambda: alice._call("list_patches", project_id=p, offset=2**64 - 1),
                          r"offset: Input should be less than"),
        # (5) accepted although broken
        "a corrupt Zarr": (lambda: alice.add_image(p, str(inputs["corrupt"])), r"corrupt\.ome\.zarr.*cannot be decoded"),
        "a NaN Zarr": (lambda: alice.add_image(p, str(inputs["nan"]), axes="yx"), "NaN"),
        "unknown fine-tune parameter": (lambda: alice.fine_tune(p, epochs=1, params={"bogus": 1}), r"params\.bogus"),
        "val_fraction 5": (lambda: alice.fine_tune(p, epochs=1, params={"val_fraction": 5}),
                           r"params\.val_fraction: Input should be less than 1"),
        "seed 'x'": (lambda: alice.fine_tune(p, epochs=1, params={"seed": "x"}), r"params\.seed: Input should be"),
        "epochs -5 in params": (lambda: alice.fine_tune(p, epochs=1, params={"epochs": -5}), r"params\.epochs"),
        "n_patches=True": (lambda: alice._call("score", project_id=p, n_patches=True), r"n_patches: Input should be"),
        "return_array=1": (lambda: alice._call("predict", project_id=p, image_id=victim["image"], origin=[0, 0],
                                               shape=PATCH, return_array=1), r"return_array: Input should be"),
        "a name with NUL": (lambda: alice.create_project("a\x00b", model), r"name: .*printable"),
        "a right-to-left override": (lambda: alice.create_project("gpj.\u202eexe", model), r"name: .*printable"),
        "a blank name": (lambda: alice.create_project("   ", model), r"name: .*blank"),
        "an export name with a newline": (lambda: alice.export_model(p, name="a\nb"), r"name: .*printable"),
    }
    failures = _cases(cases, service.data_dir)
    assert not failures, "\n".join(failures)
    assert [j["id"] for j in alice.list_jobs()] == jobs_before, "a refused call started a job"
    assert [q["id"] for q in alice.list_projects()] == projects_before
    assert len(alice.get_project(p)["images"]) == 1


def test_a_chunk_corrupted_after_scoring_gives_a_clear_error(alice, victim, inputs, service):
    _idle(alice)
    project = alice.create_project("corrupted later", victim["model"]["id"], [{"uri": str(inputs["broken"])}])
    p = project["id"]
    try:
        alice.wait(alice.score(p, n_patches=2, patch_shape=PATCH, mc_passes=2)["job_id"], progress=False,
                   timeout_s=240)
        for chunk in _chunk_files(inputs["broken"] / "0"):
            chunk.write_bytes(b"\x28\xb5\x2f\xfd garbage")
        patch = alice.list_patches(p, limit=1)[0]
        error = _refused(lambda: alice.get_patch(p, patch["id"]))
        assert re.search(r"broken\.ome\.zarr.*cannot be decoded", str(error)), str(error)
        assert str(service.data_dir) not in str(error)
    finally:
        alice.delete_project(p)


# -- 6. lifecycle -----------------------------------------------------------------------------------------------
def test_deleting_a_project_removes_its_jobs(alice, victim, inputs, service):
    _idle(alice)
    project = alice.create_project("short-lived", victim["model"]["id"], [{"uri": str(inputs["image"])}])
    job = alice.score(project["id"], n_patches=16, patch_shape=PATCH, mc_passes=64)["job_id"]
    alice.delete_project(project["id"])
    # the cancelled job's last report comes when it ends, after the delete: it must not bring the job back
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert job not in [j["id"] for j in alice.list_jobs()], "the deleted project's job is listed again"
        time.sleep(0.5)
    wait_until(ray_cpus_free, 120, "the job's actors are gone")
    assert job not in [j["id"] for j in alice.list_jobs()], "the deleted project's job is listed again"
    assert "no job" in str(_refused(lambda: alice.job_status(job)))
    assert not project_folder(service, project["id"]).exists()


def test_cancel_answers_the_truth(alice, victim):
    _idle(alice)
    job = alice.score(victim["id"], n_patches=1, patch_shape=PATCH, mc_passes=2)["job_id"]
    assert alice.wait(job, progress=False, timeout_s=240)["state"] == "done"
    answer = alice.cancel_job(job)
    assert answer == {"job_id": job, "state": "done", "cancel_requested": False}


def _embedded(data_dir: Path, port: int, ray_cluster, allow: Path | None = None) -> ServeProcess:
    """`bioadapt serve` with its own Hypha server on ``port``, joined to the session's Ray."""
    args = ["--port", str(port), "--ray-address", ray_cluster["address"]]
    return ServeProcess(data_dir, args + (["--allow-path", str(allow)] if allow else []),
                        env={**ray_env(), "BIOADAPT_REMOTE_TIMEOUT_S": "60"})


def test_a_client_survives_a_restart_of_the_embedded_server(ray_cluster, tmp_path):
    """Both ways back: the websocket gone for good, or reconnected by hypha-rpc itself to the new server, where the
    old service handle's calls get no answer at all; either way the client opens a new connection."""
    port = closed_port()
    process = _embedded(tmp_path / "data", port, ray_cluster)
    client = None
    try:
        info = process.start()
        # a short method timeout: a call through a stale handle fails in seconds instead of 5 minutes
        client = connect(info["server_url"], token=info["token"], workspace=info["workspace"], method_timeout=20)
        assert client.list_projects() == []
        for _ in range(2):
            reconnected = threading.Event()
            client.server.on("connected", lambda _info, event=reconnected: event.set())
            assert process.stop() == 0
            process.start()  # the same port and data folder: the printed token stays valid
            reconnected.wait(30)  # hypha-rpc's own reconnection, when it comes before the call
            assert client.list_projects() == []
    finally:
        if client is not None:
            client.disconnect()
        process.stop()


def test_sigterm_stops_the_service_cleanly(ray_cluster, inputs, tmp_path):
    """SIGTERM right after it serves, with calls in flight (one hanging on a silent store), and with a scoring job
    running: exit status 0 every time, no abort, connection file gone."""
    port, silent = closed_port(), SilentServer()
    try:
        for moment in ("idle", "calls", "job"):
            process = _embedded(tmp_path / f"data-{moment}", port, ray_cluster, allow=inputs["root"])
            info = process.start()
            client = None
            if moment != "idle":
                client = connect(info["server_url"], token=info["token"], workspace=info["workspace"])
                model = client.load_model(str(inputs["model"]))["id"]
                project = client.create_project("stop", model, [{"uri": str(inputs["image"])}])["id"]
                if moment == "calls":
                    for call in (lambda: client.add_image(project, f"http://127.0.0.1:{silent.port}/x.ome.zarr"),
                                 client.list_models):
                        threading.Thread(target=lambda c=call: _answer(c), daemon=True).start()
                    time.sleep(1)
                else:
                    job = client.score(project, n_patches=16, patch_shape=PATCH, mc_passes=64)["job_id"]
                    wait_until(lambda: client.job_status(job)["state"] == "running", 60, "the job runs")
            code = process.stop(timeout_s=60)
            output = process.output()
            if client is not None:
                client.disconnect()
            assert code == 0, f"{moment}: exit status {code}; output ends with:\n{output[-3000:]}"
            assert not re.search(r"Fatal Python error|Aborted|core dumped|Traceback", output), output[-3000:]
            assert not (process.data_dir / "connection.json").exists()
            process.log_path.unlink()
    finally:
        silent.close()
