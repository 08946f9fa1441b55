// labctl console client: plain JavaScript, no build step. Live updates come from one server-sent-events
// stream (/api/live); nothing here polls. Every action is a POST with the session's CSRF token; the
// controller's role table decides, and its answer is shown as it is.
'use strict';

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c.nodeType ? c : String(c));
  return e;
};
const SVG = 'http://www.w3.org/2000/svg';
const svg = (tag, attrs = {}, ...children) => {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children.flat()) if (c) e.append(c.nodeType ? c : document.createTextNode(String(c)));
  return e;
};
const time = (ms) => (ms ? new Date(ms).toLocaleTimeString() : '');
const fmt = (v) => (typeof v === 'number' ? (Math.abs(v) >= 1000 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(3)) : String(v));

const state = {
  me: null, csrf: null, caps: null, units: {}, snapshot: null, history: {}, source: null,
  offlineSince: null, retry: 1000, page: 'lab', openRun: null, approvals: [],
};
const HISTORY = 60;

// ---------- HTTP ----------
async function api(path, options = {}) {
  const headers = { 'Accept': 'application/json' };
  if (options.body !== undefined) headers['Content-Type'] = 'application/json';
  if (options.method && options.method !== 'GET' && state.csrf) headers['X-CSRF-Token'] = state.csrf;
  const r = await fetch(path, {
    method: options.method || 'GET', headers, credentials: 'same-origin',
    body: options.body !== undefined ? JSON.stringify(options.body) : undefined,
  });
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (!r.ok) {
    const err = new Error((data && data.error) || `${r.status} ${r.statusText}`);
    err.status = r.status;
    throw err;
  }
  return data;
}
const act = (path, body) => api(path, { method: 'POST', body: body === undefined ? {} : body });

function flash(text, isError) {
  const f = $('#flash');
  f.textContent = text;
  f.className = isError ? 'error' : '';
  f.hidden = false;
  clearTimeout(flash.t);
  flash.t = setTimeout(() => { f.hidden = true; }, isError ? 12000 : 5000);
}

async function attempt(what, fn) {
  try {
    const r = await fn();
    flash(`${what}: done`);
    return r;
  } catch (e) {
    flash(`${what}: refused: ${e.message}`, true);
    if (e.status === 401) showLogin();
    return null;
  }
}

// ---------- login ----------
function showLogin() {
  if (state.source) { state.source.close(); state.source = null; }
  state.me = null; state.csrf = null;
  setOffline(false);
  for (const id of ['#nav', '#estop', '#logout', '#latch']) $(id).hidden = true;
  $('#who').textContent = '';
  showPage('login');
}

$('#login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const err = $('#login-error');
  err.hidden = true;
  try {
    const me = await api('/api/login', { method: 'POST', body: { user: $('#login-user').value, password: $('#login-password').value } });
    $('#login-password').value = '';
    await start(me);
  } catch (e) {
    err.textContent = e.message;
    err.hidden = false;
  }
});

$('#logout').addEventListener('click', async () => {
  try { await act('/api/logout'); } catch (_) { /* ended anyway */ }
  showLogin();
});

// ---------- start, live stream, disconnection ----------
async function start(me) {
  state.me = me; state.csrf = me.csrf;
  $('#who').textContent = `${me.user} (${me.role})`;
  for (const id of ['#nav', '#estop', '#logout']) $(id).hidden = false;
  const lab = await api('/api/lab');
  state.caps = lab.capabilities;
  state.interlocks = lab.interlocks;
  state.interlockDefs = lab.interlock_definitions;
  $('#lab-id').textContent = lab.capabilities.lab_id;
  state.units = {};
  for (const i of lab.capabilities.instruments) {
    for (const q of i.quantities || []) state.units[`${i.id}/${q.name}`] = q.unit;
  }
  renderInterlocks();
  setLatch(lab.estop_latched);
  connect();
  route();
  refreshApprovals();
}

