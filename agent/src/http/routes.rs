//! Route templates: low-cardinality names for paths (`/users/{id}` for `/users/42`), so that
//! span names and `http.route` group requests instead of naming each one. Patterns the user
//! configured win; otherwise path segments that look like identifiers (numbers, UUIDs, hex,
//! long opaque tokens) become `{id}`. `url.path` always keeps the real path.

/// One configured pattern: literal segments, `{name}` for any one segment, and a last
/// `{name...}` (or `**`) for any rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
    Rest,
}

impl Pattern {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let bad = |why: &str| anyhow::anyhow!("route pattern `{text}`: {why}");
        if !text.starts_with('/') {
            return Err(bad("must start with /"));
        }
        let parts: Vec<&str> = text[1..].split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let seg = if *p == "**" || (p.starts_with('{') && p.ends_with("...}")) {
                if !last {
                    return Err(bad("a rest parameter must be last"));
                }
                Segment::Rest
            } else if p.starts_with('{') && p.ends_with('}') && p.len() > 2 {
                if p[1..p.len() - 1].contains(['{', '}']) {
                    return Err(bad("nested braces"));
                }
                Segment::Param
            } else if p.contains(['{', '}']) {
                return Err(bad("a parameter must be a whole segment, like {id}"));
            } else {
                Segment::Literal(p.to_string())
            };
            segments.push(seg);
        }
        Ok(Self {
            text: text.to_string(),
            segments,
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::Param => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// Configured patterns, tried in order, then the built-in templating.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    patterns: Vec<Pattern>,
}

/// Segments longer than this are never kept as they are.
const LONG: usize = 32;

/// Whether a path segment names one thing among many (and so must not be in a span name).
pub fn is_identifier(seg: &str) -> bool {
    let b = seg.as_bytes();
    if b.is_empty() {
        return false;
    }
    let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
    let hex = b.iter().all(|c| c.is_ascii_hexdigit());
    let letters = b.iter().filter(|c| c.is_ascii_alphabetic()).count();
    digits == b.len()
        || is_uuid(seg)
        || (hex && b.len() >= 8 && digits > 0)
        || (b.len() >= 16 && digits > 0 && letters > 0)
        || b.len() >= LONG
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

impl Routes {
    pub fn new(patterns: &[String]) -> anyhow::Result<Self> {
        Ok(Self {
            patterns: patterns
                .iter()
                .map(|p| Pattern::parse(p))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The route of a path (without its query), for tests: the agent writes routes into a
    /// buffer it keeps ([`Routes::route_into`]).
    #[cfg(test)]
    pub fn route(&self, path: &str) -> String {
        let mut out = String::new();
        self.route_into(path, &mut out);
        out
    }

    /// Writes the route of a path into `out` (emptied first): the agent's per-span call, into
    /// a buffer it keeps.
    pub fn route_into(&self, path: &str, out: &mut String) {
        out.clear();
        if let Some(p) = self.patterns.iter().find(|p| p.matches(path)) {
            out.push_str(&p.text);
            return;
        }
        if !path.starts_with('/') {
            // An asterisk-form (`OPTIONS *`) or unusual target: nothing to keep.
            out.push_str(if path == "*" { "*" } else { "/" });
            return;
        }
        out.reserve(path.len());
        for seg in path[1..].split('/') {
            out.push('/');
            if is_identifier(seg) {
                out.push_str("{id}");
            } else {
                out.push_str(seg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(path: &str) -> String {
        Routes::default().route(path)
    }

    #[test]
    fn identifiers_become_placeholders() {
        assert_eq!(auto("/users/42"), "/users/{id}");
        assert_eq!(auto("/users/42/orders/7"), "/users/{id}/orders/{id}");
        assert_eq!(
            auto("/orders/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/items"),
            "/orders/{id}/items"
        );
        assert_eq!(auto("/blobs/9f86d081884c7d65"), "/blobs/{id}");
        assert_eq!(auto("/sessions/AbCdEf123456GhIjKl"), "/sessions/{id}");
        assert_eq!(
            auto("/t/eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9xyz"),
            "/t/{id}",
            "a long token"
        );
    }

    #[test]
    fn words_stay() {
        assert_eq!(auto("/"), "/");
        assert_eq!(auto("/api/v1/users"), "/api/v1/users");
        assert_eq!(auto("/health"), "/health");
        assert_eq!(auto("/static/app.css"), "/static/app.css");
        assert_eq!(auto("/coffee"), "/coffee", "hex letters without a digit");
        assert_eq!(auto("/users/"), "/users/");
        assert_eq!(auto("*"), "*");
    }

    #[test]
    fn configured_patterns_win_in_order() {
        let r = Routes::new(&[
            "/users/{id}/orders/{order}".to_string(),
            "/files/{path...}".to_string(),
            "/users/{name}".to_string(),
        ])
        .unwrap();
        assert_eq!(r.route("/users/42/orders/7"), "/users/{id}/orders/{order}");
        assert_eq!(r.route("/files/a/b/c.txt"), "/files/{path...}");
        assert_eq!(r.route("/users/alice"), "/users/{name}");
        assert_eq!(
            r.route("/users/alice/x"),
            "/users/alice/x",
            "no pattern: built-in"
        );
        assert_eq!(r.route("/users/"), "/users/", "a parameter needs a segment");
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["users/{id}", "/a/{id", "/a/x{id}", "/**/a", "/a/{{id}}"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
