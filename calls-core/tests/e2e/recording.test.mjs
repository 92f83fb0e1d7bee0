// End-to-end: recording a call of two Chromium pages through the admin API, checked with the
// real ffmpeg (Debian `ffmpeg`). The recording runs ~10 s; then every file must be read by
// ffprobe, decode with no error, and hold what was sent: each Opus file lasts the recording's
// wall time (within 5 %), each camera file holds the frames its publisher sent on the recorded
// layer in that time (within 5 %). The folder's compose.sh (docs/recording.md) must mix it into
// one playable mix.webm.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join as joinPath } from 'node:path';
import {
  dumpOnFailure, join, launchBrowser, sleep, snapshot, startServer, waitFor, waitGrowing,
} from './lib.mjs';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

const KEY = 'e2e-recording-admin-key-0123';
const ADMIN = 'http://127.0.0.1:18099';
const RECORD_MS = 10000;
const TOLERANCE = 0.05;

const sessionOf = (p) => waitFor(`${p.user} to be welcomed`, async () => (await snapshot(p)).session);
const av = (sessions) => sessions.flatMap((s) => [[s, 'microphone'], [s, 'camera']]);

/**
 * The page's camera so far: frames captured (media-source `frames`) and frames sent per
 * simulcast RID (outbound-rtp `framesSent`).
 */
function framesSent(p) {
  return p.page.evaluate(async () => {
    const out = { captured: 0, sent: {} };
    (await window.pc.getStats()).forEach((r) => {
      if (r.type === 'media-source' && r.kind === 'video') out.captured += r.frames || 0;
      if (r.type === 'outbound-rtp' && r.kind === 'video') out.sent[r.rid ?? ''] = r.framesSent || 0;
    });
    return out;
  });
}

/** `ffprobe` of one file: its streams (with the frames counted by demuxing) and format. */
function probe(file) {
  const json = execFileSync('ffprobe', [
    '-v', 'error', '-count_packets', '-show_streams', '-show_format', '-of', 'json', file,
  ], { encoding: 'utf8' });
  return JSON.parse(json);
}

/** `ffmpeg -v error -i file -f null -`: decodes everything; returns what it printed. */
function decodeErrors(file) {
  const r = spawnSync('ffmpeg', ['-nostdin', '-v', 'error', '-i', file, '-f', 'null', '-'], { encoding: 'utf8' });
  return { status: r.status, stderr: r.stderr.trim() };
}

const within = (got, want) => Math.abs(got - want) <= want * TOLERANCE;

