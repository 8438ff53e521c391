"""A real PostgreSQL server for a test module (Debian's ``postgresql`` package: initdb into a temporary folder,
``postgres`` on 127.0.0.1 and a free port, run as the ``postgres`` user when the tests run as root). Modules use
the ``postgres_server`` fixture by importing it; it skips, with the reason, when the binaries or the psycopg
driver are missing."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

PG_USER = "bioadapt"
PG_START_TIMEOUT_S = 30


def postgres_bin_dir() -> Path | None:
    """The folder of ``postgres`` and ``initdb``: on PATH, else Debian's newest /usr/lib/postgresql/<ver>/bin."""
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres") if (p.parent / "initdb").exists()]
    found.sort(key=lambda bin_dir: int(bin_dir.parent.name) if bin_dir.parent.name.isdigit() else 0)
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_as() -> dict:
    """Popen keywords that drop root: PostgreSQL refuses to run as root ('root execution ... not permitted')."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    pytest.skip("running as root and there is neither a 'postgres' nor a 'nobody' user to run PostgreSQL as")


def _die_with_parent() -> list[str]:
    """A command prefix that makes the server get SIGINT (fast shutdown) when pytest dies, even by SIGKILL: util-linux's
    setpriv sets the parent-death signal after Popen dropped root (a change of user would clear it), then execs."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "INT", "--"] if setpriv else []


def _stop_postgres(process: subprocess.Popen) -> None:
    """By pid: SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait for every client to disconnect)."""
    for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGQUIT, 10), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        os.kill(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def postgres_server():
    """A PostgreSQL server on 127.0.0.1 for the module using it; yields a function making a fresh database's URL."""
    psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg 3 is not installed "
                                  "(pip install -c constraints.txt 'psycopg[binary]')")
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (postgres, initdb) not found on PATH or under "
                    "/usr/lib/postgresql/*/bin: apt-get install postgresql")
    run_as = _run_as()
    # not pytest's tmp_path: that folder is private to the test user, and the server may run as another one
    root = Path(tempfile.mkdtemp(prefix="bioadapt-pg-"))
    if run_as:
        os.chown(root, run_as["user"], run_as["group"])
    process = None
    log = root / "postgres.log"
    try:
        initdb = subprocess.run([str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", PG_USER, "--auth=trust",
                                 "-E", "UTF8", "--no-sync"], cwd=root, capture_output=True, text=True, check=False,
                                **run_as)
        if initdb.returncode != 0:
            pytest.fail(f"initdb failed ({initdb.returncode}):\n{initdb.stdout}\n{initdb.stderr}")
        port = _free_port()
        with open(log, "wb") as log_handle:
            process = subprocess.Popen(
                [*_die_with_parent(), str(bin_dir / "postgres"), "-D", str(root / "data"), "-k", str(root),
                 "-h", "127.0.0.1", "-p", str(port), "-c", "fsync=off", "-c", "max_connections=100"],
                cwd=root, stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **run_as)
        admin = None
        deadline = time.monotonic() + PG_START_TIMEOUT_S
        while admin is None:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"postgres did not start: {log.read_text(errors='replace')[-3000:]}")
            try:
                admin = psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres", autocommit=True)
            except psycopg.OperationalError:
                time.sleep(0.1)

        def new_database() -> str:
            name = f"bioadapt_{uuid.uuid4().hex[:10]}"
            admin.execute(f'CREATE DATABASE "{name}"')
            return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{port}/{name}"

        try:
            yield new_database
        finally:
            admin.close()
    finally:
        if process is not None:
            _stop_postgres(process)
        shutil.rmtree(root, ignore_errors=True)
