// End-to-end: the browser pages of `saekit serve` in Debian's headless Chromium.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";
import { startServer, fixtureDir, CHROMIUM_ARGS, root } from "./server.mjs";

const shots = process.env.E2E_SHOTS || path.join(root, "tests/e2e/shots");
fs.mkdirSync(shots, { recursive: true });
let server, base, browser, page, densest;
const pageErrors = [];

before(async () => {
  server = startServer();
  base = await server.url;
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: CHROMIUM_ARGS });
  page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") pageErrors.push(m.text()); });
  const r = await fetch(`${base}/api/features?sort=density&limit=1`);
  densest = (await r.json()).features[0].id;
});

after(async () => {
  await browser?.close();
  server?.stop();
});

test("home lists features, draws the map and searches", async () => {
  await page.goto(base + "/");
  await page.waitForSelector("#feature-list table.list tbody tr");
  const rows = await page.locator("#feature-list tbody tr").count();
  assert.equal(rows, 25);
  await page.waitForSelector("canvas.map");
  assert.equal(await page.locator("canvas.map").getAttribute("data-points"), "512");
  // sort by max activation
  await page.click("#feature-list button[data-sort=max_act]");
  await page.waitForSelector("#feature-list table.list[data-sort=max_act]");
  // hover the map: a tooltip names a feature
  const box = await page.locator("canvas.map").boundingBox();
  let named = false;
  for (let i = 0; i < 40 && !named; i++) {
    await page.mouse.move(box.x + box.width * (0.3 + 0.01 * i), box.y + box.height * (0.35 + 0.008 * i));
    named = (await page.locator("#tip").isVisible()) && /feature #\d+/.test(await page.locator("#tip").textContent());
  }
  assert.ok(named, "hovering the map never showed a feature");
  await page.screenshot({ path: path.join(shots, "home.png") });
  // click the hovered point: its feature page opens
  const hovered = (await page.locator("#tip").textContent()).match(/feature #(\d+)/)[1];
  await page.mouse.down();
  await page.mouse.up();
  await page.waitForURL(`${base}/feature/${hovered}`);
  // zoom with the wheel
  await page.goto(base + "/");
  await page.waitForSelector("canvas.map[data-scale]");
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await page.mouse.wheel(0, -600);
  await page.waitForFunction(() => Number(document.querySelector("canvas.map").dataset.scale) > 1.5);
  await page.fill("#jump", "Bridge");
  await page.press("#jump", "Enter");
  await page.waitForSelector("#search-results table.list tbody tr");
  assert.ok((await page.locator("#search-results tbody tr").count()) > 0);
});

test("feature page renders contexts, plots, logits and clickable neighbours", async () => {
  await page.goto(`${base}/feature/${densest}`);
  await page.waitForSelector("#top-contexts .ctx");
  const ctxs = await page.locator("#top-contexts .ctx").count();
  assert.ok(ctxs >= 5, `only ${ctxs} contexts`);
  // the peak token is highlighted, and its hover text shows the activation
  const peak = page.locator("#top-contexts .ctx .tok.peak").first();
  const bg = await peak.evaluate((e) => getComputedStyle(e).backgroundColor);
  assert.notEqual(bg, "rgba(0, 0, 0, 0)", "the peak token is not coloured");
  await peak.hover();
  assert.match(await page.locator("#tip").textContent(), /activation \d/);
  assert.ok((await page.locator("#histogram svg rect.hbar").count()) > 0, "no histogram bars");
  await page.waitForSelector("#density svg line.mine", { state: "attached" });
  assert.equal(await page.locator("#logits svg.logits").count(), 2);
  assert.ok((await page.locator("#quantiles details.q").count()) > 0);
  assert.ok((await page.locator("#explanation").count()) === 1);
  await page.screenshot({ path: path.join(shots, "feature.png"), fullPage: true });
  const nb = page.locator("#neighbours a.neighbour").first();
  const target = (await nb.textContent()).slice(1);
  await nb.click();
  await page.waitForURL(`${base}/feature/${target}`);
  await page.waitForSelector(`h1:text("Feature #${target}")`);
});

test("a bad feature id shows a clear error", async () => {
  await page.goto(`${base}/feature/99999`);
  await page.waitForSelector(".err");
  assert.match(await page.locator(".err").textContent(), /does not exist/);
});

test("live text colours tokens by a feature and shows the logit lens", async () => {
  await page.goto(`${base}/live?feature=${densest}`);
  await page.fill("#live-text", "The Golden Gate Bridge is in San Francisco");
  await page.click("#live-run");
  await page.waitForSelector("#live-tokens .tok", { timeout: 60_000 });
  const toks = await page.locator("#live-tokens .tok").count();
  assert.ok(toks >= 8);
  await page.waitForSelector("#logit-lens table");
  assert.equal(await page.locator("#logit-lens tbody tr").count(), 30);
  await page.locator("#live-tokens .tok").nth(4).click();
  await page.waitForSelector("#token-detail h2:text-matches('Token 4')");
  await page.screenshot({ path: path.join(shots, "live.png"), fullPage: true });
});

test("steering generates baseline and steered text side by side", async () => {
  await page.goto(`${base}/steer?feature=${densest}`);
  await page.fill("#steer-prompt", "Describe a sunny day.");
  await page.fill("#steer-max", "16");
  await page.fill(".e-value", "30");
  await page.click("#steer-run");
  await page.waitForFunction(() => document.querySelector("#steered").textContent.length > 0, null, { timeout: 120_000 });
  const b = await page.locator("#baseline").textContent();
  const s = await page.locator("#steered").textContent();
  assert.ok(b.length > 0 && s.length > 0);
  assert.notEqual(b, s, "a 30x clamp did not change the generation");
  await page.screenshot({ path: path.join(shots, "steer.png"), fullPage: true });
});

test("the graph page traces a prompt, explains a node on hover and clamps it", async () => {
  await page.goto(base + "/graph");
  await page.fill("#graph-prompt", "The capital of France is");
  // the fixture's random transcoders explain little: at 0.8 the kept influence is almost all error nodes
  await page.fill("#graph-node-threshold", "0.95");
  await page.click("#graph-run");
  await page.waitForSelector("svg.graph g.node.feature", { timeout: 120_000 });
  const drawn = page.locator("svg.graph");
  const api = await (await fetch(`${base}/api/graph`, { method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ prompt: "The capital of France is", node_threshold: 0.95, edge_threshold: 0.98 }) })).json();
  assert.equal(Number(await drawn.getAttribute("data-nodes")), api.nodes.length);
  assert.equal(await page.locator("svg.graph g.node").count(), api.nodes.length);
  assert.equal(await page.locator("svg.graph line").count(), api.links.length);
  assert.equal(await page.locator("svg.graph g.node.logit").count(), 5);
  assert.equal(await page.locator("svg.graph g.node.embedding").count(), api.metadata.prompt_tokens.length);
  // a feature at the last position: clamping it high must move the next-token distribution
  const last = api.metadata.prompt_tokens.length - 1;
  const ids = await page.locator("svg.graph g.node.feature").evaluateAll((ns) => ns.map((n) => n.dataset.id));
  const pick = ids.find((id) => id.endsWith(`_${last}`)) || ids[0];
  const node = page.locator(`svg.graph g.node[data-id="${pick}"]`);
  await node.hover();
  assert.match(await page.locator("#tip").textContent(), /transcoder feature \d+ @ layer \d+[\s\S]*promotes: \S/);
  await node.click();
  await page.waitForSelector("#graph-node h2:has-text('transcoder, position')");
  await page.fill("#graph-clamp-value", "200");
  await page.click("#graph-clamp");
  await page.waitForSelector("#graph-intervention table", { timeout: 60_000 });
  const tables = await page.locator("#graph-intervention table").allTextContents();
  assert.equal(tables.length, 2);
  assert.notEqual(tables[0], tables[1], "a clamp at 200 left the top tokens as they were");
  await page.screenshot({ path: path.join(shots, "graph.png"), fullPage: true });
});

