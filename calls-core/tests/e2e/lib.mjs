// Shared helpers for the end-to-end tests: start the reference server, drive headless Chromium
// (the Debian package, through playwright-core), read media statistics from the demo page.
import { spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { createSocket } from 'node:dgram';
import { mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
export const SERVER_BIN = process.env.CALLS_SERVER_BIN
  ? resolve(process.env.CALLS_SERVER_BIN)
  : resolve(here, '../../../target/release/calls-server');
export const CHROMIUM = process.env.CALLS_CHROMIUM || '/usr/bin/chromium';
export const LOG_DIR = resolve(here, 'logs');

// From /work/shared/INTEROP.md: what makes WebRTC work headless on loopback.
export const CHROMIUM_ARGS = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  '--ignore-certificate-errors',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  '--allow-loopback-in-peer-connection',
  // Screen sharing headless needs nothing more: with the fake-device flag getDisplayMedia gets a
  // fake 1280x720 "screen", and the fake-UI flag accepts the picker. (Without the fake-device
  // flag it fails with NotReadableError; --auto-select-desktop-capture-source is not needed.)
  // Background tabs must not be throttled: three pages share one headless browser.
  '--disable-background-timer-throttling', '--disable-renderer-backgrounding',
  '--disable-backgrounding-occluded-windows',
];

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns a truthy value; throws with `what` (and the last value) on timeout. */
export async function waitFor(what, fn, { timeout = 20000, interval = 250 } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${what}; last: ${JSON.stringify(last)}`);
    }
    await sleep(interval);
  }
}

// ------------------------------------------------------------------ server

const running = new Set();
function killAll() {
  for (const p of running) {
    try { p.kill('SIGKILL'); } catch { /* gone */ }
  }
}
process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => { killAll(); process.exit(130); });

/**
 * Starts the server binary on the given ports; resolves once /healthz answers.
 * `env` adds CALLS_* settings. Returns { url, ws, pid, log, stop() }.
 */
export async function startServer(name, { http, media, env = {} }) {
  mkdirSync(LOG_DIR, { recursive: true });
  const log = resolve(LOG_DIR, `${name}.log`);
  const fd = openSync(log, 'w');
  const child = spawn(SERVER_BIN, [], {
    env: {
      PATH: process.env.PATH,
      RUST_LOG: process.env.RUST_LOG || 'info',
      NO_COLOR: '1',
      CALLS_HTTP_LISTEN: `127.0.0.1:${http}`,
      CALLS_UDP_PORT: String(media),
      CALLS_TCP_PORT: String(media),
      // The suite runs the debug server beside several Chromiums on 2 shared cores: a join's
      // DTLS handshake in an unoptimised build can hold the worker for a few hundred ms, which
      // the default overload thresholds (50 ms lag twice in a row) take for overload and then
      // refuse joins for 5 s. These tests are not about overload (tests/server_overload.rs
      // and the load test are), so the thresholds are lifted; a test can set its own.
      CALLS_OVERLOAD_DEGRADE_LAG_MS: '3000',
      CALLS_OVERLOAD_SHED_VIDEO_LAG_MS: '6000',
      CALLS_OVERLOAD_BUSY_PERCENT: '100',
      ...env,
    },
    stdio: ['ignore', fd, fd],
  });
  running.add(child);
  let exited = null;
  const exit = new Promise((r) => child.on('exit', (code, signal) => {
    exited = { code, signal, at: Date.now() };
    running.delete(child);
    r(exited);
  }));
  const url = `http://127.0.0.1:${http}`;
  await waitFor(`server ${name} to answer /healthz (log: ${log})`, async () => {
    if (exited) throw new Error(`server ${name} exited ${JSON.stringify(exited)}:\n${readFileSync(log, 'utf8')}`);
    try {
      const r = await fetch(`${url}/healthz`);
      return r.ok;
    } catch { return false; }
  }, { timeout: 15000, interval: 100 });
  return {
    name, url, log, pid: child.pid,
    ws: `ws://127.0.0.1:${http}/ws`,
    /** CPU seconds (user + system) used so far, from /proc. */
    cpuSeconds() {
      const stat = readFileSync(`/proc/${child.pid}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      return (Number(f[11]) + Number(f[12])) / 100; // USER_HZ
    },
    /** The server's log so far. */
    logText() { return readFileSync(log, 'utf8'); },
    /** GET /metrics as text. */
    async metrics() {
      const r = await fetch(`${url}/metrics`);
      if (!r.ok) throw new Error(`/metrics: HTTP ${r.status}`);
      return r.text();
    },
    /** Sends a signal (e.g. 'SIGTERM') to the server process. */
    signal(sig) { child.kill(sig); },
    /** null while running, else { code, signal, at }. */
    exited: () => exited,
    /** Resolves with { code, signal, at } when the process exits. */
    exit,
    async stop() {
      if (exited) return;
      const gone = new Promise((r) => child.once('exit', r));
      child.kill('SIGKILL');
      await gone;
    },
  };
}

/**
 * The value of one sample in Prometheus/OpenMetrics text, e.g. metric(text, 'calls_sessions') or
 * metric(text, 'calls_rtp_in_packets_total{kind="video"}'); undefined when absent.
 */
export function metric(text, name) {
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    if (i > 0 && line.slice(0, i) === name) return Number(line.slice(i + 1));
  }
  return undefined;
}

// ------------------------------------------------------------------ TURN (coturn)

export const TURNSERVER = process.env.CALLS_TURNSERVER || 'turnserver';

/** Sends a STUN binding request to 127.0.0.1:port; resolves true when a success response comes. */
function stunPing(port, timeout = 500) {
  return new Promise((resolveP) => {
    const sock = createSocket('udp4');
    const tx = randomBytes(12);
    const req = Buffer.concat([Buffer.from([0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42]), tx]);
    const done = (ok) => { clearTimeout(timer); sock.close(); resolveP(ok); };
    const timer = setTimeout(() => done(false), timeout);
    sock.on('message', (m) => done(m.length >= 20 && m.readUInt16BE(0) === 0x0101 && m.subarray(8, 20).equals(tx)));
    sock.on('error', () => done(false));
    sock.send(req, port, '127.0.0.1');
  });
}

/**
 * The turnserver.conf lines for a coturn on loopback that accepts calls' TURN REST credentials:
 * the same lines as docs/server.md "TURN with coturn", with this test's ports and secret.
 */
export function turnConfig({ port, secret, realm = 'calls.test', minPort, maxPort, peer = '127.0.0.1' }) {
  return [
    `listening-port=${port}`,
    'listening-ip=127.0.0.1',
    'relay-ip=127.0.0.1',
    `min-port=${minPort}`,
    `max-port=${maxPort}`,
    'use-auth-secret',
    `static-auth-secret=${secret}`,
    `realm=${realm}`,
    'fingerprint',
    // Relay only to the calls server's media address (never an open relay into the network).
    'denied-peer-ip=0.0.0.0-255.255.255.255',
    `allowed-peer-ip=${peer}`,
    // The calls server is on 127.0.0.1: coturn refuses loopback peers without this (tests only).
    'allow-loopback-peers',
    'no-cli',
    'no-tls',
    'no-dtls',
  ];
}

/**
 * Starts coturn on loopback with TURN REST credentials (`use-auth-secret`) from a turnserver.conf
 * written to logs/<name>.conf (turnConfig's lines): listening on 127.0.0.1:`port` (UDP and TCP),
 * relaying from 127.0.0.1 ports `minPort`..`maxPort`, to 127.0.0.1 only. Resolves once it answers
 * a STUN binding request. Returns { port, log, conf, logText(), stop() }.
 */
export async function startTurn(name, opts) {
  mkdirSync(LOG_DIR, { recursive: true });
  const log = resolve(LOG_DIR, `${name}.log`);
  const conf = resolve(LOG_DIR, `${name}.conf`);
  writeFileSync(conf, [
    ...turnConfig(opts),
    // Test plumbing: log to stdout (our log file) with per-session lines, pid and sqlite files
    // under logs/ rather than /var.
    'log-file=stdout', 'simple-log', 'verbose',
    `pidfile=${resolve(LOG_DIR, `${name}.pid`)}`,
    `userdb=${resolve(LOG_DIR, `${name}.sqlite`)}`,
  ].join('\n') + '\n');
  const port = opts.port;
  const fd = openSync(log, 'w');
  const args = ['-c', conf];
  const child = spawn(TURNSERVER, args, { stdio: ['ignore', fd, fd] });
  running.add(child);
  let exited = null;
  child.on('exit', (code, signal) => { exited = { code, signal }; running.delete(child); });
  child.on('error', (e) => { exited = { error: e.message }; });
  await waitFor(`coturn ${name} to answer STUN on 127.0.0.1:${port} (log: ${log})`, async () => {
    if (exited) throw new Error(`coturn exited ${JSON.stringify(exited)}:\n${readFileSync(log, 'utf8')}`);
    return stunPing(port);
  }, { timeout: 15000, interval: 200 });
  return {
    name, port, log, conf, args,
    logText() { return readFileSync(log, 'utf8'); },
    async stop() {
      if (exited) return;
      const gone = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
      await gone;
      clearTimeout(timer);
    },
  };
}

// ------------------------------------------------------------------ tokens

const b64url = (buf) => Buffer.from(buf).toString('base64url');

/** An HS256 JWT as the chat server would mint it. */
export function mintToken(secret, claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

// ------------------------------------------------------------------ browser

export async function launchBrowser() {
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
}

/**
 * Opens the demo page in its own context and joins `call` as `user`. Resolves after `goto`
 * (the join runs on its own); `openedAt` is when loading started.
 */
export async function join(browser, server, call, user, { token, initScript, params, record, viewport } = {}) {
  const context = await browser.newContext({ viewport: viewport || { width: 800, height: 600 } });
  if (record) await context.addInitScript(recordSignaling);
  if (initScript) await context.addInitScript(initScript);
  const page = await context.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(`[${user}] ${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`[${user}] pageerror: ${e.message}`));
  const q = new URLSearchParams({ call, user, autojoin: '1' });
  if (token) q.set('token', token);
  for (const [k, v] of Object.entries(params || {})) q.set(k, v);
  const openedAt = Date.now();
  await page.goto(`${server.url}/?${q}`);
  return { page, context, user, call, openedAt, logs, close: () => context.close().catch(() => {}) };
}

/**
 * Init script (join's `record` option): logs every signaling WebSocket's life into
 * window.__signaling — { socket, event: 'open' | 'message' | 'close', type, msg, sdp, code, reason,
 * clean } with `socket` counting the page's WebSockets from 1 (`sdp`: { bytes, mlines } of an
 * offer or answer). Listens only; the page sees no change.
 */
function recordSignaling() {
  const Native = window.WebSocket;
  const log = [];
  window.__signaling = log;
  let n = 0;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      const socket = ++n;
      this.addEventListener('open', () => log.push({ socket, event: 'open' }));
      this.addEventListener('message', (e) => {
        let msg = null;
        try { msg = JSON.parse(e.data); } catch { /* not JSON */ }
        // Keep small messages whole; of SDP only its size and m-line count.
        const keep = msg && !msg.sdp ? msg : null;
        const sdp = msg && typeof msg.sdp === 'string'
          ? { bytes: msg.sdp.length, mlines: (msg.sdp.match(/^m=/gm) || []).length } : undefined;
        log.push({ socket, event: 'message', type: msg && msg.type, msg: keep, sdp });
      });
      this.addEventListener('close', (e) => log.push({ socket, event: 'close', code: e.code, reason: e.reason, clean: e.wasClean }));
    }
  };
}

/** The page's signaling log (join with `record: true`). */
export function signalingLog(p) {
  return p.page.evaluate(() => window.__signaling || []);
}

/**
 * Everything the tests look at, from one page: its session, roster, slot mapping (`slots`: what
 * each receive slot carries now, from the `slots` messages), inbound RTP per slot (with the
 * slot's current mapping, the decoded video size, the codec's mime type and, for audio, the
 * samples received and concealed), outbound RTP per simulcast encoding (`rid`, `active`,
 * `frameWidth`, `codec`), the sender encodings as the page set them (`encodings`), the `layers`
 * the server asked for (dynacast), the tiles shown and the active `speaker`.
 *
 * An inbound row's counters are the slot's, over every source it carried; `session`/`source` are
 * what it carries now. `counter` sums them per current source, and the tests look at growth.
 */
export async function snapshot(p) {
  return p.page.evaluate(async () => {
    const s = window.callState;
    const pc = window.pc;
    const out = {
      session: s.session,
      roster: [...s.roster.entries()].map(([id, p]) => [id, p.user]),
      slots: [...s.slots.values()],
      pins: [...s.pins],
      routerOffers: s.routerOffers,
      inbound: [],
      outbound: [],
      pair: null,
      connection: pc ? pc.connectionState : null,
      tiles: [...document.querySelectorAll('.tile')].map((e) => e.id),
      cameraTiles: [...document.querySelectorAll('.tile[data-mid]')].map((e) => ({
        id: e.id, mid: e.dataset.mid, kind: e.dataset.kind, session: Number(e.dataset.session), user: e.dataset.user,
        label: e.querySelector('.name').textContent,
      })),
      speaker: s.speaker ?? null,
      speakerTiles: [...document.querySelectorAll('.tile.speaking')].map((e) => Number(e.dataset.session)),
      layers: [...(s.layers || new Map()).entries()],
      encodings: [],
    };
    if (!pc) return out;
    for (const t of pc.getTransceivers()) {
      if (!t.sender || !t.sender.track || !t.mid) continue;
      for (const e of t.sender.getParameters().encodings || []) {
        out.encodings.push({ mid: t.mid, kind: t.sender.track.kind, rid: e.rid ?? null, active: e.active !== false });
      }
    }
    const report = await pc.getStats();
    const midOfTrack = new Map();
    for (const t of pc.getTransceivers()) if (t.receiver && t.receiver.track) midOfTrack.set(t.receiver.track.id, t.mid);
    report.forEach((r) => {
      if (r.type === 'inbound-rtp') {
        const mid = r.mid ?? midOfTrack.get(r.trackIdentifier);
        const info = s.slots.get(mid) || {};
        out.inbound.push({
          mid, kind: r.kind, slot: info.kind ?? null, session: info.session ?? null, user: info.user ?? null,
          source: info.source ?? null, ssrc: r.ssrc,
          packets: r.packetsReceived || 0, frames: r.framesDecoded || 0, bytes: r.bytesReceived || 0,
          frameWidth: r.frameWidth ?? null, frameHeight: r.frameHeight ?? null,
          codec: report.get(r.codecId)?.mimeType ?? null,
          concealedSamples: r.concealedSamples || 0, totalSamplesReceived: r.totalSamplesReceived || 0,
        });
      }
      if (r.type === 'outbound-rtp') {
        out.outbound.push({
          mid: r.mid, kind: r.kind, packets: r.packetsSent || 0, bytes: r.bytesSent || 0,
          codec: report.get(r.codecId)?.mimeType ?? null,
          rid: r.rid ?? null, active: r.active ?? null,
          frameWidth: r.frameWidth ?? null, frameHeight: r.frameHeight ?? null,
          limitation: r.qualityLimitationReason ?? null,
        });
      }
      if (r.type === 'transport' && r.selectedCandidatePairId) {
        const pair = report.get(r.selectedCandidatePairId);
        const local = pair && report.get(pair.localCandidateId);
        const remote = pair && report.get(pair.remoteCandidateId);
        out.pair = pair && {
          state: pair.state,
          local: local && { protocol: local.protocol, type: local.candidateType, tcpType: local.tcpType },
          remote: remote && { protocol: remote.protocol, type: remote.candidateType, address: `${remote.address}:${remote.port}`, tcpType: remote.tcpType },
        };
      }
    });
    return out;
  });
}

/** The tile of `session`'s camera or screen on page `p` (a CSS selector for `page.$`). */
export const tileOf = (session, kind = 'camera') => `.tile[data-kind="${kind}"][data-session="${session}"]`;

/** The counter that shows media arriving: decoded frames for video, packets for audio. */
export function counter(snap, session, source) {
  let sum = 0;
  let seen = false;
  for (const r of snap.inbound) {
    if (r.session !== session || r.source !== source) continue;
    seen = true;
    sum += source === 'microphone' ? r.packets : r.frames;
  }
  return seen ? sum : -1;
}

const MIN_GROWTH = { microphone: 25, camera: 10, screen: 5 }; // ~0.5 s of audio, a few frames

/**
 * Polls until, on page `p`, every (session, source) in `want` grew by a clear margin over the
 * first sample. Returns the final snapshot.
 */
export async function waitGrowing(p, want, what, timeout = 25000) {
  const base = await snapshot(p);
  const start = new Map(want.map(([s, src]) => [`${s}/${src}`, Math.max(0, counter(base, s, src))]));
  let last = null;
  try {
    return await waitFor(`${p.user}: ${what}`, async () => {
      const snap = await snapshot(p);
      last = snap;
      const lacking = want.filter(([s, src]) => counter(snap, s, src) < start.get(`${s}/${src}`) + MIN_GROWTH[src]);
      return lacking.length === 0 ? snap : false;
    }, { timeout, interval: 300 });
  } catch (e) {
    e.message += `\n  wanted ${JSON.stringify(want)} from ${JSON.stringify([...start])}` +
      `\n  last snapshot: ${JSON.stringify({ ...last, inbound: last?.inbound })}`;
    throw e;
  }
}

/**
 * Polls until `session`'s `source` counter on `p` did not move over a `windowMs` window, while
 * every (session, source) in `alive` kept growing in that same window.
 */
export async function waitStalled(p, session, source, { windowMs = 2000, timeout = 15000, alive = [] } = {}) {
  const deadline = Date.now() + timeout;
  let a = await snapshot(p);
  for (;;) {
    await sleep(windowMs);
    const b = await snapshot(p);
    const still = counter(b, session, source) === counter(a, session, source);
    const others = alive.every(([s, src]) => counter(b, s, src) > counter(a, s, src));
    if (still && others) return { before: a, after: b };
    if (Date.now() > deadline) {
      throw new Error(`${p.user}: ${session}/${source} did not stop (or ${JSON.stringify(alive)} stopped): ` +
        `${counter(a, session, source)} -> ${counter(b, session, source)}; alive ${alive.map(([s, src]) => `${counter(a, s, src)}->${counter(b, s, src)}`)}`);
    }
    a = b;
  }
}

/** Dumps page logs and the server log tail when a test fails. */
export function dumpOnFailure(t, pages, servers) {
  return (err) => {
    for (const p of pages) if (p && p.logs.length) console.error(p.logs.slice(-30).join('\n'));
    for (const s of servers) {
      if (!s) continue;
      try {
        const lines = readFileSync(s.log, 'utf8').trim().split('\n');
        console.error(`--- ${s.name} server log (last 40 lines of ${s.log}) ---\n${lines.slice(-40).join('\n')}`);
      } catch { /* none */ }
    }
    throw err;
  };
}

// ------------------------------------------------------------------ aiortc participant

export const PYTHON = process.env.CALLS_PYTHON || 'python3';

/**
 * Starts aiortc_peer.py as a participant. `status()` is its latest JSON status line;
 * `counter(session, source)` sums the frames it decoded from that publisher's source.
 */
export function startAiortc(server, call, user) {
  mkdirSync(LOG_DIR, { recursive: true });
  const url = `${server.ws}?${new URLSearchParams({ call, user })}`;
  const child = spawn(PYTHON, [resolve(here, 'aiortc_peer.py'), url], { stdio: ['pipe', 'pipe', 'pipe'] });
  running.add(child);
  let exited = null;
  child.on('exit', (code, signal) => { exited = { code, signal }; running.delete(child); });
  let latest = null;
  let buf = '';
  const stderr = [];
  child.stdout.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      try { latest = JSON.parse(line); } catch { stderr.push(`stdout: ${line}`); }
    }
  });
  child.stderr.on('data', (d) => stderr.push(String(d)));
  const peer = {
    user, call, logs: stderr,
    status() {
      if (exited) throw new Error(`aiortc peer ${user} exited ${JSON.stringify(exited)}:\n${stderr.join('')}`);
      return latest;
    },
    counter(session, source) {
      const s = latest;
      if (!s) return -1;
      let sum = 0;
      let seen = false;
      for (const [mid, info] of Object.entries(s.slots)) {
        if (info.session !== session || info.source !== source || !s.recv[mid]) continue;
        seen = true;
        sum += s.recv[mid].frames;
      }
      return seen ? sum : -1;
    },
    async stop() {
      if (exited) return;
      const gone = new Promise((r) => child.once('exit', r));
      child.stdin.end();
      const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
      await gone;
      clearTimeout(timer);
    },
  };
  return peer;
}

/** Polls until the aiortc peer decoded a clear number of new frames of each (session, source). */
export async function waitAiortcGrowing(peer, want, what, timeout = 25000) {
  await waitFor(`${peer.user}: first status`, () => peer.status(), { timeout: 15000 });
  const start = new Map(want.map(([s, src]) => [`${s}/${src}`, Math.max(0, peer.counter(s, src))]));
  try {
    return await waitFor(`${peer.user}: ${what}`, () => {
      const st = peer.status();
      const lacking = want.filter(([s, src]) => peer.counter(s, src) < start.get(`${s}/${src}`) + MIN_GROWTH[src]);
      return lacking.length === 0 ? st : false;
    }, { timeout, interval: 300 });
  } catch (e) {
    e.message += `\n  wanted ${JSON.stringify(want)} from ${JSON.stringify([...start])}\n  last status: ${JSON.stringify(peer.status())}`;
    throw e;
  }
}
