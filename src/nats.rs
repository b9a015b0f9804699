//! The `nats:` block: how a cluster process reaches NATS and who it is there. The binary reads
//! the secrets it names (environment variables, credentials and NKey files) and checks the TLS
//! files at load time, so that a mistake stops the process before anything binds, naming the
//! key; the bus gets the values ([`NatsAccess`]), never the names.

use std::path::{Path, PathBuf};

use bus::nats::{NatsAuth, NatsTls, split_userinfo};
use bus::{BusError, NatsOptions};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// `nats:`. At most one way of authenticating: `creds_file`, `nkey_file`, `user` with
/// `password_env`, `token_env`, or credentials in the URL.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// NATS server URL(s), comma-separated. Empty: the in-process bus (embedded mode).
    /// `tls://` requires TLS. Credentials written in it (`nats://user:pass@host`) are taken
    /// out of it before it is used or shown.
    pub url: String,
    /// A `.creds` file (user JWT and NKey seed, from `nsc`), for operator-mode servers.
    pub creds_file: Option<PathBuf>,
    /// A file holding an NKey user seed (`SU…`).
    pub nkey_file: Option<PathBuf>,
    /// The user name; its password comes from `password_env`.
    pub user: Option<String>,
    /// The environment variable holding the password of `user`.
    pub password_env: Option<String>,
    /// The environment variable holding an authentication token.
    pub token_env: Option<String>,
    pub tls: NatsTlsConfig,
}

/// `nats.tls:`. Setting any key requires TLS.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsTlsConfig {
    /// PEM CA bundle that signed the server's certificate. Default: the platform's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for servers that verify clients (`verify: true`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// What the `nats:` block resolves to: the URLs without credentials, and the secrets read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsAccess {
    pub url: String,
    pub auth: NatsAuth,
    pub tls: NatsTls,
    /// The keys the credentials came from, for error messages.
    pub auth_keys: &'static str,
}

impl NatsAccess {
    /// Bus options for a process named `name` whose replies come on `inbox_prefix`.
    pub fn options(&self, name: &str, inbox_prefix: &str) -> NatsOptions {
        NatsOptions {
            url: self.url.clone(),
            name: name.to_owned(),
            auth: self.auth.clone(),
            tls: self.tls.clone(),
            inbox_prefix: inbox_prefix.to_owned(),
            ..NatsOptions::default()
        }
    }

    /// What to tell an operator when the first connection fails: the cause, and the keys
    /// to check. Never a secret (async-nats's connect errors carry none).
    pub fn explain(&self, error: &BusError) -> String {
        use async_nats::ConnectErrorKind as Kind;
        let source = std::error::Error::source(error);
        let connect = source.and_then(|s| s.downcast_ref::<async_nats::ConnectError>());
        let cause = source.map_or_else(|| error.to_string(), ToString::to_string);
        let kind = connect.map(async_nats::ConnectError::kind);
        // async-nats reports a failed handshake as an I/O error; rustls's message tells.
        let tls_failed =
            kind == Some(Kind::Tls) || cause.contains("certificate") || cause.contains("TLS");
        let hint = match kind {
            Some(Kind::AuthorizationViolation) if self.auth == NatsAuth::None => {
                "the server wants credentials: set nats.creds_file, nats.nkey_file, nats.user \
                 with nats.password_env, or nats.token_env"
                    .to_owned()
            }
            Some(Kind::AuthorizationViolation | Kind::Authentication) => {
                format!(
                    "the server refused the credentials: check {}",
                    self.auth_keys
                )
            }
            _ if tls_failed && self.tls.ca_file.is_none() => {
                "TLS failed: a server certificate from a private CA needs nats.tls.ca_file"
                    .to_owned()
            }
            _ if tls_failed => "TLS failed: check that nats.tls.ca_file holds the CA of the \
                 server's certificate, issued for the host in nats.url (and, if the server \
                 verifies clients, nats.tls.cert_file and nats.tls.key_file)"
                .to_owned(),
            Some(Kind::ServerParse | Kind::Dns) => "check nats.url".to_owned(),
            _ => "is the server up at nats.url?".to_owned(),
        };
        format!("cannot connect to NATS at {}: {cause}; {hint}", self.url)
    }
}