function connect() {
  if (state.source) state.source.close();
  const source = new EventSource('/api/live');
  state.source = source;
  source.addEventListener('open', () => {
    const wasOffline = state.offlineSince !== null;
    setOffline(false);
    state.retry = 1000;
    if (wasOffline) { refreshInterlocks(); refreshApprovals(); route(); }
  });
  source.addEventListener('snapshot', (ev) => onSnapshot(JSON.parse(ev.data)));
  source.addEventListener('record', (ev) => onRecord(JSON.parse(ev.data)));
  source.addEventListener('lagged', () => { refreshApprovals(); route(); });
  source.addEventListener('error', () => {
    setOffline(true);
    // The browser retries by itself while the stream is CONNECTING; a refused stream (a new controller
    // does not know this session) is CLOSED: find out whether to log in again.
    if (source.readyState === EventSource.CLOSED) reconnectLater();
  });
}

function reconnectLater() {
  setTimeout(async () => {
    try {
      const me = await api('/api/me');
      state.csrf = me.csrf;
      connect();
    } catch (e) {
      if (e.status === 401) { showLogin(); flash('The controller restarted: log in again', true); return; }
      state.retry = Math.min(state.retry * 2, 10000);
      reconnectLater();
    }
  }, state.retry);
}

function setOffline(off) {
  if (off && state.offlineSince === null) state.offlineSince = new Date();
  if (!off) state.offlineSince = null;
  document.body.classList.toggle('offline', off);
  $('#disconnected').hidden = !off;
  if (off) $('#disconnected-since').textContent = state.offlineSince.toLocaleTimeString();
}

function setLatch(latched, detail) {
  const l = $('#latch');
  l.hidden = !latched;
  if (detail !== undefined) $('#latch-detail').textContent = detail;
  document.body.classList.toggle('latched', !!latched);
}

let pending = {};
function soon(key, fn, ms = 300) {
  if (pending[key]) return;
  pending[key] = setTimeout(() => { pending[key] = null; fn(); }, ms);
}

function onRecord(r) {
  switch (r.record) {
    case 'e_stop_latch':
      setLatch(r.latched, r.latched ? `by ${r.actor || 'the controller'} at ${time(r.at_ms)}${r.reason ? ': ' + r.reason : ''}` : '');
      break;
    case 'run_created': case 'run_state': case 'approval':
      soon('approvals', refreshApprovals);
      if (state.page === 'runs') soon('runs', renderRuns);
      break;
    case 'result':
      if (state.page === 'runs' && state.openRun === r.run_id) soon('run', () => openRun(r.run_id, true), 500);
      break;
    case 'event':
      if (String(r.kind).startsWith('interlock')) soon('interlocks', refreshInterlocks);
      if (state.page === 'runs' && state.openRun && r.run_id === state.openRun) appendRunEvent(r);
      break;
  }
  if (state.page === 'log' && r.record !== 'result') soon('log', renderLog, 800);
}

// ---------- pages ----------
function showPage(name) {
  state.page = name;
  for (const p of document.querySelectorAll('.page')) p.hidden = p.id !== `page-${name}`;
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.page === name);
}

function route() {
  if (!state.me) return showLogin();
  const [page, arg] = (location.hash.slice(1) || 'lab').split('/');
  const name = ['lab', 'approvals', 'runs', 'log'].includes(page) ? page : 'lab';
  showPage(name);
  if (name === 'lab') renderLab();
  if (name === 'approvals') renderApprovals();
  if (name === 'runs') { renderRuns(); if (arg) openRun(decodeURIComponent(arg)); else { state.openRun = null; $('#run-detail').replaceChildren(); } }
  if (name === 'log') renderLog();
}
window.addEventListener('hashchange', route);

// ---------- lab ----------
function onSnapshot(s) {
  state.snapshot = s;
  for (const i of s.instruments) {
    for (const [q, v] of i.values) {
      const key = `${i.id}/${q}`;
      const h = state.history[key] || (state.history[key] = []);
      h.push(v);
      if (h.length > HISTORY) h.shift();
    }
  }
  if (s.estop_latched !== !$('#latch').hidden) setLatch(s.estop_latched, s.estop_latched ? $('#latch-detail').textContent : '');
  if (state.page === 'lab') renderLab();
  if (state.page === 'runs' && state.openRun) updateRunProgress();
}

