"""`bioadapt serve` as a child process (the demo, the tests and the RPC benchmark drive the service this way):
started, awaited until it writes its connection file, stopped by its process id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bioadapt.errors import BioadaptError
from bioadapt.service.serve import CONNECTION_FILE


class ServeProcess:
    def __init__(self, data_dir: str | Path, args: Sequence[str] = (), *, log_path: str | Path | None = None,
                 env: Mapping[str, str] | None = None):
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / f"{self.data_dir.name}-serve.log"
        self.command = [sys.executable, "-m", "bioadapt.cli", "serve", "--data-dir", str(self.data_dir), *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen | None = None
        self.info: dict[str, Any] | None = None

    def start(self, timeout_s: float = 180) -> dict[str, Any]:
        """Start it and return its connection details once it serves."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env)
        connection = self.data_dir / CONNECTION_FILE
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BioadaptError(f"`bioadapt serve` exited with {self.process.returncode}; its output (in "
                                    f"{self.log_path}) ends with:\n{self.output()}")
            try:  # a file left by a killed earlier process names that process's pid
                info = json.loads(connection.read_text())
                if info["pid"] == self.process.pid:
                    self.info = info
                    return info
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        self.stop()
        raise BioadaptError(f"`bioadapt serve` wrote no {connection} within {timeout_s} s; its output ends with:\n"
                            f"{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else "(no output)"

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=15)

    def stop(self, timeout_s: float = 15) -> int | None:
        """SIGTERM by pid, SIGKILL after ``timeout_s``; the exit status (None when it never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        return self.process.returncode
