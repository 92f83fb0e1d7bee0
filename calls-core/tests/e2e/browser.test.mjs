// End-to-end: headless Chromium participants (and one aiortc participant) against the reference
// server binary. Every assertion is on received media (inbound-rtp in the pages, decoded frames
// in aiortc), matched to publishers through the server's slot mapping (window.slotMap, from the
// `slots` messages).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import {
  counter, dumpOnFailure, join, launchBrowser, mintToken, snapshot, startAiortc, startServer, tileOf,
  waitAiortcGrowing, waitFor, waitGrowing, waitStalled, sleep,
} from './lib.mjs';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

const others = (sessions, i) => sessions.filter((_, j) => j !== i);
const av = (sessions) => sessions.flatMap((s) => [[s, 'microphone'], [s, 'camera']]);
const sessionOf = (p) => waitFor(`${p.user} to be welcomed`, async () => (await snapshot(p)).session);

/** Sum of one page's inbound counters (packets) on the given mids. */
function midPackets(snap, mids) {
  return snap.inbound.filter((r) => mids.includes(r.mid)).reduce((a, r) => a + r.packets, 0);
}

/** Polls until page `p` received nothing on `mids` over 2 s (stats may also vanish). */
async function waitMidsStalled(p, mids, what) {
  let a = midPackets(await snapshot(p), mids);
  await waitFor(`${p.user}: ${what}`, async () => {
    await sleep(2000);
    const b = midPackets(await snapshot(p), mids);
    const stopped = b === a;
    a = b;
    return stopped;
  }, { timeout: 15000, interval: 0 });
}

/** Every SSRC page `p` ever received on each of its audio slots: { mid: [ssrc…] }. */
async function audioSlotSsrcs(p) {
  const out = {};
  for (const r of (await snapshot(p)).inbound) {
    if (r.slot !== 'audio') continue;
    (out[r.mid] ||= []).push(r.ssrc);
  }
  return out;
}

