// The review app's viewer: one case at a time in NiiVue (CT in a soft-tissue window, the mask as
// NiiVue's drawing layer), its numbers beside it, keys to decide, draw and move on.
// Everything from the server or the reviewer reaches the page through textContent, never as markup.
import { Niivue, NVImage, SLICE_TYPE, SHOW_RENDER } from "/static/niivue.js";

const $ = (id) => document.getElementById(id);
const PEN = { navigate: null, paint: [1, false], erase: [0, false], fill: [1, true] };
const ZOOM_STEP = 1.15;
const PEN_SIZES = [1, 3, 5, 9, 15];
const DRAW_OPACITY = 0.45;

// ``?timing`` in the URL: wait for the GPU after each step of a load and keep the times (benchmarks/bench_review.py).
const state = { case: null, info: null, view: "roi", dirty: false, armed: null, busy: false, tool: "navigate",
                prefetch: null, loadedMs: null, laps: {}, timing: new URLSearchParams(location.search).has("timing") };
const nv = new Niivue({
  backColor: [0, 0, 0, 1], dragAndDropEnabled: false, isColorbar: false, logLevel: "warn",
  sliceType: SLICE_TYPE.MULTIPLANAR, multiplanarShowRender: SHOW_RENDER.ALWAYS, show3Dcrosshair: true,
  clipPlaneHotKey: "NoKey", viewModeHotKey: "NoKey", cycleClipPlaneHotKey: "NoKey", isNearestInterpolation: true,
  penSize: 1, crosshairColor: [0.1, 0.8, 1, 0.9], crosshairWidth: 0.2, crosshairGap: 6,
  isRadiologicalConvention: true,  // the patient's left on the screen's right, as a radiologist reads
});
window.reviewViewer = { nv, state, sync };

function message(text, kind) {
  const node = $("message");
  node.textContent = text;
  node.className = kind || "";
}

function sync() {
  // Wait for the GPU to finish what it was given (tests and the benchmark time the case by it).
  const gl = nv.gl;
  gl.bindFramebuffer(gl.FRAMEBUFFER, null);
  gl.readPixels(0, 0, 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, new Uint8Array(4));
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.arrayBuffer();
  if (!response.ok) {
    const error = new Error(body && body.error ? body.error : `${response.status} ${response.statusText}`);
    error.status = response.status;
    error.body = body;
    throw error;
  }
  return body;
}

function caseUrl(id) { return `/api/cases/${encodeURIComponent(id)}`; }
function viewUrl(id, view) { return `${caseUrl(id)}/${view}`; }

function fetchView(id, view) {
  return Promise.all([api(`${viewUrl(id, view)}/ct.nii.gz`), api(`${viewUrl(id, view)}/mask.nii.gz`)]);
}

function row(table, label, value) {
  const tr = table.insertRow();
  tr.insertCell().textContent = label;
  const td = tr.insertCell();
  td.className = "num";
  td.textContent = value;
}

function fixed(value, digits) { return value === null || value === undefined ? "" : Number(value).toFixed(digits); }

function showInfo(info) {
  const report = info.report;
  $("case-id").textContent = info.case;
  $("position").textContent = info.position === null ? "not in the review order" :
    `${info.position + 1} of ${info.count}`;
  const verdict = $("verdict");
  const review = info.review;
  verdict.className = "verdict " + info.review_status;
  verdict.textContent = info.review_status ? `${info.review_status} (revision ${review.revision}` +
    (review.reviewer ? `, ${review.reviewer}` : "") + ")" : `not reviewed (revision ${review.revision})`;
  const body = $("numbers").tBodies[0];
  body.replaceChildren();
  row(body, "status", info.status);
  row(body, "volume (mL)", fixed(report.volume_ml, 1));
  row(body, "voxels", String(report.voxel_count));
  if (review.correction) {
    row(body, "corrected volume (mL)", fixed(review.correction.volume_ml, 1));
    row(body, "change (mL / voxels)", `${fixed(review.correction.change_ml, 1)} / ${review.correction.change_voxels}`);
    row(body, "Dice vs model", fixed(review.correction.dice_vs_model, 3));
  }
  if (report.extents_mm) {
    row(body, "extent L-R / A-P / S-I (mm)", ["left_right", "anterior_posterior", "superior_inferior"]
      .map((k) => fixed(report.extents_mm[k], 0)).join(" / "));
  }
  row(body, "HU mean (SD)", report.hu_mean === null ? "" : `${fixed(report.hu_mean, 0)} (${fixed(report.hu_std, 0)})`);
  row(body, "components (kept)", `${report.components_found} (${report.components_kept})`);
  if (report.quality) { row(body, "quality score", fixed(report.quality.score, 3)); }
  row(body, "voxel size (mm)", (report.spacing_mm || []).map((v) => fixed(v, 2)).join(" x "));
  const grid = info.views[state.view];
  row(body, "shown", `${grid.shape.join(" x ")} (${state.view}` +
    (grid.factors.some((f) => f > 1) ? `, blocks ${grid.factors.join("x")}` : ", every voxel") + ")");
  const flags = $("flags");
  flags.replaceChildren(...report.flags.map((f) => { const li = document.createElement("li"); li.textContent = f; return li; }));
  const warnings = $("warnings");
  warnings.replaceChildren(...report.warnings.map((w) => { const li = document.createElement("li"); li.textContent = w; return li; }));
  $("comment").value = review.comment || "";
  $("previous").disabled = !info.previous;
  $("next").disabled = !info.next;
  $("toggle-view").textContent = state.view === "roi" ? "whole volume " : "spleen only ";
  $("toggle-view").appendChild(document.createElement("kbd")).textContent = "w";
  document.title = `spleen-seg review: ${info.case}`;
}

