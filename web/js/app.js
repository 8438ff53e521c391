// The page: connect, projects, scoring, the ranked patches, the patch editor, fine-tuning and export. Every action
// is one call of the "bioadapt" service; this file only wires the page to those calls.
import { connect, errorMessage, fromNdarray, runJob, toNdarray } from "./rpc.js";
import { PatchView, labelColor } from "./patch-view.js";
import { OverviewView } from "./overview.js";
import { drawLearningCurve, verdictText } from "./curve.js";

const $ = (id) => document.getElementById(id);
const STORAGE = { serverUrl: "bioadapt.server_url", workspace: "bioadapt.workspace" };
const state = { service: null, server: null, project: null, patches: [], patch: null, busy: new Set(),
  defaultPatchShape: [] };
const view = new PatchView($("patch-canvas"));
const overview = new OverviewView($("overview-canvas"));

// -- messages -------------------------------------------------------------------------------------------------
/** A name made safe for a file name: letters, digits, '.', '_' and '-' kept, the rest become '-'. */
function fileStem(name) {
  return name.replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^-+|-+$/g, "") || "model";
}

function say(text, { error = false } = {}) {
  $("message").textContent = text;
  $("message").classList.toggle("error", error);
}

/** Run an action with its button disabled; errors go to the message line. */
async function act(button, what, action) {
  if (button) button.disabled = true;
  state.busy.add(what);
  say(`${what}…`);
  try {
    const result = await action();
    if ($("message").textContent === `${what}…`) say("");
    return result;
  } catch (error) {
    console.error(error);
    say(`${what} failed: ${errorMessage(error)}`, { error: true });
    return undefined;
  } finally {
    state.busy.delete(what);
    updateButtons();
  }
}

function updateButtons() {
  const connected = Boolean(state.service), project = Boolean(state.project), patch = Boolean(state.patch);
  $("refresh-projects").disabled = !connected;
  $("create").disabled = !connected || state.busy.has("Creating the project");
  $("score").disabled = !project || state.busy.has("Scoring");
  $("fine-tune").disabled = !project || state.busy.has("Fine-tuning");
  $("export").disabled = !project || state.busy.has("Exporting");
  $("submit").disabled = !patch || state.busy.has("Submitting");
  $("skip").disabled = !patch || state.patch.status !== "pending";
  $("reset").disabled = !patch;
}

// -- connection -----------------------------------------------------------------------------------------------
function restoreConnectionFields() {
  const query = new URLSearchParams(location.search);
  $("server-url").value = query.get("server_url") || localStorage.getItem(STORAGE.serverUrl) || location.origin;
  $("workspace").value = query.get("workspace") || localStorage.getItem(STORAGE.workspace) || "";
}

$("connect-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const serverUrl = $("server-url").value.trim(), workspace = $("workspace").value.trim();
  act($("connect"), "Connecting", async () => {
    if (state.server) await state.server.disconnect().catch(() => {});
    state.server = state.service = null;
    $("connection").textContent = "not connected";
    $("connection").classList.add("muted");
    state.project = null;
    closePatch();
    const { server, service } = await connect({ serverUrl, workspace, token: $("token").value.trim() });
    Object.assign(state, { server, service });
    localStorage.setItem(STORAGE.serverUrl, serverUrl);
    localStorage.setItem(STORAGE.workspace, workspace);
    $("connection").textContent = `connected to ${server.config.workspace} as ${server.config.user?.id ?? "?"}`;
    $("connection").classList.remove("muted");
    showScoreDefaults();
    await loadProjects();
  }).finally(() => { $("connect").disabled = false; });
});

// -- projects -------------------------------------------------------------------------------------------------
function countsText(counts) {
  if (!counts) return "";
  return Object.entries(counts).filter(([, n]) => typeof n === "number").map(([k, n]) => `${n} ${k}`).join(", ");
}

async function loadProjects() {
  const projects = await state.service.list_projects();
  const list = $("projects");
  list.replaceChildren();
  for (const project of projects) {
    const item = document.createElement("li");
    item.dataset.projectId = project.id;
    item.innerHTML = `<span class="name"></span><span class="muted"></span>`;
    item.querySelector(".name").textContent = project.name;
    item.querySelector(".muted").textContent = countsText(project.patches);
    item.title = `${project.id} · model ${project.model}`;
    item.classList.toggle("selected", state.project?.id === project.id);
    item.addEventListener("click", () => act(null, "Opening the project", () => openProject(project.id)));
    list.append(item);
  }
  if (!projects.length) list.innerHTML = `<li class="muted">no projects yet: create one below</li>`;
  updateButtons();
}

