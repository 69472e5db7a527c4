// Start `saekit serve` on a free loopback port with the fixture database and wait for its URL.
import { spawn } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, "../..");

// `db`: the fixture's database to serve, `features.json` (the built-in texts) or `features.sqlite` (the same
// texts through `saekit analyze`, with stored LLM explanations: `explained.json`).
export function startServer(extraArgs = [], { db = "features.json" } = {}) {
  const bin = process.env.SAEKIT_BIN || path.join(root, "target/debug/saekit");
  const fix = fixtureDir();
  const args = ["serve", "--sae", path.join(fix, "sae"), "--db", path.join(fix, db),
    "--transcoders", path.join(fix, "transcoders"), "--port", "0", ...extraArgs];
  const proc = spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "saekit=warn" } });
  let log = "";
  proc.stderr.on("data", (d) => { log += d; });
  const url = new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error("saekit serve did not start in 120 s:\n" + log)), 120_000);
    proc.stdout.on("data", (d) => {
      out += d;
      const m = out.match(/listening on (http:\/\/\S+?)\/?\s/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    proc.on("exit", (code) => { clearTimeout(timer); reject(new Error(`saekit serve exited with ${code}:\n${log}`)); });
  });
  return { proc, url, stop: () => proc.kill("SIGINT"), log: () => log };
}

export function fixtureDir() {
  const fix = process.env.SAEKIT_E2E_FIXTURE;
  if (!fix) throw new Error("SAEKIT_E2E_FIXTURE is not set: run scripts/e2e.sh, which builds the fixture");
  return fix;
}

export const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];