async function loadCase(id, { push = true } = {}) {
  if (state.busy) { return; }
  state.busy = true;
  const started = performance.now();
  message(`loading ${id} ...`);
  document.body.dataset.loaded = "";
  try {
    const info = await api(caseUrl(id));
    const pending = state.prefetch && state.prefetch.id === id && state.prefetch.view === state.view ?
      state.prefetch.promise : fetchView(id, state.view);
    state.prefetch = null;
    const [ctBytes, maskBytes] = await pending;
    const laps = { attach: state.laps.attach };
    let last = performance.now();
    const lap = (name) => { const now = performance.now(); laps[name] = Math.round(now - last); last = now; };
    lap("fetch");
    const [lo, hi] = info.window_hu;
    const ct = await NVImage.loadFromUrl({ url: "ct.nii.gz", name: "ct.nii.gz", buffer: ctBytes, cal_min: lo, cal_max: hi });
    const mask = await NVImage.loadFromUrl({ url: "mask.nii.gz", name: "mask.nii.gz", buffer: maskBytes });
    lap("parse");
    if (nv.drawBitmap) { nv.closeDrawing(); }
    await nv.loadVolumes([]);
    nv.addVolume(ct);
    if (state.timing) { sync(); lap("volume"); }
    nv.loadDrawing(mask);
    nv.setDrawOpacity(DRAW_OPACITY);
    if (info.report.centroid_ras_mm) {  // the cross on the spleen (NiiVue's world is RAS+ mm, as the report's)
      nv.scene.crosshairPos = nv.mm2frac(info.report.centroid_ras_mm);
    }
    if (state.timing) { sync(); lap("drawing"); }
    state.laps = laps;
    setTool(state.tool);
    state.case = id;
    state.info = info;
    state.dirty = false;
    state.armed = null;
    showInfo(info);
    if (push) { history.replaceState(null, "", `/cases/${encodeURIComponent(id)}/`); }
    nv.drawScene();
    if (state.timing) { sync(); lap("draw"); }
    state.loadedMs = Math.round(performance.now() - started);
    message(`${id}: shown in ${(state.loadedMs / 1000).toFixed(1)} s`);
    document.body.dataset.loaded = id;
    if (info.next) { state.prefetch = { id: info.next, view: state.view, promise: fetchView(info.next, state.view) }; }
    if (state.prefetch) { state.prefetch.promise.catch(() => { state.prefetch = null; }); }
  } catch (error) {
    message(`${id}: ${error.message}`, "error");
    document.body.dataset.loaded = "error";
  } finally {
    state.busy = false;
  }
}

function setTool(tool) {
  state.tool = tool;
  const pen = PEN[tool];
  nv.setDrawingEnabled(pen !== null);
  if (pen) { nv.setPenValue(pen[0], pen[1]); }
  document.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("active", b.dataset.tool === tool));
}

function setSlice(type) {
  nv.setSliceType(type);
  document.querySelectorAll("[data-slice]").forEach((b) => b.classList.toggle("active", Number(b.dataset.slice) === type));
}

function zoom(factor) {
  const pan = nv.scene.pan2Dxyzmm;
  nv.setPan2Dxyzmm([pan[0], pan[1], pan[2], factor === null ? 1 : Math.min(20, Math.max(0.5, pan[3] * factor))]);
}

function penSize(step) {
  const at = PEN_SIZES.indexOf(nv.opts.penSize);
  nv.opts.penSize = PEN_SIZES[Math.min(PEN_SIZES.length - 1, Math.max(0, (at < 0 ? 0 : at) + step))];
  message(`pen size ${nv.opts.penSize} voxels`);
}

function guardDirty(action) {
  // An unsaved drawing is dropped only on the second press of the same key.
  if (!state.dirty || state.armed === action) { return true; }
  state.armed = action;
  message("the drawing is not saved: s saves it; press the same key again to drop it", "dirty");
  return false;
}

async function go(direction) {
  const id = state.info && state.info[direction];
  if (!id || !guardDirty(direction)) { return; }
  await loadCase(id);
}

