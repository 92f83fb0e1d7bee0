// End-to-end: media through a TURN relay. coturn runs on loopback with TURN REST credentials
// (use-auth-secret); the calls server hands out time-limited credentials for it in `welcome`;
// two Chromium pages use only relay candidates (page.html ?relay=1 → iceTransportPolicy "relay").
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import {
  dumpOnFailure, join, launchBrowser, signalingLog, snapshot, startServer, startTurn, waitFor, waitGrowing,
} from './lib.mjs';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

const av = (sessions) => sessions.flatMap((s) => [[s, 'microphone'], [s, 'camera']]);

test('TURN relay only (coturn, REST credentials): media both ways through the relay', async () => {
  const secret = randomBytes(18).toString('base64url');
  const turnPort = 13478;
  const turn = await startTurn('coturn', { port: turnPort, secret, minPort: 49160, maxPort: 49200 });
  let server;
  let pages = [];
  try {
    server = await startServer('turn', {
      http: 18090, media: 18450,
      env: {
        CALLS_TURN_URLS: `turn:127.0.0.1:${turnPort}?transport=udp`,
        CALLS_TURN_SECRET: secret,
        // coturn answers plain STUN too: the server's public-IP discovery at start-up.
        CALLS_STUN_SERVER: `127.0.0.1:${turnPort}`,
      },
    });
    assert.match(server.logText(), /STUN discovered the public address.*ip=127\.0\.0\.1/);
    pages = await Promise.all(['rita', 'ray'].map((u) => join(browser, server, 'relay-room', u, {
      params: { relay: '1' }, record: true,
    })));
    const sessions = await Promise.all(pages.map((p) => waitFor(`${p.user} welcomed`, async () => (await snapshot(p)).session)));

    // The welcome carried time-limited TURN REST credentials for the coturn instance.
    for (const p of pages) {
      const welcome = (await signalingLog(p)).find((e) => e.type === 'welcome').msg;
      const [ice] = welcome.ice_servers;
      assert.deepEqual(ice.urls, [`turn:127.0.0.1:${turnPort}?transport=udp`]);
      const [expiry, user] = ice.username.split(':');
      assert.equal(user, p.user);
      const ttl = Number(expiry) - Date.now() / 1000;
      assert.ok(ttl > 86000 && ttl <= 86400, `credential expiry ${expiry} is ~24 h ahead (${ttl} s)`);
      assert.ok(ice.credential.length > 20, 'a credential');
      const policy = await p.page.evaluate(() => window.pc.getConfiguration().iceTransportPolicy);
      assert.equal(policy, 'relay', `${p.user}'s peer connection is relay-only`);
    }

    const t0 = Date.now();
    await Promise.all(pages.map((p, i) => waitGrowing(p, av(sessions.filter((_, j) => j !== i)), 'audio+video through TURN', 40000)));
    console.log(`# media both ways through coturn ${Date.now() - t0} ms after welcome (pages opened ${t0 - pages[0].openedAt} ms before)`);
    for (const p of pages) {
      // Media flows over the selected pair; its stats state can read `in-progress` for a moment
      // while Chrome re-checks it (consent freshness, RFC 7675), so wait for `succeeded`.
      const snap = await waitFor(`${p.user}: selected pair succeeded`, async () => {
        const s = await snapshot(p);
        return s.pair?.state === 'succeeded' ? s : false;
      }, { timeout: 10000, interval: 250 });
      console.log(`# ${p.user}: selected pair ${JSON.stringify(snap.pair)}`);
      assert.equal(snap.pair?.local?.type, 'relay', `${p.user}'s selected local candidate is a TURN relay`);
      assert.equal(snap.pair?.remote?.address, '127.0.0.1:18450', 'the relay reaches the calls server\'s UDP port');
      // Relay-only: no host/srflx candidate was even gathered.
      const types = await p.page.evaluate(async () => {
        const out = new Set();
        (await window.pc.getStats()).forEach((r) => { if (r.type === 'local-candidate') out.add(r.candidateType); });
        return [...out];
      });
      assert.deepEqual(types, ['relay'], `${p.user}'s local candidates`);
    }
    // coturn saw authenticated allocations (REST credentials accepted) for both users.
    const log = turn.logText();
    for (const u of ['rita', 'ray']) {
      assert.match(log, new RegExp(`user <\\d+:${u}>.*ALLOCATE processed, success`), `coturn allocated for ${u}`);
    }
  } catch (e) {
    console.error(`--- coturn log (last 30 lines) ---\n${turn.logText().trim().split('\n').slice(-30).join('\n')}`);
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server?.stop();
    await turn.stop();
  }
});
