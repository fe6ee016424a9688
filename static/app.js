// The page's behaviour: pick or drop a file, preview it, send it to POST /api/predict,
// then show the verdict, the P(fake) bar, the per-frame chart (videos) and the heatmaps.
// Plain browser APIs only (fetch, FormData, SVG): nothing to install, works offline.
"use strict";
const $ = (id) => document.getElementById(id);
const app = $("app");
const LIMIT_MB = { image: +app.dataset.maxImageMb, video: +app.dataset.maxVideoMb };
let chosen = null; // the File to analyze

function sizeText(bytes) { return bytes < 2 ** 20 ? `${Math.ceil(bytes / 1024)} KB` : `${(bytes / 2 ** 20).toFixed(1)} MB`; }
function show(id, on) { $(id).hidden = !on; }
function showError(text) { $("error").textContent = text; show("error", !!text); }

function choose(file) {
  chosen = file;
  showError("");
  show("result", false);
  const preview = $("preview");
  preview.replaceChildren();
  if (!file) { $("analyze").disabled = true; show("preview", false); return; }
  const kind = file.type.startsWith("video/") ? "video" : "image";
  const media = document.createElement(kind === "video" ? "video" : "img");
  media.src = URL.createObjectURL(file); // a local preview: nothing is uploaded yet
  if (kind === "video") { media.controls = true; media.muted = true; }
  media.alt = "preview of the chosen file";
  const caption = document.createElement("span");
  caption.className = "muted";
  caption.textContent = `${file.name} (${sizeText(file.size)})`;
  media.onerror = () => { // e.g. a codec this browser lacks, or not media at all: the server decides
    media.remove();
    caption.textContent += ", no preview in this browser";
  };
  preview.append(media, caption);
  show("preview", true);
  // a friendly early warning; the server checks the real limit from the file's content
  const limit = Math.max(LIMIT_MB.image, LIMIT_MB.video);
  const tooBig = file.size > limit * 2 ** 20;
  if (tooBig) showError(`${file.name} is ${sizeText(file.size)}: over the ${limit} MB upload limit.`);
  $("analyze").disabled = tooBig;
}

// choosing a file: the <label> opens the picker; dropping works on the same zone
$("file").addEventListener("change", (e) => choose(e.target.files[0]));
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
drop.addEventListener("drop", (e) => { e.preventDefault(); if (e.dataTransfer.files.length) choose(e.dataTransfer.files[0]); });

$("analyze").addEventListener("click", async () => {
  const button = $("analyze");
  button.disabled = true;
  button.classList.add("busy");
  button.querySelector(".label").textContent = "Analyzing…";
  showError("");
  show("result", false);
  try {
    const form = new FormData();
    form.append("file", chosen);
    const response = await fetch("/api/predict", { method: "POST", body: form });
    const answer = await response.json().catch(() => ({ error: `server answered ${response.status} ${response.statusText}` }));
    if (!response.ok) throw new Error(answer.error || `server answered ${response.status}`);
    render(answer);
  } catch (err) {
    // a TypeError from fetch means no answer at all (server stopped, connection cut)
    showError(err instanceof TypeError ? `Upload failed: ${err.message}. Is the server still running?` : err.message);
  } finally {
    button.classList.remove("busy");
    button.querySelector(".label").textContent = "Analyze";
    button.disabled = !chosen;
  }
});

