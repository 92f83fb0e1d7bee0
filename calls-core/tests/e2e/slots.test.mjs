// End-to-end: receive slots (signaling protocol 2) with six Chromium participants in one browser.
// Three publish a camera, a canvas filled with their own colour instead of the fake device, so a
// decoded frame tells whom it shows. The other three publish only a microphone. One of those asks
// for a single camera slot and pins a publisher, then another one. On every page, each camera tile
// must show the person the `slots` messages named: the decoded picture's colour says who it is,
// and inbound-rtp on the slot's mid shows frames being decoded. Also: the participant list, a
// hidden page pausing its camera slots, and that nobody's joining renegotiated anyone.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  dumpOnFailure, join, launchBrowser, signalingLog, snapshot, startServer, waitFor,
} from './lib.mjs';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

// Far apart in RGB, so VP8 at any simulcast layer keeps them apart.
const PUBLISHERS = [['pat', [220, 40, 40]], ['pia', [40, 190, 60]], ['pom', [50, 90, 230]]];
const VIEWERS = ['vic', 'val', 'vin'];
const PINNER = 'vic';
/** Largest distance (per channel) between a decoded colour and the painted one. */
const COLOUR_TOLERANCE = 60;

/**
 * Init script: getUserMedia gives the fake microphone and, instead of the fake camera, a 640x360
 * canvas at 15 fps filled with `colour` (a moving white bar along the top keeps the encoder
 * busy). Without a colour the page gets no camera at all (it falls back to audio only).
 */
function colourCamera(colour) {
  const devices = navigator.mediaDevices;
  const real = devices.getUserMedia.bind(devices);
  devices.getUserMedia = async (constraints) => {
    if (constraints && constraints.video && !colour) throw new DOMException('no camera here', 'NotFoundError');
    const out = new MediaStream();
    if (constraints && constraints.audio) for (const t of (await real({ audio: true })).getAudioTracks()) out.addTrack(t);
    if (constraints && constraints.video) {
      const canvas = document.createElement('canvas');
      canvas.width = 640; canvas.height = 360;
      const ctx = canvas.getContext('2d');
      let n = 0;
      const paint = () => {
        ctx.fillStyle = `rgb(${colour.join(',')})`;
        ctx.fillRect(0, 0, canvas.width, canvas.height);
        ctx.fillStyle = '#fff';
        ctx.fillRect((n++ * 8) % (canvas.width - 40), 0, 40, 24);
      };
      paint();
      setInterval(paint, 66);
      out.addTrack(canvas.captureStream(15).getVideoTracks()[0]);
    }
    return out;
  };
}
const initScript = (colour) => ({ content: `(${colourCamera.toString()})(${JSON.stringify(colour)});` });

/** The mean colour of the middle of the picture that camera tile `mid` shows now (null: none yet). */
function sampleTile(page, mid) {
  return page.evaluate((m) => {
    const video = document.querySelector(`.tile[data-mid="${m}"] video`);
    if (!video || video.readyState < 2 || !video.videoWidth) return null;
    const w = video.videoWidth;
    const h = video.videoHeight;
    const canvas = document.createElement('canvas');
    canvas.width = 8; canvas.height = 8;
    const ctx = canvas.getContext('2d', { willReadFrequently: true });
    // Below the moving bar: the middle 40 % across, 40-90 % down.
    ctx.drawImage(video, w * 0.3, h * 0.4, w * 0.4, h * 0.5, 0, 0, 8, 8);
    const d = ctx.getImageData(0, 0, 8, 8).data;
    const sum = [0, 0, 0];
    for (let i = 0; i < d.length; i += 4) for (let c = 0; c < 3; c++) sum[c] += d[i + c];
    return sum.map((v) => Math.round(v / 64));
  }, mid);
}

/** Which publisher a sampled colour is (null: none of them). */
function whoseColour(rgb) {
  if (!rgb) return null;
  for (const [user, colour] of PUBLISHERS) {
    if (colour.every((c, i) => Math.abs(c - rgb[i]) <= COLOUR_TOLERANCE)) return user;
  }
  return null;
}

/**
 * What page `p` shows now: per camera tile its slot mid, the mapping's user, the user whose
 * colour the picture has, and the frames decoded on that mid.
 */
async function cameraView(p) {
  const snap = await snapshot(p);
  const tiles = [];
  for (const t of snap.cameraTiles.filter((x) => x.kind === 'camera')) {
    const slot = snap.slots.find((s) => s.mid === t.mid);
    const rows = snap.inbound.filter((r) => r.mid === t.mid && r.kind === 'video');
    const rgb = await sampleTile(p.page, t.mid);
    tiles.push({
      mid: t.mid, label: t.label, session: slot?.session ?? null, user: slot?.user ?? null, source: slot?.source ?? null,
      shows: whoseColour(rgb), rgb, frames: rows.reduce((a, r) => a + r.frames, 0),
    });
  }
  return { snap, tiles };
}