$("refresh-projects").addEventListener("click", () => act($("refresh-projects"), "Loading projects", loadProjects));

$("create-form").addEventListener("submit", (event) => {
  event.preventDefault();
  act($("create"), "Creating the project", async () => {
    const project = await state.service.create_project({
      name: $("project-name").value.trim(), model: $("model-source").value.trim(),
      images: [{ uri: $("image-uri").value.trim() }],
    });
    $("new-project").open = false;
    await loadProjects();
    await openProject(project.id);
    say(`Project "${project.name}" created: score patches next.`);
  });
});

async function openProject(projectId) {
  await showProject(projectId);
  for (const item of $("projects").children) item.classList.toggle("selected", item.dataset.projectId === projectId);
  closePatch();
  await loadPatches();
  await loadOverview();
}

/** The uncertainty overview of the open patch's image (else the project's first image). */
async function loadOverview() {
  const imageId = state.patch?.imageId ?? state.project.images[0]?.id;
  if (!imageId) return;
  const answer = await state.service.get_overview({ project_id: state.project.id, image_id: imageId });
  overview.show(answer);
  overview.setPatches(state.patches, state.patch?.id);
  $("overview-status").textContent = `${(100 * answer.scored_fraction).toFixed(1)}% scored · ` +
    `${answer.shape.join(" × ")} px, shown at 1/${Math.round(answer.uncertainty_factors.at(-1))}`;
}

$("show-overview").addEventListener("change", () => {
  overview.showUncertainty = $("show-overview").checked;
  overview.render();
});

/** Fetch the project and show its summary (versions, patch counts). */
async function showProject(projectId) {
  state.project = await state.service.get_project({ project_id: projectId });
  const p = state.project;
  $("project-info").textContent = `${p.name} (${p.id}) · model ${p.model.name} · ${p.images.length} image(s) · ` +
    `model version ${p.default_version} · patches: ${countsText(p.patches) || "none"}`;
  drawLearningCurve($("learning-curve"), p.learning_curve || []);
}

/** After labels changed: the patch list, the project's counts and the project list. */
async function refreshCounts() {
  await Promise.all([loadPatches(), showProject(state.project.id)]);
  await loadProjects();
}

// -- scoring --------------------------------------------------------------------------------------------------
/** The score form's fields, each starting from the service's default as its published schema of score states it
 * (no default is written in this page); a field is sent only when the user changed it. */
const SCORE_FIELDS = {
  "mode": (p) => p.mode?.default,
  "n-patches": (p) => p.n_patches?.random_default,
  "patch-size": (p) => p.patch_shape?.default?.[0],
  "mc-passes": (p) => p.mc_passes?.default,
};

function showScoreDefaults() {
  const properties = state.service.score.__schema__?.parameters?.properties ?? {};
  state.defaultPatchShape = properties.patch_shape?.default ?? [];
  for (const [id, read] of Object.entries(SCORE_FIELDS)) {
    const value = read(properties);
    $(id).dataset.default = value ?? "";
    if (value !== undefined) $(id).value = value;
  }
}

const changed = (id) => $(id).value !== $(id).dataset.default;

$("score-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const size = Number($("patch-size").value), dims = state.project.images[0]?.spatial_axes?.length || 2;
  const args = { project_id: state.project.id };
  if (changed("mode")) args.mode = $("mode").value;
  if (changed("mc-passes")) args.mc_passes = Number($("mc-passes").value);
  // a 3D image needs a 3D patch even when the 2D default size is kept
  if (changed("patch-size") || dims !== state.defaultPatchShape.length) args.patch_shape = Array(dims).fill(size);
  for (const name of ["strategy", "acquisition"]) if ($(name).value) args[name] = $(name).value;  // "": the service's
  if ($("mode").value === "random" && changed("n-patches")) args.n_patches = Number($("n-patches").value);
  act($("score"), "Scoring", async () => {
    $("score-progress").value = 0;
    const job = await runJob(state.service, (progress) => state.service.score({ ...args, progress }), (info) => {
      if (info.total) {
        $("score-progress").value = info.done / info.total;
        $("score-status").textContent = `${info.state}: ${info.done} / ${info.total} patches` +
          (info.patches_per_second ? ` (${info.patches_per_second} per s)` : "");
      } else {
        $("score-status").textContent = info.state;
      }
    });
    if (job.state !== "done") throw new Error(`the scoring job ${job.state}: ${job.error || ""}`);
    $("score-progress").value = 1;
    $("score-status").textContent = `done: ${job.result.scored} patches scored (${job.result.strategy}, model ` +
      `version ${job.result.version})`;
    await refreshCounts();
    await loadOverview();
  });
});