function render(a) {
  const verdict = $("verdict");
  const noFace = a.fake_probability === null;
  verdict.textContent = a.label;
  verdict.className = "verdict " + (noFace ? "unsure" : a.label);
  const where = a.kind === "video" ? ` in ${a.frames} sampled frames` : "";
  $("summary").textContent = noFace ? a.name
    : `P(fake) ${a.fake_probability.toFixed(3)} (threshold ${a.threshold.toFixed(2)}), ${a.faces} face(s)${where}, ${a.seconds} s`;
  $("validated").textContent = a.validated_on || "";
  const note = [a.message, a.warning && `Note: ${a.warning}`].filter(Boolean).join(" ");
  $("message").textContent = note;
  show("message", !!note);

  show("meter", !noFace);
  if (!noFace) {
    $("bar-fill").style.width = `${(100 * a.fake_probability).toFixed(1)}%`;
    $("bar-threshold").style.left = `${(100 * a.threshold).toFixed(1)}%`;
    $("bar").setAttribute("aria-label", `P(fake) ${a.fake_probability.toFixed(3)}, threshold ${a.threshold.toFixed(2)}`);
  }

  const faces = $("faces");
  faces.replaceChildren(...a.images.map((img) => faceCard(img, a.kind)));
  show("faces-title", a.images.length > 0);
  show("faces-help", a.images.length > 0);
  if (a.images_total > a.images.length) {
    $("faces-help").textContent = `Red areas pushed the model towards "fake". Showing ${a.images.length} of ${a.images_total} faces, spread over the video.`;
  }
  show("result", true);
  lastVideo = a.kind === "video" && a.rows.length > 0 ? a : null;
  show("chart-box", !!lastVideo);
  if (lastVideo) drawChart(lastVideo.rows, lastVideo.threshold); // once visible: it is drawn at its pixel width
  $("result").scrollIntoView({ behavior: "smooth", block: "start" });
}

function faceCard(img, kind) {
  const figure = document.createElement("figure");
  figure.className = "face";
  figure.innerHTML = `<div class="pair"><img class="crop" alt="face crop"><img class="gradcam" alt="Grad-CAM heatmap"></div><figcaption></figcaption>`;
  figure.querySelector(".crop").src = img.crop;
  if (img.gradcam) figure.querySelector(".gradcam").src = img.gradcam;
  else figure.querySelector(".gradcam").replaceWith("no heatmap for this model");
  figure.querySelector("figcaption").textContent =
    `${kind === "video" ? `frame ${img.frame}, ` : ""}face ${img.face}: P(fake) ${img.fake_probability.toFixed(3)}`;
  return figure;
}

// per-frame scores as an inline SVG: one dot per face, a dashed line at the threshold.
// Drawn in screen pixels (viewBox = its width) so the labels keep their size on any screen.
let lastVideo = null;
window.addEventListener("resize", () => { if (lastVideo) drawChart(lastVideo.rows, lastVideo.threshold); });
function drawChart(rows, threshold) {
  const W = Math.max(200, $("chart").clientWidth), H = 140, pad = 16;
  $("chart").setAttribute("viewBox", `0 0 ${W} ${H}`);
  const frames = rows.map((r) => r.frame);
  const lo = Math.min(...frames), hi = Math.max(...frames);
  const x = (f) => pad + (hi > lo ? (f - lo) / (hi - lo) : 0.5) * (W - 2 * pad);
  const y = (p) => H - pad - p * (H - 2 * pad);
  const dots = rows.map((r) => `<circle cx="${x(r.frame).toFixed(1)}" cy="${y(r.fake_probability).toFixed(1)}" r="3"
      class="${r.fake_probability >= threshold ? "dot-fake" : "dot-real"}"><title>frame ${r.frame}, face ${r.face}: ${r.fake_probability.toFixed(3)}</title></circle>`);
  $("chart").innerHTML = `
    <line x1="${pad}" x2="${W - pad}" y1="${y(threshold)}" y2="${y(threshold)}" stroke="#1f2328" stroke-dasharray="4 3"/>
    <text x="${W - pad}" y="${y(threshold) - 3}" font-size="11" text-anchor="end">threshold ${threshold.toFixed(2)}</text>
    <text x="3" y="${y(1) + 4}" font-size="11">1</text><text x="3" y="${y(0) + 4}" font-size="11">0</text>
    <text x="${pad}" y="${H - 2}" font-size="11">frame ${lo}</text>
    <text x="${W - pad}" y="${H - 2}" font-size="11" text-anchor="end">frame ${hi}</text>
    ${dots.join("")}`;
  $("rows").innerHTML = rows.map((r) => `<tr><td>${r.frame}</td><td>${r.face}</td><td>${r.fake_probability.toFixed(3)}</td></tr>`).join("");
}
