// End-to-end: simulcast layer switching with real Chromium. The publisher sends its 1280x720
// camera in three layers (q/h/f); the subscriber first decodes the full layer; an admin bandwidth
// cap on the subscriber (POST /api/sessions/{id}/bandwidth) makes the router forward the lowest
// layer and tell the publisher (dynacast `layers`) to stop the upper ones; removing the cap brings
// the full layer back. Asserted on decoded frame sizes and on the publisher's encodings.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  dumpOnFailure, join, launchBrowser, signalingLog, sleep, snapshot, startServer, waitFor,
} from './lib.mjs';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

const sessionOf = (p) => waitFor(`${p.user} to be welcomed`, async () => (await snapshot(p)).session);

// The page's camera layers (page.html CAMERA_ENCODINGS), and what "full" and "lowest" mean for
// a 1280x720 camera: f is 1280 wide, h 640, q 320. Chrome may trim a layer a little under CPU
// load, hence the margins.
const RIDS = ['q', 'h', 'f'];
const FULL_MIN_WIDTH = 960;
const LOW_MAX_WIDTH = 400;
const CAP_BPS = 250000;

/** The subscriber's inbound video from `session`'s camera (the camera slot with the most frames). */
function cameraFrom(snap, session) {
  const rows = snap.inbound.filter((r) => r.session === session && r.source === 'camera' && r.kind === 'video');
  return rows.sort((a, b) => b.frames - a.frames)[0] || null;
}

/** The publisher's camera encodings: per RID, active as set and what outbound-rtp reports. */
function cameraEncodings(snap, mid) {
  return RIDS.map((rid) => {
    const set = snap.encodings.find((e) => e.mid === mid && e.rid === rid);
    const sent = snap.outbound.find((r) => r.mid === mid && r.rid === rid);
    return {
      rid, active: set ? set.active : null, statsActive: sent ? sent.active : null,
      packets: sent ? sent.packets : 0, frameWidth: sent ? sent.frameWidth : null, limitation: sent ? sent.limitation : null,
    };
  });
}

/**
 * Polls until the subscriber decodes `session`'s camera at a width `ok` accepts, with frames
 * still growing there: returns { width, at } (at: when first seen).
 */
async function waitWidth(p, session, what, ok, timeout) {
  let last = null;
  try {
    const seen = await waitFor(`${p.user}: ${what}`, async () => {
      const cam = cameraFrom(await snapshot(p), session);
      last = cam;
      return cam && cam.frameWidth !== null && ok(cam.frameWidth) ? { width: cam.frameWidth, frames: cam.frames, at: Date.now() } : false;
    }, { timeout, interval: 200 });
    // Still decoding at that size, not a last frame before a stall.
    const grown = await waitFor(`${p.user}: frames keep coming at ${what}`, async () => {
      const cam = cameraFrom(await snapshot(p), session);
      last = cam;
      return cam && cam.frames >= seen.frames + 10 && ok(cam.frameWidth) ? cam : false;
    }, { timeout: 15000, interval: 250 });
    return { ...seen, height: grown.frameHeight };
  } catch (e) {
    e.message += `\n  last inbound camera: ${JSON.stringify(last)}`;
    throw e;
  }
}

