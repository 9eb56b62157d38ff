// Drive OHIF 3.13 in the system's headless Chromium for tests/integration/test_ohif.py.
//
// Usage: node ohif.js BASE_URL STUDY_UID OUT_DIR [SEG_DESCRIPTION [REPORT_DESCRIPTION [SR_DESCRIPTION]]]
// Opens the study list, then the study in the viewer; loads the node's SEG over its source series,
// opens the Secondary Capture report, then the SR and steps through its measurements; saves
// screenshots ohif_*.png in OUT_DIR and prints one JSON object
// with what the page showed (the test asserts on it). Never downloads a browser: it launches
// /usr/bin/chromium (Debian package chromium) with the flags that keep it off the network.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const FLAGS = [
  '--no-sandbox', '--disable-gpu', '--enable-unsafe-swiftshader', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const STEP_MS = 60000;

function text(s) {
  return (s || '').replace(/\s+/g, ' ').trim();
}

async function dismissOverlays(page) {
  // The first-visit tour and the investigational-use banner sit over the viewport.
  for (const target of [page.getByText('Skip all', { exact: true }), page.locator('[data-cy="confirm-and-hide-button"]')]) {
    try {
      await target.click({ timeout: 3000 });
    } catch (e) { /* not shown this time */ }
  }
}

async function answerPrompt(page, question, timeoutMs = 15000) {
  // OHIF asks before hydrating a SEG or tracking an SR's measurements; return the question asked.
  const prompt = page.getByText(question);
  try {
    await prompt.first().waitFor({ timeout: timeoutMs });
  } catch (e) {
    return null;
  }
  const asked = text(await prompt.first().innerText());
  await page.getByRole('button', { name: 'Yes' }).click();
  return asked;
}