impl NatsConfig {
    /// Reads what the block names and checks that it fits together; on success the URL in
    /// `self` has its credentials replaced by `***`, so printing the config shows none.
    pub fn resolve(&mut self, env: &[(String, String)]) -> Result<NatsAccess, ConfigError> {
        let (url, in_url) =
            split_userinfo(&self.url).map_err(|e| ConfigError::key("nats.url", e.to_string()))?;
        let methods: Vec<&'static str> = [
            (in_url.is_some(), "nats.url"),
            (self.creds_file.is_some(), "nats.creds_file"),
            (self.nkey_file.is_some(), "nats.nkey_file"),
            (
                self.user.is_some() || self.password_env.is_some(),
                "nats.user",
            ),
            (self.token_env.is_some(), "nats.token_env"),
        ]
        .into_iter()
        .filter_map(|(set, key)| set.then_some(key))
        .collect();
        if let [first, second, ..] = methods[..] {
            return Err(ConfigError::key(
                second,
                format!("conflicts with {first}: use one way of authenticating to NATS"),
            ));
        }
        let var = |key: &str, name: &str| match env.iter().find(|(n, _)| n == name) {
            Some((_, v)) if !v.is_empty() => Ok(v.clone()),
            _ => Err(ConfigError::key(
                key,
                format!("environment variable {name} is not set"),
            )),
        };
        let (auth, auth_keys) = match (methods.first().copied(), in_url) {
            (Some("nats.url"), Some(auth)) => (auth, "the credentials in nats.url"),
            (Some("nats.creds_file"), _) => {
                let path = self.creds_file.as_deref().unwrap_or(Path::new(""));
                let creds = read("nats.creds_file", path)?;
                // Parsed now so that a wrong file is named here, not at the first connect.
                async_nats::ConnectOptions::new()
                    .credentials(&creds)
                    .map_err(|e| {
                        ConfigError::key(
                            "nats.creds_file",
                            format!("{} is not a NATS credentials file: {e}", path.display()),
                        )
                    })?;
                (NatsAuth::Credentials(creds), "nats.creds_file")
            }
            (Some("nats.nkey_file"), _) => {
                let path = self.nkey_file.as_deref().unwrap_or(Path::new(""));
                let text = read("nats.nkey_file", path)?;
                let seed = text.trim();
                if !seed.starts_with("SU") || seed.contains(char::is_whitespace) {
                    return Err(ConfigError::key(
                        "nats.nkey_file",
                        format!("{} does not hold an NKey user seed (SU…)", path.display()),
                    ));
                }
                (NatsAuth::NKey(seed.to_owned()), "nats.nkey_file")
            }
            (Some("nats.user"), _) => {
                let user = match self.user.as_deref() {
                    Some(u) if !u.is_empty() => u.to_owned(),
                    Some(_) => return Err(ConfigError::key("nats.user", "must not be empty")),
                    None => {
                        return Err(ConfigError::key(
                            "nats.user",
                            "required with nats.password_env",
                        ));
                    }
                };
                let Some(name) = self.password_env.as_deref() else {
                    return Err(ConfigError::key(
                        "nats.password_env",
                        "required with nats.user (the variable holding the password)",
                    ));
                };
                let password = var("nats.password_env", name)?;
                (
                    NatsAuth::UserPassword { user, password },
                    "nats.user and nats.password_env",
                )
            }
            (Some(_), _) => {
                let name = self.token_env.as_deref().unwrap_or_default();
                (
                    NatsAuth::Token(var("nats.token_env", name)?),
                    "nats.token_env",
                )
            }
            (None, _) => (NatsAuth::None, "the nats block"),
        };
        let t = &self.tls;
        let ca_file = match &t.ca_file {
            Some(path) => {
                let pem = read("nats.tls.ca_file", path)?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(ConfigError::key(
                        "nats.tls.ca_file",
                        format!("{} holds no PEM certificate", path.display()),
                    ));
                }
                Some(path.clone())
            }
            None => None,
        };
        let client_cert = match (&t.cert_file, &t.key_file) {
            (Some(cert), Some(key)) => {
                read("nats.tls.cert_file", cert)?;
                read("nats.tls.key_file", key)?;
                Some((cert.clone(), key.clone()))
            }
            (Some(_), None) => {
                return Err(ConfigError::key(
                    "nats.tls.key_file",
                    "required with nats.tls.cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::key(
                    "nats.tls.cert_file",
                    "required with nats.tls.key_file",
                ));
            }
            (None, None) => None,
        };
        let required = ca_file.is_some()
            || client_cert.is_some()
            || url.split(',').any(|u| u.trim().starts_with("tls://"));
        self.url = bus::nats::redact_url(&self.url);
        Ok(NatsAccess {
            url,
            auth,
            tls: NatsTls {
                required,
                ca_file,
                client_cert,
            },
            auth_keys,
        })
    }
}