function spark(values) {
  if (!values || values.length < 2) return svg('svg', { class: 'spark', viewBox: '0 0 80 22' });
  const min = Math.min(...values), max = Math.max(...values), span = max - min || 1;
  // The newest value at the right edge; a constant value is a line through the middle.
  const n = values.length;
  const pts = values.map((v, i) => `${80 - ((n - 1 - i) / (HISTORY - 1)) * 80},${max === min ? 11 : 20 - ((v - min) / span) * 18}`).join(' ');
  return svg('svg', { class: 'spark', viewBox: '0 0 80 22', preserveAspectRatio: 'none' }, svg('polyline', { points: pts }));
}

// Cards are built once and updated in place: a snapshot arrives several times a second.
const cards = new Map();
function instrumentCard(i) {
  const c = {
    conn: el('span', { class: 'badge' }), state: el('span', { class: 'badge' }),
    ident: el('div', { class: 'identity' }), err: el('div', { class: 'error' }),
    tbody: el('tbody', {}), rows: new Map(),
  };
  c.root = el('div', { class: 'card instrument', 'data-instrument': i.id, id: `instrument-${i.id}` },
    el('h3', {}, i.id, el('span', {}, c.conn, ' ', c.state)), c.ident, c.err,
    el('table', { class: 'values' }, c.tbody));
  return c;
}

function renderLab() {
  const s = state.snapshot;
  if (!s) return;
  const box = $('#instruments');
  const ids = s.instruments.map((i) => i.id).join(' ');
  if (ids !== renderLab.ids) {
    cards.clear();
    for (const i of s.instruments) cards.set(i.id, instrumentCard(i));
    box.replaceChildren(...[...cards.values()].map((c) => c.root));
    renderLab.ids = ids;
  }
  for (const i of s.instruments) {
    const c = cards.get(i.id);
    c.conn.textContent = i.connection;
    c.conn.className = `badge ${i.connection}`;
    c.state.textContent = i.state || '';
    c.state.className = `badge ${i.state || ''}`;
    c.state.hidden = !i.state;
    const id = i.identity;
    c.ident.textContent = id ? `${id.manufacturer} ${id.model} · s/n ${id.serial} · fw ${id.firmware}` : 'identity not read yet';
    c.err.textContent = i.detail || i.state_detail || '';
    c.err.hidden = !c.err.textContent;
    for (const [q, v] of i.values) {
      let row = c.rows.get(q);
      if (!row) {
        row = { value: el('td', { class: 'v' }), spark: el('td', {}) };
        c.rows.set(q, row);
        c.tbody.append(el('tr', { 'data-quantity': q }, el('td', {}, q.replace(/_(mm|ul|g|c|rpm|nm|au)$/i, '')), row.value, row.spark));
      }
      row.value.textContent = `${fmt(v)} ${state.units[`${i.id}/${q}`] || ''}`;
      row.spark.replaceChildren(spark(state.history[`${i.id}/${q}`]));
    }
  }
}

async function refreshInterlocks() {
  try { const lab = await api('/api/lab'); state.interlocks = lab.interlocks; renderInterlocks(); } catch (_) { /* shown when back */ }
}

function renderInterlocks() {
  const defs = Object.fromEntries((state.interlockDefs || []).map((d) => [d.name, d]));
  const rows = (state.interlocks || []).map((i) => {
    const d = defs[i.name] || {};
    const cond = d.on_alarm ? 'on alarm' : `${d.quantity || ''} ${d.above !== undefined && d.above !== null ? '> ' + d.above : ''}${d.below !== undefined && d.below !== null ? '< ' + d.below : ''}`;
    return el('tr', {}, el('td', {}, i.name), el('td', {}, d.instrument || ''), el('td', {}, cond),
      el('td', {}, el('span', { class: `badge ${i.state}` }, i.state), i.reason ? ` ${i.reason}` : ''));
  });
  $('#interlocks tbody').replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { colspan: 4 }, 'no interlocks in the lab file'))]));
}

