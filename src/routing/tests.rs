use http::Method;

use super::*;
use crate::config::Route;

fn route(name: &str, path: &str, methods: &[&str]) -> Route {
    let yaml = format!(
        "name: {name}\npath: \"{path}\"\nmethods: [{}]\n",
        methods.join(", ")
    );
    serde_yaml::from_str(&yaml).unwrap()
}

fn table(routes: &[Route]) -> RouteTable<String> {
    RouteTable::compile(routes, |route| Ok(route.upstream.clone())).unwrap()
}

fn find<'a>(
    table: &'a RouteTable<String>,
    method: Method,
    raw: &str,
) -> Option<(&'a str, Vec<(String, String)>)> {
    let path = NormalizedPath::parse(raw).ok()?;
    table
        .find(&method, &path)
        .map(|m| (&*m.route.name, m.params))
}

#[test]
fn literal_param_and_rest_segments() {
    let t = table(&[
        route("health", "/api/system/health", &["GET"]),
        route(
            "ws-read",
            "/api/workspaces/{workspace_id}/workflows/**",
            &["GET", "HEAD"],
        ),
        route("one", "/api/workflows/{ref}", &[]),
        route("root", "/", &[]),
    ]);
    assert_eq!(
        find(&t, Method::GET, "/api/system/health").unwrap().0,
        "health"
    );
    assert!(find(&t, Method::GET, "/api/system/health/x").is_none());
    let (name, params) = find(&t, Method::GET, "/api/workspaces/ws-1/workflows").unwrap();
    assert_eq!(name, "ws-read");
    assert_eq!(
        params,
        vec![("workspace_id".to_string(), "ws-1".to_string())]
    );
    assert_eq!(
        find(&t, Method::HEAD, "/api/workspaces/w/workflows/a/b/c")
            .unwrap()
            .0,
        "ws-read"
    );
    assert_eq!(
        find(&t, Method::DELETE, "/api/workflows/abc").unwrap().0,
        "one"
    );
    assert!(find(&t, Method::GET, "/api/workflows").is_none());
    assert!(find(&t, Method::GET, "/api/workflows/a/b").is_none());
    assert_eq!(find(&t, Method::GET, "/").unwrap().0, "root");
}

#[test]
fn first_match_wins_and_methods_filter() {
    let t = table(&[
        route("public", "/api/workflows/{ref}/public", &["GET"]),
        route("read", "/api/workflows/**", &["GET"]),
        route("write", "/api/workflows/**", &["POST", "PUT"]),
    ]);
    assert_eq!(
        find(&t, Method::GET, "/api/workflows/x/public").unwrap().0,
        "public"
    );
    assert_eq!(
        find(&t, Method::POST, "/api/workflows/x/public").unwrap().0,
        "write"
    );
    assert_eq!(find(&t, Method::GET, "/api/workflows/x").unwrap().0, "read");
    assert!(
        find(&t, Method::DELETE, "/api/workflows/x").is_none(),
        "method mismatch is no match"
    );
}

#[test]
fn matching_is_case_sensitive_and_ignores_the_query() {
    let t = table(&[route("r", "/api/Items/**", &[])]);
    assert!(find(&t, Method::GET, "/api/items/x").is_none());
    assert!(find(&t, Method::GET, "/api/Items/x").is_some());
}

#[test]
fn traversal_never_escapes_a_route() {
    let t = table(&[
        route("public", "/public/**", &[]),
        route("admin", "/admin/**", &[]),
    ]);
    // Every spelling of "go up out of /public" lands where its normalised path says.
    for raw in [
        "/public/../admin/x",
        "/public/%2e%2e/admin/x",
        "/public/%2E%2E/admin/x",
        "/public/.%2e/admin/x",
        "/public/./../admin/x",
        "//public/../admin/x",
        "/public//..//admin/x",
    ] {
        assert_eq!(find(&t, Method::GET, raw).unwrap().0, "admin", "{raw}");
    }
    // `..` can never climb above the root.
    assert_eq!(
        find(&t, Method::GET, "/../../public/x").unwrap().0,
        "public"
    );
    // Empty segments collapse, so `//admin` is `/admin`.
    assert_eq!(find(&t, Method::GET, "//admin//x").unwrap().0, "admin");
    // A double-encoded dot segment is a literal name, not `..`.
    let path = NormalizedPath::parse("/public/%252e%252e/admin").unwrap();
    assert_eq!(
        path.segments().collect::<Vec<_>>(),
        ["public", "%2e%2e", "admin"]
    );
    assert_eq!(path.encode(0), "/public/%252e%252e/admin");
}

