"""The embedded Hypha server, and the auth facts the bioadapt service relies on (measured, no mocks)."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import numpy as np
import pytest
from hypha_rpc import connect_to_server
from hypha_rpc.sync import connect_to_server as connect_sync

from bioadapt.errors import BioadaptError
from bioadapt.service.hypha_server import mint_token, start_hypha_server


def _context_probe(context=None) -> dict:
    user = context["user"]
    return {"id": user["id"], "is_anonymous": user["is_anonymous"], "email": user.get("email"),
            "roles": user["roles"], "parent": user.get("parent"), "ws": context["ws"]}


async def _connect(server, user: str | None = None, *, workspace: str | None = None, **token_args):
    config = {"server_url": server.url}
    if user is not None:
        config["token"] = mint_token(user, jwt_secret=server.jwt_secret, **token_args)
    if workspace is not None:
        config["workspace"] = workspace
    return await connect_to_server(config)


async def _register_probe(server, owner: str, visibility: str, **config):
    svc = await _connect(server, owner)
    info = await svc.register_service({"id": "probe", "probe": _context_probe,
                                       "config": {"visibility": visibility, "require_context": True, **config}})
    return svc, info


def test_server_starts_on_loopback_and_client_connects(hypha_server):
    assert hypha_server.url == f"http://127.0.0.1:{hypha_server.port}"
    assert hypha_server.process.poll() is None
    with urllib.request.urlopen(f"{hypha_server.url}/health/readiness", timeout=5) as response:
        assert response.status == 200
    client = connect_sync({"server_url": hypha_server.url})
    try:
        assert client.config.workspace.startswith("ws-user-anonymouz-")
    finally:
        client.disconnect()


def test_protected_service_is_called_by_users_connected_into_its_workspace(hypha_server):
    async def check():
        svc, info = await _register_probe(hypha_server, "svc", "protected")
        ws = svc.config.workspace
        assert ws == "ws-user-svc"
        assert info["id"] == f"ws-user-svc/{svc.config.client_id}:probe"
        clients = [svc]
        try:
            # "rw" and "r" grants both let the user connect INTO ws-user-svc and call the protected service;
            # the context names the caller, not the service owner.
            for user, mode in [("alice", "rw"), ("bob", "r")]:
                client = await _connect(hypha_server, user, workspace=ws, workspaces={ws: mode},
                                        email=f"{user}@example.org", roles=["lab"])
                clients.append(client)
                assert client.config.workspace == ws
                for service_id in (f"{ws}/probe", "probe"):
                    seen = await (await client.get_service(service_id)).probe()
                    assert seen == {"id": user, "is_anonymous": False, "email": f"{user}@example.org",
                                    "roles": ["lab"], "parent": None, "ws": ws}

            # With the grant but connected to her own workspace, alice finds the service but cannot call it.
            alice_home = await _connect(hypha_server, "alice", workspaces={ws: "rw"})
            clients.append(alice_home)
            assert alice_home.config.workspace == "ws-user-alice"
            service = await alice_home.get_service(f"{ws}/probe")
            with pytest.raises(Exception, match="workspace mismatch: ws-user-svc != ws-user-alice"):
                await service.probe()

            # Without a grant (dave) or without a token: no entry into ws-user-svc, no protected service.
            for user in ("dave", None):
                with pytest.raises(Exception, match="Permission denied for workspace: ws-user-svc"):
                    await _connect(hypha_server, user, workspace=ws)
                outsider = await _connect(hypha_server, user)
                clients.append(outsider)
                with pytest.raises(Exception, match="Permission denied|not found"):
                    await outsider.get_service(f"{ws}/probe")
        finally:
            for client in clients:
                await client.disconnect()

    asyncio.run(check())


def test_public_service_is_called_anonymously(hypha_server):
    async def check():
        svc, info = await _register_probe(hypha_server, "svc-public", "public")
        anonymous = await _connect(hypha_server)
        alice = await _connect(hypha_server, "alice")
        try:
            seen = await (await anonymous.get_service(info["id"])).probe()
            assert seen["is_anonymous"] is True
            assert seen["id"].startswith("anonymouz-")
            assert seen["roles"] == ["anonymous"]
            assert seen["ws"] == anonymous.config.workspace == f"ws-user-{seen['id']}"
            # A signed-in caller of a public service keeps her own workspace in the context.
            seen = await (await alice.get_service("ws-user-svc-public/probe")).probe()
            assert seen["id"] == "alice" and seen["ws"] == "ws-user-alice"
        finally:
            for client in (anonymous, alice, svc):
                await client.disconnect()

    asyncio.run(check())


def test_generated_token_is_an_anonymous_child_of_the_service_user(hypha_server):
    async def check():
        svc, _ = await _register_probe(hypha_server, "svc-token", "protected")
        token = await svc.generate_token()
        third = await connect_to_server({"server_url": hypha_server.url, "token": token})
        try:
            assert third.config.workspace == "ws-user-svc-token"
            seen = await (await third.get_service("probe")).probe()
            assert seen["id"] not in ("svc-token", "") and seen["parent"] == "svc-token"
            assert seen["is_anonymous"] is False and seen["ws"] == "ws-user-svc-token"
        finally:
            await third.disconnect()
            await svc.disconnect()

    asyncio.run(check())


def test_authorized_workspaces_admits_callers_from_their_own_workspace(hypha_server):
    async def check():
        svc, info = await _register_probe(hypha_server, "svc-authz", "protected",
                                          authorized_workspaces=["ws-user-erin"])
        erin = await _connect(hypha_server, "erin")
        frank = await _connect(hypha_server, "frank")
        try:
            seen = await (await erin.get_service(info["id"])).probe()
            assert seen["id"] == "erin" and seen["ws"] == "ws-user-erin"
            with pytest.raises(Exception, match="Permission denied"):
                await frank.get_service(info["id"])
        finally:
            for client in (erin, frank, svc):
                await client.disconnect()

    asyncio.run(check())


def test_rw_grant_lets_callers_register_clashing_services(hypha_server):
    """Trap: an "rw" guest can register a same-named service, making the short id ambiguous; "r" cannot."""
    async def check():
        svc, info = await _register_probe(hypha_server, "svc-clash", "protected")
        ws = "ws-user-svc-clash"
        alice = await _connect(hypha_server, "alice", workspace=ws, workspaces={ws: "rw"})
        bob = await _connect(hypha_server, "bob", workspace=ws, workspaces={ws: "r"})
        try:
            with pytest.raises(Exception, match="Permission denied for workspace"):
                await bob.register_service({"id": "probe", "probe": lambda: "bob"})
            await alice.register_service({"id": "probe", "probe": lambda: "alice"})
            with pytest.raises(Exception, match="Multiple services found"):
                await bob.get_service(f"{ws}/probe")
            seen = await (await bob.get_service(info["id"])).probe()  # the full id stays unambiguous
            assert seen["id"] == "bob"
        finally:
            for client in (alice, bob, svc):
                await client.disconnect()

    asyncio.run(check())


def test_array_round_trip_fast_transfer(hypha_server):
    async def check():
        svc = await _connect(hypha_server, "svc-echo")

        async def echo(array):
            return array

        await svc.register_service({"id": "echo", "echo": echo})
        caller = await _connect(hypha_server, "alice", workspace="ws-user-svc-echo",
                                workspaces={"ws-user-svc-echo": "rw"})
        try:
            echo_service = await caller.get_service("echo")
            array = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
            start = time.perf_counter()
            back = await echo_service.echo(array)
            seconds = time.perf_counter() - start
            print(f"1024x1024 float32 round trip: {seconds:.3f} s, {2 * array.nbytes / 1e6 / seconds:.0f} MB/s")
            assert back.dtype == np.float32 and np.array_equal(back, array)
        finally:
            await caller.disconnect()
            await svc.disconnect()

    asyncio.run(check())


def test_mint_token_inside_a_running_event_loop(hypha_server):
    async def check():
        token = mint_token("gina", jwt_secret=hypha_server.jwt_secret)
        client = await connect_to_server({"server_url": hypha_server.url, "token": token})
        try:
            assert client.config.workspace == "ws-user-gina"
        finally:
            await client.disconnect()

    asyncio.run(check())


def test_start_failure_raises_with_the_log_tail(tmp_path):
    with pytest.raises(BioadaptError, match="did not start(.|\n)*unrecognized arguments: --no-such-option"):
        start_hypha_server(extra_args=["--no-such-option"], log_file=tmp_path / "hypha.log", timeout_s=30)


def test_the_event_database_is_the_servers_own_and_goes_with_it(tmp_path):
    """hypha keeps event logs in a temporary SQLite file it never deletes when stopped by a signal; the embedded
    server gets one of ours instead, deleted on stop."""
    import sqlite3
    from contextlib import closing

    server = start_hypha_server(log_file=tmp_path / "hypha.log")
    try:
        database = server._own_database
        assert database is not None and database.exists()
        with closing(sqlite3.connect(database)) as connection:
            tables = {row[0] for row in connection.execute("select name from sqlite_master")}
        assert "event_logs" in tables, tables
    finally:
        server.stop()
    assert not database.exists()
    assert "temporary file-based SQLite" not in (tmp_path / "hypha.log").read_text()
