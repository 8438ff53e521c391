"""Two replicas of the service (two `bioadapt serve` processes, one data folder) on one real PostgreSQL database,
joined to the session's Hypha server and Ray, each called through its own client: a replica starting next to a
live one leaves that one's jobs running, and a replica killed with SIGKILL leaves jobs that end failed, with that
cause, once their lease lapses. Leases are short here (``BIOADAPT_JOB_LEASE_S``); 30 s by default."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zarr
from model_factory import unet_package
from postgres_helpers import postgres_server  # noqa: F401  (a fixture)
from service_helpers import ServiceProcess, client_for, ray_cpus_free, wait_until

from bioadapt.data.synthetic import write_synthetic_ome_zarr
from bioadapt.errors import BioadaptError
from bioadapt.service.jobs import INTERRUPTED, LEASE_VARIABLE, RENEW_VARIABLE

ray = pytest.importorskip("ray")

USER = "replicas"
WORKSPACE = f"ws-user-{USER}"
LEASE_S = 4.0
PATCH = [64, 64]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("replica-files")
    allowed = root / "inputs"
    allowed.mkdir()
    write_synthetic_ome_zarr(allowed / "image.ome.zarr", (256, 256), "crowded", seed=0)
    model = unet_package(allowed / "model.zip", features=4, weights=("pytorch_state_dict",))
    truth = np.asarray(zarr.open_group(str(allowed / "image.ome.zarr"), mode="r")["labels/ground_truth/0"][:])
    return {"root": root, "allowed": allowed, "image": allowed / "image.ome.zarr", "model": model, "truth": truth}


class Replica:
    """One `bioadapt serve` process on the shared database and data folder, and alice's client bound to it."""

    def __init__(self, name: str, hypha_server, ray_cluster, inputs: dict, database_url: str):
        self.hypha_server = hypha_server
        self.process = ServiceProcess(hypha_server, ray_cluster, USER, inputs["root"] / "data", [inputs["allowed"]],
                                      env={LEASE_VARIABLE: str(LEASE_S), RENEW_VARIABLE: "0.5"},
                                      database_url=database_url, log_path=inputs["root"] / f"replica-{name}.log")
        self.info: dict = {}
        self.alice = None

    def start(self) -> "Replica":
        self.info = self.process.start()
        self.alice = client_for(self.hypha_server, "alice", WORKSPACE, self.info["full_service_id"])
        return self

    def stop(self) -> None:
        if self.alice is not None:
            self.alice.disconnect()
        self.process.stop()


@pytest.fixture(scope="module")
def database(postgres_server):  # noqa: F811
    return postgres_server()


@pytest.fixture(scope="module")
def replica_a(hypha_server, ray_cluster, inputs, database):
    wait_until(ray_cpus_free, 60, "Ray idle before the replica tests")
    replica = Replica("a", hypha_server, ray_cluster, inputs, database).start()
    yield replica
    replica.stop()


@pytest.fixture(scope="module")
def replica_b(hypha_server, ray_cluster, inputs, database, replica_a):
    """Started when a test first asks for it (the first test starts it while replica A runs a job)."""
    replica = Replica("b", hypha_server, ray_cluster, inputs, database).start()
    yield replica
    replica.stop()


@pytest.fixture(scope="module")
def project(replica_a, inputs):
    """alice's project, made through replica A: 8 patches scored, 4 labelled."""
    alice = replica_a.alice
    model = alice.load_model(str(inputs["model"]))
    project_id = alice.create_project("replicas", model["id"], [{"uri": str(inputs["image"])}])["id"]
    alice.wait(alice.score(project_id, n_patches=8, patch_shape=PATCH, mc_passes=2), progress=False, timeout_s=120)
    for patch in alice.list_patches(project_id, limit=4):
        (y, x), (h, w) = patch["origin"], patch["shape"]
        alice.submit_labels(project_id, patch["id"], inputs["truth"][y:y + h, x:x + w].astype(np.uint32))
    return project_id


def _running_fine_tune(alice, project_id: str) -> tuple[str, int]:
    """A fine-tune that runs until cancelled, once it trains: (job id, the version number it reserved)."""
    job_id = alice.fine_tune(project_id, epochs=10_000)["job_id"]
    status = wait_until(lambda: (got := alice.job_status(job_id))["progress"].get("epoch") and got, 90,
                        "fine-tune training")
    return job_id, status["progress"]["version"]


def test_a_replica_starting_leaves_the_jobs_of_a_live_one_running(request, replica_a, project):
    job_id, _ = _running_fine_tune(replica_a.alice, project)
    replica_b = request.getfixturevalue("replica_b")  # starts now, on the database where that job runs
    assert replica_b.info["interrupted_jobs_marked_failed"] == 0
    ended: list[dict] = []
    waiting = threading.Thread(target=lambda: ended.append(replica_b.alice.wait(job_id, progress=False,
                                                                                timeout_s=120,
                                                                                raise_on_failure=False)))
    waiting.start()  # replica B's client follows replica A's job
    time.sleep(3 * LEASE_S)  # three leases: only A's renewals keep the job
    status = replica_b.alice.job_status(job_id)
    assert status["state"] == "running" and status["replica"] is not None, status
    assert waiting.is_alive() and not ended
    assert replica_a.alice.cancel_job(job_id)["cancel_requested"]  # only the replica running it can
    waiting.join(60)
    assert ended and ended[0]["state"] == "cancelled", ended  # its real end, seen from the other replica


def test_a_killed_replicas_job_ends_failed_with_its_cause_after_the_lease(replica_a, replica_b, project):
    job_id, number = _running_fine_tune(replica_a.alice, project)
    assert replica_b.alice.job_status(job_id)["state"] == "running"
    replica_a.process.kill()  # SIGKILL: no clean stop, nothing written on the way out
    killed = time.monotonic()
    ended = replica_b.alice.wait(job_id, progress=False, timeout_s=10 * LEASE_S + 60, raise_on_failure=False)
    took_s = time.monotonic() - killed
    assert ended["state"] == "failed" and ended["error"] == INTERRUPTED, ended
    assert took_s < LEASE_S + 20, f"failed {took_s:.1f} s after the kill, the lease is {LEASE_S} s"
    # the version it reserved is never usable; replica B works on
    assert number not in [v["number"] for v in replica_b.alice.get_project(project)["versions"]]
    with pytest.raises(BioadaptError, match=f"no model version {number} .*did not finish"):
        replica_b.alice.evaluate(project, versions=[number])
    wait_until(ray_cpus_free, 60, "Ray released the killed replica's actor", poll_s=0.5)
    tuned = replica_b.alice.wait(replica_b.alice.fine_tune(project, epochs=1), progress=False, timeout_s=120)
    assert tuned["state"] == "done" and tuned["result"]["version"] > number