$('#estop').addEventListener('click', () => attempt('Emergency stop', () => act('/api/estop')));
$('#estop-ack').addEventListener('click', () => attempt('Acknowledge the emergency stop', () => act('/api/estop/acknowledge')));

// ---------- approvals ----------
async function refreshApprovals() {
  try {
    state.approvals = await api('/api/approvals');
  } catch (e) { if (e.status === 401) showLogin(); return; }
  $('#pending-count').textContent = state.approvals.length || '';
  if (state.page === 'approvals') renderApprovals();
}

function pathPicture(ev) {
  const pts = ev.deck.concat(ev.gantry_path);
  if (!pts.length) return el('p', {}, 'no deck positions');
  const xs = pts.map((p) => p.x_mm), ys = pts.map((p) => p.y_mm);
  const minX = Math.min(...xs) - 15, maxX = Math.max(...xs) + 15, minY = Math.min(...ys) - 15, maxY = Math.max(...ys) + 15;
  const pic = svg('svg', { viewBox: `${minX} ${minY} ${maxX - minX} ${maxY - minY}`, class: 'gantry-path', role: 'img', 'aria-label': 'gantry path' });
  for (const p of ev.deck) {
    pic.append(svg('circle', { cx: p.x_mm, cy: p.y_mm, r: 3.5, fill: '#fff', stroke: '#9aa3b2' }));
    if (!/^[A-Z]\d+$/.test(p.name) || p.name.endsWith('1')) pic.append(svg('text', { x: p.x_mm + 5, y: p.y_mm - 4, 'font-size': 6, fill: '#5b6575' }, p.name));
  }
  if (ev.gantry_path.length) {
    pic.append(svg('polyline', { points: ev.gantry_path.map((p) => `${p.x_mm},${p.y_mm}`).join(' '), fill: 'none', stroke: '#1f5fbf', 'stroke-width': 1.5, 'marker-end': 'url(#arrow)' }));
    ev.gantry_path.forEach((p, i) => pic.append(svg('text', { x: p.x_mm - 3, y: p.y_mm + 10, 'font-size': 6, fill: '#1f5fbf' }, String(i + 1))));
    pic.append(svg('circle', { cx: ev.gantry_path[0].x_mm, cy: ev.gantry_path[0].y_mm, r: 3, fill: '#1b7f3b' }));
  }
  return pic;
}

const PUMP_COLOURS = { 'pump-red': '#d33', 'pump-yellow': '#e0b000', 'pump-blue': '#2a5bd7' };
function volumePicture(ev) {
  if (!ev.volumes.length) return el('p', {}, 'nothing is dispensed');
  const w = 50, gap = 110, h = 120;
  const pic = svg('svg', { viewBox: `0 0 ${ev.volumes.length * (w + gap) + 40} ${h + 40}`, class: 'volumes', role: 'img', 'aria-label': 'volumes per vessel' });
  ev.volumes.forEach((v, i) => {
    const total = v.initial_ul + v.added_ul.reduce((a, [, ul]) => a + ul, 0);
    // Drawn to the total, so small volumes in a large vial still show their proportions; the fill of
    // the vial is in words below.
    const cap = total || 1;
    const x = 30 + i * (w + gap);
    pic.append(svg('rect', { x, y: 10, width: w, height: h, fill: '#fff', stroke: '#5b6575' }));
    let y = 10 + h;
    const layers = (v.initial_ul ? [['initial', v.initial_ul]] : []).concat(v.added_ul);
    for (const [who, ul] of layers) {
      const lh = Math.min(h, (ul / cap) * h);
      y -= lh;
      pic.append(svg('rect', { x, y, width: w, height: lh, fill: PUMP_COLOURS[who] || '#8a94a6' }, svg('title', {}, `${who}: ${ul} uL`)));
    }
    pic.append(svg('text', { x: x + w / 2, y: h + 24, 'font-size': 10, 'text-anchor': 'middle' }, v.vessel));
    pic.append(svg('text', { x: x + w / 2, y: h + 36, 'font-size': 9, 'text-anchor': 'middle', fill: '#5b6575' }, `${total} of ${v.capacity_ul || '?'} uL`));
    let ly = 20;
    for (const [who, ul] of layers) {
      pic.append(svg('rect', { x: x + w + 4, y: ly - 7, width: 8, height: 8, fill: PUMP_COLOURS[who] || '#8a94a6' }));
      pic.append(svg('text', { x: x + w + 15, y: ly, 'font-size': 8 }, `${who} ${ul} uL`));
      ly += 12;
    }
  });
  return pic;
}

