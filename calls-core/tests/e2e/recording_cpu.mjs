// Measures what recording a 2-party call costs, for docs/recording.md (not part of run.sh):
// CPU seconds per 10 s window, on this machine, of
//   0. the call alone (two Chromium pages publishing camera and microphone to each other),
//   1. the same call recorded by the server's tap (admin API), and
//   2. the same call with a third, hidden Chromium page that only receives (the way a
//      browser-based recorder joins: it decodes and renders both participants; it does not
//      screen-capture or encode, which Mattermost's recorder also does, so this is a floor).
// Prints the server's CPU and Chromium's (every Chromium process this script started) per window.
//
//   CALLS_SERVER_BIN=target/debug/calls-server node calls-core/tests/e2e/recording_cpu.mjs
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join as joinPath } from 'node:path';
import { join, launchBrowser, sleep, snapshot, startServer, waitFor, waitGrowing } from './lib.mjs';

const WINDOW_MS = Number(process.env.WINDOW_MS || 10000);
const KEY = 'cpu-recording-admin-key-0123';
const ADMIN = 'http://127.0.0.1:18101';

/** CPU seconds (user + system) of `pid` from /proc, 0 if it is gone. */
function cpuOf(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch { return 0; }
}

/** Every process below this one whose name says Chromium, and their CPU seconds so far. */
function chromiumCpu() {
  const parent = new Map();
  const name = new Map();
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      name.set(Number(d), stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')));
      parent.set(Number(d), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]));
    } catch { /* gone */ }
  }
  const below = (pid) => {
    for (let p = parent.get(pid); p; p = parent.get(p)) if (p === process.pid) return true;
    return false;
  };
  let sum = 0;
  for (const [pid, comm] of name) if (/chrom/i.test(comm) && below(pid)) sum += cpuOf(pid);
  return sum;
}

async function window(label, server) {
  const s0 = server.cpuSeconds();
  const c0 = chromiumCpu();
  await sleep(WINDOW_MS);
  const row = { label, server: server.cpuSeconds() - s0, chromium: chromiumCpu() - c0 };
  console.log(`${label}: server ${row.server.toFixed(2)} CPU s, chromium ${row.chromium.toFixed(2)} CPU s per ${WINDOW_MS / 1000} s`);
  return row;
}

const dir = mkdtempSync(joinPath(tmpdir(), 'calls-cpu-recording-'));
const server = await startServer('recording-cpu', {
  http: 18100, media: 18460,
  env: { CALLS_ADMIN_API_KEY: KEY, CALLS_ADMIN_LISTEN: '127.0.0.1:18101', CALLS_RECORDING_DIR: dir, RUST_LOG: 'warn' },
});
const browser = await launchBrowser();
const pages = [];
try {
  for (const u of ['cora', 'cato']) pages.push(await join(browser, server, 'cpu-room', u));
  const sessions = await Promise.all(pages.map((p) => waitFor('welcome', async () => (await snapshot(p)).session)));
  const av = (s) => [[s, 'microphone'], [s, 'camera']];
  await Promise.all(pages.map((p, i) => waitGrowing(p, av(sessions[1 - i]), 'media', 30000)));
  await sleep(3000);
  const rows = [await window('0. call alone', server)];

  const auth = { Authorization: `Bearer ${KEY}` };
  const path = `${ADMIN}/api/calls/cpu-room/recording`;
  if ((await fetch(path, { method: 'POST', headers: auth })).status !== 204) throw new Error('start failed');
  rows.push(await window('1. recorded by the tap', server));
  if ((await fetch(path, { method: 'DELETE', headers: auth })).status !== 204) throw new Error('stop failed');

  const bot = await join(browser, server, 'cpu-room', 'recorder-bot', {
    initScript: () => { navigator.mediaDevices.getUserMedia = () => Promise.reject(new Error('a recorder has no devices')); },
  });
  pages.push(bot);
  await waitGrowing(bot, [...av(sessions[0]), ...av(sessions[1])], 'the bot receives both', 30000);
  await sleep(3000);
  rows.push(await window('2. a hidden receive-only browser joined', server));

  const [alone, tap, hidden] = rows;
  console.log(`tap: +${(tap.server - alone.server).toFixed(2)} server CPU s per ${WINDOW_MS / 1000} s; ` +
    `hidden browser: +${(hidden.chromium - alone.chromium).toFixed(2)} chromium CPU s and +${(hidden.server - alone.server).toFixed(2)} server CPU s`);
} finally {
  for (const p of pages) await p.close();
  await browser.close();
  await server.stop();
  rmSync(dir, { recursive: true, force: true });
}
