//! The route table (contract §4.1): compiled once per configuration, matched per request
//! against the normalised path. The first route whose path and method match wins; no
//! match is a 404 — a catch-all must be written explicitly.

use http::Method;

use crate::config::{self, Route};

mod path;

pub use path::{NormalizedPath, PathError};

/// One segment of a route pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// A compiled path pattern: literal segments, `{param}` segments, optional trailing `**`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    segments: Vec<Segment>,
    rest: bool,
}

impl Pattern {
    /// Compiles a pattern such as `/api/workspaces/{workspace_id}/workflows/**`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(body) = text.strip_prefix('/') else {
            return Err(format!("`{text}` must start with `/`"));
        };
        let body = body.strip_suffix('/').unwrap_or(body);
        let mut segments = Vec::new();
        let mut rest = false;
        let pieces: Vec<&str> = if body.is_empty() {
            Vec::new()
        } else {
            body.split('/').collect()
        };
        for (i, piece) in pieces.iter().enumerate() {
            if *piece == "**" {
                if i + 1 != pieces.len() {
                    return Err("`**` may only be the last segment".into());
                }
                rest = true;
            } else if let Some(name) = piece.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(format!(
                        "`{{{name}}}`: parameter names are letters, digits and _"
                    ));
                }
                if segments.contains(&Segment::Param(name.to_string())) {
                    return Err(format!("parameter `{name}` appears twice"));
                }
                segments.push(Segment::Param(name.to_string()));
            } else {
                check_literal(piece)?;
                segments.push(Segment::Literal(piece.to_string()));
            }
        }
        Ok(Pattern { segments, rest })
    }

    /// Whether the pattern has a `{name}` segment.
    pub fn has_param(&self, name: &str) -> bool {
        self.segments.contains(&Segment::Param(name.to_string()))
    }

    /// Matches decoded segments, returning the parameters on success.
    fn matches(&self, path: &NormalizedPath) -> Option<Vec<(String, String)>> {
        let n = self.segments.len();
        let length = path.len();
        if length < n || (!self.rest && length != n) {
            return None;
        }
        let mut params = Vec::new();
        for (segment, value) in self.segments.iter().zip(path.segments()) {
            match segment {
                Segment::Literal(literal) if literal == value => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => params.push((name.clone(), value.to_string())),
            }
        }
        Some(params)
    }
}

fn check_literal(piece: &str) -> Result<(), String> {
    if piece.is_empty() {
        return Err("empty segment (`//`)".into());
    }
    if piece == "." || piece == ".." {
        return Err("`.` and `..` segments are not allowed".into());
    }
    if piece.contains(['{', '}', '*', '%', '?', '#', '\\']) {
        return Err(format!(
            "segment `{piece}` has a character reserved for patterns"
        ));
    }
    Ok(())
}

/// A route ready for matching, holding `T`: what it forwards to, resolved once when the
/// table is compiled (the gateway's upstream client), never looked up per request.
#[derive(Debug, Clone)]
pub struct CompiledRoute<T> {
    /// The route's name (metrics label and log field), shared with each request's record.
    pub name: std::sync::Arc<str>,
    /// The route as configured.
    pub config: Route,
    /// Where the route forwards to.
    pub target: T,
    pattern: Pattern,
    methods: Vec<Method>,
    strip: Vec<String>,
}

impl<T> CompiledRoute<T> {
    /// Appends the path to send upstream to `out`: the normalised path without
    /// `strip_prefix`.
    pub fn push_upstream_path(&self, path: &NormalizedPath, out: &mut String) {
        let strips = path.starts_with(&self.strip);
        path.encode_into(if strips { self.strip.len() } else { 0 }, out);
    }
}

/// A successful match.
#[derive(Debug)]
pub struct RouteMatch<'a, T> {
    /// The route.
    pub route: &'a CompiledRoute<T>,
    /// Values of its `{param}` segments, decoded.
    pub params: Vec<(String, String)>,
}

impl<T> RouteMatch<'_, T> {
    /// The value of a `{param}`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The compiled route table.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    routes: Vec<CompiledRoute<T>>,
}

impl<T> RouteTable<T> {
    /// Compiles validated routes, resolving each one's target with `resolve`. Fails only
    /// on input that validation would have refused.
    pub fn compile(
        routes: &[Route],
        resolve: impl Fn(&Route) -> Result<T, String>,
    ) -> Result<Self, String> {
        let compiled = routes
            .iter()
            .map(|route| {
                let pattern = Pattern::parse(&route.path)?;
                let methods = route
                    .methods
                    .0
                    .iter()
                    .map(|m| m.parse::<Method>().map_err(|_| format!("bad method `{m}`")))
                    .collect::<Result<_, _>>()?;
                let strip = match &route.strip_prefix {
                    Some(prefix) => NormalizedPath::parse(prefix)
                        .map_err(|e| e.message().to_string())?
                        .segments()
                        .map(str::to_string)
                        .collect(),
                    None => Vec::new(),
                };
                Ok(CompiledRoute {
                    name: config::route_name(route).into(),
                    config: route.clone(),
                    target: resolve(route)?,
                    pattern,
                    methods,
                    strip,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(RouteTable { routes: compiled })
    }

    /// The first route matching `method` and `path`.
    pub fn find(&self, method: &Method, path: &NormalizedPath) -> Option<RouteMatch<'_, T>> {
        self.routes.iter().find_map(|route| {
            if !route.methods.is_empty() && !route.methods.contains(method) {
                return None;
            }
            let params = route.pattern.matches(path)?;
            Some(RouteMatch { route, params })
        })
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the table is empty (every request is then a 404).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests;
