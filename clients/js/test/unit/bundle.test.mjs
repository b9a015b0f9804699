// The browser bundle that `switchboard dev` embeds (include_str! in src/demo.rs) must be what
// the sources build to, and stay within the size goal.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { BROWSER_BUNDLE, browserBundle } from "../../build.mjs";

test("the committed dist/switchboard.min.js is in sync with src/", async () => {
  const built = await browserBundle();
  const committed = readFileSync(BROWSER_BUNDLE, "utf8");
  assert.ok(built === committed, "clients/js/dist/switchboard.min.js is stale: run `npm run build` in clients/js and commit it");
});

test("the browser bundle is at most 8 KiB minified and gzipped", async () => {
  const js = await browserBundle();
  const gz = gzipSync(js, { level: 9 }).length;
  console.log(`bundle: ${js.length} bytes minified, ${gz} bytes gzipped`);
  assert.ok(gz <= 8192, `${gz} bytes gzipped`);
});