test('a call recorded through the admin API plays in ffmpeg: durations and frame counts match what was sent', async () => {
  const dir = mkdtempSync(joinPath(tmpdir(), 'calls-e2e-recording-'));
  const server = await startServer('recording', {
    http: 18088, media: 18459,
    env: { CALLS_ADMIN_API_KEY: KEY, CALLS_ADMIN_LISTEN: '127.0.0.1:18099', CALLS_RECORDING_DIR: dir },
  });
  const auth = { Authorization: `Bearer ${KEY}` };
  const path = `${ADMIN}/api/calls/rec-e2e/recording`;
  let pages = [];
  try {
    pages = await Promise.all(['rita', 'rolf'].map((u) => join(browser, server, 'rec-e2e', u)));
    const sessions = await Promise.all(pages.map(sessionOf));
    await Promise.all(pages.map((p, i) => waitGrowing(p, av([sessions[1 - i]]), 'audio+video from the other', 30000)));

    assert.equal((await fetch(path, { method: 'POST' })).status, 401, 'no key, no recording');
    const sentBefore = await Promise.all(pages.map(framesSent));
    const startedAt = Date.now();
    const started = await fetch(path, { method: 'POST', headers: auth });
    assert.equal(started.status, 204, await started.text());
    await waitFor('the red dot (a recording message) on both pages', async () => {
      const shown = await Promise.all(pages.map((p) => p.page.evaluate(() => window.callState.recording === true && !document.getElementById('rec').hidden)));
      return shown.every(Boolean);
    }, { timeout: 5000, interval: 100 });
    await sleep(RECORD_MS - (Date.now() - startedAt));
    const sentAfter = await Promise.all(pages.map(framesSent));
    const stopped = await fetch(path, { method: 'DELETE', headers: auth });
    const wallMs = Date.now() - startedAt;
    assert.equal(stopped.status, 204, await stopped.text());

    const [folder] = readdirSync(dir).map((f) => joinPath(dir, f)).filter((f) => statSync(f).isDirectory());
    assert.ok(folder, `a folder under ${dir}`);
    const manifest = await waitFor('the final manifest and compose.sh', () => {
      const m = JSON.parse(readFileSync(joinPath(folder, 'manifest.json'), 'utf8'));
      return m.stopped_at_unix_ms && existsSync(joinPath(folder, 'compose.sh')) ? m : false;
    }, { timeout: 10000, interval: 100 });
    const recordedMs = manifest.stopped_at_unix_ms - manifest.started_at_unix_ms;
    console.log(`# recorded ${recordedMs} ms (wall ${wallMs} ms): ` +
      manifest.files.map((f) => `${f.name} ${f.codec} offset ${f.start_offset_ms} ms, ${f.duration_ms} ms, ${f.frames} frames, ${f.bytes} B`).join('; '));
    assert.equal(manifest.files.length, 4, JSON.stringify(manifest.files));

    const rows = [];
    for (const f of manifest.files) {
      const file = joinPath(folder, f.name);
      const info = probe(file);
      assert.equal(info.streams.length, 1, `${f.name}: one stream`);
      const stream = info.streams[0];
      const { status, stderr } = decodeErrors(file);
      assert.equal(status, 0, `${f.name}: ffmpeg exit ${status}: ${stderr}`);
      assert.equal(stderr, '', `${f.name}: ffmpeg decode errors`);
      const publisher = sessions.indexOf(f.session);
      assert.ok(publisher >= 0, `${f.name}: a session of the call`);
      if (f.codec === 'opus') {
        assert.equal(stream.codec_name, 'opus');
        const seconds = Number(info.format.duration);
        rows.push(`${f.name}: opus ${seconds.toFixed(3)} s (ffprobe) vs ${(recordedMs / 1000).toFixed(3)} s recorded`);
        // Audio starts at once and its gaps are filled: the file lasts the recording.
        assert.ok(within(seconds * 1000, recordedMs), `${f.name}: ${seconds} s vs ${recordedMs} ms`);
        assert.ok(within(f.duration_ms, recordedMs), `${f.name}: manifest ${f.duration_ms} ms`);
      } else {
        assert.equal(stream.codec_name, f.codec);
        const frames = Number(stream.nb_read_packets);
        // Every frame the camera gave in the window, whichever layer carried it: the recording
        // follows the best layer being sent, which may change (dynacast resumes the upper
        // layers for it; Chrome drops one under CPU load), and the layers share one frame rate.
        const captured = sentAfter[publisher].captured - sentBefore[publisher].captured;
        const fps = captured / (wallMs / 1000);
        const perRid = Object.keys(sentAfter[publisher].sent)
          .map((rid) => `${rid} ${sentAfter[publisher].sent[rid] - (sentBefore[publisher].sent[rid] || 0)}`);
        rows.push(`${f.name}: ${f.codec} ${frames} frames (ffprobe) vs ${captured} captured in ${wallMs} ms (${fps.toFixed(1)} fps; ` +
          `sent per RID: ${perRid.join(', ')}), ${f.layer_switches} layer switches, first frame ${stream.width}x${stream.height}`);
        assert.ok(within(frames, captured), `${f.name}: ${frames} frames vs ${captured} captured (${rows.at(-1)})`);
        assert.equal(frames, f.frames, `${f.name}: manifest frames`);
        assert.ok(stream.width > 0 && stream.height > 0, `${f.name}: a frame size`);
      }
    }
    console.log(`# ${rows.join('\n# ')}`);

    // The documented compose step: one playable file with the call's audio and video.
    const compose = spawnSync('sh', [joinPath(folder, 'compose.sh')], { encoding: 'utf8' });
    assert.equal(compose.status, 0, `compose.sh: ${compose.stderr.slice(-2000)}`);
    const mix = probe(joinPath(folder, 'mix.webm'));
    const kinds = mix.streams.map((s) => s.codec_type).sort();
    assert.deepEqual(kinds, ['audio', 'video']);
    const mixMs = Number(mix.format.duration) * 1000;
    console.log(`# mix.webm: ${mixMs.toFixed(0)} ms, ${mix.streams.map((s) => `${s.codec_name} ${s.width ?? ''}x${s.height ?? ''}`).join(', ')}`);
    assert.ok(within(mixMs, recordedMs), `mix.webm ${mixMs} ms vs ${recordedMs} ms`);
    const mixDecode = decodeErrors(joinPath(folder, 'mix.webm'));
    assert.equal(mixDecode.status, 0, mixDecode.stderr);
    assert.equal(mixDecode.stderr, '', 'mix.webm decodes with no error');
  } catch (e) {
    dumpOnFailure(null, pages, [server])(e);
  } finally {
    await Promise.all(pages.map((p) => p.close()));
    await server.stop();
    // CALLS_E2E_KEEP_RECORDING=1 keeps the folder to look at.
    if (process.env.CALLS_E2E_KEEP_RECORDING) console.log(`# kept ${dir}`);
    else rmSync(dir, { recursive: true, force: true });
  }
});
