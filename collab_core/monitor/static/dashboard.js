// collab monitor dashboard: polls /api/state once a second and redraws (no reload, nothing fetched from elsewhere).
// The charts are a small SVG line renderer of our own.
"use strict";

const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";

function text(id, value) { document.getElementById(id).textContent = value; }

function fmtRate(rate) {
  if (rate === null || rate === undefined || !isFinite(rate)) return "unknown";
  return rate < 100 ? rate.toFixed(1) : rate.toFixed(0);
}

function fmtEta(seconds) {
  if (seconds === null || seconds === undefined) return "unknown";
  if (seconds < 60) return seconds.toFixed(1) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + Math.round(seconds % 60) + " s";
  return (seconds / 3600).toFixed(1) + " h";
}

function niceNumber(v) {
  if (Math.abs(v) >= 1000) return v.toFixed(0);
  if (Math.abs(v) >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

function el(name, attrs, content) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (content !== undefined) node.textContent = content;
  return node;
}

// points: [[x, y], ...]; draws axes with min/max ticks and one polyline (or a step line)
function lineChart(svgId, points, options) {
  const svg = document.getElementById(svgId);
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 420, H = 200, L = 44, R = 10, T = 10, B = 26;
  svg.appendChild(el("line", {class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B}));
  svg.appendChild(el("line", {class: "axis", x1: L, y1: T, x2: L, y2: H - B}));
  svg.appendChild(el("text", {x: W - R, y: H - 4, "text-anchor": "end"}, options.xlabel));
  if (points.length === 0) {
    svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no data yet"));
    return;
  }
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  let y0 = options.zero ? 0 : Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 = y0 + 1; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.appendChild(el("line", {class: "grid", x1: L, y1: sy(y), x2: W - R, y2: sy(y)}));
    svg.appendChild(el("text", {x: L - 4, y: sy(y) + 3, "text-anchor": "end"}, niceNumber(y)));
  }
  svg.appendChild(el("text", {x: L, y: H - B + 12, "text-anchor": "start"}, niceNumber(x0)));
  svg.appendChild(el("text", {x: W - R, y: H - B + 12, "text-anchor": "end"}, niceNumber(x1)));
  let path = "";
  points.forEach((p, i) => {
    if (options.step && i > 0) path += " L" + sx(p[0]).toFixed(1) + "," + sy(points[i - 1][1]).toFixed(1);
    path += (i === 0 ? "M" : " L") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1);
  });
  svg.appendChild(el("path", {class: "line", d: path}));
}

function peerRows(peers) {
  const body = document.getElementById("peer-rows");
  while (body.firstChild) body.removeChild(body.firstChild);
  if (peers.length === 0) {
    const row = body.insertRow();
    row.className = "empty";
    const cell = row.insertCell();
    cell.colSpan = 8;
    cell.textContent = "no peers yet";
    return;
  }
  for (const peer of peers) {
    const row = body.insertRow();
    row.dataset.peerId = peer.peer_id;
    if (peer.silent) {
      row.className = "silent";
      row.title = "no record for " + peer.last_seen.toFixed(0) + " s: crashed or stuck (listed until its records expire)";
    }
    const cells = [
      peer.short_id, peer.step, fmtRate(peer.samples_per_second),
      peer.samples_contributed === null ? "" : peer.samples_contributed,
      peer.loss === null ? "" : peer.loss.toFixed(4),
      peer.client_mode ? "yes" : "no", peer.reached_at, peer.last_seen.toFixed(1) + " s ago",
    ];
    cells.forEach((value, i) => {
      const cell = row.insertCell();
      cell.textContent = value;
      if (i === 0 || i === 6) cell.className = "mono";
      if (i === 0) cell.title = peer.peer_id;
    });
  }
}

function render(state) {
  const status = document.getElementById("status");
  status.className = "status" + (state.error ? " error" : "");
  status.textContent = state.error ? "DHT read failed: " + state.error : "updated " + new Date().toLocaleTimeString();
  text("step", state.step);
  text("peers", state.num_peers + (state.num_silent ? " (" + state.num_silent + " silent)" : ""));
  text("rate", fmtRate(state.samples_per_second));
  const target = state.target_batch_size;
  text("accumulated", state.samples_accumulated + " / " + (target === null ? "?" : target));
  const fraction = target ? Math.min(1, state.samples_accumulated / target) : 0;
  document.getElementById("progress").style.width = (100 * fraction).toFixed(1) + "%";
  text("eta", fmtEta(state.eta_seconds));
  text("loss", state.loss === null ? "–" : state.loss.toFixed(4));
  const h = state.history;
  lineChart("chart-loss", h.loss, {xlabel: "collaborative step"});
  lineChart("chart-rate", h.seconds.map((t, i) => [t, h.samples_per_second[i]]), {xlabel: "seconds", zero: true});
  lineChart("chart-peers", h.seconds.map((t, i) => [t, h.peers[i]]), {xlabel: "seconds", zero: true, step: true});
  peerRows(state.peers);
  text("skipped", state.skipped_records ? state.skipped_records + " malformed record(s) skipped in the last read" : "");
}

async function poll() {
  try {
    const response = await fetch("/api/state", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (e) {
    const status = document.getElementById("status");
    status.className = "status error";
    status.textContent = "monitor unreachable: " + e.message;
  }
  setTimeout(poll, POLL_MS);
}

poll();
