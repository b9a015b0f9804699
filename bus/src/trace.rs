//! W3C trace context across process boundaries: `traceparent` (and `tracestate`) in bus
//! message headers and gRPC metadata, so that one trace runs from a backend's call through
//! the coordinator and the edge to the socket, and from a client event to the backend.
//!
//! The binary installs the propagator and the OpenTelemetry layer when tracing is on; without
//! them every function here does nothing. **Invariant:** outside the binary's `telemetry.rs`,
//! this is the only module that names OpenTelemetry.

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::Headers;

/// Writes the context of `span` into bus headers.
pub fn inject(span: &tracing::Span, headers: &mut Headers) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

/// Writes the context of `span` with `set` (e.g. into gRPC metadata).
pub fn inject_with(span: &tracing::Span, set: &mut dyn FnMut(&str, String)) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut FnInjector(set)));
}

/// Makes `span` a child of the context in bus headers, if they carry one.
pub fn follow(span: &tracing::Span, headers: &Headers) {
    if headers.get("traceparent").is_none() {
        return;
    }
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(cx);
}

/// Makes `span` a child of the context `get` finds (e.g. in gRPC metadata), if any.
pub fn follow_with(span: &tracing::Span, get: &dyn Fn(&str) -> Option<String>) {
    let Some(traceparent) = get("traceparent") else {
        return;
    };
    let state = get("tracestate");
    let mut headers = Headers::default();
    headers.insert("traceparent", traceparent);
    if let Some(s) = state {
        headers.insert("tracestate", s);
    }
    follow(span, &headers);
}

/// Whether bus headers carry a trace context (cheap: decides whether to open a span at all
/// on hot paths).
pub fn is_traced(headers: &Headers) -> bool {
    headers.get("traceparent").is_some()
}

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct FnInjector<'a>(&'a mut dyn FnMut(&str, String));

impl Injector for FnInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        (self.0)(key, value);
    }
}

struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}