/// The file's text; an unreadable file is named with its key.
fn read(key: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::key(key, format!("cannot read {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(yaml: &str, env: &[(&str, &str)]) -> Result<(NatsConfig, NatsAccess), String> {
        let mut cfg: NatsConfig = serde_yaml_ng::from_str(yaml).unwrap();
        let env: Vec<_> = env
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect();
        let access = cfg.resolve(&env).map_err(|e| e.to_string())?;
        Ok((cfg, access))
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sb-nats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn password_comes_from_the_environment_and_is_shown_nowhere() {
        let (cfg, access) = resolve(
            "url: nats://n:4222\nuser: edge\npassword_env: NATS_PW\n",
            &[("NATS_PW", "hunter2")],
        )
        .unwrap();
        assert_eq!(
            access.auth,
            NatsAuth::UserPassword {
                user: "edge".into(),
                password: "hunter2".into()
            }
        );
        let shown = format!("{:?} {}", access, serde_yaml_ng::to_string(&cfg).unwrap());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("NATS_PW"), "{shown}");
        let e = resolve("url: x\nuser: edge\npassword_env: NATS_PW\n", &[]).unwrap_err();
        assert_eq!(
            e,
            "nats.password_env: environment variable NATS_PW is not set"
        );
        let e = resolve("url: x\nuser: edge\n", &[]).unwrap_err();
        assert!(e.starts_with("nats.password_env: required"), "{e}");
        let e = resolve("url: x\npassword_env: P\n", &[("P", "x")]).unwrap_err();
        assert!(e.starts_with("nats.user: required"), "{e}");
    }

    #[test]
    fn credentials_in_the_url_are_taken_out_and_redacted() {
        let (cfg, access) = resolve("url: nats://edge:hunter2@n:4222\n", &[]).unwrap();
        assert_eq!(access.url, "nats://n:4222");
        assert_eq!(cfg.url, "nats://***@n:4222");
        assert!(matches!(access.auth, NatsAuth::UserPassword { .. }));
        assert!(!access.tls.required);
        let (_, access) = resolve("url: tls://tok@n:4222\n", &[]).unwrap();
        assert_eq!(access.auth, NatsAuth::Token("tok".into()));
        assert!(access.tls.required);
    }

    #[test]
    fn two_ways_of_authenticating_are_refused() {
        let e = resolve(
            "url: x\nuser: u\npassword_env: P\ntoken_env: T\n",
            &[("P", "p"), ("T", "t")],
        )
        .unwrap_err();
        assert_eq!(
            e,
            "nats.token_env: conflicts with nats.user: use one way of authenticating to NATS"
        );
        let e = resolve("url: nats://u:p@x\ntoken_env: T\n", &[("T", "t")]).unwrap_err();
        assert!(
            e.starts_with("nats.token_env: conflicts with nats.url"),
            "{e}"
        );
        let e = resolve("url: x\ncreds_file: /a\nnkey_file: /b\n", &[]).unwrap_err();
        assert!(
            e.starts_with("nats.nkey_file: conflicts with nats.creds_file"),
            "{e}"
        );
    }

    #[test]
    fn files_are_read_and_checked_at_load() {
        let e = resolve("url: x\nnkey_file: /nonexistent/seed\n", &[]).unwrap_err();
        assert!(
            e.starts_with("nats.nkey_file: cannot read /nonexistent/seed"),
            "{e}"
        );
        let seed = temp_file(
            "seed",
            "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY\n",
        );
        let (_, access) =
            resolve(&format!("url: x\nnkey_file: {}\n", seed.display()), &[]).unwrap();
        assert!(matches!(access.auth, NatsAuth::NKey(s) if s.ends_with("VY")));
        let bad = temp_file("bad-seed", "UABC\n");
        let e = resolve(&format!("url: x\nnkey_file: {}\n", bad.display()), &[]).unwrap_err();
        assert!(e.contains("NKey user seed"), "{e}");
        let e = resolve(&format!("url: x\ncreds_file: {}\n", bad.display()), &[]).unwrap_err();
        assert!(
            e.starts_with("nats.creds_file:") && e.contains("not a NATS credentials"),
            "{e}"
        );
        let e = resolve("url: x\ntls:\n  ca_file: /nonexistent/ca.pem\n", &[]).unwrap_err();
        assert!(e.starts_with("nats.tls.ca_file: cannot read"), "{e}");
        let e = resolve(
            &format!("url: x\ntls:\n  ca_file: {}\n", bad.display()),
            &[],
        )
        .unwrap_err();
        assert!(
            e.starts_with("nats.tls.ca_file:") && e.contains("no PEM"),
            "{e}"
        );
        let e = resolve(
            &format!("url: x\ntls:\n  cert_file: {}\n", bad.display()),
            &[],
        )
        .unwrap_err();
        assert_eq!(e, "nats.tls.key_file: required with nats.tls.cert_file");
    }
}
