//! The demo page `switchboard dev` serves at `/`: a live chat and a watch, using the browser
//! bundle of the JavaScript client. Both files are compiled in, so the binary needs no Node:
//! `clients/js/dist/switchboard.min.js` is committed, and a test of `clients/js` fails when it
//! is not what the client's sources build to.

use edge::StaticPage;

/// `/` (the page) and `/switchboard.js` (the client, the global `switchboard`).
pub static PAGES: &[StaticPage] = &[
    StaticPage {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../clients/js/demo/index.html"),
    },
    StaticPage {
        path: "/switchboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../clients/js/dist/switchboard.min.js"),
    },
];
