// Not a test: makes docs/demo-three-participants.png — three headless Chromium participants
// (fake cameras) in one call, a screenshot of one page once every page decodes both
// others and shows their video.
//
//   cargo build -p calls-core --features server --bin calls-server
//   CALLS_SERVER_BIN=target/debug/calls-server node calls-core/tests/e2e/screenshot.mjs [out.png]
import { resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { counter, join, launchBrowser, snapshot, startServer, waitFor } from './lib.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] || resolve(here, '../../../docs/demo-three-participants.png'));
const users = ['alice', 'bob', 'carol'];

const server = await startServer('screenshot', { http: 18097, media: 18457 });
const browser = await launchBrowser();
let pages = [];
try {
  pages = await Promise.all(users.map((u) => join(browser, server, 'demo', u, { viewport: { width: 1280, height: 800 } })));
  const sessions = await Promise.all(pages.map((p) => waitFor(`${p.user} welcomed`, async () => (await snapshot(p)).session)));
  // Every page decodes camera frames from both others...
  await Promise.all(pages.map((p, i) => waitFor(`${p.user}: video from both others`, async () => {
    const snap = await snapshot(p);
    return sessions.filter((_, j) => j !== i).every((s) => counter(snap, s, 'camera') > 30);
  }, { timeout: 40000, interval: 300 })));
  // ...and the page we photograph shows three playing videos (its own and two remote ones).
  const shot = pages[0];
  await waitFor('three tiles with playing video, the remote ones at least 640 wide', () => shot.page.evaluate(() => {
    const vids = [...document.querySelectorAll('.tile video')];
    return vids.length === 3 && vids.every((v) => v.videoWidth >= 640 && v.currentTime > 1 && !v.paused);
  }), { timeout: 20000, interval: 300 }).catch(async (e) => {
    console.warn(e.message, await shot.page.evaluate(() => [...document.querySelectorAll('.tile video')]
      .map((v) => [v.videoWidth, v.videoHeight, v.currentTime, v.paused])));
    throw e;
  });
  // The status line shows the RTT once Chrome measured one (cosmetic: do not fail without it).
  await waitFor('an RTT in the status line', () => shot.page.evaluate(() => /rtt \d+ ms/.test(document.getElementById('status').textContent)),
    { timeout: 10000, interval: 300 }).catch((e) => console.warn(e.message));
  await shot.page.evaluate(() => document.activeElement && document.activeElement.blur());
  const names = await shot.page.$$eval('.tile .name', (els) => els.map((e) => e.textContent));
  await shot.page.screenshot({ path: out });
  console.log(`saved ${out} (${shot.user}'s page; tiles: ${names.join(', ')})`);
} finally {
  await Promise.all(pages.map((p) => p.close()));
  await browser.close();
  await server.stop();
}
