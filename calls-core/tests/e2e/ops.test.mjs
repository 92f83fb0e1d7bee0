// End-to-end: the reference server's operations, asserted on behaviour — resuming a dropped
// signaling connection, the admin API, draining on SIGTERM, and /metrics.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  dumpOnFailure, join, launchBrowser, metric, signalingLog, snapshot, startServer, tileOf, waitFor, waitGrowing,
} from './lib.mjs';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

const av = (sessions) => sessions.flatMap((s) => [[s, 'microphone'], [s, 'camera']]);
const sessionOf = (p) => waitFor(`${p.user} to be welcomed`, async () => (await snapshot(p)).session);

/** Two pages in `call`, both receiving the other's audio and video. */
async function twoInCall(server, call, users) {
  const pages = await Promise.all(users.map((u) => join(browser, server, call, u, { record: true })));
  const sessions = await Promise.all(pages.map(sessionOf));
  await Promise.all(pages.map((p, i) => waitGrowing(p, av([sessions[1 - i]]), 'audio+video from the other', 30000)));
  return { pages, sessions };
}

/** The close events of a page's signaling sockets. */
async function closes(p) {
  return (await signalingLog(p)).filter((e) => e.event === 'close');
}

/**
 * Opens a WebSocket from a page on the server's origin and reports how it ended (close code,
 * reason, whether a welcome came).
 */
function tryJoin(page, url) {
  return page.evaluate((u) => new Promise((resolve) => {
    const ws = new WebSocket(u);
    let welcomed = false;
    ws.onmessage = (e) => { if (JSON.parse(e.data).type === 'welcome') welcomed = true; };
    ws.onclose = (e) => resolve({ code: e.code, reason: e.reason, welcomed });
    setTimeout(() => { resolve({ code: null, reason: 'still open after 5 s', welcomed }); ws.close(); }, 5000);
  }), url);
}