function renderApprovals() {
  const box = $('#approvals');
  if (!state.approvals.length) { box.replaceChildren(el('p', { id: 'no-approvals' }, 'Nothing awaits a decision.')); return; }
  box.replaceChildren(...state.approvals.map((a) => {
    const r = a.run, v = a.validation || {}, d = a.dry_run, ev = a.evidence;
    const reason = el('input', { placeholder: 'reason for rejecting', id: `reason-${r.run_id}` });
    const findings = (v.findings || []).map((f) => el('li', { class: `finding ${f.severity}` }, `${f.severity}: ${f.path ? f.path + ': ' : ''}${f.message}`));
    return el('div', { class: 'card approval', 'data-run': r.run_id, id: `approval-${r.run_id}` },
      el('h3', {}, `${r.name} `, el('span', { class: 'badge awaiting_approval' }, 'awaiting approval')),
      el('p', {}, el('strong', {}, 'Planner '), `${r.planner_id}`, a.planner_model ? ` · model ${a.planner_model}${a.planner_model_version ? ' ' + a.planner_model_version : ''}` : '',
        ` · submitted by ${r.submitted_by} at ${time(a.submitted_at_ms)} · run ${r.run_id} · proposal ${r.proposal_id}`),
      a.objective ? el('p', {}, el('strong', {}, 'Objective '), a.objective) : null,
      a.hypothesis ? el('p', {}, el('strong', {}, 'Hypothesis '), a.hypothesis) : null,
      el('p', { class: 'why' }, el('strong', {}, 'Needs approval because '), (r.approval_required_because || []).join('; ') || '-'),
      el('div', { class: 'evidence' },
        el('div', {}, el('h4', {}, 'Protocol'), el('ol', { class: 'steps' }, ev.steps.map((s) => el('li', { style: `margin-left:${s.depth * 1.2}rem` }, s.text)))),
        el('div', {}, el('h4', {}, 'Validation'), el('p', {}, v.valid ? 'valid' : 'NOT valid', ` · ${v.expanded_steps || 0} steps`),
          findings.length ? el('ul', {}, findings) : el('p', {}, 'no findings'),
          el('h4', {}, 'Dry run'), d ? el('div', {},
            el('p', { class: 'duration' }, `estimated ${d.estimated_duration_s.toFixed(1)} s over ${d.steps_simulated} steps`),
            d.problems.length ? el('ul', {}, d.problems.map((p) => el('li', { class: 'finding error' }, `${p.path}: ${p.message}`))) : el('p', {}, 'no conflicts found'),
            d.notes.length ? el('ul', {}, d.notes.map((n) => el('li', {}, n))) : null) : el('p', {}, 'not dry-run')),
        el('div', {}, el('h4', {}, 'Gantry path'), pathPicture(ev)),
        el('div', {}, el('h4', {}, 'Volumes per vessel'), volumePicture(ev))),
      el('div', { class: 'actions' },
        el('button', { class: 'primary approve', id: `approve-${r.run_id}`, onclick: () => attempt(`Approve ${r.run_id}`, () => act(`/api/runs/${encodeURIComponent(r.run_id)}/approve`)).then((x) => x && refreshApprovals()) }, 'Approve'),
        reason,
        el('button', { class: 'danger reject', id: `reject-${r.run_id}`, onclick: () => attempt(`Reject ${r.run_id}`, () => act(`/api/runs/${encodeURIComponent(r.run_id)}/reject`, { reason: reason.value })).then((x) => x && refreshApprovals()) }, 'Reject')));
  }));
}

