// The browser bundle that `switchboard dev` embeds (include_str! in src/demo.rs) must be what
// the sources build to, and stay within the size goal.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { gzipSync } from "node:zlib";
import { browserBundle } from "../../build.mjs";

// Compared with the committed file (git), not the working tree: `npm run build` rewrites the
// working tree's copy, and the Rust build compiles in what is committed.
test("the committed dist/switchboard.min.js is what src/ builds to", async () => {
  const built = await browserBundle();
  const committed = execFileSync("git", ["show", "HEAD:./dist/switchboard.min.js"], { encoding: "utf8", maxBuffer: 1 << 24 });
  assert.ok(built === committed, "clients/js/dist/switchboard.min.js is stale: run `npm run build` in clients/js and commit it");
});

test("the browser bundle is at most 8 KiB minified and gzipped", async () => {
  const js = await browserBundle();
  const gz = gzipSync(js, { level: 9 }).length;
  console.log(`bundle: ${js.length} bytes minified, ${gz} bytes gzipped`);
  assert.ok(gz <= 8192, `${gz} bytes gzipped`);
});
