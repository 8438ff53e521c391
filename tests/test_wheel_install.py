"""A newcomer's install: the wheel `python -m build` makes (from the sdist), installed into a fresh venv with
constraints.txt, carries the browser page and napari.yaml, gives a working `bioadapt` command, and its
`bioadapt serve` (embedded Hypha server and Ray) serves the page through the Hypha server.

It installs the whole stack again (torch included: ~6.6 GB; 10-19 minutes on 2 cores shared with other test
runs), so it runs only when asked:
`make test-install` (CI runs it after `make test`) sets BIOADAPT_TEST_INSTALL=1. pip reuses its cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import free_port

from bioadapt.service.serve_process import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.skipif(os.environ.get("BIOADAPT_TEST_INSTALL") != "1",
                                 reason="installs the whole stack into a fresh venv: run `make test-install`"),
              pytest.mark.timeout(2400)]  # the install took 570-1151 s on 2 cores shared with other test runs


def run(command: list[str], cwd: Path, timeout_s: float) -> str:
    """Run outside the checkout, with nothing of it on the path: only what the venv installed is importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv) once the wheel is built and installed."""
    root = tmp_path_factory.mktemp("newcomer")
    start = time.monotonic()
    run([sys.executable, "-m", "build", "--outdir", str(root / "dist"), str(ROOT)], root, 600)
    built = time.monotonic()
    (wheel,) = (root / "dist").glob("bioadapt-*.whl")
    run([sys.executable, "-m", "venv", str(root / "venv")], root, 120)
    # --no-compile: byte-compiling torch & co. is CPU time a throwaway venv does not need
    run([str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-compile", "-c", str(ROOT / "constraints.txt"), str(wheel)], root, 1800)
    print(f"\nbuild (sdist + wheel): {built - start:.0f} s; fresh venv + pip install of the wheel: "
          f"{time.monotonic() - built:.0f} s")
    return wheel, root / "venv"


def test_the_wheel_carries_the_page_and_the_napari_manifest(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "bioadapt/napari/napari.yaml" in names
    page = sorted(p.relative_to(ROOT / "web").as_posix() for p in (ROOT / "web").rglob("*") if p.is_file())
    missing = [p for p in page if f"bioadapt/web/{p}" not in names]
    assert not missing, f"the wheel lacks these files of web/: {missing}"


def test_the_installed_command_and_package_data(installed, tmp_path):
    _, venv = installed
    assert "{convert,serve,demo}" in run([str(venv / "bin" / "bioadapt"), "--help"], tmp_path, 120)
    where = json.loads(run([str(venv / "bin" / "python"), "-c", (
        "import json, importlib.resources, bioadapt; from bioadapt.service.web import web_dir; "
        "print(json.dumps({'package': bioadapt.__file__, 'web': str(web_dir()), "
        "'napari': (importlib.resources.files('bioadapt.napari') / 'napari.yaml').is_file()}))")], tmp_path, 120))
    site = str(venv / "lib")
    assert where["package"].startswith(site) and where["web"].startswith(site), where
    assert where["napari"]


def test_bioadapt_serve_from_the_venv_serves_the_page(installed, tmp_path):
    _, venv = installed
    process = ServeProcess(tmp_path / "data", ["--port", str(free_port()), "--num-cpus", "1"],
                           env={"OMP_NUM_THREADS": "1"})
    process.command = [str(venv / "bin" / "bioadapt"), *process.command[3:]]  # the venv's entry point
    process.env.pop("PYTHONPATH", None)
    try:
        info = process.start(timeout_s=240)
        with urllib.request.urlopen(info["web_url"], timeout=30) as response:
            assert response.status == 200 and response.headers["content-type"].startswith("text/html")
            assert response.read() == (ROOT / "web" / "index.html").read_bytes()
        module = info["web_url"].split("?")[0] + "js/app.js"
        with urllib.request.urlopen(module, timeout=30) as response:
            assert response.read() == (ROOT / "web" / "js" / "app.js").read_bytes()
    finally:
        process.stop()
    assert "no web page to serve" not in process.output()