// -- patches --------------------------------------------------------------------------------------------------
async function loadPatches() {
  state.patches = await state.service.list_patches({ project_id: state.project.id, limit: 200 });
  const list = $("patches");
  list.replaceChildren();
  for (const patch of state.patches) {
    const item = document.createElement("li");
    item.dataset.patchId = patch.id;
    const score = patch.score == null ? "–" : patch.score.toPrecision(3);
    item.innerHTML = `<span>#${patch.id} <span class="muted">[${patch.origin.join(", ")}]</span></span>` +
      `<span><span class="status-${patch.status}">${patch.status}</span> · ${score}</span>`;
    item.classList.toggle("selected", state.patch?.id === patch.id);
    item.addEventListener("click", () => act(null, "Opening the patch", () => openPatch(patch.id)));
    list.append(item);
  }
  if (!state.patches.length) list.innerHTML = `<li class="muted">no patches yet: score some</li>`;
  overview.setPatches(state.patches, state.patch?.id);
}

async function openPatch(patchId) {
  const got = await state.service.get_patch({ project_id: state.project.id, patch_id: patchId });
  const labels = fromNdarray(got.labels ?? got.predicted_labels);
  const shownImage = state.patch?.imageId ?? state.project.images[0]?.id;
  state.patch = { id: got.id, status: got.status, shape: got.shape, origin: got.origin, score: got.score,
    imageId: got.image_id };
  view.show({ image: fromNdarray(got.image), labels, uncertainty: fromNdarray(got.uncertainty) });
  $("patch-canvas").classList.remove("empty");
  $("placeholder").hidden = true;
  const channels = view.patch.image.shape[0];
  $("channel-control").hidden = channels < 2;
  $("channel").replaceChildren(...Array.from({ length: channels }, (_, c) => new Option(String(c), String(c))));
  $("z-control").hidden = view.depth < 2;
  $("z").max = String(view.depth - 1);
  $("z").value = String(view.z);
  view.newLabel();
  for (const item of $("patches").children) item.classList.toggle("selected", Number(item.dataset.patchId) === got.id);
  showPatchInfo(got.labels ? "your labels" : "the model's labels");
  updateButtons();
  if (got.image_id !== shownImage) await loadOverview();
  else overview.setPatches(state.patches, got.id);
}

function showPatchInfo(source) {
  const p = state.patch;
  $("patch-info").textContent = `patch #${p.id} at [${p.origin.join(", ")}], ${p.shape.join(" × ")} px · ` +
    `${p.status} · showing ${source}`;
}

function closePatch() {
  state.patch = null;
  $("patch-canvas").classList.add("empty");
  $("placeholder").hidden = false;
  $("patch-info").textContent = "";
  updateButtons();
}

$("submit").addEventListener("click", () => act($("submit"), "Submitting", async () => {
  const { id, shape } = state.patch;
  const answer = await state.service.submit_labels({
    project_id: state.project.id, patch_id: id, labels: toNdarray(view.labels, shape, "uint32"),
  });
  state.patch.status = answer.status;
  view.edited = false;
  showPatchInfo("your labels");
  say(`Labels of patch #${id} saved (${answer.split ?? answer.status}).`);
  await refreshCounts();
}));

$("skip").addEventListener("click", () => act($("skip"), "Skipping", async () => {
  await state.service.skip_patch({ project_id: state.project.id, patch_id: state.patch.id });
  closePatch();
  await refreshCounts();
}));

$("reset").addEventListener("click", () => view.reset());

// -- tools ----------------------------------------------------------------------------------------------------
function showTool() {
  for (const button of document.querySelectorAll(".tool")) button.classList.toggle("active", button.dataset.tool === view.tool);
  $("label-id").value = String(view.labelId);
  $("label-swatch").style.background = `rgb(${labelColor(view.labelId).join(",")})`;
}
view.onChange = showTool;

for (const button of document.querySelectorAll(".tool")) {
  button.addEventListener("click", () => { view.tool = button.dataset.tool; showTool(); });
}
$("new-label").addEventListener("click", () => view.patch && view.newLabel());
$("label-id").addEventListener("change", () => {
  view.labelId = Math.max(1, Math.floor(Number($("label-id").value) || 1));
  view.tool = "brush";
  showTool();
});
$("brush-size").addEventListener("input", () => {
  view.brushSize = Number($("brush-size").value);
  $("brush-size-value").textContent = $("brush-size").value;
});
$("show-labels").addEventListener("change", () => { view.showLabels = $("show-labels").checked; view.render(); });
$("show-uncertainty").addEventListener("change", () => {
  view.showUncertainty = $("show-uncertainty").checked;
  view.render();
});
$("channel").addEventListener("change", () => view.setChannel(Number($("channel").value)));
$("z").addEventListener("input", () => view.setZ(Number($("z").value)));

