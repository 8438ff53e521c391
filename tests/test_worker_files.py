"""Ray worker processes keep their temporary files in a folder named after their process id; the folders of
processes that ended (a model actor stopped by ``ray.kill`` runs no cleanup) are removed by the next worker or the
service's stop, and only those."""

import os
import subprocess
import sys
import tempfile

from bioadapt.service.worker_files import PREFIX, remove_orphans, use_own_temporary_folder


def _ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_the_folders_of_ended_processes_go(tmp_path):
    ended = tmp_path / f"{PREFIX}{_ended_pid()}-abc"
    running = tmp_path / f"{PREFIX}{os.getpid()}-def"
    others = [tmp_path / f"{PREFIX}notapid-x", tmp_path / "tmpabcdef"]
    for folder in [ended, running, *others]:
        (folder / "inner").mkdir(parents=True)
        (folder / "inner" / "unet_0123.py").write_text("x = 1\n")
    assert remove_orphans(tmp_path) == 1
    assert not ended.exists()
    assert running.exists() and all(folder.exists() for folder in others)


def test_a_worker_writes_into_its_own_folder_and_clears_what_ended_workers_left(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    left = tmp_path / f"{PREFIX}{_ended_pid()}-abc"
    left.mkdir()
    folder = use_own_temporary_folder()
    assert folder.parent == tmp_path and folder.name.startswith(f"{PREFIX}{os.getpid()}-")
    assert not left.exists()
    with tempfile.TemporaryDirectory() as inside:
        assert os.path.dirname(inside) == str(folder)
    assert use_own_temporary_folder() == folder  # once per process