// ---------- runs ----------
async function renderRuns() {
  let data;
  try { data = await api('/api/runs'); } catch (e) { if (e.status === 401) showLogin(); return; }
  const active = new Map(data.active.map((r) => [r.run_id, r]));
  const rows = [];
  const seen = new Set();
  for (const r of data.active.concat(data.recent)) {
    if (seen.has(r.run_id)) continue;
    seen.add(r.run_id);
    const live = active.get(r.run_id);
    const st = live ? live.state : r.state;
    rows.push(el('tr', { class: 'clickable', 'data-run': r.run_id, onclick: () => { location.hash = `#runs/${encodeURIComponent(r.run_id)}`; } },
      el('td', {}, r.run_id), el('td', {}, r.name), el('td', {}, r.planner_id),
      el('td', {}, el('span', { class: `badge ${st}` }, st)), el('td', {}, (live ? live.current_step : r.current_step) || ''),
      el('td', {}, String(live ? live.results : r.results))));
  }
  $('#runs tbody').replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { colspan: 6 }, 'no runs yet'))]));
}

function eventLine(e) {
  const detail = e.detail && typeof e.detail === 'object' ? JSON.stringify(e.detail) : (e.detail || '');
  return el('div', { class: 'event' }, `${time(e.at_ms)} ${e.kind}${e.step ? ' ' + e.step : ''}${e.actor ? ' [' + e.actor + ']' : ''} ${detail.length > 160 ? detail.slice(0, 160) + '…' : detail}`);
}

function appendRunEvent(r) {
  const box = $('#run-events');
  if (!box) return;
  box.append(eventLine(r));
  box.scrollTop = box.scrollHeight;
}

// Progress over the protocol's top-level steps, from the current step's path (`/steps/3/...`).
function updateRunProgress() {
  const bar = $('#run-progress');
  if (!bar) return;
  const live = state.snapshot && state.snapshot.runs.find((r) => r.run_id === state.openRun);
  if (live) {
    state.runState = live.state;
    state.runStep = live.current_step;
    $('#run-state').textContent = live.state;
    $('#run-state').className = `badge ${live.state}`;
    $('#run-step').textContent = live.current_step || '-';
  }
  const m = /^\/steps\/(\d+)/.exec(state.runStep || '');
  const total = state.stepsTotal || 0;
  const at = state.runState === 'completed' ? total : m ? Number(m[1]) + 1 : 0;
  bar.firstChild.style.width = `${total ? Math.min(100, (100 * (state.runState === 'completed' ? total : Math.max(0, at - 1))) / total) : 0}%`;
  $('#run-progress-text').textContent = state.runState === 'completed' ? `all ${total} steps done` : at ? `step ${at} of ${total}` : `${total} steps`;
}

async function openRun(runId, quiet) {
  state.openRun = runId;
  let d;
  try { d = await api(`/api/runs/${encodeURIComponent(runId)}`); } catch (e) { if (!quiet) flash(`run ${runId}: ${e.message}`, true); return; }
  if (state.openRun !== runId) return;
  const rec = d.record, s = rec;
  const st = d.live ? d.live.state : s.state;
  state.stepsTotal = (rec.protocol.steps || []).length;
  state.runState = st;
  state.runStep = (d.live && d.live.current_step) || rec.current_step;
  const ctl = (c) => el('button', { id: `run-${c}`, class: c === 'abort' ? 'danger' : '', onclick: () => attempt(`${c} ${runId}`, () => act(`/api/runs/${encodeURIComponent(runId)}/control`, { control: c })).then(() => openRun(runId, true)) }, c);
  const base = `/api/runs/${encodeURIComponent(runId)}`;
  const box = el('div', { class: 'card', id: 'run', 'data-run': runId },
    el('h3', {}, `${rec.name} · ${runId} `, el('span', { id: 'run-state', class: `badge ${st}` }, st)),
    el('p', {}, `planner ${rec.planner_id}${rec.planner_model ? ' · model ' + rec.planner_model : ''} · submitted by ${rec.submitted_by} · current step `, el('strong', { id: 'run-step' }, (d.live && d.live.current_step) || rec.current_step || '-'),
      rec.reason ? ` · ${rec.reason}` : ''),
    el('div', { class: 'progress', id: 'run-progress' }, el('div', {})), el('small', { id: 'run-progress-text' }),
    el('div', { class: 'actions' }, ctl('pause'), ctl('resume'), ctl('abort'),
      el('a', { href: `${base}/results.jsonl`, id: 'download-jsonl', download: '' }, 'results.jsonl'), ' ',
      el('a', { href: `${base}/results.csv`, id: 'download-csv', download: '' }, 'results.csv')),
    el('h4', {}, `Results (${d.results.length})`), el('div', { id: 'plots' }),
    el('h4', {}, 'Events'), el('div', { class: 'events', id: 'run-events' }, rec.events.map(eventLine)));
  $('#run-detail').replaceChildren(box);
  updateRunProgress();
  plotResults(d.results);
  const evs = $('#run-events'); evs.scrollTop = evs.scrollHeight;
}

