// latentwire web page: plain JavaScript over the gateway's /ui/api endpoints (services/gateway/web.py).
"use strict";

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- helpers

async function api(path, options = {}) {
  const init = { headers: {}, ...options };
  if (init.body !== undefined && typeof init.body !== "string") {
    init.body = JSON.stringify(init.body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch (e) { data = { detail: text }; }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

class ApiError extends Error {
  constructor(status, data) {
    super(describeError(data));
    this.status = status;
    this.reason = data && data.reason;
  }
}

function describeError(data) {
  if (!data) return "request failed";
  if (Array.isArray(data.detail)) {  // FastAPI's 422: field errors
    return data.detail.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
  }
  const reason = data.reason ? ` (${data.reason})` : "";
  return `${data.detail || data.message || data.error || "request failed"}${reason}`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the image could not be read"));
    image.src = src;
  });
}

function numberOr(id, fallback) {
  const value = $(id).value.trim();
  return value === "" ? fallback : Number(value);
}

// ---------------------------------------------------------------- tabs

function selectTab(name) {
  for (const tab of ["generate", "gallery", "classify"]) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`panel-${tab}`).hidden = tab !== name;
  }
  if (name === "gallery") loadGallery(true);
}

// ---------------------------------------------------------------- options

let samplers = [];
let scheduleTypes = [];

async function loadOptions() {
  const options = await api("/ui/api/options");
  samplers = options.samplers;
  scheduleTypes = options.schedule_types;
  const sampler = $("sampler");
  for (const s of samplers) sampler.add(new Option(s.name, s.name));
  const models = $("model-list");
  for (const name of options.models) models.append(new Option(name, name));
  $("model").value = options.current_model || "";
  for (const name of options.controlnet_models) $("controlnet-model-list").append(new Option(name, name));
  updateScheduleTypes();
}

function updateScheduleTypes() {
  const select = $("schedule-type");
  const current = select.value;
  const sampler = samplers.find((s) => s.name === $("sampler").value);
  select.replaceChildren(new Option("Automatic", ""));
  for (const name of sampler ? sampler.schedule_types : []) {
    if (name !== "Automatic") select.add(new Option(name, name));
  }
  select.disabled = !sampler;
  if ([...select.options].some((o) => o.value === current)) select.value = current;
}

// ---------------------------------------------------------------- mask canvas

const mask = { drawing: false, painted: false, last: null };

async function showInitImage(file) {
  const canvasStack = $("canvas-stack");
  if (!file) { canvasStack.hidden = true; mask.painted = false; return; }
  const image = await loadImage(await readFile(file));
  for (const id of ["image-canvas", "mask-canvas"]) {
    $(id).width = image.naturalWidth;
    $(id).height = image.naturalHeight;
  }
  $("image-canvas").getContext("2d").drawImage(image, 0, 0);
  clearMask();
  canvasStack.hidden = false;
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  mask.painted = false;
}

function canvasPoint(event) {
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  return { x: (event.clientX - box.left) * canvas.width / box.width,
           y: (event.clientY - box.top) * canvas.height / box.height };
}

function paint(from, to) {
  const canvas = $("mask-canvas");
  const context = canvas.getContext("2d");
  const scale = canvas.width / canvas.getBoundingClientRect().width;
  context.strokeStyle = "#fff";
  context.fillStyle = "#fff";
  context.lineCap = "round";
  context.lineJoin = "round";
  context.lineWidth = Number($("brush-size").value) * scale;
  context.beginPath();
  context.moveTo(from.x, from.y);
  context.lineTo(to.x, to.y);
  context.stroke();
  mask.painted = true;
}

function setUpMaskCanvas() {
  const canvas = $("mask-canvas");
  canvas.addEventListener("pointerdown", (event) => {
    mask.drawing = true;
    canvas.setPointerCapture(event.pointerId);
    mask.last = canvasPoint(event);
    paint(mask.last, mask.last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!mask.drawing) return;
    const point = canvasPoint(event);
    paint(mask.last, point);
    mask.last = point;
  });
  for (const kind of ["pointerup", "pointercancel"]) {
    canvas.addEventListener(kind, () => { mask.drawing = false; });
  }
  $("clear-mask").addEventListener("click", clearMask);
}

// The mask as the suite takes it: the source image's size, black background, white where repainted.
function maskDataUrl() {
  const source = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = source.width;
  out.height = source.height;
  const context = out.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, out.width, out.height);
  context.drawImage(source, 0, 0);
  return out.toDataURL("image/png");
}

