// Bounded load test of `saekit serve` on loopback: C concurrent keep-alive clients issue N requests in all
// (stopping early at a time limit), a mix of what the pages fetch. Prints latency percentiles as JSON and
// exits non-zero on any error.
//   node load.mjs [--clients 64] [--requests 20000] [--seconds 60] [--model 32] [--p99-feature-ms 250]
// --p99-feature-ms L fails the run when the p99 latency of feature pages (`/api/features/{id}` and the
// `/feature/{id}` HTML page) exceeds L milliseconds.
// --model M adds M live-text requests (the model queue) spread over the run; they may be answered 503 busy,
// which is counted apart: that is the queue doing its job, not an error.
import http from "node:http";
import { startServer } from "./server.mjs";

const arg = (k, d) => { const i = process.argv.indexOf("--" + k); return i > 0 ? Number(process.argv[i + 1]) : d; };
const CLIENTS = arg("clients", 64), REQUESTS = arg("requests", 20000), SECONDS = arg("seconds", 60), MODEL = arg("model", 0);
const P99_FEATURE_MS = arg("p99-feature-ms", Infinity);

const server = startServer(["--queue", "4"]);
const base = new URL(await server.url);
const agent = new http.Agent({ keepAlive: true, maxSockets: CLIENTS });
const info = await (await fetch(base + "api/info")).json();
const N = info.n_features;
const words = ["the", "Bridge", "Paris", "def", "water", "ocean", "return", "la"];

function request(method, path, body) {
  return new Promise((resolve) => {
    const t0 = process.hrtime.bigint();
    const req = http.request({ host: base.hostname, port: base.port, path, method, agent, headers: body ? { "content-type": "application/json" } : {} }, (res) => {
      res.resume();
      res.on("end", () => resolve({ status: res.statusCode, ms: Number(process.hrtime.bigint() - t0) / 1e6 }));
    });
    req.on("error", (e) => resolve({ status: 0, ms: Number(process.hrtime.bigint() - t0) / 1e6, err: String(e) }));
    if (body) req.write(JSON.stringify(body));
    req.end();
  });
}

let seed = 12345;
const rnd = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; };
function nextRequest(i) {
  if (MODEL > 0 && i % Math.floor(REQUESTS / MODEL) === 0) return ["live", "POST", "/api/live", { text: "The ocean is deep and blue.", lens: false }];
  const k = i % 10;
  if (k < 5) return ["feature", "GET", `/api/features/${rnd(N)}`];
  if (k < 7) return ["list", "GET", `/api/features?sort=${k === 5 ? "density" : "max_act"}&offset=${rnd(N)}&limit=25`];
  if (k < 8) return ["search", "GET", `/api/search?q=${words[rnd(words.length)]}`];
  if (k < 9) return ["map", "GET", "/api/map"];
  return ["page", "GET", `/feature/${rnd(N)}`];
}

const lat = {}, errors = [];
let issued = 0, busy = 0;
const deadline = Date.now() + SECONDS * 1000;
const t0 = Date.now();
async function client() {
  while (issued < REQUESTS && Date.now() < deadline) {
    const [kind, method, path, body] = nextRequest(issued++);
    const r = await request(method, path, body);
    if (kind === "live" && r.status === 503) { busy++; continue; }
    if (r.status !== 200) { errors.push(`${method} ${path}: ${r.status} ${r.err || ""}`); continue; }
    (lat[kind] ||= []).push(r.ms);
  }
}
await Promise.all(Array.from({ length: CLIENTS }, client));
const wall = (Date.now() - t0) / 1000;
server.stop();
agent.destroy();

const pctl = (a, p) => a[Math.min(a.length - 1, Math.floor((p / 100) * a.length))];
const summary = (a) => { a.sort((x, y) => x - y); return { n: a.length, p50: +pctl(a, 50).toFixed(2), p90: +pctl(a, 90).toFixed(2), p99: +pctl(a, 99).toFixed(2), max: +a[a.length - 1].toFixed(2) }; };
const all = Object.values(lat).flat();
const report = {
  clients: CLIENTS, requests: all.length + errors.length + busy, seconds: +wall.toFixed(2), req_per_s: +((all.length) / wall).toFixed(0),
  errors: errors.length, model_busy_503: busy, all_ms: summary(all),
  by_kind_ms: Object.fromEntries(Object.entries(lat).map(([k, v]) => [k, summary(v)])),
};
console.log(JSON.stringify(report, null, 1));
if (errors.length) { console.error(errors.slice(0, 10).join("\n")); process.exit(1); }
const featurePages = [...(lat.feature || []), ...(lat.page || [])];
if (!featurePages.length) { console.error("no feature page was served"); process.exit(1); }
const p99 = summary(featurePages).p99;
if (p99 > P99_FEATURE_MS) { console.error(`feature pages: p99 ${p99} ms exceeds the limit of ${P99_FEATURE_MS} ms`); process.exit(1); }