test('resume: a dropped WebSocket reconnects with its resume token and keeps its session', async () => {
  const server = await startServer('ops-resume', { http: 18091, media: 18451 });
  let pages = [];
  try {
    const call = await twoInCall(server, 'resume-room', ['rosa', 'remy']);
    pages = call.pages;
    const [rosa, remy] = pages;
    const [sRosa, sRemy] = call.sessions;
    assert.equal(metric(await server.metrics(), 'calls_sessions'), 2);

    // Drop rosa's signaling from the page (close code 1005 < 4000: the page reconnects in 1 s).
    const before = await signalingLog(rosa);
    const resumeToken = await rosa.page.evaluate(() => window.callState.resume);
    const droppedAt = Date.now();
    await rosa.page.evaluate(() => window.callState.ws.close());
    // The server keeps the session for the grace period: calls_sessions stays 2 throughout.
    const sessionCounts = [];
    const log = await waitFor('rosa: a new socket with a welcome', async () => {
      sessionCounts.push(metric(await server.metrics(), 'calls_sessions'));
      const l = await signalingLog(rosa);
      return l.some((e) => e.socket === 2 && e.type === 'welcome') ? l : false;
    }, { timeout: 15000, interval: 100 });
    console.log(`# rosa: socket closed ${JSON.stringify(log.find((e) => e.socket === 1 && e.event === 'close'))}, ` +
      `resumed ${Date.now() - droppedAt} ms later; calls_sessions meanwhile ${[...new Set(sessionCounts)]}`);
    assert.ok(before.some((e) => e.socket === 1 && e.type === 'welcome'));
    // The server completed the closing handshake (1005: closed cleanly, no status code given).
    assert.deepEqual(log.filter((e) => e.socket === 1 && e.event === 'close').map((e) => [e.code, e.clean]), [[1005, true]]);
    const welcome2 = log.find((e) => e.socket === 2 && e.type === 'welcome').msg;
    assert.equal(welcome2.session, sRosa, 'the new welcome carries the same session');
    assert.equal(welcome2.resume, resumeToken, 'and the same resume token');
    assert.equal(await rosa.page.evaluate(() => window.callState.session), sRosa, 'callState.session unchanged');
    assert.equal(await rosa.page.evaluate(() => window.callState.ws.readyState), 1, 'the new socket is open');
    assert.ok(sessionCounts.every((n) => n === 2), `calls_sessions stayed 2: ${sessionCounts}`);
    await waitFor('server log: signaling resumed', () => /signaling resumed session=/.test(server.logText()), { timeout: 5000 });
    assert.match(server.logText(), /signaling dropped; waiting for a resume/);
    // remy never saw rosa leave.
    assert.ok(!(await signalingLog(remy)).some((e) => e.type === 'participant_left'), 'remy saw no participant_left');
    assert.equal((await closes(remy)).length, 0);

    // Media keeps flowing both ways, and the resumed socket carries signaling: a mute reaches remy.
    await Promise.all([waitGrowing(rosa, av([sRemy]), 'remy after the resume'), waitGrowing(remy, av([sRosa]), 'rosa after the resume')]);
    await rosa.page.click('#mute');
    await waitFor('remy told rosa is muted', () => remy.page.evaluate((s) => window.callState.mutedSessions.has(s), sRosa), { timeout: 10000 });
    // Past the 10 s grace period the session is still there (the old socket's timer did not end it).
    await waitFor('grace period over', async () => Date.now() - droppedAt > 11000, { timeout: 15000, interval: 500 });
    assert.equal(metric(await server.metrics(), 'calls_sessions'), 2, 'calls_sessions still 2 after the grace period');
    assert.doesNotMatch(server.logText(), /signaling lost/);
    await waitGrowing(remy, [[sRosa, 'camera']], 'rosa video after the grace period');
  } catch (e) {
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
});

test('admin API: key required, lists the call, removes a participant, ends a call', async () => {
  const key = 'e2e-admin-key-0123456789';
  const admin = 'http://127.0.0.1:18095';
  const server = await startServer('ops-admin', {
    http: 18092, media: 18452, env: { CALLS_ADMIN_API_KEY: key, CALLS_ADMIN_LISTEN: '127.0.0.1:18095' },
  });
  const auth = { Authorization: `Bearer ${key}` };
  const listCalls = async () => {
    const r = await fetch(`${admin}/api/calls`, { headers: auth });
    assert.equal(r.status, 200);
    return (await r.json()).calls;
  };
  let pages = [];
  try {
    const call = await twoInCall(server, 'admin-room', ['ava', 'alf']);
    pages = call.pages;
    const [ava, alf] = pages;
    const [sAva, sAlf] = call.sessions;

    // Without the key (or with a wrong one): 401, for every endpoint.
    assert.equal((await fetch(`${admin}/api/calls`)).status, 401);
    assert.equal((await fetch(`${admin}/api/calls`, { headers: { Authorization: `Bearer ${key}x` } })).status, 401);
    assert.equal((await fetch(`${admin}/api/sessions/${sAlf}`, { method: 'DELETE' })).status, 401);
    assert.equal((await fetch(`${admin}/api/calls/admin-room`, { method: 'DELETE' })).status, 401);
    // The admin API is not on the public listener.
    assert.equal((await fetch(`${server.url}/api/calls`, { headers: auth })).status, 404);

    // With the key: the call and both participants (connected).
    const calls = await listCalls();
    console.log(`# GET /api/calls: ${JSON.stringify(calls)}`);
    assert.equal(calls.length, 1);
    assert.equal(calls[0].call, 'admin-room');
    // Listed by session id; the two pages join concurrently, so either may hold the lower id.
    const expected = [[sAva, 'ava', true], [sAlf, 'alf', true]].sort((a, b) => a[0] - b[0]);
    assert.deepEqual(calls[0].participants.map((p) => [p.session, p.user, p.connected]), expected);
    // RTT and loss per participant come from RTCP within seconds.
    const measured = await waitFor('RTT and loss for both in /api/calls', async () => {
      const c = await listCalls();
      return c[0].participants.every((p) => p.rtt_ms > 0 && p.rtt_ms < 1000 && p.egress_loss !== null) && c[0].participants;
    }, { timeout: 20000, interval: 500 });
    console.log(`# /api/calls rtt_ms/egress_loss/ingress_loss: ${JSON.stringify(measured.map((p) => [p.rtt_ms, p.egress_loss, p.ingress_loss]))}`);

    // Remove alf: his WebSocket closes with 4000, ava's tile for him goes away.
    let r = await fetch(`${admin}/api/sessions/${sAlf}`, { method: 'DELETE', headers: auth });
    assert.equal(r.status, 204);
    const alfClose = await waitFor('alf: socket closed', async () => (await closes(alf))[0]);
    console.log(`# alf removed: close ${alfClose.code} ${JSON.stringify(alfClose.reason)}`);
    assert.equal(alfClose.code, 4000);
    assert.match(alfClose.reason, /removed by an administrator/);
    await waitFor('ava: alf\'s tile gone', async () => (await ava.page.$(tileOf(sAlf))) === null);
    assert.ok((await signalingLog(ava)).some((e) => e.type === 'participant_left' && e.msg.session === sAlf));
    // The page does not reconnect after a 4xxx close, and the server forgot alf.
    assert.match(await alf.page.textContent('#banner'), /Disconnected: removed by an administrator/);
    await waitFor('only ava left in /api/calls', async () => {
      const c = await listCalls();
      return c.length === 1 && c[0].participants.length === 1 && c[0].participants[0].session === sAva;
    });
    assert.equal((await closes(alf)).length, 1, 'alf did not reconnect');
    await alf.close();
    pages = [ava];

    // A newcomer joins; then the whole call is ended: both sockets close with 4000.
    const amy = await join(browser, server, 'admin-room', 'amy', { record: true });
    pages.push(amy);
    const sAmy = await sessionOf(amy);
    await waitGrowing(ava, av([sAmy]), 'amy');
    assert.equal((await listCalls())[0].participants.length, 2);
    r = await fetch(`${admin}/api/calls/admin-room`, { method: 'DELETE', headers: auth });
    assert.equal(r.status, 204);
    for (const p of [ava, amy]) {
      const c = await waitFor(`${p.user}: socket closed`, async () => (await closes(p))[0]);
      assert.equal(c.code, 4000, `${p.user}: ${JSON.stringify(c)}`);
      assert.match(c.reason, /call ended by an administrator/);
    }
    await waitFor('no calls in /api/calls', async () => (await listCalls()).length === 0);
    await waitFor('calls_sessions 0', async () => metric(await server.metrics(), 'calls_sessions') === 0);
  } catch (e) {
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
});

test('drain: SIGTERM → 503, clients told, joins refused, exit 0 once the call is over', async () => {
  const server = await startServer('ops-drain', { http: 18093, media: 18453, env: { CALLS_DRAIN_DEADLINE_S: '30' } });
  let pages = [];
  try {
    const call = await twoInCall(server, 'drain-room', ['dan', 'dee']);
    pages = call.pages;
    const [dan, dee] = pages;

    const termAt = Date.now();
    server.signal('SIGTERM');
    await waitFor('/healthz 503', async () => (await fetch(`${server.url}/healthz`)).status === 503, { timeout: 5000, interval: 100 });
    for (const p of pages) {
      const msg = await waitFor(`${p.user}: draining message`, async () => (await signalingLog(p)).find((e) => e.type === 'draining'));
      assert.equal(msg.msg.deadline_s, 30);
      await waitFor(`${p.user}: banner`, () => p.page.evaluate(() => {
        const b = document.getElementById('banner');
        return b.style.display === 'block' && /restarting; calls end within 30 s/.test(b.textContent);
      }), { timeout: 5000 });
    }
    assert.equal(metric(await server.metrics(), 'calls_draining'), 1);
    // A new join is refused.
    const refused = await tryJoin(dan.page, `${server.ws}?call=drain-room&user=late`);
    console.log(`# join while draining: close ${refused.code} ${JSON.stringify(refused.reason)}`);
    assert.deepEqual(refused, { code: 4001, reason: 'server is draining', welcomed: false });
    // The running call goes on.
    await Promise.all(pages.map((p, i) => waitGrowing(p, av([call.sessions[1 - i]]), 'media while draining')));
    assert.equal(server.exited(), null, 'still running while the call goes on');

    // Both leave: the server exits 0, well before the 30 s deadline.
    const leftAt = Date.now();
    for (const p of pages) await p.page.click('#leave');
    const exit = await Promise.race([server.exit, new Promise((r) => setTimeout(() => r(null), 20000))]);
    assert.ok(exit, 'the server exited within 20 s of the last leave');
    console.log(`# drain: exited ${JSON.stringify({ code: exit.code, signal: exit.signal })} ${exit.at - leftAt} ms after the leaves, ${exit.at - termAt} ms after SIGTERM`);
    assert.equal(exit.code, 0);
    assert.equal(exit.signal, null);
    assert.ok(exit.at - termAt < 25000, 'well before the drain deadline');
    assert.match(server.logText(), /all calls ended; exiting/);
  } catch (e) {
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
});

test('metrics: sessions, video packets in growing, resident memory, # EOF', async () => {
  const server = await startServer('ops-metrics', { http: 18094, media: 18454 });
  let pages = [];
  try {
    const idle = await server.metrics();
    assert.equal(metric(idle, 'calls_sessions'), 0);
    const call = await twoInCall(server, 'metrics-room', ['mia', 'max']);
    pages = call.pages;

    const r = await fetch(`${server.url}/metrics`);
    assert.match(r.headers.get('content-type'), /^application\/openmetrics-text/);
    const a = await r.text();
    assert.equal(metric(a, 'calls_sessions'), 2);
    assert.ok(a.endsWith('# EOF\n'), `ends with # EOF: ${JSON.stringify(a.slice(-40))}`);
    assert.equal(a.indexOf('# EOF'), a.length - 6, 'exactly one # EOF, at the end');
    const rss = metric(a, 'process_resident_memory_bytes');
    assert.ok(rss > 1e6 && rss < 4e9, `process_resident_memory_bytes ${rss}`);
    assert.equal(metric(a, 'calls_websockets'), 2);
    const name = 'calls_rtp_in_packets_total{kind="video"}';
    const v0 = metric(a, name);
    assert.ok(v0 > 0, `${name} ${v0}`);
    // Two cameras at ~30 fps: video packets in keep growing.
    const t0 = Date.now();
    const b = await waitFor(`${name} to grow by 100`, async () => {
      const text = await server.metrics();
      return metric(text, name) >= v0 + 100 ? text : false;
    }, { timeout: 15000, interval: 250 });
    console.log(`# ${name}: ${v0} -> ${metric(b, name)} in ${Date.now() - t0} ms; audio ${metric(b, 'calls_rtp_in_packets_total{kind="audio"}')}; RSS ${(rss / 1048576).toFixed(1)} MiB`);
    assert.ok(metric(b, 'calls_rtp_in_packets_total{kind="audio"}') > 0);
    assert.ok(metric(b, 'process_cpu_seconds_total') > 0);
  } catch (e) {
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
});
