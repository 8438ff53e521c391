"""The last connection the napari widget used (server URL, token, workspace), remembered in a small JSON file.

The file is ``napari.json`` in the user's config folder (platformdirs' ``user_config_dir("bioadapt")`` when
platformdirs is installed, else ``~/.config/bioadapt``), or the path in ``$BIOADAPT_NAPARI_SETTINGS``. It holds a
token, so it is written readable by its owner only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

log = logging.getLogger(__name__)

SETTINGS_ENV = "BIOADAPT_NAPARI_SETTINGS"
DEFAULT_SERVER_URL = "http://127.0.0.1:9527"


@dataclass
class Connection:
    server_url: str = DEFAULT_SERVER_URL
    token: str = ""
    workspace: str = ""


def settings_path() -> Path:
    """Where the remembered connection lives: $BIOADAPT_NAPARI_SETTINGS, else napari.json in the config folder."""
    if os.environ.get(SETTINGS_ENV):
        return Path(os.environ[SETTINGS_ENV]).expanduser()
    try:
        from platformdirs import user_config_dir
    except ImportError:
        return Path.home() / ".config" / "bioadapt" / "napari.json"
    return Path(user_config_dir("bioadapt")) / "napari.json"


def load_connection(path: Path | None = None) -> Connection:
    """The remembered connection; the defaults when there is none or the file cannot be read (logged)."""
    path = path or settings_path()
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return Connection()
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable bioadapt napari settings %s: %s", path, e)
        return Connection()
    known = {f.name for f in fields(Connection)}
    return Connection(**{k: str(v) for k, v in saved.items() if k in known and v is not None})


def save_connection(connection: Connection, path: Path | None = None) -> Path:
    """Remember ``connection`` (owner-only file permissions: it holds the token); returns the file written."""
    path = path or settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(asdict(connection), file, indent=2)
    os.replace(partial, path)
    return path
