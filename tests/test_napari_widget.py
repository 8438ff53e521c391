"""The napari widget as a user drives it, against a real `bioadapt serve` subprocess (user "svc-napari") on the
session's Hypha server and Ray: open the widget from its npe2 manifest, connect, create a project, score, load
the most uncertain patch, correct its labels and commit them, skip one, fine-tune, evaluate, export; a screenshot
of the viewer goes to $BIOADAPT_NAPARI_SCREENSHOT when set (docs/napari-widget.png was made that way), else to a
temporary folder, so a test run leaves the checkout as it was.

napari's canvas needs OpenGL on an X display: without $DISPLAY the module starts its own Xvfb (Debian packages
xvfb, libxcb-icccm4, libxcb-keysyms1), or skips when there is none (fails under CI=true). Qt's 'offscreen' platform cannot render
napari's canvas (no QOpenGLWidget; without any X display vispy fails when a layer is added).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import stat
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import import_or_missing, missing
from service_helpers import ServiceProcess, client_for, crowded_inputs, project_folder

from bioadapt.data import LabelStore
from bioadapt.napari.layers import IMAGE_LAYER, LABELS_LAYER, UNCERTAINTY_LAYER
from bioadapt.napari.overview import OVERVIEW_IMAGE_LAYER, OVERVIEW_LAYER
from bioadapt.napari.settings import SETTINGS_ENV, load_connection
from bioadapt.service.hypha_server import mint_token

import_or_missing("napari", "napari", "pip install -c constraints.txt -e '.[napari]'")
import_or_missing("pytestqt", "pytest-qt", "pip install -c constraints.txt -e '.[napari]'")

SERVICE_USER = "svc-napari"
WORKSPACE = f"ws-user-{SERVICE_USER}"
PATCH = [128, 128]
MANIFEST = Path(__file__).resolve().parents[1] / "bioadapt" / "napari" / "napari.yaml"
WAIT_MS = 60_000


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def x_display():
    """$DISPLAY, or a private Xvfb started before Qt is. The QApplication lives until the process exits, so the
    server is told to end with its last client (-terminate) rather than killed under Qt's feet."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        missing("Xvfb", "napari's canvas needs an X display with OpenGL: run under xvfb-run, or install xvfb")
    process, display = _start_xvfb(xvfb)
    os.environ["DISPLAY"] = display
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    yield display
    from qtpy.QtWidgets import QApplication

    if QApplication.instance() is None:  # Qt never connected: nothing will end the server but us
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def _start_xvfb(xvfb: str) -> tuple[subprocess.Popen, str]:
    """Xvfb on a free display; it writes the display number and a newline to -displayfd once it accepts clients
    (the pipe stays open until the newline: Xvfb exits when it cannot write)."""
    read_end, write_end = os.pipe()
    process = subprocess.Popen([xvfb, "-displayfd", str(write_end), "-screen", "0", "1600x1000x24", "-nolisten",
                                "tcp", "-terminate"], pass_fds=(write_end,), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    os.close(write_end)
    answer = b""
    while not answer.endswith(b"\n") and select.select([read_end], [], [], 20)[0]:
        chunk = os.read(read_end, 64)
        if not chunk:
            break
        answer += chunk
    os.close(read_end)
    if not answer.endswith(b"\n") or process.poll() is not None:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        missing("Xvfb", "Xvfb did not start within 20 s")
    return process, f":{answer.decode().strip()}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return crowded_inputs(tmp_path_factory.mktemp("napari-inputs"), 512)


@pytest.fixture(scope="module")
def service(hypha_server, ray_cluster, inputs):
    process = ServiceProcess(hypha_server, ray_cluster, SERVICE_USER, inputs["allowed"].parent / "napari-data",
                             [inputs["allowed"]])
    info = process.start()
    assert info["workspace"] == WORKSPACE
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def settings_file(tmp_path, monkeypatch):
    path = tmp_path / "config" / "napari.json"
    monkeypatch.setenv(SETTINGS_ENV, str(path))
    return path


def _open_widget(viewer):
    """The widget as napari's Plugins menu opens it: from the npe2 manifest (registered here, as the
    napari.manifest entry point does once the package is installed)."""
    from npe2 import PluginManager, PluginManifest

    manager = PluginManager.instance()
    if "bioadapt" not in manager._manifests:
        manager.register(PluginManifest.from_file(MANIFEST))
    _, widget = viewer.window.add_plugin_dock_widget("bioadapt", "Active learning")
    return widget


def _click(qtbot, button) -> None:
    """Click ``button`` once it is enabled, as a user would: a panel re-enables its button when its call's worker
    has finished, which Qt reports after the call's answer or error (a click right after those may find it still
    disabled)."""
    from qtpy.QtCore import Qt

    try:
        qtbot.waitUntil(button.isEnabled, timeout=WAIT_MS)
    except qtbot.TimeoutError:
        pytest.fail(f"{button.text()!r} stayed disabled for {WAIT_MS / 1000} s")
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def _press(qtbot, viewer, key: str) -> None:
    """A key press with Shift on the viewer's canvas, as the user types it."""
    from qtpy.QtCore import Qt

    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, getattr(Qt.Key, f"Key_{key}"), Qt.KeyboardModifier.ShiftModifier)