function plotResults(results) {
  const box = $('#plots');
  const width = Math.max(280, Math.min(900, box.clientWidth || 600));
  const spectra = results.filter((r) => r.value && Array.isArray(r.value.wavelengths_nm) && Array.isArray(r.value.absorbance));
  if (spectra.length) {
    const xs = spectra[0].value.wavelengths_nm;
    const series = [{ label: 'nm' }], data = [xs];
    const colours = ['#1f5fbf', '#d33', '#1b7f3b', '#a86400', '#7b3fbf'];
    spectra.slice(0, 8).forEach((r, i) => {
      series.push({ label: `${r.name} #${r.seq}`, stroke: colours[i % colours.length], width: 1.5 });
      data.push(xs.map((x, j) => (r.value.wavelengths_nm[j] === x ? r.value.absorbance[j] : null)));
    });
    const div = el('div', { class: 'plot', id: 'plot-spectrum' });
    box.append(div);
    new uPlot({ title: 'Absorbance spectrum (AU)', width, height: 260, scales: { x: { time: false } }, series, axes: [{ label: 'wavelength (nm)' }, { label: 'AU' }] }, data, div);
  }
  // Scalars over time, one plot per quantity (masses, temperatures, ...).
  const byQuantity = {};
  for (const r of results) {
    if (!r.value || typeof r.value !== 'object' || Array.isArray(r.value.absorbance)) continue;
    for (const [k, v] of Object.entries(r.value)) {
      if (typeof v === 'number') (byQuantity[k] || (byQuantity[k] = [])).push([r.at_ms / 1000, v]);
    }
  }
  for (const [q, pts] of Object.entries(byQuantity)) {
    const div = el('div', { class: 'plot', id: `plot-${q}` });
    box.append(div);
    new uPlot({ title: `${q} over time`, width, height: 200, series: [{}, { label: q, stroke: '#1f5fbf', width: 1.5, points: { show: true, size: 7 } }] },
      [pts.map((p) => p[0]), pts.map((p) => p[1])], div);
  }
  if (!spectra.length && !Object.keys(byQuantity).length) box.append(el('p', {}, 'no results yet'));
}

// ---------- log ----------
async function renderLog() {
  const f = new FormData($('#log-filter'));
  const q = new URLSearchParams();
  for (const [k, v] of f.entries()) if (String(v).trim()) q.set(k, String(v).trim());
  let rows;
  try { rows = await api(`/api/log?${q}`); } catch (e) { if (e.status === 401) showLogin(); return; }
  $('#log tbody').replaceChildren(...rows.map((e) => {
    const detail = e.detail && typeof e.detail === 'object' ? JSON.stringify(e.detail) : String(e.detail || '');
    return el('tr', { 'data-kind': e.kind }, el('td', {}, e.seq), el('td', {}, time(e.at_ms)), el('td', {}, e.run_id || ''), el('td', {}, e.kind),
      el('td', {}, e.step || ''), el('td', { class: 'actor' }, e.actor || ''), el('td', {}, detail.length > 200 ? detail.slice(0, 200) + '…' : detail));
  }));
}
$('#log-filter').addEventListener('submit', (ev) => { ev.preventDefault(); renderLog(); });

// ---------- boot ----------
(async () => {
  try { await start(await api('/api/me')); } catch (_) { showLogin(); }
})();