document.addEventListener("keydown", (event) => {
  if (event.target.closest("input, select, textarea") || event.ctrlKey || event.metaKey || event.altKey) return;
  const toggle = (id) => { $(id).checked = !$(id).checked; $(id).dispatchEvent(new Event("change")); };
  const keys = {
    b: () => { view.tool = "brush"; showTool(); }, e: () => { view.tool = "eraser"; showTool(); },
    n: () => view.patch && view.newLabel(), l: () => toggle("show-labels"), u: () => toggle("show-uncertainty"),
  };
  if (keys[event.key]) keys[event.key]();
});

// -- fine-tuning ----------------------------------------------------------------------------------------------
function plotLoss(losses) {
  const canvas = $("loss-plot"), context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (!losses.length) return;
  const max = Math.max(...losses), min = Math.min(...losses), span = max - min || 1, pad = 8;
  const points = losses.map((loss, i) => [
    pad + (canvas.width - 2 * pad) * (losses.length > 1 ? i / (losses.length - 1) : 0.5),
    canvas.height - pad - (canvas.height - 2 * pad) * (loss - min) / span,
  ]);
  context.strokeStyle = context.fillStyle = "#2f6fdb";
  context.lineWidth = 2;
  context.beginPath();
  points.forEach(([x, y], i) => (i ? context.lineTo(x, y) : context.moveTo(x, y)));
  context.stroke();
  for (const [x, y] of points) {
    context.beginPath();
    context.arc(x, y, 2.5, 0, 2 * Math.PI);
    context.fill();
  }
  context.fillStyle = "#68737d";
  context.font = "11px system-ui";
  context.fillText(`loss ${losses[losses.length - 1].toPrecision(3)}`, pad, 14);
}

$("tune-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const args = { project_id: state.project.id }; // fields left empty keep the model's own defaults
  if ($("epochs").value) args.epochs = Number($("epochs").value);
  if ($("learning-rate").value) args.learning_rate = Number($("learning-rate").value);
  act($("fine-tune"), "Fine-tuning", async () => {
    const losses = [];
    plotLoss(losses);
    $("tune-progress").value = 0;
    const job = await runJob(state.service, (progress) => state.service.fine_tune({ ...args, progress }), (info) => {
      if (info.epoch && info.loss != null && info.epoch > losses.length) {
        losses[info.epoch - 1] = info.loss;
        plotLoss(losses.filter((v) => v != null));
      }
      if (info.epoch && info.epochs) $("tune-progress").value = info.epoch / info.epochs;
      $("tune-status").textContent = info.epoch
        ? `${info.state}: epoch ${info.epoch} / ${info.epochs}, loss ${Number(info.loss).toPrecision(3)}` +
          (info.val_score != null ? `, validation ${Number(info.val_score).toPrecision(3)}` : "")
        : info.state;
    });
    if (job.state !== "done") throw new Error(`the fine-tuning job ${job.state}: ${job.error || ""}`);
    $("tune-progress").value = 1;
    $("tune-status").textContent = `done: model version ${job.result.version} (from ${job.result.parent}); ` +
      $("tune-status").textContent.replace(/^\w+: /, "") + `. ${verdictText(job.result)}`;
    await showProject(state.project.id);
  });
});

// -- export ---------------------------------------------------------------------------------------------------
$("export").addEventListener("click", () => act($("export"), "Exporting", async () => {
  $("download").hidden = true;
  const named = $("export-version").value ? { version: Number($("export-version").value) } : {};
  const job = await runJob(state.service, (progress) => state.service.export_model({
    project_id: state.project.id, ...named, progress }),
  (info) => { $("export-status").textContent = info.stage || info.state; });
  if (job.state !== "done") throw new Error(`the export job ${job.state}: ${job.error || ""}`);
  const answer = job.result;
  $("export-status").textContent = "fetching the package ...";
  // the package comes through the service (job_output), so the page works wherever the browser runs
  const got = await state.service.job_output({ job_id: job.id, name: "package" });
  const bytes = got instanceof Uint8Array ? got : new Uint8Array(got);
  const link = $("download");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([bytes], { type: "application/zip" }));
  link.download = `${fileStem(state.project.name)}-v${answer.version}.zip`;
  link.textContent = `Download ${link.download} (${(answer.size / 1e6).toFixed(2)} MB)`;
  link.hidden = false;
  $("export-status").textContent = `model version ${answer.version} exported as a bioimage.io package (tested):`;
}));

restoreConnectionFields();
showTool();
closePatch();
