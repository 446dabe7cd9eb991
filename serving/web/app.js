// mnist37's page: draw a digit, send its 28x28 pixels to this server's /v1/explain, and
// draw the answer: the digit, P(7), each pixel's vote and, for a linear model, its weights.
// No build step and no library: the browser runs this file as it is.
"use strict";

const SIDE = 28; // the model's image is 28x28 (serving/contract.py)
const PIXELS = SIDE * SIDE;
const DIGIT_BOX = 20; // the digit's longest side in it, as MNIST's (serving/imaging.py)
const INK_THRESHOLD = 30; // ink (0-255) at most this strong is not part of the digit's box
const PAD = 280; // the drawing pad's own pixels, whatever its size on screen
const PEN_WIDTH = 24; // in pad pixels: about 2 image pixels once a digit is scaled down
const SCALE = 10; // panel pixels per image pixel (serving/explain_render.py's SCALE)
const REQUEST_TIMEOUT_MS = 15000; // a request not answered by then is given up
const DEFAULT_MODEL = "mnist37"; // the model /v1/explain answers with when none is named
const TOKEN_KEY = "mnist37.token";
const INK = 255; // a pixel's value for full ink: the model reads it as x = 1

// ColorBrewer's 11-class RdBu, red to blue: the colour scale of serving/explain_render.py
// and of training's weights.png (matplotlib's RdBu_r runs it backwards: blue says 3 at
// -limit, near white is 0, red says 7 at +limit; linear between evenly spaced colours).
const RDBU = [
  "#67001f",
  "#b2182b",
  "#d6604d",
  "#f4a582",
  "#fddbc7",
  "#f7f7f7",
  "#d1e5f0",
  "#92c5de",
  "#4393c3",
  "#2166ac",
  "#053061",
];
const RDBU_R = RDBU.slice()
  .reverse()
  .map((hex) => [1, 3, 5].map((at) => parseInt(hex.slice(at, at + 2), 16)));

const $ = (id) => document.getElementById(id);
const pad = $("pad");
const pen = pad.getContext("2d", { willReadFrequently: true });
const seen = $("seen");
const votesCanvas = $("votes");
const weightsCanvas = $("weights");
const result = $("result");
const modelSelect = $("model");
const tokenInput = $("token");
const upload = $("upload");

// --- The colour scale ---------------------------------------------------------------

/** [r, g, b] of a vote on the scale from -limit (dark blue) to +limit (dark red). */
function voteColour(vote, limit) {
  const position = Math.min(1, Math.max(0, vote / (2 * limit) + 0.5));
  const scaled = position * (RDBU_R.length - 1);
  const low = Math.min(Math.floor(scaled), RDBU_R.length - 2);
  const fraction = scaled - low;
  return RDBU_R[low].map((start, c) => Math.round(start + (RDBU_R[low + 1][c] - start) * fraction));
}

/** The scale's end, +-: the largest vote either way (1 when no pixel votes). */
function voteLimit(votes) {
  return votes.reduce((largest, vote) => Math.max(largest, Math.abs(vote)), 0) || 1;
}

function signed(value, digits = 3) {
  return (value >= 0 ? "+" : "") + value.toFixed(digits);
}

// --- Drawing on canvases --------------------------------------------------------------

/** 784 colours as a 28x28 picture of SCALE-wide squares. */
function drawCells(canvas, colours) {
  const context = canvas.getContext("2d");
  for (let index = 0; index < PIXELS; index++) {
    const [r, g, b] = colours[index];
    context.fillStyle = `rgb(${r}, ${g}, ${b})`;
    context.fillRect((index % SIDE) * SCALE, Math.floor(index / SIDE) * SCALE, SCALE, SCALE);
  }
}

