'use strict';
// drover's dashboard. Plain script, no build step, no framework.
//
// It reads the admin API (GET /api/v1/services every second; listeners, routes and status
// on load, on each change and every ten seconds), keeps each endpoint's request and error
// rates in a ring buffer computed from the counters, and follows GET /api/v1/events with
// fetch() so that it can send the token, which EventSource cannot.

(() => {
  const POLL_MS = 1000;
  /** Samples kept per endpoint: five minutes at one a second. */
  const HISTORY = 300;
  /** Samples closer together than this are not recorded: their rates would be noise. */
  const MIN_SAMPLE_MS = 500;
  /** Listeners, routes and status are re-read every this many polls even without events. */
  const FULL_EVERY = 10;
  const MAX_EVENTS = 100;
  const TOKEN_KEY = 'drover.admin-token';
  const SPARK_W = 120;
  const SPARK_H = 28;
  const SVG_NS = 'http://www.w3.org/2000/svg';

  const $ = (sel) => document.querySelector(sel);

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    /** Seconds of history the charts show. */
    window: 300,
    generation: null,
    services: [],
    listeners: [],
    routes: [],
    status: null,
    /** `service address` → Series. */
    series: new Map(),
    /** service name → its view (DOM nodes kept between polls). */
    serviceViews: new Map(),
    shown: false,
    /** When this page first read the counters: the charts span at least a minute and grow
     *  to the chosen window as history builds up. */
    since: Date.now(),
    eventCount: 0,
    earlierShown: false,
  };

  // ---------------------------------------------------------------- small helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children) {
      if (c !== null && c !== undefined) node.append(c);
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function setAttr(node, name, value) {
    if (node.getAttribute(name) !== value) node.setAttribute(name, value);
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function fmtRate(v) {
    if (!Number.isFinite(v)) return '–';
    if (v >= 10000) return (v / 1000).toFixed(0) + 'k';
    if (v >= 1000) return (v / 1000).toFixed(1) + 'k';
    if (v >= 10) return v.toFixed(0);
    return v.toFixed(1);
  }

  function fmtCount(n) {
    return typeof n === 'number' ? n.toLocaleString('en-US') : '–';
  }

  function fmtClock(ms) {
    const d = new Date(ms);
    const p = (n) => String(n).padStart(2, '0');
    return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  function fmtAgo(ms) {
    const s = Math.max(0, (Date.now() - ms) / 1000);
    if (s < 10) return `${s.toFixed(1)} s ago`;
    if (s < 120) return `${Math.round(s)} s ago`;
    if (s < 7200) return `${Math.round(s / 60)} min ago`;
    return `${Math.round(s / 3600)} h ago`;
  }

  // ---------------------------------------------------------------- the API

  /** The API answered 401: the page needs (another) token. */
  class NeedToken extends Error {
    constructor(sent) {
      super('the admin API needs a token');
      this.sent = sent;
    }
  }

  async function api(path, init) {
    const headers = new Headers((init && init.headers) || {});
    const sent = state.token;
    if (sent) headers.set('Authorization', 'Bearer ' + sent);
    const res = await fetch(path, { ...init, headers, cache: 'no-store', credentials: 'omit' });
    if (res.status === 401) throw new NeedToken(sent);
    if (!res.ok) {
      let why = `${res.status} ${res.statusText}`;
      try {
        why = (await res.json()).error || why;
      } catch {
        // not JSON: keep the status line
      }
      throw new Error(`${path}: ${why}`);
    }
    return res;
  }

  const getJson = async (path) => (await api(path)).json();

  // ---------------------------------------------------------------- the token

  let tokenWait = null;

  /** Shows the token form and resolves once a token has been entered. */
  function askToken(err) {
    if (err.sent !== state.token) {
      // Another token was entered while this request was on its way: just try again.
      return Promise.resolve();
    }
    if (err.sent) {
      sessionStorage.removeItem(TOKEN_KEY);
      state.token = null;
      setText($('#token-message'), 'drover refused that token. Enter the current one.');
    }
    if (!tokenWait) {
      let resolve;
      const promise = new Promise((r) => (resolve = r));
      tokenWait = { promise, resolve };
      $('#token-panel').hidden = false;
      $('#dashboard').hidden = true;
      document.body.dataset.locked = '';
      $('#forget-token').hidden = true;
      setStream('locked', 'needs the token');
      $('#token-input').focus();
    }
    return tokenWait.promise;
  }

  function onTokenSubmit(e) {
    e.preventDefault();
    const input = $('#token-input');
    const token = input.value.trim();
    if (!token) return;
    if (!/^[\x20-\x7e]+$/.test(token)) {
      // A header cannot carry it, so drover cannot have been given it.
      setText($('#token-message'), 'A token is made of printable ASCII characters.');
      return;
    }
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    input.value = '';
    setText($('#token-message'), '');
    $('#token-panel').hidden = true;
    delete document.body.dataset.locked;
    $('#forget-token').hidden = false;
    if (tokenWait) {
      const { resolve } = tokenWait;
      tokenWait = null;
      resolve();
    }
    refreshAll();
  }

  function forgetToken() {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    location.reload();
  }

  // ---------------------------------------------------------------- rates

  /** One endpoint's counters turned into rates: a ring buffer of (time, req/s, err/s).
   *  A request is an attempt at the endpoint (answered or not); an error is an attempt that
   *  got no answer or a 5xx. */
  class Series {
    constructor() {
      this.t = new Float64Array(HISTORY);
      this.req = new Float64Array(HISTORY);
      this.err = new Float64Array(HISTORY);
      this.start = 0;
      this.len = 0;
      this.last = null;
    }

    /** Records the counters read at `t` (ms): requests tried, and those that failed. Counters
     *  that went down (drover restarted, or the endpoint was removed and added again) start
     *  over from there. */
    add(t, requests, errors) {
      const last = this.last;
      if (last && t - last.t < MIN_SAMPLE_MS) return;
      this.last = { t, requests, errors };
      if (!last) return;
      const dt = (t - last.t) / 1000;
      const dReq = requests - last.requests;
      const dErr = errors - last.errors;
      if (dReq < 0 || dErr < 0) return;
      const i = (this.start + this.len) % HISTORY;
      this.t[i] = t;
      this.req[i] = dReq / dt;
      this.err[i] = dErr / dt;
      if (this.len < HISTORY) this.len++;
      else this.start = (this.start + 1) % HISTORY;
    }

    /** The samples newer than `since` (ms), oldest first. */
    *points(since) {
      for (let k = 0; k < this.len; k++) {
        const i = (this.start + k) % HISTORY;
        if (this.t[i] >= since) yield { t: this.t[i], req: this.req[i], err: this.err[i] };
      }
    }

    latest() {
      if (this.len === 0) return { req: 0, err: 0 };
      const i = (this.start + this.len - 1) % HISTORY;
      return { req: this.req[i], err: this.err[i] };
    }

    /** Totals over the chart window, for the error share. */
    sums(since) {
      let req = 0;
      let err = 0;
      let prev = null;
      for (const p of this.points(since)) {
        const dt = prev === null ? MIN_SAMPLE_MS / 1000 : (p.t - prev) / 1000;
        req += p.req * dt;
        err += p.err * dt;
        prev = p.t;
      }
      return { req, err };
    }
  }

  function seriesFor(key) {
    let s = state.series.get(key);
    if (!s) {
      s = new Series();
      state.series.set(key, s);
    }
    return s;
  }

  // ---------------------------------------------------------------- sparklines

  function makeSpark(kind) {
    const node = svg('svg', {
      class: `spark ${kind}`,
      viewBox: `0 0 ${SPARK_W} ${SPARK_H}`,
      width: SPARK_W,
      height: SPARK_H,
      preserveAspectRatio: 'none',
      role: 'img',
    });
    const title = svg('title');
    const base = svg('line', { class: 'base', x1: 0, x2: SPARK_W, y1: SPARK_H - 0.5, y2: SPARK_H - 0.5 });
    const area = svg('path', { class: 'area' });
    const line = svg('path', { class: 'line' });
    node.append(title, base, area, line);
    return { node, title, area, line };
  }

  /** How many ms the charts span now: the chosen window, or less while this page has not
   *  been open that long (but at least a minute). */
  function chartSpan(now) {
    return Math.min(state.window * 1000, Math.max(60000, now - state.since));
  }

  /** Draws the samples of `field` in the chart span; the y scale starts at 0 and ends at the
   *  span's peak (at least 1/s). */
  function drawSpark(spark, series, field, label) {
    const now = Date.now();
    const span = chartSpan(now);
    const since = now - span;
    const pts = [...series.points(since)];
    let max = 1;
    for (const p of pts) max = Math.max(max, p[field]);
    const x = (t) => ((t - since) / span) * SPARK_W;
    const y = (v) => SPARK_H - 1 - (v / max) * (SPARK_H - 3);
    let line = '';
    let area = '';
    let runStart = null;
    let prevT = null;
    let prevX = 0;
    for (const p of pts) {
      const px = x(p.t).toFixed(1);
      const py = y(p[field]).toFixed(1);
      const gap = prevT !== null && p.t - prevT > POLL_MS * 4;
      if (runStart === null || gap) {
        if (runStart !== null) area += `L${prevX},${SPARK_H}Z`;
        line += `M${px},${py}`;
        area += `M${px},${SPARK_H}L${px},${py}`;
        runStart = px;
      } else {
        line += `L${px},${py}`;
        area += `L${px},${py}`;
      }
      prevT = p.t;
      prevX = px;
    }
    if (runStart !== null) area += `L${prevX},${SPARK_H}Z`;
    setAttr(spark.node, 'data-quiet', String(!pts.some((p) => p[field] > 0)));
    setAttr(spark.line, 'd', line || 'M0,0');
    setAttr(spark.area, 'd', area || 'M0,0');
    const minutes = Math.round(span / 60000);
    setText(spark.title, `${label} over the last ${minutes} min; peak ${fmtRate(max)}/s`);
    setAttr(spark.node, 'aria-label', spark.title.textContent);
  }

  // ---------------------------------------------------------------- services

  /** What the health report says, as the page shows it. */
  function healthOf(ep) {
    const h = ep.health;
    if (!h) return 'unknown';
    return { healthy: 'up', unhealthy: 'down', ejected: 'ejected' }[h.state] || 'unknown';
  }

  function makeServiceView(name) {
    const title = el('h3', { text: name });
    const chips = el('span', { class: 'chips' });
    const up = el('span', { class: 'svc-up', 'data-field': 'up' });
    const rate = el('span', { class: 'svc-rate', 'data-field': 'rate' });
    const head = el('header', { class: 'svc-head' }, title, chips, el('span', { class: 'svc-stats' }, up, rate));
    const thead = el(
      'thead',
      {},
      el(
        'tr',
        {},
        ...['Endpoint', 'Weight', 'State', 'Why', 'Requests/s', 'Errors/s', 'In flight', 'Answered'].map((h) =>
          el('th', { text: h, scope: 'col' }),
        ),
      ),
    );
    const tbody = el('tbody');
    const empty = el('p', { class: 'empty', text: 'No endpoints.', hidden: true });
    const table = el('table', { class: 'grid endpoints' }, thead, tbody);
    const root = el(
      'section',
      { class: 'service', 'data-service': name },
      head,
      el('div', { class: 'table-wrap' }, table),
      empty,
    );
    return { root, chips, up, rate, tbody, empty, rows: new Map() };
  }

  function chip(text, cls, title) {
    return el('span', { class: `chip ${cls || ''}`.trim(), text, title });
  }

  function updateServiceView(view, svc, now) {
    const chips = [chip(svc.policy, 'policy', 'Balancing policy')];
    const hc = svc.health_check;
    if (hc) {
      const what = hc.kind === 'tcp' ? 'tcp connect' : `http ${hc.path || '/'}`;
      chips.push(
        chip(`checks: ${what} every ${hc.interval}`, 'check', `down after ${hc.fall} failed checks, up after ${hc.rise} passed`),
      );
    } else if (svc.health_check === null) {
      chips.push(chip('no active checks', 'check off', 'Endpoints count as up until outlier detection ejects them'));
    }
    if (svc.slow_start && svc.slow_start !== '0s') chips.push(chip(`slow start ${svc.slow_start}`, 'slow'));
    if (svc.panic) chips.push(chip('panic: no endpoint is available, all get traffic', 'panic'));
    if (svc.source) chips.push(chip(svc.source, 'source', 'Defined by'));
    const sig = chips.map((c) => c.textContent).join('|');
    if (view.chips.dataset.sig !== sig) {
      view.chips.replaceChildren(...chips);
      view.chips.dataset.sig = sig;
    }
    setAttr(view.root, 'data-panic', String(!!svc.panic));

    const seen = new Set();
    let upCount = 0;
    let req = 0;
    let err = 0;
    svc.endpoints.forEach((ep, i) => {
      seen.add(ep.address);
      let row = view.rows.get(ep.address);
      if (!row) {
        row = makeRow(svc.name, ep.address);
        view.rows.set(ep.address, row);
      }
      if (view.tbody.children[i] !== row.tr) view.tbody.insertBefore(row.tr, view.tbody.children[i] || null);
      const series = seriesFor(`${svc.name} ${ep.address}`);
      updateRow(row, ep, svc, series, now);
      if (ep.state === 'enabled' && healthOf(ep) === 'up') upCount++;
      const l = series.latest();
      req += l.req;
      err += l.err;
    });
    for (const [address, row] of view.rows) {
      if (!seen.has(address)) {
        row.tr.remove();
        view.rows.delete(address);
        state.series.delete(`${svc.name} ${address}`);
      }
    }
    view.empty.hidden = svc.endpoints.length > 0;
    setText(view.up, `${upCount}/${svc.endpoints.length} up`);
    setAttr(view.up, 'data-all-up', String(upCount === svc.endpoints.length));
    setText(view.rate, `${fmtRate(req)} req/s · ${fmtRate(err)} err/s`);
    return { up: upCount, total: svc.endpoints.length, req, err };
  }

  function makeRow(service, address) {
    const td = (field, label, ...kids) => el('td', { 'data-field': field, 'data-label': label }, ...kids);
    const addr = el('span', { class: 'addr', text: address });
    const source = el('span', { class: 'sub' });
    const weight = el('span', { class: 'num' });
    const share = el('span', { class: 'sub' });
    const health = el('span', { class: 'pill', 'data-field': 'health' });
    const admin = el('span', { class: 'pill admin', 'data-field': 'admin' });
    const reason = el('span', { class: 'reason', 'data-field': 'reason' });
    const detail = el('span', { class: 'sub', 'data-field': 'check' });
    const reqSpark = makeSpark('req');
    const errSpark = makeSpark('err');
    const reqNow = el('span', { class: 'num rate' });
    const errNow = el('span', { class: 'num rate' });
    const errShare = el('span', { class: 'sub' });
    const inflight = el('span', { class: 'num' });
    const idle = el('span', { class: 'sub' });
    const answered = el('span', { class: 'num' });
    const failed = el('span', { class: 'sub' });
    const tr = el(
      'tr',
      { 'data-endpoint': address, 'data-service': service },
      td('address', 'Endpoint', addr, source),
      td('weight', 'Weight', weight, share),
      td('state', 'State', health, admin),
      td('why', 'Why', reason, detail),
      td('requests', 'Requests/s', el('span', { class: 'chart' }, reqSpark.node, reqNow)),
      td('errors', 'Errors/s', el('span', { class: 'chart' }, errSpark.node, errNow), errShare),
      td('in-flight', 'In flight', inflight, idle),
      td('answered', 'Answered', answered, failed),
    );
    return { tr, source, weight, share, health, admin, reason, detail, reqSpark, errSpark, reqNow, errNow, errShare, inflight, idle, answered, failed };
  }

  function updateRow(row, ep, svc, series, now) {
    const h = ep.health || {};
    const health = healthOf(ep);
    const status = ep.state === 'disabled' ? 'disabled' : health;
    setAttr(row.tr, 'data-health', health);
    setAttr(row.tr, 'data-admin', ep.state);
    setAttr(row.tr, 'data-status', status);

    // The source only when it is not the service's own (an endpoint the API added).
    setText(row.source, ep.source && ep.source !== svc.source ? `from ${ep.source}` : '');
    setText(row.weight, String(ep.weight));
    const share = typeof ep.weight_share === 'number' ? ep.weight_share : 1;
    // The ramp only means something while the endpoint can take requests.
    const ramping = share < 1 && ep.available !== false && ep.state === 'enabled';
    setText(row.share, ramping ? `slow start: ${Math.round(share * 100)}%` : '');

    setText(row.health, health);
    setAttr(row.health, 'data-value', health);
    // A disabled endpoint is not checked: its last health says little.
    row.health.hidden = ep.state === 'disabled';
    const adminText = ep.state === 'enabled' ? '' : ep.state === 'drain' ? 'draining' : 'disabled';
    setText(row.admin, adminText);
    setAttr(row.admin, 'data-value', ep.state);
    row.admin.hidden = !adminText;

    let why = h.reason || (ep.health ? '' : 'not in the routing table yet');
    // drover keeps the reason of the last change of state; once checks pass, say so.
    if (health === 'up' && h.last_check_passed === true) why = 'passing its health checks';
    const bits = [];
    if (ep.state === 'drain') {
      bits.push(why);
      why = 'draining: takes no new requests, those in flight finish';
    } else if (ep.state === 'disabled') {
      why = 'disabled: takes no requests and is not checked';
    }
    setText(row.reason, why);
    if (h.last_check_ms) {
      bits.push(`last check ${h.last_check_passed ? 'passed' : 'failed'} ${fmtAgo(h.last_check_ms)}`);
    }
    if (h.last_check_error && !(h.reason || '').includes(h.last_check_error)) bits.push(h.last_check_error);
    if (h.ejections) bits.push(`ejected ${h.ejections} time${h.ejections === 1 ? '' : 's'}`);
    if (h.since_ms) bits.push(`${health === 'ejected' ? '' : health + ' '}since ${fmtClock(h.since_ms)}`);
    setText(row.detail, bits.join(' · '));
    setAttr(row.detail, 'data-passed', h.last_check_passed === false ? 'false' : 'true');

    const fiveXX = ep.responses_5xx || 0;
    series.add(now, ep.responses + ep.failures, ep.failures + fiveXX);
    drawSpark(row.reqSpark, series, 'req', 'Requests per second');
    drawSpark(row.errSpark, series, 'err', '5xx answers and failed attempts per second');
    const l = series.latest();
    setText(row.reqNow, fmtRate(l.req));
    setText(row.errNow, fmtRate(l.err));
    setAttr(row.errNow, 'data-nonzero', String(l.err > 0));
    const sums = series.sums(now - chartSpan(now));
    setText(row.errShare, sums.req > 0 ? `${((sums.err / sums.req) * 100).toFixed(1)}% errors` : '');

    setText(row.inflight, fmtCount(ep.in_flight));
    setText(row.idle, `${fmtCount(ep.idle_connections)} idle`);
    setText(row.answered, fmtCount(ep.responses));
    setText(row.failed, `${fmtCount(fiveXX)} 5xx · ${fmtCount(ep.failures)} failed`);
  }

  function renderServices(now) {
    const box = $('#services');
    const seen = new Set();
    let up = 0;
    let total = 0;
    let req = 0;
    let err = 0;
    state.services.forEach((svc, i) => {
      seen.add(svc.name);
      let view = state.serviceViews.get(svc.name);
      if (!view) {
        view = makeServiceView(svc.name);
        state.serviceViews.set(svc.name, view);
      }
      if (box.children[i] !== view.root) box.insertBefore(view.root, box.children[i] || null);
      const s = updateServiceView(view, svc, now);
      up += s.up;
      total += s.total;
      req += s.req;
      err += s.err;
    });
    for (const [name, view] of state.serviceViews) {
      if (!seen.has(name)) {
        view.root.remove();
        state.serviceViews.delete(name);
        for (const key of state.series.keys()) if (key.startsWith(name + ' ')) state.series.delete(key);
      }
    }
    $('#services-empty').hidden = state.services.length > 0;
    setText($('#tile-services'), String(state.services.length));
    setText($('#tile-endpoints'), `${up}/${total}`);
    setAttr($('#tile-endpoints'), 'data-all-up', String(up === total));
    setText($('#tile-rate'), fmtRate(req));
    setText($('#tile-errors'), fmtRate(err));
    setAttr($('#tile-errors'), 'data-nonzero', String(err > 0));
  }

  // ---------------------------------------------------------------- listeners and routes

  function routeText(r) {
    return `${r.host || '*'}${r.path_prefix || '/'} → ${r.service}`;
  }

  function renderListeners() {
    const rows = state.listeners.map((l) => {
      const routes = state.routes.filter((r) => r.listener === l.name);
      const list = el('ul', { class: 'routes' });
      for (const r of routes) list.append(el('li', { text: routeText(r), 'data-service': r.service }));
      if (routes.length === 0) list.append(el('li', { class: 'none', text: 'no routes: every request gets 404' }));
      return el(
        'tr',
        { 'data-listener': l.name },
        el('td', { 'data-label': 'Listener', class: 'name', text: l.name }),
        el('td', { 'data-label': 'Address', class: 'addr', text: l.listen }),
        el('td', { 'data-label': 'Protocol', text: l.protocol }),
        el('td', { 'data-label': 'Routes' }, list),
        el('td', { 'data-label': 'Source', class: 'sub', text: l.source || '' }),
      );
    });
    $('#listeners tbody').replaceChildren(...rows);
    setText($('#tile-listeners'), String(state.listeners.length));
  }

  function renderStatus() {
    const s = state.status;
    if (!s) return;
    if (state.generation === null || s.generation > state.generation) state.generation = s.generation;
    setText($('#generation'), `generation ${state.generation}`);
    setText(
      $('#last-change'),
      s.last_change_at_ms ? `last change ${fmtClock(s.last_change_at_ms)} by ${s.last_source || '?'}` : '',
    );
    const rej = $('#rejection');
    const r = s.last_rejection;
    if (r && (!s.last_change_at_ms || r.at_ms > s.last_change_at_ms)) {
      rej.hidden = false;
      setText(rej, `The last change from ${r.source} was rejected at ${fmtClock(r.at_ms)}: ${r.error}`);
    } else {
      rej.hidden = true;
    }
    if (!state.earlierShown && s.last_changes && s.last_changes.length) {
      state.earlierShown = true;
      addEntry({
        kind: 'earlier',
        at: s.last_change_at_ms,
        generation: s.generation,
        source: s.last_source,
        reason: 'before this page opened',
        lines: s.last_changes,
      });
    }
  }

  // ---------------------------------------------------------------- events

  function addEntry(e) {
    const list = $('#events');
    const head = el(
      'div',
      { class: 'ev-head' },
      el('time', { text: e.at ? fmtClock(e.at) : '', datetime: e.at ? new Date(e.at).toISOString() : null }),
      el('span', { class: `ev-kind ${e.kind}`, text: e.kind === 'earlier' ? 'earlier' : e.kind }),
      e.generation !== undefined ? el('span', { class: 'ev-gen', text: `gen ${e.generation}` }) : null,
      e.source ? el('span', { class: 'ev-source', text: e.source }) : null,
    );
    const body = el('ul', { class: 'ev-lines' });
    for (const line of e.lines) body.append(el('li', { text: line }));
    const item = el(
      'li',
      { class: `event ${e.kind}`, 'data-event-kind': e.kind, 'data-generation': e.generation },
      head,
      e.reason ? el('div', { class: 'ev-reason', text: e.reason }) : null,
      body,
    );
    if (e.kind === 'earlier') list.append(item);
    else list.prepend(item);
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
    $('#events-empty').hidden = true;
    state.eventCount++;
  }

  function onStreamEvent(type, text) {
    let data;
    try {
      data = JSON.parse(text);
    } catch {
      return; // not JSON: nothing this page understands
    }
    if (type === 'hello') {
      setStream('live', 'live');
      if (state.generation !== null && data.generation !== state.generation) {
        addEntry({
          kind: 'note',
          at: Date.now(),
          generation: data.generation,
          reason: `reconnected: the configuration went from generation ${state.generation} to ${data.generation} meanwhile; the page re-read it`,
          lines: [],
        });
      }
      state.generation = data.generation;
      refreshAll();
    } else if (type === 'change') {
      addEntry({
        kind: 'change',
        at: data.at_ms,
        generation: data.generation,
        source: data.source,
        reason: data.reason,
        lines: (data.changes || []).map((c) => c.text || c.kind),
      });
      state.generation = Math.max(state.generation || 0, data.generation);
      setText($('#generation'), `generation ${state.generation}`);
      refreshAll();
    } else if (type === 'rejected') {
      addEntry({ kind: 'rejected', at: data.at_ms, source: data.source, lines: [data.error] });
      refreshAll();
    }
  }

  /** Feeds text to an SSE parser; calls `emit(type, data)` for each complete event. */
  function sseParser(emit) {
    let buf = '';
    let type = '';
    let data = [];
    return (chunk) => {
      buf += chunk;
      for (;;) {
        const i = buf.search(/[\r\n]/);
        if (i < 0) return;
        // A CR at the very end may be the first half of CRLF: wait for more.
        if (buf[i] === '\r' && i === buf.length - 1) return;
        const line = buf.slice(0, i);
        buf = buf.slice(buf[i] === '\r' && buf[i + 1] === '\n' ? i + 2 : i + 1);
        if (line === '') {
          if (data.length) emit(type || 'message', data.join('\n'));
          type = '';
          data = [];
        } else if (line[0] !== ':') {
          const c = line.indexOf(':');
          const field = c < 0 ? line : line.slice(0, c);
          let value = c < 0 ? '' : line.slice(c + 1);
          if (value[0] === ' ') value = value.slice(1);
          if (field === 'event') type = value;
          else if (field === 'data') data.push(value);
        }
      }
    };
  }

  function setStream(st, text) {
    setAttr($('#stream'), 'data-state', st);
    setText($('#stream-text'), text);
  }

  async function followEvents() {
    let delay = 1000;
    for (;;) {
      setStream('connecting', 'connecting');
      try {
        const res = await api('/api/v1/events', { headers: { Accept: 'text/event-stream' } });
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        const feed = sseParser((type, data) => {
          if (type === 'hello') delay = 1000;
          onStreamEvent(type, data);
        });
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          feed(value);
        }
      } catch (e) {
        if (e instanceof NeedToken) {
          await askToken(e);
          continue;
        }
        // The connection failed or broke: try again below.
      }
      const wait = delay;
      delay = Math.min(delay * 2, 30000);
      for (let left = Math.ceil(wait / 1000); left > 0; left--) {
        setStream('offline', `stream lost, retrying in ${left} s`);
        await sleep(1000);
      }
    }
  }

  // ---------------------------------------------------------------- loading

  function showBanner(text) {
    const b = $('#banner');
    b.hidden = !text;
    setText(b, text || '');
  }

  function reveal() {
    if (!state.shown || $('#dashboard').hidden) {
      state.shown = true;
      $('#dashboard').hidden = false;
      $('#forget-token').hidden = !state.token;
    }
  }

  async function loadServices() {
    state.services = await getJson('/api/v1/services');
    renderServices(Date.now());
  }

  async function loadAll() {
    const [services, listeners, routes, status] = await Promise.all([
      getJson('/api/v1/services'),
      getJson('/api/v1/listeners'),
      getJson('/api/v1/routes'),
      getJson('/api/v1/status'),
    ]);
    Object.assign(state, { services, listeners, routes, status });
    renderServices(Date.now());
    renderListeners();
    renderStatus();
  }

  let refreshing = null;
  let refreshAgain = false;

  /** Re-reads everything now; calls made while a refresh runs share one more refresh. */
  function refreshAll() {
    if (refreshing) {
      refreshAgain = true;
      return refreshing;
    }
    refreshing = (async () => {
      try {
        do {
          refreshAgain = false;
          await loadAll();
          showBanner('');
          reveal();
        } while (refreshAgain);
      } catch (e) {
        if (!(e instanceof NeedToken)) showBanner(`drover does not answer: ${e.message}`);
        // A 401 is handled by the poll and the stream, which wait for the token.
      } finally {
        refreshing = null;
      }
    })();
    return refreshing;
  }

  async function poll() {
    for (let n = 0; ; n++) {
      try {
        if (n % FULL_EVERY === 0) await loadAll();
        else await loadServices();
        showBanner('');
        reveal();
      } catch (e) {
        if (e instanceof NeedToken) {
          await askToken(e);
          n = -1;
          continue;
        }
        showBanner(`drover does not answer (${e.message}); retrying every second.`);
        reveal();
      }
      await sleep(POLL_MS);
    }
  }

  function setWindow(seconds) {
    state.window = seconds;
    for (const b of document.querySelectorAll('[data-window]')) {
      b.setAttribute('aria-pressed', String(Number(b.dataset.window) === seconds));
    }
    renderServices(Date.now());
  }

  function start() {
    $('#token-form').addEventListener('submit', onTokenSubmit);
    $('#forget-token').addEventListener('click', forgetToken);
    for (const b of document.querySelectorAll('[data-window]')) {
      b.addEventListener('click', () => setWindow(Number(b.dataset.window)));
    }
    poll();
    followEvents();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