def _row_statuses(panel) -> list[str]:
    return [panel.table.item(row, 3).text() for row in range(panel.table.rowCount())]


# -- the story --------------------------------------------------------------------------------------------
def test_a_user_labels_and_tunes_through_the_widget(make_napari_viewer, qtbot, service, inputs, hypha_server,
                                                      settings_file, tmp_path):
    viewer = make_napari_viewer()
    viewer.window._qt_window.resize(1500, 950)
    widget = _open_widget(viewer)
    session = widget.session
    errors: list[str] = []
    messages: list[str] = []  # every line the status bar showed
    session.message.connect(lambda text, is_error: errors.append(text) if is_error else None)
    session.message.connect(lambda text, is_error: messages.append(text))

    def until(condition) -> None:
        """Let Qt run until ``condition()`` holds; any error the widget reports fails the test at once."""
        try:
            qtbot.waitUntil(lambda: bool(condition()) or bool(errors), timeout=WAIT_MS)
        except qtbot.TimeoutError:
            pytest.fail(f"not within {WAIT_MS / 1000} s; the widget's status line says: {widget.status.text()}")
        assert not errors, errors

    try:
        # 1. connect; the connection is remembered for the next time, readable by its owner only
        token = mint_token("nadia", workspaces={WORKSPACE: "r"}, jwt_secret=hypha_server.jwt_secret)
        connect_panel = widget.connect_panel
        connect_panel.server_url.setText(hypha_server.url)
        connect_panel.token.setText(token)
        connect_panel.workspace.setText(WORKSPACE)
        _click(qtbot, connect_panel.connect_button)
        until(lambda: session.client is not None)
        assert connect_panel.connect_button.text() == "Disconnect"
        assert json.loads(settings_file.read_text()) == {"server_url": hypha_server.url, "token": token,
                                                         "workspace": WORKSPACE}
        assert stat.S_IMODE(settings_file.stat().st_mode) == 0o600
        assert load_connection().workspace == WORKSPACE

        # 2. create a project: the tiny model, the image, patches drawn inside the 'auto' mask; a mistake in the
        # form comes back as the service's message on the status line, and the viewer stays usable
        project_panel = widget.project_panel
        project_panel.name.setText("napari labelling")
        project_panel.model_source.setText(str(inputs["model"]))
        project_panel.image_uris.setPlainText(str(inputs["allowed"] / "absent.ome.zarr"))
        _click(qtbot, project_panel.create_button)
        qtbot.waitUntil(lambda: bool(errors), timeout=WAIT_MS)
        assert "creating the project failed" in errors[0] and "absent.ome.zarr" in errors[0], errors
        assert widget.status.text() == errors.pop() and session.project is None
        project_panel.image_uris.setPlainText(str(inputs["image"]))
        project_panel.mask.setCurrentText("auto")
        _click(qtbot, project_panel.create_button)
        until(lambda: session.project is not None)
        project = session.project
        assert project["name"] == "napari labelling" and project["images"][0]["mask"] == "auto"
        assert project_panel.projects.currentData() == project["id"]
        assert widget.tabs.tabText(widget.tabs.currentIndex()) == "Label"  # the next step is shown

        # 3. score 6 patches; the click returns at once (the call runs in a worker), the progress bar fills
        score_panel = widget.score_panel
        score_panel.n_patches.setValue(6)
        score_panel.patch_shape.setText(", ".join(map(str, PATCH)))
        score_panel.mc_passes.setValue(4)
        score_panel.strategy.setCurrentText("bald")  # top-k by BALD: the picks come in score order
        _click(qtbot, score_panel.score_button)
        assert session.background.busy and not score_panel.score_button.isEnabled()
        patch_panel = widget.patch_panel
        # the job ends, then the table is listed again. Rows alone prove nothing: the listing asked for when the
        # project opened can run after the job drew its patches, and list them before they are scored
        until(lambda: score_panel.job_id is None and not session.background.busy)
        drawn = patch_panel.table.rowCount()  # as many as fit in the mask without overlapping
        assert 5 <= drawn <= 6 and score_panel.progress.value() == score_panel.progress.maximum() == drawn
        scores = [p["score"] for p in patch_panel.patches]
        assert scores == sorted(scores, reverse=True) and _row_statuses(patch_panel) == ["pending"] * drawn
        assert patch_panel.table.item(0, 0).text() == f"{scores[0]:.4g}"
        assert patch_panel.table.item(0, 1).text() == "image.ome.zarr"

        # 4. the top row loads the patch where it lies in the full image, and the camera goes there
        top = patch_panel.patches[0]
        patch_panel.select(0)
        until(lambda: (patch_panel.shown or {}).get("id") == top["id"])
        image, labels, uncertainty = (viewer.layers[name] for name in (IMAGE_LAYER, LABELS_LAYER,
                                                                        UNCERTAINTY_LAYER))
        for layer in (image, labels, uncertainty):
            assert list(layer.translate) == top["origin"] and list(layer.data.shape) == PATCH
        assert type(labels).__name__ == "Labels" and viewer.layers.selection.active is labels
        assert uncertainty.colormap.name == "magma" and uncertainty.blending == "additive"
        center = np.asarray(viewer.camera.center[-2:])
        assert np.all(np.abs(center - (np.asarray(top["origin"]) + np.asarray(PATCH) / 2)) < 1)
        predicted = np.array(labels.data)
        # the map shown is the readable default (pass disagreement): one value over each of the model's objects
        shown = np.asarray(uncertainty.data)
        assert predicted.max() > 0 and all(np.ptp(shown[predicted == i]) < 1e-6 for i in np.unique(predicted) if i)
        # the uncertainty overview of the whole image, under the patch: the patch's map lies where the patch is
        widget.overview.checkbox.setChecked(True)
        until(lambda: OVERVIEW_LAYER in viewer.layers)
        overview, slide = viewer.layers[OVERVIEW_LAYER], viewer.layers[OVERVIEW_IMAGE_LAYER]
        assert [viewer.layers.index(layer) for layer in (slide, overview)] == [0, 1]
        assert overview.data.shape == slide.data.shape == (512, 512)  # one level: 512 pixels need no coarser one
        (y, x), (h, w) = top["origin"], PATCH
        np.testing.assert_allclose(overview.data[y:y + h, x:x + w], np.asarray(uncertainty.data), rtol=1e-6)
        assert (overview.data > 0).sum() <= drawn * h * w  # nothing outside the scored patches
        widget.overview.checkbox.setChecked(False)
        assert OVERVIEW_LAYER not in viewer.layers and OVERVIEW_IMAGE_LAYER not in viewer.layers
        # Shift+Right / Shift+Left on the canvas move through the table, loading each patch
        _press(qtbot, viewer, "Right")
        until(lambda: (patch_panel.shown or {}).get("id") == patch_panel.patches[1]["id"])
        assert list(viewer.layers[LABELS_LAYER].translate) == patch_panel.patches[1]["origin"]
        _press(qtbot, viewer, "Left")
        until(lambda: (patch_panel.shown or {}).get("id") == top["id"])
        labels = viewer.layers[LABELS_LAYER]  # the same layer, with the top patch's data again
        np.testing.assert_array_equal(labels.data, predicted)

        # 5. correct the labels (a new object painted in), commit with Shift+Enter on the canvas
        edited = predicted.copy()
        edited[10:40, 20:50] = 777
        labels.data = edited
        _press(qtbot, viewer, "Return")
        until(lambda: _row_statuses(patch_panel)[0] == "annotated")
        store = LabelStore.open(project_folder(service, project["id"]) / "images" / project["images"][0]["id"] /
                                "labels.ome.zarr", "corrections")
        np.testing.assert_array_equal(store.read(top["origin"], PATCH), edited)
        client = client_for(hypha_server, "nadia", WORKSPACE)
        try:
            np.testing.assert_array_equal(client.get_patch(project["id"], top["id"])["labels"], edited)
        finally:
            client.disconnect()
        # ... and the next patch to label is loaded
        second = patch_panel.patches[1]
        until(lambda: (patch_panel.shown or {}).get("id") == second["id"])
        assert list(viewer.layers[LABELS_LAYER].translate) == second["origin"]

        # 6. skip it (Shift+Backspace), then three corrected from the ground truth with the Commit button
        _press(qtbot, viewer, "Backspace")
        until(lambda: _row_statuses(patch_panel)[1] == "skipped")
        for row in (2, 3, 4):
            wanted = patch_panel.patches[row]
            until(lambda wanted=wanted: (patch_panel.shown or {}).get("id") == wanted["id"])
            (y, x), (h, w) = wanted["origin"], wanted["shape"]
            viewer.layers[LABELS_LAYER].data = inputs["truth"][y:y + h, x:x + w].copy()
            _click(qtbot, patch_panel.commit_button)
            until(lambda row=row: _row_statuses(patch_panel)[row] == "annotated")
        assert _row_statuses(patch_panel)[:5] == ["annotated", "skipped", "annotated", "annotated", "annotated"]

        # 7. fine-tune 2 epochs on the 3 training patches (the 4th is held out); the loss shows, a version appears
        tune_panel, versions_panel = widget.tune_panel, widget.versions_panel
        widget.tabs.setCurrentIndex(2)
        tune_panel.epochs.setValue(2)
        tune_panel.learning_rate.setValue(1e-3)
        tune_panel.batch_size.setValue(2)
        assert versions_panel.table.rowCount() == 1
        _click(qtbot, tune_panel.tune_button)
        until(lambda: versions_panel.table.rowCount() == 2)
        assert tune_panel.progress.value() == tune_panel.progress.maximum() == 2
        assert tune_panel.loss.text().startswith("loss by epoch: ") and "2: " in tune_panel.loss.text()
        assert [session.project["versions"][i]["parent"] for i in (0, 1)] == [None, 0]
        # one held-out patch cannot judge version 1 alone: the fine-tune cross-validated it over the 4 annotated
        # patches; the learning curve shows that one step, the table the verdict and its reason
        until(lambda: len(versions_panel.curve.points()) == 1)
        [(point_row, _)] = versions_panel.curve.points()
        assert (point_row["version"], point_row["labels"], point_row["judged_by"]) == (1, 3, "cross-validation")
        assert point_row["verdict"] in ("better", "same", "worse") and point_row["holdout_patches"] == 4
        assert versions_panel.table.item(1, 6).text() == point_row["verdict"]
        assert versions_panel.table.item(1, 6).toolTip().startswith("cross-validated (4 fine-tunes")
        default_row = 0 if point_row["verdict"] == "worse" else 1  # a worse version is not the default
        assert versions_panel.table.item(default_row, 0).text().endswith(" (default)")

        # ... a long one is cancelled once it trains: no new version
        tune_panel.epochs.setValue(1000)
        _click(qtbot, tune_panel.tune_button)
        until(lambda: tune_panel.job_id is not None and tune_panel.progress.value() >= 1)
        _click(qtbot, tune_panel.cancel_button)
        until(lambda: tune_panel.job_id is None)
        assert widget.status.text() == "fine-tuning cancelled: no new version"
        assert tune_panel.progress.value() < 1000 and tune_panel.tune_button.isEnabled()
        qtbot.waitUntil(lambda: not session.background.busy, timeout=WAIT_MS)
        assert versions_panel.table.rowCount() == 2

        # 8. evaluate both versions on the held-out patch: F1 and AP columns fill in
        _click(qtbot, versions_panel.evaluate_button)
        # (version 1's came with its fine-tune, which scored it on the held-out patch: wait for version 0's)
        until(lambda: all(versions_panel.table.item(row, 3).text() != "" for row in (0, 1)))
        for row in (0, 1):
            assert 0 <= float(versions_panel.table.item(row, 3).text()) <= 1  # F1
            assert 0 <= float(versions_panel.table.item(row, 4).text()) <= 1  # AP
        assert versions_panel.table.isColumnHidden(5)  # no Dice for an instance model

        # 9. export the new version, named, to a file here (the package comes through the service)
        package = tmp_path / "exported" / "napari-labelling.zip"
        versions_panel.export_to(package, 1)
        until(lambda: package.exists() and not session.background.busy)
        assert "rdf.yaml" in zipfile.ZipFile(package).namelist()
        assert widget.status.text().startswith(f"exported version 1 to {package} (")
        # the user saw the model by its name, and never a path of the service's machine
        assert f"model '{project['model']['name']}'" in " ".join(messages), messages
        data_folder = str(service.data_dir.resolve())
        assert not [text for text in messages if data_folder in text or str(inputs["model"]) in text], messages

        # 10. the picture for the docs: the Label tab, a corrected patch loaded back with its stored labels
        widget.tabs.setCurrentIndex(1)
        corrected = patch_panel.patches[2]
        patch_panel.select(2)
        until(lambda: (patch_panel.shown or {}).get("id") == corrected["id"])
        (y, x), (h, w) = corrected["origin"], corrected["shape"]
        np.testing.assert_array_equal(viewer.layers[LABELS_LAYER].data, inputs["truth"][y:y + h, x:x + w])
        qtbot.wait(200)
        screenshot = Path(os.environ.get("BIOADAPT_NAPARI_SCREENSHOT") or tmp_path / "napari-widget.png")
        viewer.screenshot(str(screenshot), canvas_only=False)
        assert screenshot.stat().st_size > 10_000
    finally:
        widget.close_session()