function blank(canvas) {
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

/** The model's image as dark ink on white, like explain_render's digit panel. */
function drawImage(canvas, pixels) {
  drawCells(canvas, pixels.map((value) => [255 - value, 255 - value, 255 - value]));
}

function drawVotes(canvas, scaleCanvas, votes) {
  const limit = voteLimit(votes);
  drawCells(canvas, votes.map((vote) => voteColour(vote, limit)));
  const context = scaleCanvas.getContext("2d");
  const width = scaleCanvas.width;
  for (let x = 0; x < width; x++) {
    const [r, g, b] = voteColour(-limit + (2 * limit * x) / (width - 1), limit);
    context.fillStyle = `rgb(${r}, ${g}, ${b})`;
    context.fillRect(x, 0, 1, scaleCanvas.height);
  }
  return limit;
}

// --- From the drawing to the model's 28x28 ------------------------------------------
// MNIST's recipe, as serving/imaging.py does it for PNGs: the ink's bounding box, scaled
// so that its longest side is 20 pixels (aspect kept), then placed in 28x28 so that its
// centre of mass is at (14, 14). The scaling is area averaging (each image pixel is the
// mean ink of the pad pixels it covers), the same in every browser.

/** The pad's ink as 784 integers 0-255, or null when nothing is drawn. */
function modelImage(imageData) {
  const { data, width, height } = imageData;
  const ink = new Float64Array(width * height);
  let top = height;
  let bottom = -1;
  let left = width;
  let right = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const alpha = data[(y * width + x) * 4 + 3]; // the pen's ink: its coverage
      ink[y * width + x] = alpha;
      if (alpha > INK_THRESHOLD) {
        top = Math.min(top, y);
        bottom = Math.max(bottom, y);
        left = Math.min(left, x);
        right = Math.max(right, x);
      }
    }
  }
  if (bottom < 0) return null;
  const boxWidth = right - left + 1;
  const boxHeight = bottom - top + 1;
  const scale = DIGIT_BOX / Math.max(boxWidth, boxHeight);
  const digitWidth = Math.max(1, Math.round(boxWidth * scale));
  const digitHeight = Math.max(1, Math.round(boxHeight * scale));
  const across = areaWeights(boxWidth, digitWidth);
  const down = areaWeights(boxHeight, digitHeight);
  const rows = new Float64Array(boxHeight * digitWidth); // scaled across, then down
  for (let y = 0; y < boxHeight; y++) {
    const start = (top + y) * width + left;
    for (let x = 0; x < digitWidth; x++) {
      let sum = 0;
      for (const [source, weight] of across[x]) sum += ink[start + source] * weight;
      rows[y * digitWidth + x] = sum;
    }
  }
  const digit = new Float64Array(digitHeight * digitWidth);
  for (let y = 0; y < digitHeight; y++) {
    for (let x = 0; x < digitWidth; x++) {
      let sum = 0;
      for (const [source, weight] of down[y]) sum += rows[source * digitWidth + x] * weight;
      digit[y * digitWidth + x] = sum;
    }
  }
  return centredByMass(digit, digitWidth, digitHeight);
}

/** For each of `to` cells spread over `from`: [source cell, share of it] pairs. */
function areaWeights(from, to) {
  const step = from / to;
  const cells = [];
  for (let cell = 0; cell < to; cell++) {
    const start = cell * step;
    const end = start + step;
    const shares = [];
    for (let source = Math.floor(start); source < Math.min(from, Math.ceil(end)); source++) {
      const overlap = Math.min(source + 1, end) - Math.max(source, start);
      if (overlap > 0) shares.push([source, overlap / step]);
    }
    cells.push(shares);
  }
  return cells;
}

/** `digit` pasted into 28x28 with its centre of mass at (14, 14), rounded to 0-255. */
function centredByMass(digit, width, height) {
  let total = 0;
  let rowSum = 0;
  let columnSum = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const value = digit[y * width + x];
      total += value;
      rowSum += y * value;
      columnSum += x * value;
    }
  }
  const centreY = total > 0 ? rowSum / total : (height - 1) / 2;
  const centreX = total > 0 ? columnSum / total : (width - 1) / 2;
  const top = Math.round(SIDE / 2 - centreY);
  const left = Math.round(SIDE / 2 - centreX);
  const pixels = new Array(PIXELS).fill(0);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const row = y + top;
      const column = x + left;
      if (row >= 0 && row < SIDE && column >= 0 && column < SIDE) {
        pixels[row * SIDE + column] = Math.min(255, Math.max(0, Math.round(digit[y * width + x])));
      }
    }
  }
  return pixels;
}

