// Tributary's live dashboard: polls /api/jobs/JOB every second and draws
// plain SVG (no libraries, nothing fetched from elsewhere). With auth on, the
// admin token is asked for once and kept in this tab's sessionStorage.
"use strict";

const TOKEN_KEY = "tributary.adminToken";
const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

let currentJob = null;
let timer = null;

class Unauthorized extends Error {}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) throw new Unauthorized((await response.json()).error);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function showLogin(message) {
  clearTimeout(timer);
  $("dashboard").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setStatus("admin token required", true);
  $("token").focus();
}

function setStatus(text, bad) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", !!bad);
}

async function start() {
  try {
    const overview = await api("/api/jobs");
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("logout").hidden = !sessionStorage.getItem(TOKEN_KEY);
    fillJobs(overview.jobs);
    poll();
  } catch (error) {
    if (error instanceof Unauthorized) {
      showLogin(sessionStorage.getItem(TOKEN_KEY) ? "That token was not accepted." : "");
      sessionStorage.removeItem(TOKEN_KEY);
    } else {
      setStatus("cannot reach the server; retrying", true);
      timer = setTimeout(start, 2 * POLL_MS);
    }
  }
}

function fillJobs(jobs) {
  const select = $("job-select");
  const fromHash = decodeURIComponent(location.hash.slice(1));
  const ids = jobs.map((job) => job.job_id);
  currentJob = ids.includes(currentJob) ? currentJob : ids.includes(fromHash) ? fromHash : ids[0];
  select.replaceChildren(...ids.map((id) => new Option(id, id, false, id === currentJob)));
  $("job-picker").hidden = ids.length < 2;
}

async function poll() {
  clearTimeout(timer);
  try {
    const job = await api("/api/jobs/" + encodeURIComponent(currentJob));
    render(job);
    setStatus("live · updated " + new Date().toLocaleTimeString());
  } catch (error) {
    if (error instanceof Unauthorized) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("The server no longer accepts the token.");
      return;
    }
    setStatus("cannot reach the server; retrying", true);
  }
  timer = setTimeout(poll, POLL_MS);
}

// -- rendering --------------------------------------------------------------------