// ---------------------------------------------------------------- generate

let currentJob = null;
let events = null;

async function formBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    model: $("model").value.trim(),
    sampler: $("sampler").value,
    schedule_type: $("schedule-type").value,
    steps: numberOr("steps", 20),
    cfg_scale: numberOr("cfg-scale", 7),
    seed: numberOr("seed", -1),
    width: numberOr("width", 0),
    height: numberOr("height", 0),
    batch_size: numberOr("batch-size", 1),
  };
  const initFile = $("init-image").files[0];
  if (initFile) {
    body.init_image = await readFile(initFile);
    if (mask.painted) body.mask = maskDataUrl();
    const strength = numberOr("strength", null);
    if (strength !== null) body.strength = strength;
  }
  if ($("controlnet-enabled").checked) {
    const controlFile = $("controlnet-image").files[0];
    if (!controlFile) throw new Error("ControlNet: choose a control image, or untick the unit");
    body.controlnet = {
      image: await readFile(controlFile),
      model: $("controlnet-model").value.trim(),
      preprocessor: $("controlnet-preprocessor").value.trim() || "none",
      weight: numberOr("controlnet-weight", 1),
    };
  }
  return body;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
}

function setProgress(step, total) {
  $("progress").max = Math.max(total, 1);
  $("progress").value = step;
  $("progress-text").textContent = `${step} / ${total}`;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  if (!$("prompt").value.trim()) { showError("Prompt: write what the image should show"); return; }
  setRunning(true);
  $("cancel").disabled = true;  // until the job is accepted
  setProgress(0, numberOr("steps", 20));
  $("status").textContent = "Submitting";
  $("results").replaceChildren();
  $("result-info").textContent = "";
  $("preview-figure").hidden = true;
  try {
    // The answer is the job's event stream (server-sent events over this POST), read as it arrives.
    const response = await fetch("/ui/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(await formBody()),
    });
    if (!response.ok) {
      const text = await response.text();
      let data = {};
      try { data = JSON.parse(text); } catch (e) { data = { detail: text }; }
      throw new ApiError(response.status, data);
    }
    await readEvents(response.body, handleEvent);
  } catch (error) {
    showError(error.message);
    $("status").textContent = "Failed";
  } finally {
    finish();
  }
}

// Server-sent events from a fetch body: blocks of "event: KIND" and "data: JSON" lines, a blank line after each.
async function readEvents(body, handler) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      handler(kind, data ? JSON.parse(data) : {});
    }
  }
}

// One event of a job, from the generate stream or the re-attach stream (EventSource).
function handleEvent(kind, d) {
  if (kind === "accepted") {
    currentJob = d.job_id;
    $("cancel").disabled = false;
    $("status").textContent = `Job ${d.job_id} accepted (seed ${d.seed})`;
  } else if (kind === "queued") {
    $("status").textContent = `Queued: position ${d.position} of ${d.queue_length}`;
  } else if (kind === "stage") {
    $("status").textContent = d.text;
  } else if (kind === "progress") {
    setProgress(d.step, d.total);
    $("status").textContent = `Sampling: step ${d.step} of ${d.total}`;
    if (d.preview) {
      $("preview").src = d.preview;
      $("preview-figure").hidden = false;
    }
  } else if (kind === "result") {
    const images = d.images.map((url, i) => {
      const image = new Image();
      image.src = url;
      image.alt = `Generated image ${i + 1} (seed ${d.seed})`;
      image.className = "result-image";
      return image;
    });
    $("results").replaceChildren(...images);
    $("result-info").textContent = d.parameters;
    $("status").textContent = `Done in ${d.total_seconds.toFixed(1)} s (seed ${d.seed})`;
  } else if (kind === "failure") {
    if (d.code === "CANCELLED") {
      $("status").textContent = "Cancelled";
    } else {
      showError(`${d.message} (${d.reason})`);
      $("status").textContent = "Failed";
    }
  } else if (kind === "end") {
    finish();
  }
}

// Follow a job that is already running (from the gallery), with the re-attach stream.
function follow(jobId) {
  if (events) events.close();
  selectTab("generate");
  showError("");
  setRunning(true);
  $("results").replaceChildren();
  events = new EventSource(`/ui/api/jobs/${encodeURIComponent(jobId)}/events`);
  for (const kind of ["accepted", "queued", "stage", "progress", "result", "failure", "end"]) {
    events.addEventListener(kind, (e) => handleEvent(kind, JSON.parse(e.data)));
  }
  // A transport error: stop instead of letting EventSource reconnect.
  events.onerror = () => { if (events && events.readyState !== EventSource.OPEN) finish(); };
}