// --- Talking to the server ------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function modelPath(name, version) {
  const path = `/v2/models/${encodeURIComponent(name)}`;
  return version === undefined ? path : `${path}/versions/${encodeURIComponent(version)}`;
}

/** One API call on this origin, with the token if one is set; the answer's JSON. */
async function api(method, path, body, contentType = "application/json") {
  const headers = {};
  const token = tokenInput.value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = contentType;
    payload = contentType === "application/json" ? JSON.stringify(body) : body;
  }
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
  try {
    const response = await fetch(path, {
      method,
      headers,
      body: payload,
      signal: controller.signal,
      cache: "no-store",
    });
    const text = await response.text();
    let answer = null;
    try {
      answer = text ? JSON.parse(text) : null;
    } catch {
      // not JSON: the status says enough
    }
    if (!response.ok) {
      const why = answer && typeof answer.error === "string" ? answer.error : "";
      throw new ApiError(response.status, why || `HTTP ${response.status}`);
    }
    return answer;
  } catch (error) {
    if (error.name === "AbortError") {
      throw new ApiError(0, `no answer within ${REQUEST_TIMEOUT_MS / 1000} s`);
    }
    if (error instanceof ApiError) throw error;
    throw new ApiError(0, "cannot reach the server");
  } finally {
    clearTimeout(timer);
  }
}

function explanation(answer) {
  return answer.explanations[0];
}

