// Live training-loss chart on the "WanTuner Train LoRA" node.
//
// The node streams its loss over ComfyUI's websocket as custom `wantuner.training` messages (nodes/comfy_adapter.py
// LossStream): {node, prompt_id, points: [[step, loss|null], ...], total, status, reset}. Each message carries every
// point since the previous one; `reset` starts a new run. The chart is a canvas widget drawn under the node's
// widgets; it keeps the last run's curve after training ends (and is refilled from the node's UI output `losses`
// when the finished run's result arrives).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "WanTunerTrainLoRA";
const EVENT = "wantuner.training";
const WIDGET = "wantuner_loss_chart";
const CHART_HEIGHT = 160;
const MAX_POINTS = 50000;
const COLOURS = {
  background: "#18191e",
  border: "#3a3e46",
  grid: "#2c2f36",
  text: "#c8cbd2",
  raw: "#5c84be",
  average: "#ffb238",
};

function lossState(node) {
  node.wantunerLoss ??= { points: [], total: 0, status: "idle" };
  return node.wantunerLoss;
}

function findNode(id) {
  if (id === null || id === undefined) return null;
  const graph = app.rootGraph ?? app.graph;
  const text = String(id);
  const local = text.includes(":") ? text.split(":").pop() : text; // subgraph paths end with the node's own id
  return graph?.getNodeById?.(local) ?? graph?.getNodeById?.(Number(local)) ?? null;
}

function applyMessage(node, data) {
  const state = lossState(node);
  if (data.reset) state.points = [];
  for (const point of data.points ?? []) state.points.push(point);
  if (state.points.length > MAX_POINTS) state.points.splice(0, state.points.length - MAX_POINTS);
  state.total = data.total ?? state.total;
  state.status = data.status ?? state.status;
  node.setDirtyCanvas?.(true, false);
}

function movingAverage(values, window) {
  const out = [];
  let sum = 0;
  for (let i = 0; i < values.length; i++) {
    sum += values[i];
    if (i >= window) sum -= values[i - window];
    out.push(sum / Math.min(i + 1, window));
  }
  return out;
}

function statusLine(state, finite) {
  const last = finite.length ? finite[finite.length - 1] : null;
  const step = state.points.length ? state.points[state.points.length - 1][0] : 0;
  const of = state.total ? `/${state.total}` : "";
  const loss = last ? `  loss ${last[1].toPrecision(4)}` : "";
  const label = { starting: "loading", running: "training", done: "done", interrupted: "cancelled", error: "failed" };
  return `${label[state.status] ?? "loss"}  step ${step}${of}${loss}`;
}

function polyline(ctx, xs, ys, colour, width) {
  ctx.strokeStyle = colour;
  ctx.lineWidth = width;
  ctx.beginPath();
  xs.forEach((x, i) => (i ? ctx.lineTo(x, ys[i]) : ctx.moveTo(x, ys[i])));
  ctx.stroke();
}

function drawCurve(ctx, finite, box, total) {
  const steps = finite.map((p) => p[0]);
  const losses = finite.map((p) => p[1]);
  let lo = Math.min(...losses);
  let hi = Math.max(...losses);
  if (hi - lo < 1e-12) [lo, hi] = [lo - Math.max(Math.abs(lo) * 0.5, 1e-3), hi + Math.max(Math.abs(hi) * 0.5, 1e-3)];
  const first = steps[0];
  const lastStep = Math.max(steps[steps.length - 1], total || 0, first + 1);
  const x = (s) => box.left + ((s - first) / (lastStep - first)) * (box.right - box.left);
  const y = (v) => box.bottom - ((v - lo) / (hi - lo)) * (box.bottom - box.top);
  ctx.fillStyle = COLOURS.text;
  ctx.font = "10px sans-serif";
  ctx.textAlign = "right";
  for (const [value, at] of [[hi, box.top], [lo, box.bottom]]) {
    ctx.strokeStyle = COLOURS.grid;
    ctx.beginPath();
    ctx.moveTo(box.left, at);
    ctx.lineTo(box.right, at);
    ctx.stroke();
    ctx.fillText(value.toPrecision(3), box.left - 4, at + 3);
  }
  const xs = steps.map(x);
  polyline(ctx, xs, losses.map(y), COLOURS.raw, 1);
  polyline(ctx, xs, movingAverage(losses, Math.max(1, Math.floor(losses.length / 20))).map(y), COLOURS.average, 2);
}

function drawChart(ctx, width, top, state) {
  const left = 10;
  const right = width - 10;
  const bottom = top + CHART_HEIGHT - 8;
  ctx.save();
  ctx.fillStyle = COLOURS.background;
  ctx.strokeStyle = COLOURS.border;
  ctx.lineWidth = 1;
  ctx.fillRect(left, top, right - left, bottom - top);
  ctx.strokeRect(left, top, right - left, bottom - top);
  const finite = state.points.filter((p) => p[1] !== null && Number.isFinite(p[1]));
  ctx.fillStyle = COLOURS.text;
  ctx.font = "11px sans-serif";
  ctx.textAlign = "left";
  ctx.fillText(state.points.length || state.status !== "idle" ? statusLine(state, finite) : "loss: not trained yet",
               left + 6, top + 14);
  if (finite.length) {
    drawCurve(ctx, finite, { left: left + 44, right: right - 8, top: top + 24, bottom: bottom - 8 }, state.total);
  }
  ctx.restore();
}

function addChart(node) {
  const widget = {
    type: "wantuner_loss_chart",
    name: WIDGET,
    value: "",
    serialize: false, // display only: not part of the saved widget values
    options: { serialize: false }, // nor of the API prompt
    computeSize: (width) => [width, CHART_HEIGHT],
    draw(ctx, owner, width, y) {
      drawChart(ctx, width, y, lossState(owner));
    },
  };
  node.addCustomWidget(widget);
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
}

app.registerExtension({
  name: "WanTuner.TrainingLoss",
  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = findNode(detail?.node);
      if (node?.comfyClass === NODE || node?.type === NODE) applyMessage(node, detail);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      lossState(this);
      addChart(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (Array.isArray(message?.losses)) {
        applyMessage(this, { reset: true, points: message.losses, status: "done" });
      }
    };
  },
});