#[test]
fn encoded_separators_and_bad_escapes_are_refused() {
    for (raw, error) in [
        ("/public/..%2fadmin", PathError::EncodedSeparator),
        ("/public/%2F", PathError::EncodedSeparator),
        ("/a%5cb", PathError::EncodedSeparator),
        ("/a%5Cb", PathError::EncodedSeparator),
        ("/a\\b", PathError::EncodedSeparator),
        ("/a%zz", PathError::BadEscape),
        ("/a%2", PathError::BadEscape),
        ("/a%00b", PathError::BadBytes),
        ("/a%ff", PathError::BadBytes),
        ("a/b", PathError::NotAbsolute),
        ("*", PathError::NotAbsolute),
        ("/public/..;/admin", PathError::Semicolon),
        ("/public/..%3B/admin", PathError::Semicolon),
        ("/files/{id};jsessionid=x", PathError::Semicolon),
        ("/admin%3bx", PathError::Semicolon),
    ] {
        assert_eq!(NormalizedPath::parse(raw), Err(error), "{raw}");
    }
}

#[test]
fn methods_are_matched_case_sensitively() {
    let t = table(&[route("read", "/r", &["GET"])]);
    assert!(find(&t, Method::GET, "/r").is_some());
    let lower = Method::from_bytes(b"get").unwrap();
    assert!(find(&t, lower, "/r").is_none(), "`get` is not `GET`");
}

#[test]
fn decoded_segments_match_and_are_re_encoded_for_the_upstream() {
    let t = table(&[route("r", "/files/{name}", &[])]);
    let (_, params) = find(&t, Method::GET, "/files/a%20b%C3%A9").unwrap();
    assert_eq!(params[0].1, "a bé");
    let path = NormalizedPath::parse("/files/a%20b%C3%A9").unwrap();
    assert_eq!(path.encode(0), "/files/a%20b%C3%A9");
    assert_eq!(NormalizedPath::parse("/a/b/").unwrap().encode(0), "/a/b/");
    assert_eq!(NormalizedPath::parse("/a/b/..").unwrap().encode(0), "/a/");
    assert_eq!(NormalizedPath::parse("/").unwrap().encode(0), "/");
    assert_eq!(
        NormalizedPath::parse("/a:b@c,d=e").unwrap().encode(0),
        "/a:b@c,d=e"
    );
}

#[test]
fn strip_prefix_removes_whole_segments_only() {
    let mut r = route("svc", "/svc/**", &[]);
    r.strip_prefix = Some("/svc".into());
    let t = table(&[r]);
    let m = |raw: &str| {
        let path = NormalizedPath::parse(raw).unwrap();
        let found = t.find(&Method::GET, &path).unwrap();
        let mut out = String::new();
        found.route.push_upstream_path(&path, &mut out);
        out
    };
    assert_eq!(m("/svc/a/b"), "/a/b");
    assert_eq!(m("/svc"), "/");
    assert_eq!(m("/svc/"), "/");
}

#[test]
fn bad_patterns_are_explained() {
    for (pattern, needle) in [
        ("api/x", "must start with `/`"),
        ("/api/**/x", "last segment"),
        ("/api/{}", "parameter names"),
        ("/api/{a-b}", "parameter names"),
        ("/api/{a}/{a}", "twice"),
        ("/api//x", "empty segment"),
        ("/api/../x", "not allowed"),
        ("/api/x*", "reserved"),
        ("/api/%2e", "reserved"),
    ] {
        let error = Pattern::parse(pattern).unwrap_err();
        assert!(error.contains(needle), "{pattern}: {error}");
    }
    assert!(Pattern::parse("/api/").is_ok());
    assert!(Pattern::parse("/**").is_ok());
}

#[test]
fn a_segment_that_is_not_utf8_is_refused_even_when_a_later_dot_dot_removes_it() {
    assert_eq!(
        NormalizedPath::parse("/a/%ff/../b"),
        Err(PathError::BadBytes)
    );
    assert_eq!(
        NormalizedPath::parse("/a/%C3%A9/../b").unwrap().encode(0),
        "/a/b"
    );
}

#[test]
fn segments_length_and_prefixes() {
    let path = NormalizedPath::parse("/a//b/./c/").unwrap();
    assert_eq!(path.segments().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(path.len(), 3);
    assert!(path.starts_with(&["a", "b"]));
    assert!(!path.starts_with(&["a", "c"]));
    assert!(!path.starts_with(&["a", "b", "c", "d"]));
    let root = NormalizedPath::parse("/").unwrap();
    assert_eq!(root.len(), 0);
    assert!(root.is_empty() && root.segments().next().is_none());
    assert!(root.starts_with::<&str>(&[]));
}

#[test]
fn the_upstream_path_is_appended_after_what_the_target_already_holds() {
    let path = NormalizedPath::parse("/svc/a%20b/").unwrap();
    let mut out = String::from("/base");
    path.encode_into(1, &mut out);
    assert_eq!(out, "/base/a%20b/");
    let mut out = String::from("/base");
    NormalizedPath::parse("/svc")
        .unwrap()
        .encode_into(1, &mut out);
    assert_eq!(out, "/base/", "nothing left is the root");
}