const fmt = (x, digits = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const ago = (seconds) => (seconds < 60 ? `${seconds.toFixed(0)} s ago` : `${(seconds / 60).toFixed(1)} min ago`);
const clock = (unix) => new Date(unix * 1000).toLocaleTimeString();

function render(job) {
  $("model-version").textContent = job.version;
  $("version-age").textContent = "published " + ago(Math.max(0, job.server_time - job.version_published));
  const evaluations = job.evaluations;
  const accuracy = evaluations.filter((e) => e.metrics.accuracy !== undefined);
  const latest = accuracy[accuracy.length - 1];
  $("accuracy").textContent = latest ? (100 * latest.metrics.accuracy).toFixed(1) + " %" : "–";
  $("accuracy-version").textContent = latest ? "of version " + latest.version : "no evaluator results";
  const rate = job.update_rate.per_second;
  $("rate").textContent = [rate["10"], rate["60"], rate["300"]].map((r) => fmt(r, 1)).join(" · ");
  const c = job.counters;
  $("accepted").textContent = `${c.updates_accepted} accepted · ${c.pending_updates} pending · ${c.rejected} rejected`;
  const roster = job.roster;
  $("clients").textContent = roster.total;
  $("client-states").textContent = Object.entries(roster.by_state).map(([s, n]) => `${n} ${s}`).join(" · ");
  $("slots").textContent = job.slots ? `${job.slots.active} / ${job.slots.max_concurrent_trainers}` : "none";
  $("strategy").textContent = job.strategy + (job.secure_aggregation ? " · secure aggregation" : "");

  lineChart($("chart-version"), job.versions.map(([v, t]) => [t, v]), { step: true, yLabel: (y) => y.toFixed(0) });
  const federated = evaluations.filter((e) => e.metrics.federated_accuracy !== undefined);
  const serverPoints = accuracy.map((e) => [e.time, e.metrics.accuracy]);
  const federatedPoints = federated.map((e) => [e.time, e.metrics.federated_accuracy]);
  lineChart($("chart-accuracy"), serverPoints.length ? serverPoints : federatedPoints, {
    yLabel: (y) => (100 * y).toFixed(0) + "%", empty: "no evaluations yet (configure an evaluator, or clients report them)",
    extra: serverPoints.length ? federatedPoints : [],  // clients' (federated) accuracy, a second line
  });
  barChart($("chart-staleness"), job.staleness);
  lineChart($("chart-rate"), job.update_rate.series, { yLabel: (y) => y.toFixed(1), zero: true });

  renderRoster(roster);
  renderCohorts(job.cohorts, job.server_time);
  renderRejections(job.rejections);
}

function cells(row, values) {
  const tr = document.createElement("tr");
  values.forEach((value, i) => {
    const td = document.createElement("td");
    td.textContent = value === null || value === undefined ? "–" : String(value);
    if (row && row[i]) td.className = row[i];
    tr.appendChild(td);
  });
  return tr;
}

function renderRoster(roster) {
  $("roster-note").textContent = `(dropped: silent for over ${roster.dropped_after_s.toFixed(0)} s` +
    (roster.total > roster.clients.length ? `; ${roster.clients.length} of ${roster.total} shown)` : ")");
  $("roster").replaceChildren(...roster.clients.map((client) => {
    const d = client.device || {};
    const battery = client.device ? (d.battery_level === null ? "mains" : (100 * d.battery_level).toFixed(0) + " %") : null;
    const yes = (v) => (v === undefined ? null : v ? "yes" : "no");
    return cells([null, "state-" + client.state], [
      client.client_id, client.state, client.base_version, ago(client.last_seen_s), client.updates_accepted,
      client.slot_version === null ? "" : "v" + client.slot_version, d.profile || null, battery,
      yes(d.charging), yes(d.idle), yes(d.unmetered),
    ]);
  }));
}

function renderCohorts(cohorts, now) {
  $("cohorts-section").hidden = !cohorts;
  if (!cohorts) return;
  $("cohort-waiting").textContent = `${cohorts.waiting} waiting to form a cohort of ${cohorts.cohort_size}`;
  $("cohorts").replaceChildren(...cohorts.live.map((c) => cells(null, [
    c.cohort_id, c.phase.replace("_", " "), c.deadline === null ? "" : `${c.answered} / ${c.expected}`, c.uploaded, c.needed, c.members,
    c.deadline === null ? "" : "in " + Math.max(0, c.deadline - now).toFixed(0) + " s",
    c.applied_version !== null ? "version " + c.applied_version : c.abort_reason || "",
  ])));
}

function renderRejections(rejections) {
  $("rejection-counts").textContent = Object.entries(rejections.by_reason).map(([r, n]) => `${r}: ${n}`).join(" · ");
  $("rejections").replaceChildren(...rejections.recent.map((r) => cells(null, [clock(r.time), r.client_id || "–", r.reason])));
}

// -- charts: plain SVG ------------------------------------------------------------

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function frame(svg) {
  const width = svg.clientWidth || 420;
  const height = svg.clientHeight || 180;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  return { width, height, left: 44, right: 10, top: 8, bottom: 22 };
}

function empty(svg, box, message) {
  svg.appendChild(svgEl("text", { x: box.width / 2, y: box.height / 2, "text-anchor": "middle", class: "empty" }, message));
}

function axes(svg, box, x0, x1, y0, y1, xLabel, yLabel) {
  const { width, height, left, right, top, bottom } = box;
  svg.appendChild(svgEl("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, class: "axis" }));
  svg.appendChild(svgEl("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axis" }));
  svg.appendChild(svgEl("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, yLabel(y1)));
  svg.appendChild(svgEl("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, yLabel(y0)));
  svg.appendChild(svgEl("text", { x: left, y: height - 6 }, xLabel(x0)));
  svg.appendChild(svgEl("text", { x: width - right, y: height - 6, "text-anchor": "end" }, xLabel(x1)));
}

function lineChart(svg, points, options) {
  const box = frame(svg);
  if (points.length === 0) return empty(svg, box, options.empty || "no data yet");
  const xs = points.concat(options.extra || []).map((p) => p[0]);
  const extra = options.extra || [];
  const ys = points.concat(extra).map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = options.zero ? 0 : Math.min(...ys), y1 = Math.max(...ys);
  if (y1 <= y0) y1 = y0 + 1;
  const sx = (x) => box.left + ((x - x0) / (x1 - x0)) * (box.width - box.left - box.right);
  const sy = (y) => box.height - box.bottom - ((y - y0) / (y1 - y0)) * (box.height - box.top - box.bottom);
  axes(svg, box, x0, x1, y0, y1, clock, options.yLabel);
  let d = "";
  points.forEach(([x, y], i) => {
    if (i === 0) d += `M${sx(x)},${sy(y)}`;
    else d += options.step ? `H${sx(x)}V${sy(y)}` : `L${sx(x)},${sy(y)}`;
  });
  svg.appendChild(svgEl("path", { d, class: "line" }));
  if (extra.length) {
    const e = extra.map(([x, y], i) => `${i ? "L" : "M"}${sx(x)},${sy(y)}`).join("");
    svg.appendChild(svgEl("path", { d: e, class: "line federated" })).appendChild(svgEl("title", {}, "federated (clients') accuracy"));
  }
}

function barChart(svg, counts) {
  const box = frame(svg);
  if (counts.length === 0) return empty(svg, box, "no updates accepted yet");
  const maxStaleness = counts[counts.length - 1][0];
  const maxCount = Math.max(...counts.map((c) => c[1]));
  const slots = Math.max(maxStaleness + 1, 10);  // a lone bar stays a bar, not a wall
  const slotWidth = (box.width - box.left - box.right) / slots;
  axes(svg, box, 0, slots - 1, 0, maxCount, (x) => String(x), (y) => y.toFixed(0));
  for (const [staleness, count] of counts) {
    const h = (count / maxCount) * (box.height - box.top - box.bottom);
    svg.appendChild(svgEl("rect", {
      x: box.left + staleness * slotWidth + 1, y: box.height - box.bottom - h,
      width: Math.max(1, slotWidth - 2), height: h, class: "bar",
    }, undefined)).appendChild(svgEl("title", {}, `staleness ${staleness}: ${count}`));
  }
}

// -- wiring -----------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("");
  });
  $("job-select").addEventListener("change", (event) => {
    currentJob = event.target.value;
    location.hash = encodeURIComponent(currentJob);
    poll();
  });
  start();
});
