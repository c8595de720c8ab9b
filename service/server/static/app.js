// dapo-inspect operator page: plain JS, no build step, no third-party code.
// Talks to the public API only (v1/model, detect, v1/feedback); every URL is relative to the page.
"use strict";

(function () {
  const KEY_STORAGE = "dapo.apiKey";
  const $ = (id) => document.getElementById(id);
  const els = {
    body: document.body, modelInfo: $("model-info"), product: $("product"), apiKey: $("api-key"),
    saveKey: $("save-key"), inspect: $("inspect"), status: $("status"), error: $("error"),
    errorCode: $("error-code"), errorMessage: $("error-message"), errorRequest: $("error-request"),
    drop: $("drop"), file: $("file"), fileName: $("file-name"), result: $("result"), verdict: $("verdict"),
    overlay: $("overlay"), boxes: $("boxes"), showBoxes: $("show-boxes"), heatmap: $("heatmap"), mask: $("mask"),
    defects: $("defects").tBodies[0], defectsEmpty: $("defects-empty"),
    regions: $("regions").tBodies[0], regionsEmpty: $("regions-empty"), timing: $("timing"),
    feedback: $("feedback"), fbCorrect: $("fb-correct"), fbWrong: $("fb-wrong"), fbType: $("fb-type"),
    fbDefect: $("fb-defect"), fbStatus: $("fb-status"),
  };
  let currentFile = null;
  let lastResult = null;
  let model = null; // the /v1/model answer: defect types per product for the feedback buttons
  let sequence = 0; // only the latest request's answer is shown

  // ---- helpers -----------------------------------------------------------------------
  const fmt = (x, digits = 3) => (typeof x === "number" && isFinite(x) ? x.toFixed(digits) : String(x));

  function setState(state, text) {
    els.body.dataset.state = state;
    els.status.textContent = text || "";
  }

  function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

  function headers() {
    const h = {};
    const key = apiKey();
    if (key) h["X-API-Key"] = key;
    return h;
  }

  function showError(code, message, requestId) {
    els.errorCode.textContent = code;
    els.errorMessage.textContent = message;
    els.errorRequest.textContent = requestId ? "request id: " + requestId : "";
    els.error.hidden = false;
  }

  function clearError() { els.error.hidden = true; }

  // The API's error envelope {"error": {code, message, request_id}}, or something readable
  // when the answer is not ours (a proxy's HTML page, a network failure).
  async function apiError(response) {
    let code = "http_" + response.status, message = response.statusText || "request failed", rid = "";
    try {
      const body = await response.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
        rid = body.error.request_id || "";
      }
    } catch (_) { /* not JSON */ }
    rid = rid || response.headers.get("X-Request-ID") || "";
    return { code: response.status + " " + code, message, rid };
  }

  // A stable colour per defect type name (hue from a string hash).
  function colour(name) {
    let h = 0;
    for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
    return "hsl(" + (h % 360) + ", 90%, 55%)";
  }

  function cell(row, text, cls) {
    const td = row.insertCell();
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  // ---- model info and products ---------------------------------------------------------
  async function loadModel() {
    setState("loading-model", "loading model…");
    let response;
    try {
      response = await fetch("v1/model", { headers: headers() });
    } catch (e) {
      showError("network_error", "cannot reach the service: " + e.message, "");
      setState("error", "");
      return;
    }
    if (!response.ok) {
      const err = await apiError(response);
      showError(err.code, err.message + (response.status === 401 ? " — enter the API key above" : ""), err.rid);
      els.modelInfo.textContent = "model unavailable";
      setState("error", "");
      return;
    }
    const m = await response.json();
    model = m;
    clearError();
    els.modelInfo.textContent = m.name + " " + m.version + " · " + m.backbone + " · " +
      m.backend.name + " (" + m.backend.provider + ") · threshold " + fmt(m.image_threshold);
    const selected = els.product.value;
    els.product.replaceChildren(new Option("any", ""));
    for (const name of Object.keys(m.products || {}).sort()) {
      const p = m.products[name];
      const opt = new Option(name, name);
      opt.title = "types: " + p.defect_types.join(", ") + "; threshold " + fmt(p.image_threshold);
      els.product.add(opt);
    }
    if ([...els.product.options].some((o) => o.value === selected)) els.product.value = selected;
    els.product.dataset.loaded = "true";
    setState("idle", "");
  }

  // ---- detection ---------------------------------------------------------------------------
  async function inspect() {
    if (!currentFile) return;
    const mine = ++sequence;
    clearError();
    setState("loading", "inspecting " + currentFile.name + "…");
    els.inspect.disabled = true;
    const form = new FormData();
    form.append("image", currentFile, currentFile.name);
    if (els.product.value) form.append("product", els.product.value);
    let response;
    try {
      response = await fetch("detect?overlay=true&heatmap=true&mask_format=png",
                             { method: "POST", body: form, headers: headers() });
    } catch (e) {
      if (mine !== sequence) return;
      showError("network_error", "cannot reach the service: " + e.message, "");
      setState("error", "");
      els.inspect.disabled = false;
      return;
    }
    if (mine !== sequence) return;
    els.inspect.disabled = false;
    if (!response.ok) {
      const err = await apiError(response);
      if (mine !== sequence) return;
      showError(err.code, err.message, err.rid);
      els.result.hidden = true;
      setState("error", "");
      return;
    }
    const body = await response.json();
    if (mine !== sequence) return;
    render(body.results[0], body.request_id, body.answer_id);
  }

  function render(r, requestId, answerId) {
    lastResult = r;
    els.result.hidden = false;
    els.result.dataset.requestId = requestId || "";
    els.result.dataset.answerId = answerId || "";  // the verdict names the answer (unique), not the request

    const bad = !!r.is_anomalous;
    els.verdict.className = "verdict " + (bad ? "bad" : "ok");
    els.verdict.dataset.anomalous = String(bad);
    els.verdict.textContent = (bad ? "ANOMALOUS" : "OK") + " — score " + fmt(r.anomaly_score) +
      (bad ? " ≥ " : " < ") + "threshold " + fmt(r.threshold);

    const rows = els.defects;
    rows.replaceChildren();
    for (const d of r.defect_types) {
      const row = rows.insertRow();
      row.dataset.name = d.name;
      const td = cell(row, "");
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = colour(d.name);
      td.append(sw, document.createTextNode(d.name));
      cell(row, fmt(d.score));
      cell(row, fmt(d.area_fraction, 4));
      cell(row, fmt(d.max_pixel_score));
    }
    els.defectsEmpty.hidden = r.defect_types.length > 0;

    const regions = els.regions;
    regions.replaceChildren();
    r.regions.forEach((g, i) => {
      const row = regions.insertRow();
      row.dataset.type = g.defect_type;
      cell(row, String(i + 1));
      cell(row, g.defect_type);
      cell(row, "[" + g.bbox.join(", ") + "]");
      cell(row, String(g.area_px));
      cell(row, fmt(g.score));
    });
    els.regionsEmpty.hidden = r.regions.length > 0;

    resetFeedback(r);
    setImage(els.heatmap, r.heatmap_png);
    setImage(els.mask, r.mask && r.mask.png);
    const t = r.timing_ms || {};
    els.timing.textContent = "request " + (requestId || "") + " · " + r.width + "×" + r.height + " px · " +
      Object.keys(t).map((k) => k + " " + fmt(t[k], 1) + " ms").join(" · ");

    // The canvas has the image's own pixel size and is scaled with it by CSS, so boxes are
    // drawn in original image coordinates. Draw once the overlay has decoded.
    els.overlay.onload = () => { drawBoxes(); setState("done", ""); };
    els.overlay.onerror = () => { showError("render_error", "the overlay image could not be decoded", requestId); setState("error", ""); };
    els.overlay.src = "data:image/png;base64," + r.overlay_png;
  }

  // ---- operator feedback ------------------------------------------------------------------
  // Three buttons under the result: Correct; Wrong call (a false positive when the answer was
  // anomalous, a missed defect otherwise, whose true type comes from the select); Wrong type
  // (anomalous answers only; the true type from the select). POST v1/feedback with the
  // request id, so the service keeps the image as a labelled sample.
  function defectTypes() {
    if (!model) return [];
    const p = model.products && model.products[els.product.value];
    return p ? p.defect_types : (model.vocabulary || []).map((v) => v.name).filter((n) => n !== "normal");
  }

  function resetFeedback(r) {
    const bad = !!r.is_anomalous;
    const top = r.defect_types.length ? r.defect_types[0].name : "";
    els.feedback.dataset.state = "";
    els.fbStatus.textContent = "";
    els.fbWrong.textContent = bad ? "Wrong call: part is good" : "Wrong call: part is defective";
    els.fbWrong.dataset.verdict = bad ? "false_positive" : "false_negative";
    els.fbType.hidden = !bad;
    const types = defectTypes();
    els.fbDefect.replaceChildren(...types.map((t) => new Option(t, t)));
    const other = types.find((t) => t !== top);
    if (bad && other) els.fbDefect.value = other;
    [els.fbCorrect, els.fbWrong, els.fbType, els.fbDefect].forEach((b) => { b.disabled = false; });
  }

  async function sendFeedback(verdict) {
    const body = { answer_id: els.result.dataset.answerId, index: 0, verdict: verdict };
    if (verdict === "false_negative" || verdict === "wrong_type") body.defect_type = els.fbDefect.value;
    const buttons = [els.fbCorrect, els.fbWrong, els.fbType, els.fbDefect];
    buttons.forEach((b) => { b.disabled = true; });
    els.feedback.dataset.state = "sending";
    els.fbStatus.textContent = "sending…";
    let response;
    try {
      response = await fetch("v1/feedback", { method: "POST", body: JSON.stringify(body),
                                              headers: Object.assign({ "Content-Type": "application/json" }, headers()) });
    } catch (e) {
      els.feedback.dataset.state = "error";
      els.fbStatus.textContent = "cannot reach the service: " + e.message;
      buttons.forEach((b) => { b.disabled = false; });
      return;
    }
    if (response.ok) {
      const out = await response.json();
      els.feedback.dataset.state = "sent";
      els.feedback.dataset.verdict = out.verdict;
      els.fbStatus.textContent = "recorded: " + out.label + (out.sample ? " (image kept as a labelled sample)" : "");
      return;
    }
    const err = await apiError(response);
    els.feedback.dataset.state = "error";
    els.fbStatus.textContent = err.code + ": " + err.message;
    if (response.status !== 409 && response.status !== 410) buttons.forEach((b) => { b.disabled = false; });
  }

  function setImage(img, b64) {
    if (b64) img.src = "data:image/png;base64," + b64; else img.removeAttribute("src");
  }

  // The canvas covers the overlay at the screen's resolution; boxes are given in original
  // image pixels and scaled here, text and lines keep a constant on-screen size.
  function drawBoxes() {
    const r = lastResult, c = els.boxes;
    if (!r) return;
    const dpr = window.devicePixelRatio || 1;
    const cssW = els.overlay.clientWidth || r.width;
    c.width = Math.max(1, Math.round(cssW * dpr));
    c.height = Math.max(1, Math.round(cssW * dpr * r.height / r.width));
    c.dataset.imageWidth = String(r.width);
    c.dataset.imageHeight = String(r.height);
    c.dataset.boxes = String(els.showBoxes.checked ? r.regions.length : 0);
    const ctx = c.getContext("2d");
    ctx.clearRect(0, 0, c.width, c.height);
    if (!els.showBoxes.checked) return;
    const sx = c.width / r.width, sy = c.height / r.height;
    const line = 2 * dpr, fontPx = 12 * dpr, pad = 3 * dpr, labelH = fontPx + 2 * pad;
    ctx.lineWidth = line;
    ctx.font = fontPx + "px system-ui, sans-serif";
    ctx.textBaseline = "top";
    r.regions.forEach((g, i) => {
      const x = g.bbox[0] * sx, y = g.bbox[1] * sy, w = g.bbox[2] * sx, h = g.bbox[3] * sy;
      ctx.strokeStyle = colour(g.defect_type);
      ctx.strokeRect(x + line / 2, y + line / 2, Math.max(w - line, 1), Math.max(h - line, 1));
      const label = (i + 1) + " " + g.defect_type + " " + fmt(g.score, 2);
      const tw = ctx.measureText(label).width + 2 * pad;
      const tx = Math.max(0, Math.min(x, c.width - tw));
      const ty = y >= labelH ? y - labelH : Math.min(y + h, c.height - labelH);
      ctx.fillStyle = "rgba(0,0,0,.65)";
      ctx.fillRect(tx, ty, tw, labelH);
      ctx.fillStyle = colour(g.defect_type);
      ctx.fillText(label, tx + pad, ty + pad);
    });
  }

  function choose(file) {
    if (!file) return;
    currentFile = file;
    els.fileName.textContent = file.name + " (" + Math.round(file.size / 1024) + " KiB)";
    els.inspect.disabled = false;
    inspect();
  }

  // ---- wiring --------------------------------------------------------------------------------
  els.apiKey.value = apiKey();
  els.saveKey.addEventListener("click", () => {
    const key = els.apiKey.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
    loadModel();
  });
  els.apiKey.addEventListener("keydown", (e) => { if (e.key === "Enter") els.saveKey.click(); });
  els.inspect.addEventListener("click", inspect);
  els.fbCorrect.addEventListener("click", () => sendFeedback("correct"));
  els.fbWrong.addEventListener("click", () => sendFeedback(els.fbWrong.dataset.verdict));
  els.fbType.addEventListener("click", () => sendFeedback("wrong_type"));
  els.product.addEventListener("change", () => { if (currentFile) inspect(); });
  els.showBoxes.addEventListener("change", drawBoxes);
  window.addEventListener("resize", drawBoxes);
  els.file.addEventListener("change", () => choose(els.file.files[0]));
  ["dragenter", "dragover"].forEach((t) => els.drop.addEventListener(t, (e) => {
    e.preventDefault();
    els.drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => els.drop.addEventListener(t, (e) => {
    e.preventDefault();
    els.drop.classList.remove("over");
  }));
  els.drop.addEventListener("drop", (e) => {
    const files = e.dataTransfer && e.dataTransfer.files;
    if (files && files.length) choose(files[0]);
  });
  // a drop outside the zone must not navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  loadModel();
})();