test('simulcast: a bandwidth cap drops the subscriber to the lowest layer, dynacast stops the upper ones, uncapping restores full', async () => {
  const key = 'e2e-admin-key-simulcast-01';
  const admin = 'http://127.0.0.1:18098';
  const server = await startServer('simulcast', {
    http: 18086, media: 18449, env: { CALLS_ADMIN_API_KEY: key, CALLS_ADMIN_LISTEN: '127.0.0.1:18098', CALLS_METRICS_PER_SESSION: 'true' },
  });
  const auth = { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' };
  const cap = (session, body, headers = auth) => fetch(`${admin}/api/sessions/${session}/bandwidth`, {
    method: 'POST', headers, body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  let pages = [];
  try {
    pages = await Promise.all([['pia', true], ['sid', false]].map(([u, record]) => join(browser, server, 'simulcast-room', u, { record })));
    const [pub, sub] = pages;
    const [sPub, sSub] = await Promise.all(pages.map(sessionOf));
    const camMid = await waitFor('pia: camera m-line', () => pub.page.evaluate(() => window.callState.camTransceiver?.mid));

    // The publisher offers three layers of a 1280x720 camera.
    const settings = await pub.page.evaluate(() => window.callState.cam.getSettings());
    console.log(`# pia's camera: ${settings.width}x${settings.height}`);
    assert.equal(settings.width, 1280);
    assert.equal(settings.height, 720);
    assert.deepEqual((await snapshot(pub)).encodings.filter((e) => e.mid === camMid).map((e) => e.rid), RIDS);

    // 1. The subscriber decodes the full layer.
    let full;
    try {
      full = await waitWidth(sub, sPub, `pia's camera at >= ${FULL_MIN_WIDTH} wide`, (w) => w >= FULL_MIN_WIDTH, 60000);
    } catch (e) {
      // What the publisher sends and what the router knows of both links (bandwidth, RTT, loss).
      e.message += `\n  pia's camera encodings: ${JSON.stringify(cameraEncodings(await snapshot(pub), camMid))}`;
      e.message += `\n  admin /api/calls: ${await (await fetch(`${admin}/api/calls`, { headers: auth })).text()}`;
      const metrics = await (await fetch(`${server.url}/metrics`)).text();
      e.message += `\n  ${metrics.split('\n').filter((l) => /bandwidth|layer_switch|dynacast|probe|keyframe/.test(l) && !l.startsWith('#')).join('\n  ')}`;
      throw e;
    }
    console.log(`# sid: page load -> pia's full layer decoded (${full.width}x${full.height}) in ${full.at - sub.openedAt} ms`);
    let encodings = cameraEncodings(await snapshot(pub), camMid);
    console.log(`# pia's camera encodings uncapped: ${JSON.stringify(encodings)}`);

    // The endpoint's refusals: no key 401, unknown session 404, bad bodies 400 — none changes anything.
    assert.equal((await cap(sSub, { bps: CAP_BPS }, { 'Content-Type': 'application/json' })).status, 401);
    assert.equal((await cap(sSub, { bps: CAP_BPS }, { ...auth, Authorization: `Bearer ${key}x` })).status, 401);
    assert.equal((await cap(987654, { bps: CAP_BPS })).status, 404);
    assert.equal((await cap('not-a-session', { bps: CAP_BPS })).status, 404);
    for (const bad of ['{}', '{"bps":"250k"}', '{"bps":-1}', 'nonsense', '{"bps":1,"burst":2}']) {
      assert.equal((await cap(sSub, bad)).status, 400, `body ${bad}`);
    }
    assert.equal((await fetch(`${server.url}/api/sessions/${sSub}/bandwidth`, { method: 'POST', headers: auth, body: '{"bps":1}' })).status, 404,
      'not on the public listener');

    // 2. Cap the subscriber: it drops to the lowest layer.
    const layersBefore = (await signalingLog(pub)).filter((e) => e.type === 'layers').length;
    const cappedAt = Date.now();
    let r = await cap(sSub, { bps: CAP_BPS });
    assert.equal(r.status, 204);
    const low = await waitWidth(sub, sPub, `pia's camera down to <= ${LOW_MAX_WIDTH} wide under a ${CAP_BPS / 1000} kbit/s cap`,
      (w) => w <= LOW_MAX_WIDTH, 30000);
    console.log(`# sid capped to ${CAP_BPS / 1000} kbit/s: switched to ${low.width}x${low.height} in ${low.at - cappedAt} ms`);

    // 3. Dynacast: pia is told to send only the lowest layer of her camera, and stops the others.
    const layersMsg = await waitFor('pia: a `layers` message without h and f', async () => {
      const msgs = (await signalingLog(pub)).filter((e) => e.type === 'layers' && e.msg.mid === camMid);
      const m = msgs[msgs.length - 1];
      return m && m.msg.active.includes('q') && !m.msg.active.includes('h') && !m.msg.active.includes('f') ? m.msg : false;
    }, { timeout: 20000, interval: 200 });
    console.log(`# pia: ${JSON.stringify(layersMsg)} ${Date.now() - cappedAt} ms after the cap (${layersBefore} layers messages before)`);
    await waitFor('pia: h and f encodings inactive, q active', async () => {
      const enc = cameraEncodings(await snapshot(pub), camMid);
      return enc[0].active === true && enc[1].active === false && enc[2].active === false;
    }, { timeout: 10000, interval: 200 });
    // And they really stop: no packets on h and f over 2 s while q goes on.
    let a = cameraEncodings(await snapshot(pub), camMid);
    const stopped = await waitFor('pia: h and f send nothing, q goes on', async () => {
      await sleep(2000);
      const b = cameraEncodings(await snapshot(pub), camMid);
      const ok = b[1].packets === a[1].packets && b[2].packets === a[2].packets && b[0].packets > a[0].packets;
      a = b;
      return ok ? b : false;
    }, { timeout: 20000, interval: 0 });
    console.log(`# pia's camera encodings capped: ${JSON.stringify(stopped)}; upper layers silent ${Date.now() - cappedAt} ms after the cap`);

    // 4. Remove the cap: back to the full layer, and pia sends it again.
    const uncappedAt = Date.now();
    r = await cap(sSub, { bps: null });
    assert.equal(r.status, 204);
    const back = await waitWidth(sub, sPub, `pia's camera back to >= ${FULL_MIN_WIDTH} wide after the cap is removed`,
      (w) => w >= FULL_MIN_WIDTH, 45000);
    console.log(`# sid uncapped: back to ${back.width}x${back.height} in ${back.at - uncappedAt} ms`);
    encodings = cameraEncodings(await snapshot(pub), camMid);
    console.log(`# pia's camera encodings uncapped again: ${JSON.stringify(encodings)}`);
    assert.equal(encodings[2].active, true, 'f is active again');

    // Active speaker, if the router named one by now: that participant's tile is the highlighted one.
    for (const p of pages) {
      const snap = await snapshot(p);
      if (snap.speaker === null) continue;
      assert.deepEqual(snap.speakerTiles, [snap.speaker], `${p.user}: speaker ${snap.speaker}, tiles ${JSON.stringify(snap.cameraTiles)}`);
      console.log(`# ${p.user}: active speaker ${snap.speaker}, its tile highlighted`);
    }
  } catch (e) {
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
});