async function main() {
  const [base, studyUid, outDir, segSeries = 'Hippocampus volumetry segmentation',
    reportSeries = 'Hippocampus volumetry report',
    srSeries = 'Hippocampus volumetry measurements'] = process.argv.slice(2);
  if (!base || !studyUid || !outDir) {
    throw new Error('usage: node ohif.js BASE_URL STUDY_UID OUT_DIR');
  }
  fs.mkdirSync(outDir, { recursive: true });
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'ohif-chromium-'));
  const result = { errors: [], timings_ms: {} };
  const seriesButton = (page, description) =>
    page.locator('[data-cy="study-browser-thumbnail-no-image"]', { hasText: description });
  const started = Date.now();
  const mark = (name) => { result.timings_ms[name] = Date.now() - started; };
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: FLAGS, viewport: { width: 1600, height: 1000 },
  });
  const page = context.pages()[0] || await context.newPage();
  try {
    page.setDefaultTimeout(STEP_MS);
    page.on('pageerror', (error) => result.errors.push(String(error).slice(0, 300)));
    page.on('response', (response) => {
      if (response.status() >= 400) result.errors.push(`HTTP ${response.status()} ${response.url().slice(0, 200)}`);
    });

    // 1. The study list still shows the study's description once the results are filed.
    await page.goto(`${base}/`);
    await page.getByText('1-1 of 1').waitFor();
    await dismissOverlays(page);
    result.study_list_rows = (await page.locator('tbody tr').allInnerTexts()).map(text);
    await page.screenshot({ path: path.join(outDir, 'ohif_study_list.png') });
    mark('study_list');

    // 2. The viewer with the study's series.
    await page.goto(`${base}/viewer?StudyInstanceUIDs=${studyUid}`);
    const thumbnails = page.locator('[data-cy^="study-browser-thumbnail"]');
    await seriesButton(page, segSeries).waitFor();
    await dismissOverlays(page);
    result.thumbnails = (await thumbnails.allInnerTexts()).map(text);
    mark('viewer');

    // 3. The SEG, hydrated over its source series.
    await seriesButton(page, segSeries).dblclick();
    result.seg_prompted = await answerPrompt(page, 'Do you want to open this Segmentation?');
    await page.locator('[data-cy="panelSegmentation-btn"]').click();
    await page.getByText('Hippocampus posterior').first().waitFor();
    await page.waitForTimeout(1500); // let the overlay render
    result.seg_viewport = text(await page.locator('[data-cy="viewport-pane"]').first().innerText());
    result.seg_panel = text(await page.locator('body').innerText());
    await page.screenshot({ path: path.join(outDir, 'ohif_seg.png') });
    // The segment's centre: OHIF jumps there when the segment is clicked in the panel.
    const anterior = page.getByText('Hippocampus anterior').first();
    await anterior.click();
    // OHIF computes the segment's statistics after the jump and shows them in a tooltip while the
    // pointer rests on the segment's row. On a busy CPU they can come after the tooltip was
    // drawn without them, so the pointer leaves the row and comes back until they show.
    const statsShown = () => /Hippocampus anterior[\s\S]*?Volume\s*[\d,.]+\s*mm/.test(document.body.innerText);
    result.seg_stats_hovers = 0;
    for (const deadline = Date.now() + 90000; Date.now() < deadline; result.seg_stats_hovers += 1) {
      if (await page.waitForFunction(statsShown, null, { timeout: 5000 }).then(() => true, () => false)) break;
      await page.mouse.move(1, 1);
      await page.waitForTimeout(500);
      await anterior.hover();
    }
    await page.waitForTimeout(1500);
    result.seg_anterior_viewport = text(await page.locator('[data-cy="viewport-pane"]').first().innerText());
    // The segment's statistics as OHIF computes them from the labelmap it decoded.
    result.seg_anterior_stats = text(await page.locator('body').innerText());
    await page.screenshot({ path: path.join(outDir, 'ohif_seg_anterior.png') });
    mark('seg');

    // 4. The Secondary Capture report (volumes in mm3) in the viewport.
    await page.locator('[data-cy="study-browser-thumbnail"]', { hasText: reportSeries }).dblclick();
    await page.locator('[data-cy="viewport-pane"]', { hasText: reportSeries }).first().waitFor();
    await page.waitForTimeout(2000);
    result.report_viewport = text(await page.locator('[data-cy="viewport-pane"]').first().innerText());
    await page.screenshot({ path: path.join(outDir, 'ohif_report.png') });
    mark('report');

    // 5. The SR: OHIF shows each measurement on the image its planar ROI outlines, labelled
    // with its value; the viewport's arrows step from one measurement to the next. OHIF draws an
    // SR's annotations when the viewport renders again: each step moves to the next measurement,
    // then moves the mouse over the viewport until the label is drawn.
    await seriesButton(page, srSeries).dblclick();
    const viewport = page.locator('[data-cy="viewport-pane"]').first();
    await viewport.locator('[data-cy="viewport-action-arrows-right"]').waitFor();
    const box = await viewport.boundingBox();
    const labels = async () => (await viewport.locator('svg text').allTextContents())
      .map(text).filter((t) => t.includes('mm3'));
    result.sr_steps = [];
    let previous = null;
    for (let step = 0; step < 4; step++) {
      await page.locator('[data-cy="viewport-action-arrows-right"]').click();
      let shown = await labels();
      for (let attempt = 0; attempt < 30 && !(shown.length === 1 && shown[0] !== previous); attempt++) {
        await page.mouse.move(box.x + box.width * (0.3 + 0.01 * attempt), box.y + box.height / 2);
        await page.waitForTimeout(500);
        shown = await labels();
      }
      await page.waitForTimeout(500);
      result.sr_steps.push({ labels: await labels(), viewport: text(await viewport.innerText()) });
      await page.screenshot({ path: path.join(outDir, `ohif_sr_${step + 1}.png`) });
      previous = shown[0];
    }
    mark('sr');
  } catch (error) {
    await page.screenshot({ path: path.join(outDir, 'ohif_failure.png') }).catch(() => {});
    process.stderr.write(`page text at failure: ${text(await page.locator('body').innerText().catch(() => ''))}\n`);
    throw error;
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
  process.stdout.write(JSON.stringify(result) + '\n');
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