test("a feature's LLM explanations show with their scores, best first, and search finds them", async () => {
  // the SQLite database `saekit analyze` wrote, with explanations stored as `saekit explain` stores them
  const explained = JSON.parse(fs.readFileSync(path.join(fixtureDir(), "explained.json"), "utf8"));
  const [best, other] = explained.explanations;
  // delphi's balanced accuracy from the stored counts: (tp / (tp + fn) + tn / (tn + fp)) / 2
  const balanced = (s) => ((s.tp / (s.tp + s.fn) + s.tn / (s.tn + s.fp)) / 2).toFixed(2);
  const sqlite = startServer([], { db: "features.sqlite" });
  const sqliteBase = await sqlite.url;
  const p = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  p.on("pageerror", (e) => pageErrors.push(String(e)));
  try {
    await p.goto(`${sqliteBase}/feature/${explained.feature}`);
    const box = p.locator("#llm-explanation");
    await box.waitFor();
    const shown = await box.textContent();
    assert.ok(shown.includes(best.text), `the best explanation is not shown first: ${shown}`);
    assert.ok(shown.includes(`(${best.model})`), shown);
    assert.equal(await box.locator(".chip.score").first().textContent(), `detection ${balanced(best.detection)}`);
    assert.equal(await box.locator(".chip.score").nth(1).textContent(), `fuzzing ${balanced(best.fuzzing)}`);
    // the hover gives the counts behind the detection score
    await box.locator(".chip.score").first().hover();
    const tip = await p.locator("#tip").textContent();
    assert.ok(tip.includes(`activating: ${best.detection.tp} found, ${best.detection.fn} missed`), tip);
    // the lower-scoring explanation by another model is one click away, with its own score
    await box.locator("details summary").click();
    const rest = await box.locator("details").textContent();
    assert.ok(rest.includes(other.text) && rest.includes(`detection ${balanced(other.detection)}`), rest);
    assert.ok(rest.includes("fuzzing: not scored"), rest);
    await p.screenshot({ path: path.join(shots, "feature-explained.png"), fullPage: true });
    // a word of the explanation that is in no context finds the feature first
    await p.goto(`${sqliteBase}/?q=zeppelin`);
    await p.waitForSelector("#search-results tbody tr");
    assert.equal(await p.locator("#search-results tbody tr").first().getAttribute("data-id"), String(explained.feature));
    // the readable-context renderer joins split characters but leaves a backslash typed in the text alone
    const pieces = await p.evaluate(() => mergeTokens(["caf", "\\xc3", "\\xa9", " \\x41", "\\xc3\\xa9"], [0, 1, 2, 0, 0]).map((q) => q.text));
    assert.deepEqual(pieces, ["caf", "é", " \\x41", "\\xc3\\xa9"]);
  } finally {
    await p.close();
    sqlite.stop();
  }
});

test("no script errors on any page", () => {
  assert.deepEqual(pageErrors.filter((e) => !/404|Not Found/.test(e)), []);
});
