// End-to-end: one call over two server processes (issue 14, parts 3 and 4). Node A (node id 1)
// and node B (node id 2) on loopback, each with its own HTTP, media and relay ports, bridge the
// call over their authenticated QUIC relay. Two Chromium participants on A and one on B decode
// each other's audio and video; then B is killed, and A's two carry on (still decoding, no page
// error), while B's participant leaves their roster after relay_peer_gone_s.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  dumpOnFailure, join, launchBrowser, metric, snapshot, startServer, waitFor, waitGrowing,
} from './lib.mjs';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

const SECRET = 'e2e-node-relay-secret-0123456789';
const others = (sessions, i) => sessions.filter((_, j) => j !== i);
const av = (sessions) => sessions.flatMap((s) => [[s, 'microphone'], [s, 'camera']]);
const sessionOf = (p) => waitFor(`${p.user} to be welcomed`, async () => (await snapshot(p)).session);

/** A node on ports base (HTTP), base+1 (media UDP/TCP), base+2 (relay, UDP). */
function startNode(name, { base, id, peer }) {
  return startServer(name, {
    http: base,
    media: base + 1,
    env: {
      CALLS_WORKERS: '1',
      CALLS_NODE_ID: String(id),
      CALLS_RELAY_LISTEN: `127.0.0.1:${base + 2}`,
      CALLS_RELAY_PEERS: peer,
      CALLS_RELAY_SECRET: SECRET,
      CALLS_RELAY_PEER_GONE_S: '3',
    },
  });
}

test('a call over two nodes: everyone decodes everyone; node B dies, A\'s two carry on', async () => {
  const a = await startNode('node-a', { base: 18720, id: 1, peer: '2=127.0.0.1:18732' });
  const b = await startNode('node-b', { base: 18730, id: 2, peer: '1=127.0.0.1:18722' });
  let pages = [];
  try {
    pages = await Promise.all([
      join(browser, a, 'bridged', 'alice'),
      join(browser, a, 'bridged', 'carol'),
      join(browser, b, 'bridged', 'bob'),
    ]);
    const sessions = await Promise.all(pages.map(sessionOf));
    const [alice, carol, bob] = pages;
    const [sa, sc, sb] = sessions;
    assert.ok(Math.floor(sa / 2 ** 40) === 1 && Math.floor(sb / 2 ** 40) === 2, `session ids carry the node: ${sessions}`);

    // Everyone decodes audio and video from both others, across the relay where needed.
    await Promise.all(pages.map((p, i) => waitGrowing(p, av(others(sessions, i)), 'audio+video from both others', 45000)));
    const am = await a.metrics();
    const out = (path) => metric(am, `calls_node_relay_frames_out_total{peer="2",path="${path}"}`);
    console.log(`# node A: relay frames out ${out('datagram')} in datagrams + ${out('stream')} on the stream, in ${metric(am, 'calls_node_relay_frames_in_total{peer="2"}')}, channels ${metric(am, 'calls_node_relay_channels{peer="2"}')}`);
    assert.equal(metric(am, 'calls_node_peer_connected{peer="2"}'), 1);
    assert.equal(metric(am, 'calls_node_auth_failures_total'), 0);

    // Node B dies (SIGKILL): no goodbye on the relay.
    const killedAt = Date.now();
    await b.stop();
    await bob.close();
    // Alice and carol keep decoding each other.
    await waitGrowing(alice, av([sc]), 'carol after node B died', 20000);
    await waitGrowing(carol, av([sa]), 'alice after node B died', 20000);
    // Bob leaves their roster once node B has been gone for relay_peer_gone_s.
    for (const p of [alice, carol]) {
      await waitFor(`${p.user}: bob leaves the roster`, async () => {
        const snap = await snapshot(p);
        return !snap.roster.some(([s]) => s === sb);
      }, { timeout: 15000 });
    }
    console.log(`# bob left alice's and carol's rosters ${Date.now() - killedAt} ms after node B was killed`);
    await waitGrowing(alice, av([sc]), 'carol after bob left', 15000);
    await waitGrowing(carol, av([sa]), 'alice after bob left', 15000);
    for (const p of [alice, carol]) {
      const snap = await snapshot(p);
      assert.equal(snap.connection, 'connected', `${p.user}'s peer connection`);
      const errors = p.logs.filter((l) => l.includes('pageerror'));
      assert.deepEqual(errors, [], `${p.user}: page errors`);
    }
    const am2 = await a.metrics();
    assert.equal(metric(am2, 'calls_node_peer_connected{peer="2"}'), 0);
    assert.equal(metric(am2, 'calls_node_relay_channels{peer="2"}'), 0);
    assert.ok(!a.logText().includes(SECRET), 'the relay secret is never logged');
  } catch (e) {
    dumpOnFailure(null, pages, [a, b])(e);
  } finally {
    for (const p of pages) await p.close();
    await a.stop();
    await b.stop();
  }
});
