//! Who may send: no check, one shared bearer token, or per-agent tokens (`--tokens-file`) that
//! bind a stream to the one agent id it may send batches for.

use std::path::{Path, PathBuf};

use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read --tokens-file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--tokens-file {path}:{line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("--tokens-file {path} holds no `AGENT_ID TOKEN` line")]
    Empty { path: PathBuf },
}

/// One `AGENT_ID TOKEN` line, kept as the header value it must match.
#[derive(Clone)]
pub struct AgentToken {
    agent_id: String,
    header: String,
}

/// How streams are authenticated. `Debug` never prints a token.
#[derive(Clone, Default)]
pub enum Auth {
    /// No token required (a listener on a trusted network or loopback).
    #[default]
    Open,
    /// One token for every agent id.
    Shared(String),
    /// Each token may only send for its own agent id.
    PerAgent(Vec<AgentToken>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Open => f.write_str("Open"),
            Self::Shared(_) => f.write_str("Shared(<redacted>)"),
            Self::PerAgent(t) => write!(f, "PerAgent({} tokens)", t.len()),
        }
    }
}

/// Whom a stream was admitted as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// May send for any agent id.
    AnyAgent,
    /// May only send for this agent id.
    Agent(String),
}

impl Auth {
    pub fn shared(token: &str) -> Self {
        Self::Shared(format!("Bearer {token}"))
    }

    /// Reads `--tokens-file`: `AGENT_ID TOKEN` per line, `#` comments and blank lines ignored.
    /// A token listed twice is an error (it could not say which agent it is); an agent id may
    /// have several tokens (rotation).
    pub fn from_tokens_file(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        warn_if_readable_by_others(path);
        let mut tokens: Vec<AgentToken> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let bad = |reason: String| AuthError::Line {
                path: path.to_owned(),
                line: i + 1,
                reason,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [agent_id, token] = fields[..] else {
                return Err(bad(format!(
                    "expected `AGENT_ID TOKEN`, found {} field(s)",
                    fields.len()
                )));
            };
            // Printable ASCII: anything else cannot travel in an `authorization` header.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(
                    "the token has characters not allowed in a header".into()
                ));
            }
            let header = format!("Bearer {token}");
            if let Some(other) = tokens.iter().find(|t| t.header == header) {
                return Err(bad(format!(
                    "this token is already given to agent id {:?}",
                    other.agent_id
                )));
            }
            tokens.push(AgentToken {
                agent_id: agent_id.to_owned(),
                header,
            });
        }
        if tokens.is_empty() {
            return Err(AuthError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self::PerAgent(tokens))
    }

    /// Checks the `authorization` value a stream opened with; `None`: refuse it.
    pub fn admit(&self, given: &[u8]) -> Option<Admitted> {
        match self {
            Self::Open => Some(Admitted::AnyAgent),
            Self::Shared(expected) => {
                same_secret(given, expected.as_bytes()).then_some(Admitted::AnyAgent)
            }
            Self::PerAgent(tokens) => {
                // Every entry is compared (no early exit), so timing does not tell which matched.
                let mut found = None;
                for t in tokens {
                    if same_secret(given, t.header.as_bytes()) {
                        found = Some(&t.agent_id);
                    }
                }
                found.map(|id| Admitted::Agent(id.clone()))
            }
        }
    }
}

impl Admitted {
    /// Whether a stream admitted so may send a batch of `agent_id`.
    pub fn may_send_for(&self, agent_id: &str) -> bool {
        match self {
            Self::AnyAgent => true,
            Self::Agent(id) => id == agent_id,
        }
    }
}

/// Compares without an early exit, so the time taken does not reveal how much of a token matched.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Tokens readable by every local user are no secret: say so at start (not an error, since
/// the operator may have reasons, e.g. a container with one user).
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o004 != 0
    {
        warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o7777),
              "--tokens-file is readable by every user; chmod o-r it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Auth, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("tokens");
        std::fs::write(&p, text).expect("write");
        Auth::from_tokens_file(&p).map_err(|e| e.to_string())
    }

    #[test]
    fn tokens_bind_agent_ids() {
        let auth = parse("# c\n a  t1 \nb t2\na t3\n").expect("parses");
        assert_eq!(auth.admit(b"Bearer t1"), Some(Admitted::Agent("a".into())));
        assert_eq!(auth.admit(b"Bearer t3"), Some(Admitted::Agent("a".into())));
        assert_eq!(auth.admit(b"Bearer t2"), Some(Admitted::Agent("b".into())));
        assert_eq!(auth.admit(b"Bearer t"), None);
        assert_eq!(auth.admit(b"t1"), None);
        assert_eq!(auth.admit(b""), None);
        assert!(Admitted::Agent("a".into()).may_send_for("a"));
        assert!(!Admitted::Agent("a".into()).may_send_for("b"));
        assert!(!format!("{auth:?}").contains("t1"), "Debug hides tokens");
    }

    #[test]
    fn bad_files_name_the_line() {
        let e = parse("a t1\nb\n").expect_err("error");
        assert!(
            e.ends_with(":2: expected `AGENT_ID TOKEN`, found 1 field(s)"),
            "{e}"
        );
        let e = parse("a t1\nb t1\n").expect_err("error");
        assert!(
            e.contains(":2: this token is already given to agent id \"a\""),
            "{e}"
        );
        let e = parse("a t\u{7f}x\n").expect_err("error");
        assert!(e.contains(":1: the token has characters"), "{e}");
        let e = parse("# only comments\n\n").expect_err("error");
        assert!(e.contains("holds no `AGENT_ID TOKEN` line"), "{e}");
        let e = Auth::from_tokens_file(Path::new("/nonexistent/tokens"))
            .expect_err("error")
            .to_string();
        assert!(
            e.starts_with("cannot read --tokens-file /nonexistent/tokens"),
            "{e}"
        );
    }
}