function showStatus(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

function showError(error) {
  if ($("digit").textContent === "-") $("score").textContent = "No answer: see why below.";
  if (error.status === 401) {
    showStatus("This server needs a bearer token: enter it under Bearer token.", true);
  } else {
    showStatus(`The server did not explain it: ${error.message}`, true);
  }
}

// --- One request in flight, the last drawing wins -------------------------------------

let generation = 0; // bumped by Clear and by another model: older answers are dropped
let inFlight = false;
let pending = null; // the newest request not sent yet: only the last one matters
let frameRequested = false; // a drawing change not yet turned into the model's image

function updateState() {
  const busy = inFlight || pending !== null || frameRequested;
  result.dataset.state = busy ? "busy" : "idle";
}

function submit(request) {
  pending = request;
  updateState();
  if (!inFlight) pump();
}

async function pump() {
  inFlight = true;
  while (pending !== null) {
    const request = pending;
    pending = null;
    updateState();
    try {
      const answer = await request.send();
      if (request.generation === generation) request.show(explanation(answer));
    } catch (error) {
      if (request.generation === generation) showError(error);
    }
  }
  inFlight = false;
  updateState();
}

// --- The model versions -----------------------------------------------------------------

let choices = []; // {name, version, arch}, in the select's order
let lastImage = null; // {pixels} drawn or {png, name} uploaded: sent again for another model

function chosen() {
  return choices[Number(modelSelect.value)] ?? null;
}

/** Every loaded version: the repository index's names, each name's versions (its
 * metadata) and each version's architecture (its configuration). */
async function loadedVersions() {
  const index = await api("POST", "/v2/repository/index", { ready: true });
  const found = [];
  for (const name of [...new Set(index.map((entry) => entry.name))].sort()) {
    try {
      const metadata = await api("GET", modelPath(name));
      for (const version of metadata.versions) {
        const config = await api("GET", `${modelPath(name, version)}/config`);
        const arch = config.parameters?.architecture?.string_value ?? "";
        found.push({ name, version, arch });
      }
    } catch (error) {
      if (error.status !== 404) throw error; // 404: unloaded meanwhile, so not offered
    }
  }
  return found;
}

async function loadModels() {
  showStatus("Asking the server for its models...");
  try {
    choices = await loadedVersions();
  } catch (error) {
    if (error.status === 401) {
      showStatus("This server needs a bearer token: enter it under Bearer token.", true);
    } else {
      showStatus(`Cannot list the models: ${error.message}`, true);
    }
    return;
  }
  modelSelect.replaceChildren(
    ...choices.map((choice, at) => {
      const arch = choice.arch ? ` (${choice.arch})` : "";
      return new Option(`${choice.name} version ${choice.version}${arch}`, String(at));
    }),
  );
  const defaults = choices.map((choice, at) => [choice, at]).filter(([c]) => c.name === DEFAULT_MODEL);
  if (defaults.length) modelSelect.value = String(defaults[defaults.length - 1][1]);
  showStatus(choices.length ? "" : "The server has no model loaded.", !choices.length);
  modelChanged();
}

function modelChanged() {
  generation++;
  showWeights(chosen());
  if (lastImage !== null) send(lastImage);
}

// --- The weights of a linear model ----------------------------------------------------
// Explaining an image with full ink everywhere (x = 1 at every pixel) gives, for a linear
// model, votes of exactly 1 x weight: its 784 weights.

const weightsCache = new Map();

async function showWeights(choice) {
  const note = $("weights-note");
  const scale = $("weights-scale");
  if (choice === null || choice.arch !== "linear") {
    weightsCanvas.hidden = scale.hidden = true;
    note.textContent = choice && choice.arch
      ? `${choice.name} version ${choice.version} is ${choice.arch === "mlp" ? "an MLP" : choice.arch}: ` +
        "it has no single weight per pixel, its votes depend on which hidden units the image turns on."
      : "Choose a linear model to see its weights.";
    return;
  }
  const key = `${choice.name}/${choice.version}`;
  try {
    if (!weightsCache.has(key)) {
      note.textContent = "Loading the weights...";
      const answer = await api("POST", "/v1/explain", {
        images: [{ pixels: new Array(PIXELS).fill(INK) }],
        model_name: choice.name,
        model_version: choice.version,
      });
      weightsCache.set(key, explanation(answer));
    }
  } catch (error) {
    note.textContent = `Cannot load the weights: ${error.message}`;
    return;
  }
  if (chosen() !== choice) return; // another version was chosen meanwhile
  const weights = weightsCache.get(key);
  weightsCanvas.hidden = scale.hidden = false;
  const limit = drawVotes(weightsCanvas, scale, weights.contributions);
  note.textContent =
    `${choice.name} version ${choice.version}'s 784 weights, -${limit.toPrecision(3)} (blue, 3) ` +
    `to +${limit.toPrecision(3)} (red, 7), and a bias of ${signed(weights.bias_term)}: ` +
    "a pixel's vote is its ink (0 to 1) times its weight.";
}

// --- Showing an answer ------------------------------------------------------------------

function showExplanation(answer) {
  drawImage(seen, answer.pixels);
  seen.dataset.pixels = answer.pixels.join(",");
  const limit = drawVotes(votesCanvas, $("votes-scale"), answer.contributions);
  $("votes-low").textContent = `${signed(-limit, 3)} (3)`;
  $("votes-high").textContent = `(7) ${signed(limit, 3)}`;
  const votes = answer.contributions.reduce((sum, vote) => sum + vote, 0);
  $("digit").textContent = String(answer.digit);
  $("p7").textContent = answer.probability_seven.toFixed(4);
  $("score").textContent =
    `score (logit) ${signed(answer.logit)} = votes ${signed(votes)} + bias ` +
    `${signed(answer.bias_term)}; ${answer.model_name} version ${answer.model_version}`;
  result.dataset.pixels = answer.pixels.join(",");
  result.dataset.model = `${answer.model_name}/${answer.model_version}`;
  showStatus("");
}

function resetAnswer(message) {
  for (const canvas of [seen, votesCanvas, $("votes-scale")]) blank(canvas);
  $("votes-low").textContent = $("votes-high").textContent = "";
  $("digit").textContent = $("p7").textContent = "-";
  $("score").textContent = message;
  seen.dataset.pixels = result.dataset.pixels = "";
}

/** Ask for `image`'s explanation with the chosen model (queued: the last one wins). */
function send(image) {
  const choice = chosen();
  if (choice === null) return;
  const model = { model_name: choice.name, model_version: choice.version };
  const request = { generation, show: showExplanation };
  if (image.pixels) {
    request.send = () => api("POST", "/v1/explain", { images: [{ pixels: image.pixels }], ...model });
  } else {
    const query = new URLSearchParams(model);
    request.send = () => api("POST", `/v1/explain?${query}`, image.png, "image/png");
  }
  submit(request);
}

// --- The drawing pad ------------------------------------------------------------------

let activePointer = null;
let lastPoint = null;

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left - pad.clientLeft) * PAD) / pad.clientWidth,
    y: ((event.clientY - box.top - pad.clientTop) * PAD) / pad.clientHeight,
  };
}