async function decide(decision) {
  if (!state.info || state.busy || !guardDirty(decision)) { return; }
  state.busy = true;
  try {
    const answer = await api(`${caseUrl(state.case)}/decision`, {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ decision, comment: $("comment").value, revision: state.info.review.revision }),
    });
    state.info.review = answer.review;
    state.info.review_status = answer.review_status;
    showInfo(state.info);
    message(`${state.case}: ${decision} (revision ${answer.review.revision})`);
  } catch (error) {
    message(`${state.case}: not recorded: ${error.message}`, "error");
    return;
  } finally {
    state.busy = false;
  }
  state.dirty = false;
  if (state.info.next) { await loadCase(state.info.next); }
}

async function gzip(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream("gzip"));
  return new Response(stream).arrayBuffer();
}

async function save() {
  if (!state.info || state.busy) { return; }
  state.busy = true;
  message(`${state.case}: saving ...`);
  try {
    const drawing = await nv.saveImage({ filename: "", isSaveDrawing: true, volumeByIndex: 0 });
    const answer = await api(`${viewUrl(state.case, state.view)}/mask?revision=${state.info.review.revision}`, {
      method: "PUT", headers: { "content-type": "application/gzip" }, body: await gzip(drawing),
    });
    state.info.review = answer.review;
    state.info.review_status = answer.review_status;
    state.dirty = false;
    showInfo(state.info);
    const c = answer.review.correction;
    message(`${state.case}: correction saved (revision ${answer.review.revision}, ${c.change_voxels} voxels, ` +
            `Dice vs model ${c.dice_vs_model.toFixed(3)})`);
  } catch (error) {
    const hint = error.status === 409 ? " (reload the case: l)" : "";
    message(`${state.case}: not saved: ${error.message}${hint}`, "error");
  } finally {
    state.busy = false;
  }
}

async function toggleView() {
  if (!state.info || !guardDirty("w")) { return; }
  state.view = state.view === "roi" ? "full" : "roi";
  await loadCase(state.case, { push: false });
}

const KEYS = {
  n: () => go("next"), p: () => go("previous"), a: () => decide("accepted"), r: () => decide("rejected"),
  d: () => setTool("paint"), e: () => setTool("erase"), f: () => setTool("fill"), Escape: () => setTool("navigate"),
  u: () => { nv.drawUndo(); }, s: () => save(), w: () => toggleView(), l: () => state.case && loadCase(state.case),
  1: () => setSlice(SLICE_TYPE.AXIAL), 2: () => setSlice(SLICE_TYPE.CORONAL), 3: () => setSlice(SLICE_TYPE.SAGITTAL),
  4: () => setSlice(SLICE_TYPE.RENDER), 5: () => setSlice(SLICE_TYPE.MULTIPLANAR),
  "+": () => zoom(ZOOM_STEP), "=": () => zoom(ZOOM_STEP), "-": () => zoom(1 / ZOOM_STEP), 0: () => zoom(null),
  "[": () => penSize(-1), "]": () => penSize(1),
};

document.addEventListener("keydown", (event) => {
  const typing = event.target instanceof HTMLTextAreaElement || event.target instanceof HTMLInputElement;
  if (typing) {
    if (event.key === "Escape") { event.target.blur(); }
    return;
  }
  if (event.ctrlKey && event.key === "z") { nv.drawUndo(); event.preventDefault(); return; }
  if (event.ctrlKey || event.metaKey || event.altKey || !Object.prototype.hasOwnProperty.call(KEYS, event.key)) { return; }
  event.preventDefault();
  KEYS[event.key]();
});

function wire() {
  $("accept").addEventListener("click", () => decide("accepted"));
  $("reject").addEventListener("click", () => decide("rejected"));
  $("previous").addEventListener("click", () => go("previous"));
  $("next").addEventListener("click", () => go("next"));
  $("undo").addEventListener("click", () => nv.drawUndo());
  $("save").addEventListener("click", () => save());
  $("toggle-view").addEventListener("click", () => toggleView());
  document.querySelectorAll("[data-tool]").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
  document.querySelectorAll("[data-slice]").forEach((b) => b.addEventListener("click", () => setSlice(Number(b.dataset.slice))));
  const canvas = $("gl");
  // Ctrl + wheel zooms (NiiVue zooms with the wheel only in its pan mode, where the wheel no longer scrolls).
  canvas.addEventListener("wheel", (event) => {
    if (!event.ctrlKey) { return; }
    event.preventDefault();
    event.stopImmediatePropagation();
    zoom(event.deltaY < 0 ? ZOOM_STEP : 1 / ZOOM_STEP);
  }, { capture: true, passive: false });
  nv.onDrawingChanged = (action) => {
    if (action !== "load") {
      state.dirty = true;
      state.armed = null;
      message(`${state.case}: drawing changed, not saved yet (s saves, u undoes)`, "dirty");
    }
  };
}

async function start() {
  wire();
  const started = performance.now();
  await nv.attachTo("gl");
  if (state.timing) { sync(); }
  state.laps.attach = Math.round(performance.now() - started);
  const id = decodeURIComponent(location.pathname.split("/")[2] || "");
  setSlice(SLICE_TYPE.MULTIPLANAR);
  await loadCase(id, { push: false });
}

start();