test('three Chromium participants: audio+video both ways, mute, screen share, leave', async () => {
  const server = await startServer('three', { http: 18080, media: 18443 });
  let pages = [];
  try {
    pages = await Promise.all(['alice', 'bob', 'carol'].map((u) => join(browser, server, 'room', u)));
    const sessions = await Promise.all(pages.map(sessionOf));
    const [alice, bob, carol] = pages;
    const [sa, sb, sc] = sessions;

    // Page load -> first decoded frame (from anyone, and from both others).
    const timings = await Promise.all(pages.map(async (p, i) => {
      let first = null;
      const all = await waitFor(`${p.user}: first decoded frames from both others`, async () => {
        const snap = await snapshot(p);
        const got = others(sessions, i).map((s) => counter(snap, s, 'camera') > 0);
        if (first === null && got.some(Boolean)) first = Date.now();
        return got.every(Boolean) ? Date.now() : false;
      }, { timeout: 30000, interval: 100 });
      return { user: p.user, firstFrameMs: first - p.openedAt, bothOthersMs: all - p.openedAt };
    }));
    for (const t of timings) console.log(`# ${t.user}: page load -> first decoded frame ${t.firstFrameMs} ms, from both others ${t.bothOthersMs} ms`);

    // Everyone decodes audio and video from both others; measure the server's CPU meanwhile.
    const cpu0 = server.cpuSeconds();
    const t0 = Date.now();
    await Promise.all(pages.map((p, i) => waitGrowing(p, av(others(sessions, i)), 'audio+video from both others')));
    const window = Math.max(0, 8000 - (Date.now() - t0));
    await sleep(window); // measurement window only; the assertions above are polled
    const cpu = (server.cpuSeconds() - cpu0) / ((Date.now() - t0) / 1000);
    console.log(`# server CPU with 3 participants (6 audio + 6 video forwarded streams): ${(cpu * 100).toFixed(1)}% of one core`);

    // Alice mutes: bob and carol stop receiving her audio packets, her video goes on.
    // (Chrome keeps sending silence on a disabled track: stopping it is the server's doing.)
    const audioSent = async () => (await snapshot(alice)).outbound.filter((r) => r.kind === 'audio').reduce((a, r) => a + r.packets, 0);
    // Her microphone arrives on one audio slot at each of them.
    const aliceMicMids = await Promise.all([bob, carol].map(async (p) => (await snapshot(p)).inbound
      .filter((r) => r.session === sa && r.source === 'microphone').map((r) => r.mid)));
    assert.ok(aliceMicMids.every((m) => m.length === 1), `alice's microphone on one audio slot each: ${JSON.stringify(aliceMicMids)}`);
    const ssrcsBefore = await Promise.all([bob, carol].map(audioSlotSsrcs));
    await alice.page.click('#mute');
    const sentAtMute = await audioSent();
    for (const [k, p] of [bob, carol].entries()) {
      await waitStalled(p, sa, 'microphone', { alive: [[sa, 'camera']] });
      await waitMidsStalled(p, aliceMicMids[k], 'the audio slot that carried alice goes quiet');
      assert.ok((await p.page.evaluate((s) => window.callState.mutedSessions.has(s), sa)), `${p.user} was told alice is muted`);
    }
    const sentMuted = await audioSent();
    console.log(`# alice muted: she sent ${sentMuted - sentAtMute} audio packets meanwhile, bob and carol received none for 2 s`);
    assert.ok(sentMuted > sentAtMute + 25, 'alice kept sending (silence) while muted');
    // After 5 s without media the router parks the audio slot's send stream at bob and carol
    // (takes it out of str0m); unmuting declares it again with the same SSRC: a slot keeps one
    // SSRC for its life.
    const parked = async () => {
      const m = /^calls_streams_parked_total (\d+)/m.exec(await server.metrics());
      return m ? Number(m[1]) : 0;
    };
    await waitFor('alice\'s microphone parked at bob and carol', async () => (await parked()) >= 2, { timeout: 12000 });
    // Unmute: her audio flows again, on an audio slot whose SSRC never changed.
    await alice.page.click('#mute');
    await Promise.all([bob, carol].map((p) => waitGrowing(p, [[sa, 'microphone']], 'alice audio after unmute')));
    const ssrcsAfter = await Promise.all([bob, carol].map(audioSlotSsrcs));
    for (const [k, p] of [bob, carol].entries()) {
      for (const [mid, ssrcs] of Object.entries(ssrcsAfter[k])) {
        assert.equal(new Set(ssrcs).size, 1, `${p.user}: audio slot ${mid} has one SSRC: ${JSON.stringify(ssrcs)}`);
        if (ssrcsBefore[k][mid]) assert.deepEqual(ssrcs, ssrcsBefore[k][mid], `${p.user}: audio slot ${mid} kept its SSRC across parking`);
      }
    }
    console.log(`# alice's microphone parked (${await parked()} streams parked), resumed; audio slot SSRCs ${JSON.stringify(ssrcsAfter)}`);

    // Bob shares his screen: alice and carol decode it on their screen slot, shown large.
    await bob.page.click('#screen');
    await waitFor('bob: screen capture started', () => bob.page.evaluate(() => !!window.callState.screen), { timeout: 10000 });
    await Promise.all([alice, carol].map((p) => waitGrowing(p, [[sb, 'screen'], [sb, 'camera']], 'bob screen + camera')));
    for (const p of [alice, carol]) {
      const snap = await snapshot(p);
      const fromBob = snap.inbound.filter((r) => r.session === sb && r.kind === 'video');
      assert.equal(fromBob.length, 2, `${p.user} has bob's camera and screen: ${JSON.stringify(fromBob)}`);
      assert.deepEqual(fromBob.map((r) => r.source).sort(), ['camera', 'screen']);
      assert.deepEqual(fromBob.map((r) => r.slot).sort(), ['camera', 'screen']);
      assert.ok(await p.page.$(tileOf(sb, 'screen')), `${p.user} shows bob's screen tile`);
      assert.ok(await p.page.$(tileOf(sb, 'camera')), `${p.user} shows bob's camera tile`);
    }

    // Carol leaves: her tile goes away on alice's and bob's pages and her slots stop.
    const before = await Promise.all([alice, bob].map(snapshot));
    const carolMids = before.map((s) => s.inbound.filter((r) => r.session === sc).map((r) => r.mid));
    assert.ok(carolMids.every((m) => m.length === 2), `carol's mids: ${JSON.stringify(carolMids)}`);
    await carol.page.click('#leave');
    for (const [k, p] of [alice, bob].entries()) {
      await waitFor(`${p.user}: carol's tile gone`, async () => (await p.page.$(tileOf(sc))) === null);
      await waitFor(`${p.user}: carol gone from roster and slot map`, async () => {
        const s = await snapshot(p);
        return !s.roster.some(([id]) => id === sc) && !s.slots.some((t) => t.session === sc);
      });
      // Her former slots carry nothing any more: nobody else is left to put there.
      await waitMidsStalled(p, carolMids[k], 'carol\'s former slots stop');
    }
    // The remaining two still hear and see each other.
    await waitGrowing(alice, av([sb]), 'bob after carol left');
    await waitGrowing(bob, av([sa]), 'alice after carol left');
  } catch (e) {
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
});

test('ICE-TCP only (UDP disabled): two participants, media both ways over TCP', async () => {
  const server = await startServer('tcp', { http: 18081, media: 18444, env: { CALLS_DISABLE_UDP: 'true' } });
  let pages = [];
  try {
    pages = await Promise.all(['tina', 'tom'].map((u) => join(browser, server, 'tcp-room', u)));
    const sessions = await Promise.all(pages.map(sessionOf));
    await Promise.all(pages.map((p, i) => waitGrowing(p, av(others(sessions, i)), 'audio+video over TCP', 30000)));
    for (const p of pages) {
      const snap = await snapshot(p);
      console.log(`# ${p.user}: selected pair ${JSON.stringify(snap.pair)}`);
      assert.equal(snap.pair?.local?.protocol, 'tcp', `${p.user} selected a TCP pair`);
      assert.equal(snap.pair?.remote?.protocol, 'tcp');
      assert.equal(snap.pair?.remote?.address, '127.0.0.1:18444');
    }
  } catch (e) {
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
});

test('two concurrent calls on one server are isolated', async () => {
  // Four participants, at most three Chromium pages at once: call B's second member is aiortc.
  const server = await startServer('two-calls', { http: 18082, media: 18445 });
  let pages = [];
  let py;
  try {
    pages = await Promise.all([['call-a', 'ann'], ['call-a', 'art'], ['call-b', 'ben']]
      .map(([c, u]) => join(browser, server, c, u)));
    py = startAiortc(server, 'call-b', 'bea');
    const [ann, art, ben] = pages;
    const [sAnn, sArt, sBen] = await Promise.all(pages.map(sessionOf));
    const sBea = await waitFor('bea welcomed', () => py.status()?.session);
    const callOf = new Map([[sAnn, 'call-a'], [sArt, 'call-a'], [sBen, 'call-b'], [sBea, 'call-b']]);

    await Promise.all([
      waitGrowing(ann, av([sArt]), 'art'),
      waitGrowing(art, av([sAnn]), 'ann'),
      waitGrowing(ben, av([sBea]), 'bea (aiortc)'),
      waitAiortcGrowing(py, av([sBen]), 'ben'),
    ]);
    for (const p of pages) {
      const snap = await snapshot(p);
      const mine = callOf.get(snap.session);
      const rosterCalls = snap.roster.map(([s]) => callOf.get(s));
      assert.deepEqual(rosterCalls, [mine], `${p.user}'s roster is its own call's other member: ${JSON.stringify(snap.roster)}`);
      for (const t of snap.slots.filter((x) => x.session !== null)) {
        assert.equal(callOf.get(t.session), mine, `${p.user} was given a slot carrying ${JSON.stringify(t)}`);
      }
      // Every slot that carries media comes from the own call. (Payload bytes, not packets: the
      // router's bandwidth probes are padding-only packets on video slots, empty ones too.)
      for (const r of snap.inbound) {
        if (r.bytes > 0) assert.equal(callOf.get(r.session), mine, `${p.user} receives ${JSON.stringify(r)}`);
      }
      assert.equal(snap.inbound.filter((r) => r.bytes > 0).length, 2, `${p.user}: exactly one peer's audio + video`);
    }
    const st = py.status();
    assert.deepEqual(Object.keys(st.roster).map(Number), [sBen], `bea's roster: ${JSON.stringify(st.roster)}`);
    for (const t of Object.values(st.slots)) if (t.session !== null) assert.equal(t.session, sBen);
  } catch (e) {
    if (py) console.error(py.logs.join(''));
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await py?.stop();
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
});

/**
 * Opens a WebSocket to the server from a page on its origin (Node 20 has no global WebSocket
 * without a flag) and reports how it ended: the close code and reason, and whether a welcome came.
 */
async function tryJoin(page, url) {
  return page.evaluate((u) => new Promise((resolve) => {
    const ws = new WebSocket(u);
    let welcomed = false;
    ws.onmessage = (e) => { if (JSON.parse(e.data).type === 'welcome') welcomed = true; };
    ws.onclose = (e) => resolve({ code: e.code, reason: e.reason, welcomed });
    setTimeout(() => { resolve({ code: null, reason: 'still open after 5 s', welcomed }); ws.close(); }, 5000);
  }), url);
}

test('auth: valid tokens join; forged, expired, tampered and wrong-call tokens are refused', async () => {
  const secret = randomBytes(24).toString('base64url').slice(0, 32);
  const server = await startServer('auth', { http: 18083, media: 18446, env: { CALLS_AUTH_SECRET: secret } });
  let pages = [];
  try {
    const exp = Math.floor(Date.now() / 1000) + 600;
    const call = 'board-meeting';
    pages = await Promise.all(['amy', 'abe'].map((u) => join(browser, server, call, u, {
      token: mintToken(secret, { call, sub: u, name: u.toUpperCase(), exp }),
    })));
    const sessions = await Promise.all(pages.map(sessionOf));
    await Promise.all(pages.map((p, i) => waitGrowing(p, av(others(sessions, i)), 'audio+video with tokens')));

    // A third page on the server's origin, not joined, tries the bad tokens.
    const probe = await join(browser, server, '', 'probe');
    pages.push(probe);
    const valid = mintToken(secret, { call, sub: 'mallory', exp });
    const [h, , s] = valid.split('.');
    const tampered = `${h}.${Buffer.from(JSON.stringify({ call, sub: 'amy', exp })).toString('base64url')}.${s}`;
    const cases = [
      ['forged (wrong secret)', mintToken('x'.repeat(32), { call, sub: 'mallory', exp }), /signature/],
      ['expired', mintToken(secret, { call, sub: 'mallory', exp: Math.floor(Date.now() / 1000) - 3600 }), /expired/],
      ['tampered payload', tampered, /signature/],
      ['wrong call', mintToken(secret, { call: 'other-call', sub: 'mallory', exp }), /another call/],
      ['missing', null, /required/],
    ];
    for (const [name, token, reason] of cases) {
      const q = new URLSearchParams({ call, user: 'mallory' });
      if (token) q.set('token', token);
      const r = await tryJoin(probe.page, `${server.ws}?${q}`);
      console.log(`# ${name} token: close ${r.code} ${JSON.stringify(r.reason)}`);
      assert.equal(r.code, 4001, `${name}: ${JSON.stringify(r)}`);
      assert.match(r.reason, reason, name);
      assert.equal(r.welcomed, false, `${name} was welcomed`);
    }
    // The call goes on untouched: nobody new in the rosters, media still flowing both ways.
    for (const [i, p] of pages.slice(0, 2).entries()) {
      const snap = await snapshot(p);
      assert.deepEqual(snap.roster.map(([id]) => id), others(sessions, i), `${p.user}'s roster`);
    }
    await Promise.all(pages.slice(0, 2).map((p, i) => waitGrowing(p, av(others(sessions, i)), 'media after refused joins')));
  } catch (e) {
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
});

test('slow setRemoteDescription: a server offer right after its answer is not lost', async () => {
  // The router answers a client offer and offers the client's receive slots right after. A
  // page that handles signaling messages concurrently sees that offer while the answer is still
  // being applied (signalingState have-local-offer), takes it for glare and drops it; the router
  // then waits for an answer forever and the newcomer never receives anyone. Slowing
  // setRemoteDescription makes that race certain.
  const slow = () => {
    const orig = RTCPeerConnection.prototype.setRemoteDescription;
    RTCPeerConnection.prototype.setRemoteDescription = async function (...args) {
      await new Promise((r) => setTimeout(r, 400));
      return orig.apply(this, args);
    };
  };
  const server = await startServer('slow-srd', { http: 18085, media: 18448 });
  let pages = [];
  try {
    pages.push(await join(browser, server, 'slow', 'sam', { initScript: slow }));
    const sSam = await sessionOf(pages[0]);
    await waitFor('sam connected', async () => (await snapshot(pages[0])).connection === 'connected');
    pages.push(await join(browser, server, 'slow', 'sue', { initScript: slow }));
    const sSue = await sessionOf(pages[1]);
    await Promise.all([waitGrowing(pages[0], av([sSue]), 'sue'), waitGrowing(pages[1], av([sSam]), 'sam')]);
  } catch (e) {
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
});
