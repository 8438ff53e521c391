"""The service's tables (SQLAlchemy Core): one database for projects, their images, patches, model versions
and jobs. SQLite (WAL) by default; any SQLAlchemy URL (e.g. PostgreSQL for several replicas) otherwise."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (Column, Connection, Engine, Float, ForeignKey, Integer, MetaData, String, Table, Text,
                        create_engine, event, inspect, text)

metadata = MetaData()

models = Table(
    "models", metadata,
    Column("id", String, primary_key=True), Column("owner", String, nullable=False, index=True),
    Column("source", Text, nullable=False), Column("options", Text, nullable=False, default="{}"),
    Column("info", Text, nullable=False, default="{}"), Column("created", Float, nullable=False))

projects = Table(
    "projects", metadata,
    Column("id", String, primary_key=True), Column("owner", String, nullable=False, index=True),
    Column("name", String, nullable=False), Column("description", Text, default=""),
    Column("model_source", Text, nullable=False), Column("model_options", Text, nullable=False, default="{}"),
    Column("model_info", Text, nullable=False, default="{}"), Column("folder", Text, nullable=False),
    Column("holdout_fraction", Float, nullable=False, default=0.25), Column("created", Float, nullable=False))

images = Table(
    "images", metadata,
    Column("id", String, primary_key=True),
    Column("project_id", String, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("uri", Text, nullable=False), Column("axes", String), Column("channels", Text),
    Column("mask", Text), Column("shape", Text, nullable=False), Column("spatial_axes", String, nullable=False),
    Column("labels", Text, nullable=False), Column("predictions", Text, nullable=False),
    Column("uncertainty", Text, nullable=False), Column("storage_options", Text, default="{}"),
    Column("created", Float, nullable=False))

patches = Table(
    "patches", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project_id", String, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("image_id", String, nullable=False), Column("origin", Text, nullable=False),
    Column("shape", Text, nullable=False), Column("score", Float), Column("scores", Text, default="{}"),
    Column("objects", Integer), Column("features", Text), Column("selection_rank", Integer),
    Column("version", Integer), Column("status", String, nullable=False),
    Column("split", String), Column("annotator", String), Column("created", Float, nullable=False),
    Column("scored", Float), Column("annotated", Float))

# A version's number is reserved (state "training") before its fine-tune trains, so concurrent fine-tunes of a
# project get distinct numbers; it becomes "ready" with its weights, or "failed" (never usable, its number never
# reused). NULL state: a row written before states existed, always a finished version. trained_on: the ids of the
# patches it was trained on (JSON list), recorded when its training started; NULL in rows written before that.
# verdict: the version against its parent on the held-out patches when it was made (active.verdict: better, same,
# worse, undecided); a worse or undecided one is never the project's default version. NULL: not judged (version 0,
# older rows).
versions = Table(
    "versions", metadata,
    Column("project_id", String, ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True),
    Column("number", Integer, primary_key=True), Column("parent", Integer), Column("path", Text),
    Column("metrics", Text, default="{}"), Column("params", Text, default="{}"), Column("job_id", String),
    Column("created", Float, nullable=False), Column("state", String), Column("trained_on", Text),
    Column("verdict", String))

# replica: the id of the service process running a job; lease_until: until when (time.time()) that replica holds
# it, renewed every few seconds (jobs.Lease). NULL in rows written before leases: taken for lapsed.
jobs = Table(
    "jobs", metadata,
    Column("id", String, primary_key=True), Column("kind", String, nullable=False),
    Column("state", String, nullable=False), Column("progress", Text, default="{}"),
    Column("result", Text, default="null"), Column("error", Text), Column("created", Float),
    Column("started", Float), Column("finished", Float), Column("project_id", String, index=True),
    Column("owner", String, index=True), Column("replica", String), Column("lease_until", Float))


#: Key of the PostgreSQL advisory lock held while the tables are created (any constant; "bioadapt" in ASCII).
SCHEMA_LOCK_KEY = 0x62696F6164617074


def database_url_of(url: str) -> str:
    """``url`` with PostgreSQL's bare schemes (``postgres://``, ``postgresql://``, as hosting providers print them)
    sent to the psycopg 3 driver; SQLAlchemy would otherwise reject ``postgres://`` or ask for psycopg2."""
    for bare in ("postgres://", "postgresql://"):
        if url.startswith(bare):
            return "postgresql+psycopg://" + url[len(bare):]
    return url


def make_engine(path: str | Path | None = None, database_url: str | None = None) -> Engine:
    """An engine with every table created; ``database_url`` wins over a SQLite file at ``path``. Several
    processes may open the same database at once (replicas starting together): the tables are created once."""
    url = database_url_of(database_url) if database_url else f"sqlite:///{Path(path or 'bioadapt.sqlite')}"
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record) -> None:  # WAL: readers never wait for the writer
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=NORMAL")
    else:
        engine = create_engine(url, pool_pre_ping=True)
    with engine.begin() as conn:
        # create_all checks, then creates: two processes doing it at once both try to create (SQLite: "table
        # models already exists"; PostgreSQL: duplicate key in pg_type). Hold the database's lock meanwhile.
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        elif engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # pysqlite opens no transaction for reads or DDL by itself
        metadata.create_all(conn)
        _add_missing_columns(conn)
    return engine


def _add_missing_columns(conn: Connection) -> None:
    """Columns added to the tables since a database was created, added to it (nullable, without a default: every
    column added after the first release is), so databases of earlier versions keep working."""
    inspector = inspect(conn)
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")


def lock_project(conn: Connection, project_id: str) -> None:
    """Serialise this transaction with every other one that locks the same project, until it ends: a row lock on
    PostgreSQL, the database's write lock on SQLite. A no-op UPDATE does both: on SQLite it must be the
    transaction's first statement (pysqlite begins the transaction there, and a read before it would let another
    writer slip in between)."""
    conn.execute(projects.update().where(projects.c.id == project_id)
                 .values(holdout_fraction=projects.c.holdout_fraction))
