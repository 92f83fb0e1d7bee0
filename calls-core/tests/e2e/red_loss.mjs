// Measures audio concealment in Chromium at random UDP loss, with the server's RED on and off,
// in one run. Runs INSIDE a network namespace of its own (red.test.mjs creates it and starts
// this script with `ip netns exec`): it adds and removes an nftables table there that drops a
// share of every UDP datagram on the input hook, so each leg (browser -> server, server ->
// browser; all on the namespace's loopback) loses that share. INTEROP.md: the kernel has no
// netem, and dropping on output would fail the sender's sendto.
//
// For each mode, three Chromium pages join the demo page (microphone and camera), media
// settles, the loss starts, and after WINDOW_MS every receiver reports, over that window,
// concealedSamples / totalSamplesReceived summed over its audio slots. Prints one line
// `RESULT <json>`.
import { execFileSync } from 'node:child_process';
import { join, launchBrowser, snapshot, startServer, waitFor, waitGrowing, sleep, metric } from './lib.mjs';

const LOSS_PERCENT = Number(process.env.RED_LOSS_PERCENT || 5);
const WINDOW_MS = Number(process.env.RED_WINDOW_MS || 30000);
const TABLE = 'calls_red_loss';

function nft(args) {
  return execFileSync('nft', args, { encoding: 'utf8' });
}

function startLoss() {
  nft(['add', 'table', 'inet', TABLE]);
  nft(['add', 'chain', 'inet', TABLE, 'input', '{ type filter hook input priority 0; policy accept; }']);
  nft(['add', 'rule', 'inet', TABLE, 'input', 'meta', 'l4proto', 'udp', 'numgen', 'random', 'mod', '100', '<', String(LOSS_PERCENT), 'counter', 'drop']);
}

/** Stops the loss; returns how many datagrams it dropped. */
function stopLoss() {
  const text = nft(['list', 'table', 'inet', TABLE]);
  nft(['delete', 'table', 'inet', TABLE]);
  const m = text.match(/counter packets (\d+)/);
  return m ? Number(m[1]) : null;
}

/** Per page: { concealed, total, codecs } over its audio slots. */
async function audioTotals(p) {
  const snap = await snapshot(p);
  const rows = snap.inbound.filter((r) => r.kind === 'audio');
  return {
    concealed: rows.reduce((a, r) => a + r.concealedSamples, 0),
    total: rows.reduce((a, r) => a + r.totalSamplesReceived, 0),
  };
}

async function measure(browser, red, ports) {
  const server = await startServer(`red-${red ? 'on' : 'off'}`, { ...ports, env: { CALLS_RED: String(red) } });
  let pages = [];
  try {
    pages = await Promise.all(['alice', 'bob', 'carol'].map((u) => join(browser, server, 'red', u)));
    const sessions = await Promise.all(pages.map((p) => waitFor(`${p.user} welcomed`, async () => (await snapshot(p)).session)));
    await Promise.all(pages.map((p, i) => waitGrowing(p,
      sessions.filter((_, j) => j !== i).map((s) => [s, 'microphone']), 'audio from both others', 40000)));
    await sleep(3000); // jitter buffers settle before the baseline
    const before = await Promise.all(pages.map(audioTotals));
    const m0 = await server.metrics();
    startLoss();
    let dropped;
    try {
      await sleep(WINDOW_MS);
    } finally {
      dropped = stopLoss();
    }
    const after = await Promise.all(pages.map(audioTotals));
    const m1 = await server.metrics();
    const receivers = pages.map((p, i) => {
      const concealed = after[i].concealed - before[i].concealed;
      const total = after[i].total - before[i].total;
      return { user: p.user, concealed, total, ratio: total > 0 ? concealed / total : null };
    });
    const delta = (name) => (metric(m1, name) ?? 0) - (metric(m0, name) ?? 0);
    return {
      red,
      dropped,
      receivers,
      server: {
        redPacketsIn: delta('calls_red_packets_in_total'),
        redStripped: delta('calls_red_stripped_total'),
        fecPackets: delta('calls_opus_fec_packets_total'),
        redStreams: metric(m1, 'calls_red_streams'),
        audioPacketsIn: delta('calls_rtp_in_packets_total{kind="audio"}'),
      },
    };
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
}

const browser = await launchBrowser();
try {
  const on = await measure(browser, true, { http: 18090, media: 18453 });
  const off = await measure(browser, false, { http: 18091, media: 18454 });
  console.log(`RESULT ${JSON.stringify({ lossPercent: LOSS_PERCENT, windowMs: WINDOW_MS, runs: [on, off] })}`);
} finally {
  await browser.close();
}