function stroke(from, to) {
  pen.beginPath();
  pen.moveTo(from.x, from.y);
  pen.lineTo(to.x, to.y);
  pen.stroke();
}

function setUpPen() {
  pen.lineWidth = PEN_WIDTH;
  pen.lineCap = "round";
  pen.lineJoin = "round";
  pen.strokeStyle = "#000000";
}

function drawingChanged() {
  if (frameRequested) return;
  frameRequested = true;
  updateState();
  requestAnimationFrame(() => {
    frameRequested = false;
    const pixels = modelImage(pen.getImageData(0, 0, PAD, PAD));
    if (pixels === null) {
      updateState();
      return;
    }
    // The image shown is the one sent: drawn now, replaced by the server's echo of it.
    drawImage(seen, pixels);
    seen.dataset.pixels = pixels.join(",");
    lastImage = { pixels };
    send(lastImage);
  });
}

pad.addEventListener("pointerdown", (event) => {
  if (activePointer !== null || (event.pointerType === "mouse" && event.button !== 0)) return;
  event.preventDefault();
  activePointer = event.pointerId;
  pad.setPointerCapture(event.pointerId);
  result.setAttribute("aria-busy", "true"); // announce the answer once the stroke ends
  lastPoint = padPoint(event);
  stroke(lastPoint, lastPoint); // a dot: a tap leaves ink too
  drawingChanged();
});

pad.addEventListener("pointermove", (event) => {
  if (event.pointerId !== activePointer) return;
  const coalesced = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const moved of coalesced.length ? coalesced : [event]) {
    const point = padPoint(moved);
    stroke(lastPoint, point);
    lastPoint = point;
  }
  drawingChanged();
});

for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, (event) => {
    if (event.pointerId !== activePointer) return;
    activePointer = null;
    lastPoint = null;
    result.setAttribute("aria-busy", "false");
    drawingChanged();
  });
}

function clearDrawing() {
  pen.clearRect(0, 0, PAD, PAD);
  generation++;
  pending = null;
  lastImage = null;
  updateState();
  resetAnswer("Draw a digit to see the model's answer.");
}

$("clear").addEventListener("click", () => {
  clearDrawing();
  showStatus("");
});

upload.addEventListener("change", async () => {
  const file = upload.files[0];
  if (!file) return;
  const png = await file.arrayBuffer();
  upload.value = ""; // the same file chosen again is sent again
  clearDrawing();
  $("score").textContent = `Explaining ${file.name}...`;
  lastImage = { png, name: file.name };
  send(lastImage);
});

modelSelect.addEventListener("change", modelChanged);

tokenInput.addEventListener("change", () => {
  try {
    sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim());
  } catch {
    // storage refused (private mode): the token still works until the page is left
  }
  if (choices.length) modelChanged();
  else loadModels();
});

try {
  tokenInput.value = sessionStorage.getItem(TOKEN_KEY) ?? "";
} catch {
  // no storage: start without a token
}
setUpPen();
resetAnswer("Draw a digit to see the model's answer.");
updateState();
loadModels();
