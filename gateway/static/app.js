// CityGrid status page: a map of every device from the registry, kept live by the gateway's
// server-sent events; the figures from /api/v1/status. Everything needs the bearer token,
// kept in sessionStorage (from the #token=… address `citygrid up` prints, or typed in).
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const state = { devices: new Map(), selected: null, tz: "UTC", charts: {}, summaryTimer: null,
                unregistered: [], registering: null, picking: false, unproject: null,
                unregisteredTimer: null, project: null, orders: [], ordersTimer: null,
                role: null };

// ------------------------------------------------------------------ token and requests

function token() { return sessionStorage.getItem("citygrid-token"); }

// `#device=ID` (an alert's link) opens that light or meter once the devices are loaded.
function deviceFromAddress() {
  const m = location.hash.match(/device=([^&]+)/);
  return m ? decodeURIComponent(m[1]) : null;
}

function takeTokenFromAddress() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("citygrid-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);  // keep it out of the address bar
  }
}

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const res = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${token()}`, "Content-Type": "application/json",
               ...(options.headers || {}) },
  });
  if (res.status === 401) { showLogin("That token was not accepted."); throw new ApiError(401); }
  const text = await res.text();
  const body = text ? JSON.parse(text) : null;
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("login-error").textContent = message || "";
}

// ------------------------------------------------------------------ formatting

function fmtTime(ms, withDay) {
  if (ms == null) return "–";
  return new Intl.DateTimeFormat("en-GB", {
    timeZone: state.tz, hour: "2-digit", minute: "2-digit",
    ...(withDay ? { weekday: "short" } : {}),
  }).format(new Date(ms));
}

function levelColour(level) {
  if (level == null) return "#555b69";
  if (level <= 0) return "var(--off)";
  return `hsl(45 100% ${Math.round(16 + 0.44 * level)}%)`;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

// ------------------------------------------------------------------ the map

function drawMap(devices) {
  const svg = $("map");
  svg.replaceChildren();
  const lats = devices.map((d) => d.lat), lons = devices.map((d) => d.lon);
  const minLat = Math.min(...lats), maxLat = Math.max(...lats);
  const minLon = Math.min(...lons), maxLon = Math.max(...lons);
  const k = Math.cos(((minLat + maxLat) / 2) * Math.PI / 180);  // metres per degree, east vs north
  const w = (maxLon - minLon) * k || 0.01, h = (maxLat - minLat) || 0.01;
  const W = 1000, H = Math.max(300, Math.round(W * h / w)), pad = 20;
  svg.setAttribute("viewBox", `${-pad} ${-pad} ${W + 2 * pad} ${H + 2 * pad}`);
  const x = (lon) => (lon - minLon) * k / w * W;
  const y = (lat) => (maxLat - lat) / h * H;
  state.unproject = (sx, sy) => [maxLat - sy / H * h, minLon + sx / W * w / k];  // → [lat, lon]
  state.project = (lat, lon) => [x(lon), y(lat)];

  const districts = new Map();
  for (const d of devices) {
    const c = districts.get(d.district) || { x: 0, y: 0, n: 0 };
    c.x += x(d.lon); c.y += y(d.lat); c.n += 1;
    districts.set(d.district, c);
  }
  const labels = document.createElementNS(SVG, "g");
  for (const [name, c] of districts) {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("class", "district");
    t.setAttribute("x", (c.x / c.n).toFixed(1));
    t.setAttribute("y", (c.y / c.n - 14).toFixed(1));
    t.textContent = name;
    labels.appendChild(t);
  }
  // Lights stand 25–40 m apart along their street: size the dots so neighbours do not overlap.
  const ls = devices.filter((d) => d.kind === "streetlight").map((d) => [x(d.lon), y(d.lat)]);
  const gaps = ls.slice(0, 200).map(([ax, ay]) => Math.min(...ls.map(([bx, by]) =>
    (ax === bx && ay === by) ? Infinity : Math.hypot(ax - bx, ay - by)))).sort((a, b) => a - b);
  const gap = gaps.length ? gaps[Math.floor(gaps.length / 2)] : 10;
  const r = Math.max(1.5, Math.min(5, gap * 0.42)).toFixed(1);
  const layer = document.createElementNS(SVG, "g");
  for (const d of devices) {
    let el;
    if (d.kind === "streetlight") {
      el = document.createElementNS(SVG, "circle");
      el.setAttribute("r", r);
      el.setAttribute("class", "light");
      el.addEventListener("click", () => select(d.device_id));
    } else {
      el = document.createElementNS(SVG, "rect");
      el.setAttribute("width", "6");
      el.setAttribute("height", "6");
      el.setAttribute("class", "meter");
    }
    el.id = `dev-${d.device_id}`;
    el.dataset.device = d.device_id;
    const cx = x(d.lon), cy = y(d.lat);
    if (d.kind === "streetlight") { el.setAttribute("cx", cx.toFixed(1)); el.setAttribute("cy", cy.toFixed(1)); }
    else { el.setAttribute("x", (cx - 3).toFixed(1)); el.setAttribute("y", (cy - 3).toFixed(1)); }
    const title = document.createElementNS(SVG, "title");
    el.appendChild(title);
    layer.appendChild(el);
    state.devices.set(d.device_id, { info: d, el, title, live: {} });
  }
  const orders = document.createElementNS(SVG, "g");
  orders.id = "orders-layer";
  svg.append(labels, layer, orders);
  state.markerR = Math.max(7, Number(r) * 2.5);  // seen even where lights crowd
  drawOrders();
  const lights = devices.filter((d) => d.kind === "streetlight").length;
  $("map-count").textContent = `${lights} lights, ${devices.length - lights} meters`;
}

function paint(id) {
  const dev = state.devices.get(id);
  if (!dev) return;
  const s = dev.live;
  if (dev.info.kind === "streetlight") {
    const level = s.level;
    dev.el.setAttribute("fill", levelColour(level));
    dev.el.dataset.level = level == null ? "" : String(level);
    dev.el.classList.toggle("pending", !!s.pending);
    dev.title.textContent = `${id} (${dev.info.district}): ${level == null ? "no reading yet" : level + " %"}`
      + (s.reason ? ` — ${s.reason}` : "");
  } else {
    dev.title.textContent = `${id} (${dev.info.district}): ${s.power_w == null ? "–" : s.power_w + " W"}`;
  }
}

// ------------------------------------------------------------------ live stream

function applyChanges(msg) {
  for (const [id, s] of Object.entries(msg.devices || {})) {
    const dev = state.devices.get(id);
    if (!dev) continue;
    dev.live = s;
    paint(id);
    if (state.selected === id) showReading(id);
  }
  let newest = 0;
  for (const s of Object.values(msg.devices || {})) newest = Math.max(newest, s.ts || 0);
  if (newest) $("clock").textContent = `city time ${fmtTime(newest, true)}`;
  const body = $("commands");
  for (const c of msg.commands || []) {
    const row = body.insertRow(0);
    cell(row, fmtTime(c.ts));
    cell(row, c.device_id);
    cell(row, `${c.level} %`);
    cell(row, c.reason || "");
  }
  while (body.rows.length > 12) body.deleteRow(-1);
  if ((msg.settlements || []).length) loadSummary();
}

async function stream() {
  for (;;) {
    try {
      const res = await fetch("/api/v1/stream", { headers: { Authorization: `Bearer ${token()}` } });
      if (res.status === 401) { showLogin("That token was not accepted."); return; }
      if (!res.ok) throw new Error(`stream: HTTP ${res.status}`);
      $("live").className = "live on";
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data: "))
            .map((l) => l.slice(6)).join("\n");
          if (data) applyChanges(JSON.parse(data));
        }
      }
    } catch (e) {
      console.warn("live stream interrupted; reconnecting", e.message);
    }
    $("live").className = "live off";
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// ------------------------------------------------------------------ figures

function chart(key, target, opts, data) {
  const width = Math.max(200, target.clientWidth || 400);
  if (state.charts[key]) state.charts[key].destroy();
  state.charts[key] = new uPlot({ width, height: 150, ...opts }, data, target);
}

const axes = [{ stroke: "#8b97ad", grid: { stroke: "#2a3347" }, ticks: { stroke: "#2a3347" } },
              { stroke: "#8b97ad", grid: { stroke: "#2a3347" }, ticks: { stroke: "#2a3347" } }];

async function loadSummary() {
  let s;
  try { s = await api("/api/v1/status"); } catch (e) { return; }
  state.tz = s.city.timezone;
  $("city-name").textContent = `— ${s.city.name}`;
  const l = s.lighting;
  if (l) {
    $("saved-pct").textContent = l.saved_pct == null ? "–" : `${l.saved_pct} %`;
    $("used-kwh").textContent = `${l.actual_total_kwh.toFixed(1)} kWh`;
    $("co2").textContent = `${l.co2_avoided_kg.toFixed(1)} kg`;
    chart("energy", $("energy-chart"), {
      // One hour of data is one point, which uPlot pads to years (before it asks `range`):
      // the axis spans the data itself, at least an hour.
      scales: { x: { time: true, range: (u) => {
        const xs = u.data[0];
        if (!xs.length) return [Date.now() / 1000 - 3600, Date.now() / 1000];
        const lo = xs[0], hi = xs[xs.length - 1];
        return hi - lo < 3600 ? [lo - 1800, hi + 1800] : [lo, hi];
      } } },
      axes, tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), state.tz),
      series: [{}, { label: "used kWh", stroke: "#ffd84a", fill: "#ffd84a33" },
               { label: "all night at full", stroke: "#8b97ad", dash: [4, 4] }],
    }, [l.hours_ms.map((t) => t / 1000), l.actual_kwh, l.baseline_kwh]);
  }
  const saving = $("lighting-districts");
  saving.replaceChildren();
  for (const x of s.lighting_districts || []) {
    const row = saving.insertRow();
    cell(row, x.district);
    cell(row, `${x.used_kwh.toFixed(1)} kWh`);
    cell(row, `${x.baseline_kwh.toFixed(1)} kWh`);
    cell(row, x.saved_pct == null ? "–" : `${x.saved_pct} %`, "num");
  }
  const d = s.districts || [];
  if (d.length) {
    chart("districts", $("district-chart"), {
      scales: { x: { time: false, range: [-0.5, d.length - 0.5] } },
      axes: [{ ...axes[0], values: (u, ticks) => ticks.map((i) => (d[i] ? d[i].district.slice(0, 6) : "")),
               splits: () => d.map((_, i) => i), rotate: -45, size: 50 }, axes[1]],
      series: [{}, { label: "kWh", fill: "#5fb3ff99", stroke: "#5fb3ff",
                     paths: uPlot.paths.bars({ size: [0.7, 40] }), points: { show: false } }],
    }, [d.map((_, i) => i), d.map((x) => x.kwh)]);
  }
  const alerts = $("alerts");
  alerts.replaceChildren();
  for (const a of s.alerts) {
    const li = document.createElement("li");
    li.className = `sev-${a.severity}`;
    li.textContent = `${fmtTime(a.since_ms)} [${a.severity}] ${a.message}`;
    const lights = alarmedLights(a.scope);
    if (lights.length) {  // a light's alarm (or a cabinet's): click to open the light
      li.classList.add("link");
      li.addEventListener("click", () => select(lights[0]));
    }
    alerts.appendChild(li);
  }
  $("alert-count").textContent = String(s.alerts.length);
  markAlarms(s.alerts);
  const ledger = $("ledger");
  ledger.textContent = s.ledger.ok ? `ledger verified · ${s.ledger.entries} entries` : `ledger BROKEN: ${s.ledger.error}`;
  ledger.className = `badge ${s.ledger.ok ? "ok" : "bad"}`;
  const body = $("settlements");
  body.replaceChildren();
  for (const e of s.settlements) {
    const row = body.insertRow();
    cell(row, fmtTime(e.to_ms, true));
    cell(row, e.meter);
    cell(row, Number(e.kwh).toFixed(2));
    cell(row, `${(e.amount_minor / 100).toFixed(2)} ${e.currency}`);
  }
}

// The lamps with the most burning hours (the rule engine's lamp monitor counts them).
async function loadLamps() {
  let lamps;
  try { lamps = await api("/api/v1/lamps?limit=8"); } catch (e) { return; }
  const body = $("lamps");
  body.replaceChildren();
  for (const l of lamps) {
    const row = body.insertRow();
    row.addEventListener("click", () => select(l.device_id));
    cell(row, l.device_id);
    cell(row, l.lamp_type || "–");
    cell(row, `${Math.round(l.burning_h).toLocaleString("en")} h`, "num");
    cell(row, String(l.switch_ons), "num");
    cell(row, l.remaining_life_h == null ? "–"
      : `${Math.round(l.remaining_life_h).toLocaleString("en")} h`, "num");
  }
  $("lamps-note").textContent = lamps.length ? ""
    : "No burning hours yet: the rule file's lamp monitor counts them (settings.lamp_monitor).";
}

// The lights an alert's scope names: the light itself, or every light of a cabinet.
function alarmedLights(scope) {
  const dev = state.devices.get(scope);
  if (dev) return dev.info.kind === "streetlight" ? [scope] : [];
  const ids = [];
  for (const [id, d] of state.devices) if (d.info.cabinet === scope) ids.push(id);
  return ids;
}

// Lights with an active alarm get a ring on the map in the colour of its severity.
function markAlarms(alerts) {
  const rank = { info: 0, minor: 1, major: 2, critical: 3 };
  const worst = new Map();
  for (const a of alerts) {
    for (const id of alarmedLights(a.scope)) {
      if (!worst.has(id) || rank[a.severity] > rank[worst.get(id)]) worst.set(id, a.severity);
    }
  }
  for (const [id, dev] of state.devices) {
    const severity = worst.get(id);
    dev.el.classList.toggle("alarm", !!severity);
    if (severity) dev.el.dataset.alarm = severity; else delete dev.el.dataset.alarm;
  }
  $("map-alarms").textContent = worst.size ? `${worst.size} with an alarm` : "";
}

// ------------------------------------------------------------------ one light

function showReading(id) {
  const dev = state.devices.get(id);
  const s = dev.live || {};
  const rows = [["district", dev.info.district], ["rated", `${dev.info.rated_w} W`],
    ["level", s.level == null ? "–" : `${s.level} %${s.pending ? " (commanded, not yet confirmed)" : ""}`],
    ["reason", s.reason || "–"], ["power", s.power_w == null ? "–" : `${s.power_w} W`],
    ["ambient", s.lux == null ? "–" : `${s.lux} lx`], ["motion", s.motion == null ? "–" : (s.motion ? "yes" : "no")],
    ["last reading", fmtTime(s.ts, true)]];
  const dl = $("detail-reading");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    dd.dataset.key = k;
    dl.append(dt, dd);
  }
}

async function select(id) {
  if (state.selected) state.devices.get(state.selected).el.classList.remove("selected");
  state.selected = id;
  const dev = state.devices.get(id);
  dev.el.classList.add("selected");
  $("detail").hidden = false;
  $("detail-title").textContent = id;
  $("override-result").textContent = "";
  showReading(id);
  const explain = $("explain");
  explain.textContent = "…";
  try {
    const e = await api(`/api/v1/lights/${encodeURIComponent(id)}/explain`);
    explain.replaceChildren();
    const head = document.createElement("div");
    head.textContent = `${e.level} % because ${e.reason || "nothing asks for more"}`
      + (e.safety_floor.applied ? ` (raised to the ${e.safety_floor.level} % safety floor)` : "");
    explain.appendChild(head);
    for (const w of e.wishes) {
      const div = document.createElement("div");
      const winner = e.winner && w.key === e.winner.key;
      div.className = `wish${winner ? " winner" : ""}`;
      div.textContent = `${winner ? "▶" : "·"} ${w.level} % ${w.class} — ${w.reason}`
        + (w.expires_in_s == null ? "" : `, ${Math.round(w.expires_in_s)} s left`);
      explain.appendChild(div);
    }
  } catch (err) { explain.textContent = `explain failed: ${err.message}`; }
  const end = (dev.live && dev.live.ts) || Date.now();
  const q = (field) => api(`/api/v1/devices/${encodeURIComponent(id)}/history?field=${field}`
    + `&start_ms=${end - 6 * 3600e3}&end_ms=${end + 1}&every_s=300&fn=mean`);
  try {
    const [level, power] = await Promise.all([q("brightness_pct"), q("power_w")]);
    const byTs = new Map(power.map((b) => [b.start_ms, b.value]));
    chart("history", $("history-chart"), {
      scales: { x: { time: true } }, axes, tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), state.tz),
      series: [{}, { label: "level %", stroke: "#ffd84a" }, { label: "power W", stroke: "#5fb3ff" }],
    }, [level.map((b) => b.start_ms / 1000), level.map((b) => b.value),
        level.map((b) => byTs.get(b.start_ms) ?? null)]);
  } catch (err) { $("history-chart").textContent = `history failed: ${err.message}`; }
}

async function override(clear) {
  const id = state.selected;
  const out = $("override-result");
  out.className = "";
  try {
    if (clear) {
      await api(`/api/v1/lights/${encodeURIComponent(id)}/override`, { method: "DELETE" });
      out.textContent = `Override of ${id} cleared: the rules decide again.`;
    } else {
      const level = Number($("override-level").value);
      const minutes = Number($("override-minutes").value);
      await api(`/api/v1/lights/${encodeURIComponent(id)}/override`, {
        method: "PUT", body: JSON.stringify({ level, expires_in_s: minutes * 60 }),
      });
      out.textContent = `Sent: ${id} held at ${level} % for ${minutes} min.`;
    }
  } catch (err) {
    out.className = "error";
    out.textContent = err.status === 403 ? "Overrides need an operator token." : `Refused: ${err.message}`;
  }
}

// ------------------------------------------------------------------ unregistered devices

async function loadUnregistered() {
  let list;
  try { list = await api("/api/v1/devices/unregistered?limit=1000"); } catch (e) { return; }
  state.unregistered = list;
  $("unregistered-count").textContent = String(list.length);
  const body = $("unregistered");
  body.replaceChildren();
  const shown = list.slice(0, 50);
  for (const d of shown) {
    const row = body.insertRow();
    row.dataset.device = d.device_id;
    row.title = d.sample;  // its latest payload, on hover
    if (state.registering && state.registering.device_id === d.device_id
        && state.registering.district === d.district) row.className = "chosen";
    cell(row, d.device_id);
    cell(row, d.kind);
    cell(row, d.district);
    cell(row, fmtTime(d.first_seen, true));
    cell(row, fmtTime(d.last_seen, true));
    cell(row, String(d.count));
    row.addEventListener("click", () => chooseUnregistered(d));
  }
  $("unregistered-more").textContent = list.length > shown.length
    ? `and ${list.length - shown.length} more (GET /api/v1/devices/unregistered)` : "";
}

function chooseUnregistered(d) {
  state.registering = d;
  $("unregistered-note").textContent = "";
  for (const row of $("unregistered").rows) {
    row.classList.toggle("chosen", row.dataset.device === d.device_id && row.cells[2].textContent === d.district);
  }
  const form = $("register-form");
  form.hidden = false;
  $("register-id").textContent = d.device_id;
  $("register-sample").textContent = d.sample;
  $("register-kind").value = d.kind === "meter" ? "meter" : "streetlight";
  form.dataset.kind = $("register-kind").value;
  $("register-district").value = d.district;
  $("register-result").textContent = "";
  $("register-result").className = "";
}

function stopPicking() {
  state.picking = false;
  $("map").classList.remove("picking");
  $("register-pick").textContent = "Pick on map";
}

function pickOnMap(ev) {
  if (!state.picking || !state.unproject) return;
  ev.preventDefault();
  ev.stopPropagation();  // not a click on the light under the pointer
  const svg = $("map");
  const pt = svg.createSVGPoint();
  pt.x = ev.clientX; pt.y = ev.clientY;
  const p = pt.matrixTransform(svg.getScreenCTM().inverse());
  const [lat, lon] = state.unproject(p.x, p.y);
  $("register-lat").value = lat.toFixed(6);
  $("register-lon").value = lon.toFixed(6);
  stopPicking();
}

async function registerDevice() {
  const d = state.registering;
  const out = $("register-result");
  out.className = "";
  const kind = $("register-kind").value;
  const body = { kind, district: $("register-district").value.trim(),
                 lat: Number($("register-lat").value), lon: Number($("register-lon").value) };
  const optional = kind === "streetlight"
    ? { rated_w: $("register-rated").value }
    : { account_id: $("register-account").value.trim(), tariff: $("register-tariff").value.trim() };
  for (const [k, v] of Object.entries(optional)) {
    if (v !== "") body[k] = k === "rated_w" ? Number(v) : v;
  }
  try {
    await api(`/api/v1/devices/unregistered/${encodeURIComponent(d.device_id)}/register`, {
      method: "POST", body: JSON.stringify(body),
    });
    state.registering = null;
    stopPicking();
    $("register-form").hidden = true;
    $("unregistered-note").textContent = `Registered ${d.device_id} (${kind}, ${body.district}): `
      + "it is on the map, and its readings count as registered within seconds.";
    await Promise.all([loadUnregistered(), loadDevices()]);
  } catch (err) {
    out.className = "error";
    out.textContent = err.status === 403 ? "Registering needs an admin token." : `Refused: ${err.message}`;
  }
}

// ------------------------------------------------------------------ work orders

const CAUSES = ["lamp_replaced", "driver_replaced", "cable_fault", "no_fault_found"];

function age(ms) {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 2 * 86400) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

// A ring on the map for every open or assigned order (at its light, its cabinet's first
// light or where a citizen reported it); the lights under it stay clickable.
function drawOrders() {
  const layer = $("orders-layer");
  if (!layer || !state.project) return;
  layer.replaceChildren();
  for (const o of state.orders) {
    if (o.lat == null || o.lon == null) continue;
    const [cx, cy] = state.project(o.lat, o.lon);
    const ring = document.createElementNS(SVG, "circle");
    ring.setAttribute("class", "order");
    ring.setAttribute("cx", cx.toFixed(1));
    ring.setAttribute("cy", cy.toFixed(1));
    ring.setAttribute("r", (state.markerR || 6).toFixed(1));
    ring.dataset.order = o.id;
    ring.dataset.state = o.state;
    const title = document.createElementNS(SVG, "title");
    title.textContent = `${o.id} ${o.problem} — ${o.target} (${o.state})`;
    ring.appendChild(title);
    layer.appendChild(ring);
  }
}

async function loadOrders(force) {
  let list;
  try { list = await api("/api/v1/work-orders?state=open&state=assigned&limit=200"); } catch (e) { return; }
  state.orders = list;
  $("orders-count").textContent = String(list.length);
  drawOrders();
  const body = $("work-orders");
  // Someone typing a crew's name or choosing a cause: the table waits for the next round.
  if (!force && body.contains(document.activeElement)) return;
  body.replaceChildren();
  const shown = list.slice(0, 30);
  for (const o of shown) {
    const row = body.insertRow();
    row.dataset.order = o.id;
    row.className = `problem-${o.problem}`;
    cell(row, o.id);
    cell(row, o.assignee ? `${o.state} (${o.assignee})` : o.state).dataset.key = "state";
    cell(row, o.problem.replaceAll("_", " "));
    const target = cell(row, o.target_kind === "cabinet" ? `cabinet ${o.target}` : o.target);
    if (o.target_kind === "device" && state.devices.has(o.target)) {
      target.className = "link";
      target.addEventListener("click", () => select(o.target));
    }
    cell(row, age(o.created_ms));
    const actions = cell(row, "", "actions for-operator");
    if (o.state === "open") {
      const who = document.createElement("input");
      who.placeholder = "crew";
      who.className = "assignee";
      const assign = document.createElement("button");
      assign.type = "button";
      assign.className = "assign";
      assign.textContent = "Assign";
      assign.addEventListener("click", () => transition(o.id, "assign", { assignee: who.value.trim() }));
      actions.append(who, assign);
    }
    const cause = document.createElement("select");
    cause.className = "cause";
    for (const c of CAUSES) cause.add(new Option(c.replaceAll("_", " "), c));
    const close = document.createElement("button");
    close.type = "button";
    close.className = "close-order";
    close.textContent = "Close";
    close.addEventListener("click", () => transition(o.id, "done", { cause: cause.value }));
    actions.append(cause, close);
  }
  $("orders-more").textContent = list.length > shown.length
    ? `and ${list.length - shown.length} more (GET /api/v1/work-orders)` : "";
}

async function transition(id, action, body) {
  const out = $("orders-result");
  out.className = "";
  try {
    const o = await api(`/api/v1/work-orders/${encodeURIComponent(id)}/${action}`, {
      method: "POST", body: JSON.stringify(body),
    });
    await loadOrders(true);
    out.textContent = o.state === "done" ? `${id} closed (${o.cause.replaceAll("_", " ")}).`
      : `${id} assigned to ${o.assignee}.`;
  } catch (err) {
    out.className = "error";
    out.textContent = err.status === 403 ? "Work orders need an operator token." : `Refused: ${err.message}`;
  }
}

async function downloadOrders(ev) {
  ev.preventDefault();
  const res = await fetch("/api/v1/work-orders.csv", { headers: { Authorization: `Bearer ${token()}` } });
  if (!res.ok) return;
  const url = URL.createObjectURL(await res.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = "work-orders.csv";
  a.click();
  URL.revokeObjectURL(url);
}

// ------------------------------------------------------------------ start

async function loadDevices() {
  const devices = await api("/api/v1/devices");
  const before = state.devices;  // a redraw (a device registered) keeps what the stream said
  state.devices = new Map();
  drawMap(devices);
  for (const d of devices) {
    const old = before.get(d.device_id);
    if (old && Object.keys(old.live).length) {
      state.devices.get(d.device_id).live = old.live;
      paint(d.device_id);
    } else if (d.latest) {
      state.devices.get(d.device_id).live = { ...d.latest, level: d.latest.brightness_pct };
      paint(d.device_id);
    }
  }
  if (state.selected && state.devices.has(state.selected)) {
    state.devices.get(state.selected).el.classList.add("selected");
  }
}

async function open() {
  try { await loadDevices(); } catch (e) {
    if (e.status !== 401) showLogin(`The gateway did not answer: ${e.message}`);
    return;
  }
  $("login").hidden = true;
  $("main").hidden = false;
  if (state.linked && state.devices.has(state.linked)) {
    select(state.linked);
    state.linked = null;
  }
  $("logout").hidden = false;
  api("/api/v1/whoami").then((me) => {
    state.role = me.role;
    $("orders-card").classList.toggle("operator", (me.role === "operator" || me.role === "admin"));
  }).catch(() => {});
  await Promise.all([loadSummary(), loadUnregistered(), loadOrders(), loadLamps()]);
  clearInterval(state.ordersTimer);
  state.ordersTimer = setInterval(() => loadOrders(false), 10000);
  clearInterval(state.summaryTimer);
  state.summaryTimer = setInterval(loadSummary, 15000);
  clearInterval(state.lampsTimer);
  state.lampsTimer = setInterval(loadLamps, 60000);
  clearInterval(state.unregisteredTimer);
  state.unregisteredTimer = setInterval(loadUnregistered, 5000);
  stream();
}

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("citygrid-token", $("token-input").value.trim());
  open();
});
$("logout").addEventListener("click", () => { sessionStorage.removeItem("citygrid-token"); location.reload(); });
$("detail-close").addEventListener("click", () => { $("detail").hidden = true; });
$("override-form").addEventListener("submit", (ev) => { ev.preventDefault(); override(false); });
$("override-clear").addEventListener("click", () => override(true));
$("register-form").addEventListener("submit", (ev) => { ev.preventDefault(); registerDevice(); });
$("register-kind").addEventListener("change", () => { $("register-form").dataset.kind = $("register-kind").value; });
$("register-cancel").addEventListener("click", () => {
  state.registering = null; stopPicking(); $("register-form").hidden = true;
  for (const row of $("unregistered").rows) row.classList.remove("chosen");
});
$("register-pick").addEventListener("click", () => {
  if (state.picking) { stopPicking(); return; }
  state.picking = true;
  $("map").classList.add("picking");
  $("register-pick").textContent = "Click the map… (cancel)";
});
$("map").addEventListener("click", pickOnMap, true);
$("orders-csv").addEventListener("click", downloadOrders);

state.linked = deviceFromAddress();
takeTokenFromAddress();
if (token()) open(); else showLogin();
