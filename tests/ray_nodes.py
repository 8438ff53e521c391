"""A real multi-node Ray cluster on one machine, on loopback only, for tests: `ray start --head` and `ray start
--address=...` nodes, each with a custom resource naming it, all sharing one token (Ray 2.60's token auth), each
node's processes tracked from the `ray start --block` process the test started, and only those stopped.

Two Ray behaviours shape this:

- On Linux Ray swaps 127.0.0.1 for the machine's address (and listens there) unless
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; the head runs with it. But with that variable at 0 `ray start --address`
  refuses to start a second node ("Multi-node Ray clusters are not supported on Windows and OSX"). A second node
  therefore runs Ray's own CLI (`ray.scripts.scripts.main`) with that one swap (`resolve_ip_for_localhost`) turned
  off, so it too keeps --node-ip-address=127.0.0.1 and listens on loopback (the test checks every listener).
- `ray stop` stops every Ray on the machine; here each node is stopped by the process ids it started.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bioadapt.service.worker_files import remove_orphans

RAY = str(Path(sys.executable).with_name("ray"))
# Ray's CLI, except that 127.0.0.1 stays 127.0.0.1 (see the module's docstring)
LOOPBACK_RAY_CLI = ("import sys; from ray._private import services; from ray.scripts import scripts; "
                    "services.resolve_ip_for_localhost = lambda host: host; sys.argv[0] = 'ray'; scripts.main()")
START_TIMEOUT_S = 120
# a driver's view of the cluster: each node's id, liveness and custom resources, and every actor Ray has recorded
# (alive or dead) with the node it ran on. Ray's public state API (ray.util.state) needs the dashboard, which
# `pip install ray` without [default] does not bring, so this reads the GCS's tables (Ray 2.60, pinned).
_SNAPSHOT = """
import json, sys, ray, ray._private.state as state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
actors = [{"id": a["ActorID"], "class": a["ActorClassName"], "state": a["State"], "node": a["Address"]["NodeID"],
           "pid": a["Pid"], "restarts": a["NumRestarts"]} for a in state.actors().values()]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayNode:
    """One `ray start --block` process and everything it spawned."""

    def __init__(self, label: str, command: list[str], env: dict[str, str], log: Path):
        self.label = label
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        self._seen: dict[int, psutil.Process] = {}

    def processes(self) -> list[psutil.Process]:
        """The node's processes now (the `ray start` process and its descendants), remembered for ``stop``: a
        worker whose raylet died is re-parented, so it is only found here if it was seen before."""
        try:
            root = psutil.Process(self.process.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            found = []
        for process in found:
            self._seen.setdefault(process.pid, process)
        return [p for p in self._seen.values() if _running(p)]

    def raylet(self) -> psutil.Process:
        raylets = [p for p in self.processes() if p.name() == "raylet"]
        assert len(raylets) == 1, f"node {self.label}: raylets {raylets}"
        return raylets[0]

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM to `ray start --block` (it stops its processes), then SIGKILL to whatever of ours is left."""
        left = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while [p for p in left if _running(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        for process in left:
            if _running(process):
                process.kill()  # psutil checks it is still the process we saw, not a reused pid
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


class NodeExited(AssertionError):
    """`ray start` exited while its node was expected up."""


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LoopbackCluster:
    """A head and more nodes on 127.0.0.1, one CPU each by default, each with the custom resource
    ``{"node_<label>": 1}``. ``env`` is what a process joining it needs (the token, loopback)."""

    def __init__(self, root: Path, head_env: dict[str, str] | None = None):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.head_env = head_env or {}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, RayNode] = {}
        self._labels: dict[str, str | None] = {}  # node id -> label

    def _common(self, label: str, cpus: int) -> list[str]:
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        return ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
                f"--resources={json.dumps({f'node_{label}': 1})}", "--object-store-memory=150000000",
                "--disable-usage-stats", f"--temp-dir={self.root}", *[f"{flag}={free_port()}" for flag in ports]]

    def start_head(self, label: str = "head", cpus: int = 1) -> RayNode:
        """The head node, once it is up; the address it listens at is ``self.address``."""
        command = [RAY, "start", "--head", f"--port={self.port}", "--include-dashboard=false",
                   *self._common(label, cpus)]
        return self._start(label, command, {**self.env, **self.head_env})

    def add_node(self, label: str, cpus: int = 1) -> RayNode:
        """Another node joined to the head, once the head counts it alive."""
        command = [sys.executable, "-c", LOOPBACK_RAY_CLI, "start", f"--address={self.address}",
                   *self._common(label, cpus)]
        env = {k: v for k, v in self.env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        return self._start(label, command, env)

    def _start(self, label: str, command: list[str], env: dict[str, str], attempts: int = 2) -> RayNode:
        """Start a node and wait until it is alive. `ray start` gives a raylet 30 s to register (a constant in
        Ray's node.py) and exits when it is late, which happens on a busy 2-core machine: then it is tried again."""
        for attempt in range(1, attempts + 1):
            node = RayNode(label, command, env, self.root / f"{label}-{attempt}.log")
            self.nodes[label] = node
            try:
                self.wait_for(lambda s: any(n["alive"] and n["label"] == label for n in s["nodes"]), node=node)
                return node
            except NodeExited:
                node.stop()
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def wait_for(self, condition: Callable[[dict], bool], timeout_s: float = START_TIMEOUT_S,
                 node: RayNode | None = None) -> dict:
        """The first snapshot for which ``condition(snapshot)`` holds (NodeExited when ``node``'s `ray start`
        exits meanwhile)."""
        deadline = time.monotonic() + timeout_s
        snapshot = None
        while True:
            if node is not None and node.process.poll() is not None:
                raise NodeExited(f"`ray start` for node {node.label} exited with {node.process.returncode}:\n"
                                 f"{node.log.read_text(errors='replace')[-3000:]}")
            try:
                snapshot = self.snapshot(timeout_s=max(10.0, deadline - time.monotonic()))
                if condition(snapshot):
                    return snapshot
            except subprocess.SubprocessError:  # the head is not up yet
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout_s} s; the cluster now: {snapshot and snapshot['nodes']}; "
                                     f"logs in {self.root}")
            time.sleep(0.5)

    def snapshot(self, timeout_s: float = 60) -> dict:
        """Nodes (with ``label``: the node_<label> resource they carry) and actors, as Ray's GCS records them."""
        answer = subprocess.run([sys.executable, "-c", _SNAPSHOT, self.address], env=self.env, capture_output=True,
                                text=True, timeout=timeout_s, check=True)
        # Ray prints warnings to stdout too ("raylet has lagging heartbeats ..." on a busy machine): the snapshot is
        # the last line that is a JSON object
        snapshot = json.loads(next(line for line in reversed(answer.stdout.splitlines()) if line.startswith("{")))
        for node in snapshot["nodes"]:  # a dead node lists no resources: its label is the one seen before
            label = next((k.removeprefix("node_") for k in node["resources"] if k.startswith("node_")), None)
            self._labels.setdefault(node["id"], label)
        for item in snapshot["nodes"] + snapshot["actors"]:
            item["label"] = self._labels.get(item["id"] if "alive" in item else item["node"])
        return snapshot

    def listeners(self, extra_pids: tuple[int, ...] = ()) -> list[tuple[str, str, int]]:
        """(process name, address, port) of every socket listening in the cluster's processes (and ``extra_pids``)."""
        found = []
        processes = [p for node in self.nodes.values() for p in node.processes()]
        processes += [psutil.Process(pid) for pid in extra_pids]
        for process in processes:
            try:
                for connection in process.net_connections(kind="inet"):
                    if connection.status == psutil.CONN_LISTEN:
                        found.append((process.name(), connection.laddr.ip, connection.laddr.port))
            except psutil.NoSuchProcess:
                continue
        return found

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            node.stop()
        remove_orphans(wait_s=10)  # the temporary folders of the model actors that ran on these nodes
