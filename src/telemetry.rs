//! Logs and traces. Logging: `tracing` with an env filter (`RUST_LOG` wins over the config's
//! level), pretty or JSON lines. Tracing: OpenTelemetry over OTLP/gRPC, on when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the other
//! standard `OTEL_*` variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*`, …) apply as usual. W3C trace context
//! propagates through bus headers and gRPC metadata (`bus::trace`).
//!
//! **Invariant:** the only file of the binary that names OpenTelemetry.

use std::fmt;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat};

/// Flushes and stops the trace exporter when dropped (outside any async runtime).
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(error) = p.shutdown()
        {
            eprintln!("switchboard: trace export did not shut down cleanly: {error}");
        }
    }
}

/// Installs logging, and tracing when an OTLP endpoint is configured. `service` names the
/// process when `OTEL_SERVICE_NAME` is not set (e.g. `switchboard-edge`). `env` is the
/// process environment.
pub fn init(cfg: &LogConfig, service: &str, env: &[(String, String)]) -> TelemetryGuard {
    let var = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = match cfg.format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Pretty => fmt.fmt_fields(EscapedFields).compact().boxed(),
    };
    let endpoint =
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let (otel, provider, problem) =
        match endpoint.map(|e| tracer(e, var("OTEL_SERVICE_NAME").unwrap_or(service))) {
            None => (None, None, None),
            Some(Ok(provider)) => {
                opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
                let tracer = provider.tracer("switchboard");
                (
                    Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                    Some(provider),
                    None,
                )
            }
            Some(Err(e)) => (None, None, Some(e)),
        };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    if let Some(error) = problem {
        tracing::error!(%error, "tracing is off: the OTLP exporter could not be built");
    } else if let Some(e) = endpoint {
        tracing::info!(endpoint = e, "tracing to OTLP");
    }
    TelemetryGuard { provider }
}

/// The pretty log's fields (events' and spans'): `name=value`, the message bare, like
/// tracing-subscriber's default, but with every control character escaped (`\n`,
/// `\u{1b}`…). A value a client chose (`?user=a%0A…`) can then neither forge a log line nor
/// drive the terminal; the JSON format escapes by itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            out: Escaping(&mut writer),
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'a, 'w> {
    out: Escaping<&'a mut Writer<'w>>,
    first: bool,
    result: fmt::Result,
}

impl Visit for EscapingVisitor<'_, '_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let sep = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        self.result = if name == "message" {
            fmt::Write::write_fmt(&mut self.out, format_args!("{sep}{value:?}"))
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            fmt::Write::write_fmt(&mut self.out, format_args!("{sep}{name}={value:?}"))
        };
    }
}

/// Writes through to `W` with control characters (and the Unicode line and paragraph
/// separators) escaped.
struct Escaping<W>(W);

impl<W: fmt::Write> fmt::Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                write!(self.0, "{}", c.escape_default())?;
            } else {
                self.0.write_char(c)?;
            }
        }
        Ok(())
    }
}

fn tracer(endpoint: &str, service: &str) -> Result<SdkTracerProvider, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let exporter = {
        let _inside = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| e.to_string())?
    };
    let exporter = OnRuntime {
        runtime,
        inner: exporter,
    };
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Runs exports on a runtime of its own: the SDK's batch processor calls the exporter from a
/// plain thread, and the tonic exporter needs a Tokio reactor.
#[derive(Debug)]
struct OnRuntime {
    runtime: tokio::runtime::Runtime,
    inner: opentelemetry_otlp::SpanExporter,
}

impl SpanExporter for OnRuntime {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.runtime.block_on(self.inner.export(batch))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn client_values_cannot_forge_pretty_log_lines() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .fmt_fields(EscapedFields)
            .compact()
            .finish();
        let user = "a\n2026-01-01T00:00:00Z  WARN forged\r\u{1b}[2J\u{2028}";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("conn", ns = %"n\ns");
            let _inside = span.enter();
            tracing::info!(user = %user, n = 3, "connection\nopen");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.matches('\n').count(), 1, "{out:?}");
        assert!(out.ends_with('\n'), "{out:?}");
        assert!(!out.contains(['\r', '\u{1b}', '\u{2028}']), "{out:?}");
        assert!(
            out.contains(r"user=a\n2026-01-01T00:00:00Z  WARN forged\r\u{1b}[2J\u{2028}"),
            "{out:?}"
        );
        assert!(out.contains(r"connection\nopen"), "{out:?}");
        assert!(out.contains(r"ns=n\ns"), "{out:?}");
        assert!(out.contains("n=3"), "{out:?}");
    }
}
