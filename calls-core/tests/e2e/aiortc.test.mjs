// End-to-end: an aiortc (Python) participant and a headless Chromium participant in one call
// through the reference server. aiortc runs as a subprocess (aiortc_peer.py) that prints what
// it decodes; the browser side is checked through inbound-rtp in the page.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import {
  dumpOnFailure, join, launchBrowser, snapshot, startAiortc, startServer, waitAiortcGrowing,
  waitFor, waitGrowing,
} from './lib.mjs';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

const av = (sessions) => sessions.flatMap((s) => [[s, 'microphone'], [s, 'camera']]);
const sessionOf = (p) => waitFor(`${p.user} to be welcomed`, async () => (await snapshot(p)).session);

test('aiortc participant and Chromium: audio and video both ways', async () => {
  const server = await startServer('aiortc', { http: 18084, media: 18447 });
  let pages = [];
  let py;
  try {
    pages = [await join(browser, server, 'interop', 'chrome')];
    py = startAiortc(server, 'interop', 'aiortc');
    const [web] = pages;
    const sWeb = await sessionOf(web);
    const sPy = await waitFor('aiortc welcomed', () => py.status()?.session);
    await Promise.all([
      waitGrowing(web, av([sPy]), 'audio+video from aiortc'),
      waitAiortcGrowing(py, av([sWeb]), 'audio+video from Chromium'),
    ]);
    const st = py.status();
    console.log(`# aiortc decoded ${JSON.stringify(st.recv)}; ice ${st.ice}`);
    const snap = await snapshot(web);
    console.log(`# chromium inbound from aiortc ${JSON.stringify(snap.inbound)}`);
    assert.deepEqual(st.errors, [], 'aiortc got no signaling errors');
    assert.equal(st.protocol, 2, 'the server speaks protocol 2');
    assert.equal(st.router_offers, 1, 'one router offer: the slots');
    assert.ok(Object.values(st.slots).some((x) => x.session === sWeb && x.source === 'camera'), 'a camera slot carries Chromium');
    // aiortc says {"type": "leave"} (json.dumps spacing) and goes: Chromium drops it at once.
    await py.stop();
    await waitFor('chrome: aiortc gone from roster and slot map', async () => {
      const s = await snapshot(web);
      return s.roster.length === 0 && s.slots.every((x) => x.session === null);
    }, { timeout: 5000 });
    const log = readFileSync(server.log, 'utf8').replace(/\x1b\[[0-9;]*m/g, '');
    assert.match(log, new RegExp(`left .*session=s${sPy} reason=Left`), 'the server saw a leave, not a dropped connection');
  } catch (e) {
    if (py) console.error(py.logs.join(''));
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await py?.stop();
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
});
