// Opens the node's status page in Debian's Chromium, checks what an admin needs, clicks Retry on a
// failed job with the token typed in, and saves a screenshot. Usage: node check_status.mjs URL TOKEN JOB_UID PNG
import { chromium } from "playwright-core";

const [url, token, jobUid, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const result = {};
try {
  const page = await browser.newPage({ viewport: { width: 1500, height: 1000 } });
  const errors = [];
  page.on("pageerror", (error) => errors.push(String(error)));
  await page.goto(url);
  await page.waitForSelector("body[data-loaded=true]", { timeout: 20000 });
  result.title = await page.title();
  result.failure_text = await page.locator(`.failure[data-job="${jobUid}"]`).innerText();
  result.job_rows = await page.locator("#jobs tbody tr[data-job]").count();
  result.study_rows = await page.locator("#studies tbody tr").count();
  result.timing_text = await page.locator("#jobs .timing-text").allInnerTexts();
  // without the token the API refuses, and the page says so
  await page.locator(`.failure[data-job="${jobUid}"] button[data-retry]`).click();
  await page.waitForFunction(() => document.getElementById("toast").textContent.includes("token"), null, { timeout: 10000 });
  result.toast_without_token = await page.locator("#toast").innerText();
  await page.fill("#token", token);
  await page.locator("#token").dispatchEvent("change");
  await page.locator(`.failure[data-job="${jobUid}"] button[data-retry]`).click();
  await page.waitForFunction(() => document.getElementById("toast").textContent.includes("queued again"), null, { timeout: 10000 });
  result.toast_with_token = await page.locator("#toast").innerText();
  await page.waitForTimeout(3500); // let the job fail again and the page refresh, toast gone
  await page.screenshot({ path: screenshot, fullPage: true });
  result.page_errors = errors;
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
