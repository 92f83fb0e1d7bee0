// End-to-end: the signaling edge protects itself — the Origin check, the per-connection message
// rate limit, the message size limit — and an unreachable STUN server does not stop the server.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { launchBrowser, startServer } from './lib.mjs';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

/** A raw WebSocket upgrade request with the given Origin; resolves with the HTTP status. */
function upgradeStatus(port, origin) {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: '127.0.0.1', port, path: '/ws?call=c&user=u',
      headers: {
        Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==', ...(origin ? { Origin: origin } : {}),
      },
    });
    req.on('upgrade', (res, socket) => { socket.destroy(); resolve(res.statusCode); });
    req.on('response', (res) => { res.resume(); resolve(res.statusCode); });
    req.on('error', reject);
    req.end();
  });
}

/** From a page on the server's origin: join, then `send` messages; how did the socket end? */
async function abuse(page, url, sendScript) {
  return page.evaluate(({ u, script }) => new Promise((resolve) => {
    const ws = new WebSocket(u);
    ws.onmessage = (e) => {
      if (JSON.parse(e.data).type === 'welcome') new Function('ws', script)(ws);
    };
    ws.onclose = (e) => resolve({ code: e.code, reason: e.reason });
    setTimeout(() => resolve({ code: null, reason: 'still open after 10 s' }), 10000);
  }), { u: url, script: sendScript });
}

test('the WebSocket edge: Origin check, rate limit, size limit; STUN failure is not fatal', async () => {
  const server = await startServer('limits', {
    http: 18096, media: 18456,
    env: { CALLS_STUN_SERVER: '127.0.0.1:9' }, // nothing answers there
  });
  try {
    // Start-up went on without the STUN answer, and said so.
    assert.match(server.logText(), /STUN discovery failed/);

    // Origin: the page's own origin and non-browser clients (no Origin) may connect; others not.
    assert.equal(await upgradeStatus(18096, 'http://127.0.0.1:18096'), 101);
    assert.equal(await upgradeStatus(18096, undefined), 101);
    assert.equal(await upgradeStatus(18096, 'http://evil.example'), 403);

    // (The two accepted upgrades joined call "c" as the same user and dropped; the second
    // replaced the first (one session per user and call, `max_sessions_per_user`), which waits
    // out the reconnect grace.)
    const sessions = async () => (await server.metrics()).match(/^calls_sessions (\d+)/m)?.[1];
    // The replacement is handled by the worker after the upgrade answered, so wait for it.
    let baseline = await sessions();
    for (let i = 0; i < 50 && baseline !== '1'; i++) {
      await new Promise((r) => setTimeout(r, 100));
      baseline = await sessions();
    }
    assert.equal(baseline, '1');

    const page = await (await browser.newContext()).newPage();
    await page.goto(server.url);
    // Rate: 50/s sustained with bursts of 200 allowed; 400 at once closes the socket (4008).
    const flood = await abuse(page, `${server.ws}?call=flood&user=f`,
      "for (let i = 0; i < 400; i++) ws.send(JSON.stringify({ type: 'mute' }));");
    assert.equal(flood.code, 4008, JSON.stringify(flood));
    assert.equal(flood.reason, 'too many messages');
    // Size: a message over ws_max_message_bytes (256 KiB) closes the socket (1009 from the
    // WebSocket layer, or an abnormal close when the server drops it mid-frame).
    const huge = await abuse(page, `${server.ws}?call=huge&user=h`,
      "ws.send(JSON.stringify({ type: 'offer', sdp: 'x'.repeat(300 * 1024) }));");
    assert.ok([1009, 1006].includes(huge.code), JSON.stringify(huge));
    // Neither abuser is left in the router (left for good, not waiting for a resume).
    for (let i = 0; i < 50 && (await sessions()) !== baseline; i++) await new Promise((r) => setTimeout(r, 100));
    assert.equal(await sessions(), baseline);
    assert.match(server.logText(), /WebSocket message over the size limit/);
  } finally {
    await server.stop();
  }
});