function finish() {
  if (events) { events.close(); events = null; }
  currentJob = null;
  setRunning(false);
}

async function cancel() {
  if (!currentJob) return;
  $("cancel").disabled = true;
  $("status").textContent = "Cancelling";
  try {
    const job = await api(`/ui/api/jobs/${encodeURIComponent(currentJob)}/cancel`, { method: "POST" });
    $("status").textContent = job.state === "cancelled" ? "Cancelled" : `Job ${job.state}`;
  } catch (error) {
    showError(error.message);
  }
}

// ---------------------------------------------------------------- gallery

let galleryToken = "";

async function loadGallery(fresh) {
  if (fresh) { galleryToken = ""; $("gallery").replaceChildren(); }
  try {
    const page = await api(`/ui/api/jobs?page_token=${encodeURIComponent(galleryToken)}`);
    for (const job of page.jobs) $("gallery").append(galleryItem(job));
    galleryToken = page.next_page_token;
    $("gallery-more").hidden = !galleryToken;
  } catch (error) {
    showError(error.message);
  }
}

function galleryItem(job) {
  const figure = document.createElement("figure");
  figure.className = "gallery-item";
  figure.dataset.jobId = job.job_id;
  figure.dataset.state = job.state;
  const button = document.createElement("button");
  button.type = "button";
  button.setAttribute("aria-label", `Job ${job.job_id}: ${job.prompt}`);
  if (job.thumbnail) {
    const image = new Image();
    image.src = job.thumbnail;
    image.alt = job.prompt;
    image.loading = "lazy";
    button.append(image);
  }
  const caption = document.createElement("figcaption");
  caption.textContent = `${job.prompt} · ${job.state} · seed ${job.seed}`;
  button.append(caption);
  const running = job.state === "queued" || job.state === "running";
  button.addEventListener("click", () => (running ? follow(job.job_id) : showJob(job.job_id)));
  figure.append(button);
  return figure;
}

async function showJob(jobId) {
  try {
    const job = await api(`/ui/api/jobs/${encodeURIComponent(jobId)}`);
    $("gallery-job-id").textContent = job.job_id;
    $("gallery-images").replaceChildren(...job.images.map((url, i) => {
      const image = new Image();
      image.src = url;
      image.alt = `Image ${i + 1} of job ${job.job_id}`;
      return image;
    }));
    const lines = [`Prompt: ${job.prompt}`, `State: ${job.state}`, `Model: ${job.model || "default"}`, `Seed: ${job.seed}`];
    if (job.error) lines.push(`Error: ${job.error.message} (${job.error.reason})`);
    if (job.parameters) lines.push("", job.parameters);
    $("gallery-parameters").textContent = lines.join("\n");
    $("gallery-detail").hidden = false;
  } catch (error) {
    showError(error.message);
  }
}

// ---------------------------------------------------------------- classify

async function classifyFile(file) {
  if (!file) return;
  $("classify-results").replaceChildren();
  try {
    const image = await readFile(file);
    $("classify-image").src = image;
    $("classify-image").hidden = false;
    const answer = await api("/ui/api/classify", { method: "POST", body: { image } });
    $("classify-results").replaceChildren(...answer.classes.map((c) => {
      const item = document.createElement("li");
      item.textContent = `${c.label}: ${(c.score * 100).toFixed(1)}%`;
      item.dataset.score = c.score;
      return item;
    }));
    $("classify-model").textContent = `Model: ${answer.model}`;
  } catch (error) {
    showError(error.message);
  }
}

function setUpClassify() {
  const drop = $("classify-drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("dragging"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("dragging");
    classifyFile(e.dataTransfer.files[0]);
  });
  $("classify-file").addEventListener("change", (e) => classifyFile(e.target.files[0]));
}

// ---------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of ["generate", "gallery", "classify"]) {
    $(`tab-${tab}`).addEventListener("click", () => selectTab(tab));
  }
  $("generate-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("sampler").addEventListener("change", updateScheduleTypes);
  $("init-image").addEventListener("change", (e) => showInitImage(e.target.files[0]).catch((err) => showError(err.message)));
  $("gallery-refresh").addEventListener("click", () => loadGallery(true));
  $("gallery-more").addEventListener("click", () => loadGallery(false));
  setUpMaskCanvas();
  setUpClassify();
  loadOptions().then(() => { document.body.dataset.ready = "true"; })
    .catch((error) => showError(`Options: ${error.message}`));
});