/**
 * Polls until page `p` shows exactly the cameras of `users` (tile sessions), each tile labelled
 * with its mapping's user, its picture in that user's colour, and frames still being decoded on
 * its mid. Returns the tiles.
 */
async function waitShows(p, users, sessionOf, what, timeout = 60000) {
  const want = [...users].sort();
  let last = null;
  let framesAt = new Map();
  try {
    return await waitFor(`${p.user}: ${what}`, async () => {
      const view = await cameraView(p);
      last = view.tiles;
      const ok = view.tiles.length === want.length
        && view.tiles.map((t) => t.user).sort().join() === want.join()
        && view.tiles.every((t) => t.session === sessionOf.get(t.user) && t.source === 'camera'
          && t.label === t.user && t.shows === t.user && t.frames > (framesAt.get(t.mid) ?? Infinity));
      framesAt = new Map(view.tiles.map((t) => [t.mid, t.frames]));
      return ok ? view.tiles : false;
    }, { timeout, interval: 500 });
  } catch (e) {
    e.message += `\n  wanted cameras of ${JSON.stringify(want)}; tiles: ${JSON.stringify(last)}`;
    throw e;
  }
}

test('receive slots: six Chromium participants, three cameras, a pin; every tile shows whom the mapping names', async () => {
  const server = await startServer('slots', { http: 18087, media: 18458 });
  let pages = [];
  try {
    // Publishers first, then the viewers; everyone in one browser, small windows.
    const viewport = { width: 640, height: 480 };
    for (const [user, colour] of PUBLISHERS) {
      pages.push(await join(browser, server, 'slots-room', user, { initScript: initScript(colour), record: true, viewport }));
    }
    for (const user of VIEWERS) {
      const params = user === PINNER ? { video_slots: '1' } : {};
      pages.push(await join(browser, server, 'slots-room', user, { initScript: initScript(null), record: true, viewport, params }));
    }
    const byUser = new Map(pages.map((p) => [p.user, p]));
    const sessions = await Promise.all(pages.map((p) => waitFor(`${p.user} welcomed`, async () => (await snapshot(p)).session)));
    const sessionOf = new Map(pages.map((p, i) => [p.user, sessions[i]]));
    const userOf = new Map(pages.map((p, i) => [sessions[i], p.user]));
    const cameraUsers = PUBLISHERS.map(([u]) => u);
    for (const p of pages) {
      const welcome = (await signalingLog(p)).find((e) => e.type === 'welcome');
      assert.equal(welcome.msg.protocol, 2, `${p.user}'s welcome announces protocol 2`);
    }

    // 1. Every page with the default camera slots shows every other publisher's camera, in the
    //    right colour, under the right name.
    const t0 = Date.now();
    await Promise.all(pages.filter((p) => p.user !== PINNER).map((p) => waitShows(
      p, cameraUsers.filter((u) => u !== p.user), sessionOf, 'every other camera, each in its own colour')));
    console.log(`# 5 pages show every other camera in its own colour ${Date.now() - t0} ms after the last welcome`);

    // 2. The pinner asked for one camera slot: one tile, whoever the router put there.
    const pinner = byUser.get(PINNER);
    const [first] = await waitFor(`${PINNER}: one camera tile in a publisher's colour`, async () => {
      const { tiles } = await cameraView(pinner);
      return tiles.length === 1 && tiles[0].shows === tiles[0].user && cameraUsers.includes(tiles[0].user) ? tiles : false;
    }, { timeout: 60000, interval: 500 });
    const pinnerSnap = await snapshot(pinner);
    console.log(`# ${PINNER} (1 camera slot) shows ${first.user} on mid ${first.mid}; router offers answered: ${pinnerSnap.routerOffers}`);

    // 3. Pin someone else, then a third: the one camera slot follows, picture and label.
    const order = [...cameraUsers.filter((u) => u !== first.user), first.user];
    for (const target of order) {
      const pinnedAt = Date.now();
      await pinner.page.evaluate((s) => window.pin([s]), sessionOf.get(target));
      const [tile] = await waitShows(pinner, [target], sessionOf, `pinned ${target} on the one camera slot`, 30000);
      assert.equal(tile.mid, first.mid, 'the same slot (m-line) carries the pinned camera');
      console.log(`# ${PINNER} pinned ${target}: slot ${tile.mid} shows ${tile.shows} (rgb ${tile.rgb}) ${Date.now() - pinnedAt} ms later`);
    }
    // The others did not notice: still every other camera.
    await Promise.all(pages.filter((p) => p.user !== PINNER).map((p) => waitShows(
      p, cameraUsers.filter((u) => u !== p.user), sessionOf, 'every other camera after the pins', 20000)));

    // The participant list (roster, published): everyone else, the camera publishers marked,
    // and the pinned one's button says so.
    const people = await pinner.page.$$eval('#people li', (lis) => lis.map((li) => ({
      session: Number(li.dataset.session), who: li.querySelector('.who').textContent,
      what: li.querySelector('.what').textContent, pin: li.querySelector('button').textContent,
    })));
    assert.deepEqual(people.map((x) => x.who).sort(), pages.map((p) => p.user).filter((u) => u !== PINNER).sort(),
      `${PINNER}'s participant list: ${JSON.stringify(people)}`);
    for (const x of people) {
      assert.equal(/camera/.test(x.what), cameraUsers.includes(x.who), `${JSON.stringify(x)} shows whether they publish a camera`);
      assert.equal(x.pin, x.who === order[order.length - 1] ? 'Unpin' : 'Pin', JSON.stringify(x));
    }

    // A hidden page pauses its camera slots (`preference` by slot mid) and resumes them when
    // visible again.
    const hider = byUser.get('val');
    const setHidden = (hidden) => hider.page.evaluate((h) => {
      Object.defineProperty(document, 'hidden', { configurable: true, get: () => h });
      document.dispatchEvent(new Event('visibilitychange'));
    }, hidden);
    const cameraFrames = async () => (await cameraView(hider)).tiles.reduce((a, t) => a + t.frames, 0);
    await setHidden(true);
    let before = await cameraFrames();
    await waitFor('val hidden: its camera slots stop', async () => {
      await new Promise((r) => setTimeout(r, 1500));
      const now = await cameraFrames();
      const still = now === before;
      before = now;
      return still;
    }, { timeout: 15000, interval: 0 });
    await setHidden(false);
    await waitShows(hider, cameraUsers, sessionOf, 'every camera again once visible', 20000);
    console.log('# val hid its page: its camera slots paused, then resumed');

    // 4. The mapping messages themselves: every non-empty slot named a participant of this call
    //    with its real user and a source that fits the slot; cameras only from camera publishers.
    //    Router offers: one per page (its slots), plus one for the pinner's `slots` request; the
    //    joins of the others renegotiated nobody, and the pinner's SDP did not grow.
    for (const p of pages) {
      const log = await signalingLog(p);
      const entries = log.filter((e) => e.type === 'slots').flatMap((e) => e.msg.slots);
      assert.ok(entries.length > 0, `${p.user} got slot mappings`);
      for (const s of entries) {
        if (s.session === null) continue;
        const where = `${p.user}: ${JSON.stringify(s)}`;
        assert.notEqual(s.session, sessionOf.get(p.user), `${where} carries the page's own media`);
        assert.equal(userOf.get(s.session), s.user, `${where} names the session's user`);
        assert.equal(s.source, { audio: 'microphone', camera: 'camera', screen: 'screen' }[s.kind], `${where} source fits the slot`);
        if (s.kind === 'camera') assert.ok(cameraUsers.includes(s.user), `${where} names a camera publisher`);
      }
      const offers = log.filter((e) => e.type === 'offer');
      const distinct = new Set(offers.map((e) => `${e.sdp.bytes}/${e.sdp.mlines}`));
      console.log(`# ${p.user}: ${offers.length} router offers (m-lines ${offers.map((e) => e.sdp.mlines)}), ` +
        `${entries.length} slot mappings (${entries.filter((s) => s.session !== null).length} non-empty)`);
      assert.equal(distinct.size, p.user === PINNER ? 2 : 1, `${p.user}: router offers ${JSON.stringify(offers.map((e) => e.sdp))}`);
      if (p.user === PINNER) assert.ok(offers[offers.length - 1].sdp.mlines <= offers[0].sdp.mlines, 'fewer slots: the SDP did not grow');
    }

    // 5. Audio slots carry sound: every page receives packets on an audio slot mapped to someone.
    for (const p of pages) {
      const a = await snapshot(p);
      await waitFor(`${p.user}: audio packets on a mapped audio slot`, async () => {
        const b = await snapshot(p);
        return b.inbound.some((r) => r.slot === 'audio' && r.session !== null
          && r.packets > 25 + (a.inbound.find((x) => x.mid === r.mid)?.packets ?? 0));
      }, { timeout: 20000, interval: 500 });
    }
  } catch (e) {
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
  }
});
