//! Authorization (contract §4.2): pure checks of an authenticated caller against a route's
//! scopes and the workspace a request asks for.

use http::HeaderMap;

use crate::auth::failure::AuthError;
use crate::auth::identity::Identity;
use crate::auth::Caller;
use crate::routing::RouteMatch;

/// Why authorization refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The caller may not: 401 (anonymous) or 403.
    Denied(AuthError),
    /// The request does not name its workspace exactly once (400): with two values the
    /// gateway could check one while the upstream acts on the other.
    AmbiguousWorkspace,
}

/// The message of [`Refusal::AmbiguousWorkspace`].
pub const AMBIGUOUS_WORKSPACE: &str = "Workspace must be given exactly once";

/// Whether `caller` may use the matched route: its scopes, and the workspace the request
/// names through the route's `workspace` source. A caller whose authentication was skipped
/// (disabled mode, public route) is not checked.
pub fn authorize_route<T>(
    caller: &Caller,
    matched: &RouteMatch<'_, T>,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(), Refusal> {
    if caller.skipped {
        return Ok(());
    }
    let route = &matched.route.config;
    let scopes = &route.scopes.0;
    if caller.identity.is_anonymous() {
        // An anonymous caller holds nothing: a route that checks anything asks it to
        // authenticate, before the request's workspace is even looked at.
        if scopes.is_empty() && route.workspace.is_none() {
            return Ok(());
        }
        return Err(Refusal::Denied(AuthError::MissingToken));
    }
    let workspace = requested_workspace(matched, headers, query)?;
    authorize(&caller.identity, scopes, workspace.as_deref()).map_err(Refusal::Denied)
}

/// The workspace a request asks for, from the route's `workspace` source: exactly one
/// non-empty value — one query parameter (names decoded as form parameters, so
/// `%77orkspace` counts), one header line holding no list — or the refusal.
fn requested_workspace<T>(
    matched: &RouteMatch<'_, T>,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Option<String>, Refusal> {
    let Some(source) = matched.route.config.workspace.as_ref() else {
        return Ok(None);
    };
    let values: Vec<String> = if let Some(param) = &source.path_param {
        matched
            .param(param)
            .map(str::to_string)
            .into_iter()
            .collect()
    } else if let Some(name) = &source.header {
        headers
            .get_all(name.as_str())
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    } else if let Some(name) = &source.query {
        crate::query::values(query, name)
            .map(|v| v.into_owned())
            .collect()
    } else {
        Vec::new()
    };
    match values.as_slice() {
        [one] if !one.trim().is_empty() && !one.contains(',') => Ok(Some(one.trim().to_string())),
        _ => Err(Refusal::AmbiguousWorkspace),
    }
}

/// Checks that `identity` holds every scope in `scopes` and may access `workspace`.
/// An anonymous identity holds nothing, so it is told to authenticate (401) rather than
/// that it lacks a scope.
pub fn authorize(
    identity: &Identity,
    scopes: &[String],
    workspace: Option<&str>,
) -> Result<(), AuthError> {
    if identity.is_anonymous() {
        if scopes.is_empty() && workspace.is_none() {
            return Ok(());
        }
        return Err(AuthError::MissingToken);
    }
    let mut missing: Vec<String> = scopes
        .iter()
        .filter(|scope| !identity.scopes.contains(*scope))
        .cloned()
        .collect();
    if !missing.is_empty() {
        missing.sort();
        missing.dedup();
        return Err(AuthError::MissingScope(missing));
    }
    if let Some(workspace) = workspace {
        if !identity.workspaces.allows(workspace) {
            return Err(AuthError::WorkspaceForbidden(workspace.to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::{AuthMethod, IdentityType, Workspaces};

    fn identity(scopes: &[&str], workspaces: &[&str]) -> Identity {
        Identity {
            subject: "s".into(),
            identity_type: IdentityType::Service,
            token_id: "t".into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            workspaces: Workspaces::from_ids(workspaces.iter().map(|s| s.to_string())),
            method: AuthMethod::ServiceToken,
            expires_at: None,
            values: Default::default(),
        }
    }

    fn scopes(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_scope_is_required_and_missing_ones_are_listed_sorted() {
        let id = identity(&["workflows:read"], &[]);
        assert_eq!(authorize(&id, &scopes(&["workflows:read"]), None), Ok(()));
        assert_eq!(
            authorize(
                &id,
                &scopes(&["workflows:write", "workflows:read", "admin:tokens:write"]),
                None
            ),
            Err(AuthError::MissingScope(scopes(&[
                "admin:tokens:write",
                "workflows:write"
            ])))
        );
        let message = AuthError::MissingScope(scopes(&["a", "b"])).message();
        assert_eq!(message, "Missing required scopes: a, b");
    }

    #[test]
    fn workspaces_compare_case_insensitively_and_star_grants_all() {
        assert_eq!(
            authorize(&identity(&[], &["WS-1"]), &[], Some("ws-1")),
            Ok(())
        );
        assert_eq!(
            authorize(&identity(&[], &["ws-1"]), &[], Some("WS-1")),
            Ok(())
        );
        assert_eq!(
            authorize(&identity(&[], &["ws-1"]), &[], Some("ws-2")),
            Err(AuthError::WorkspaceForbidden("ws-2".into()))
        );
        assert_eq!(
            authorize(&identity(&[], &[]), &[], Some("ws-2")),
            Err(AuthError::WorkspaceForbidden("ws-2".into())),
            "no workspaces: denied"
        );
        assert_eq!(
            authorize(&identity(&[], &["*"]), &[], Some("anything")),
            Ok(())
        );
        assert_eq!(
            AuthError::WorkspaceForbidden("ws-x".into()).message(),
            "Workspace access denied for: ws-x"
        );
    }

    #[test]
    fn anonymous_callers_are_asked_to_authenticate() {
        let anonymous = Identity::anonymous();
        assert_eq!(authorize(&anonymous, &[], None), Ok(()));
        assert_eq!(
            authorize(&anonymous, &scopes(&["x"]), None),
            Err(AuthError::MissingToken)
        );
        assert_eq!(
            authorize(&anonymous, &[], Some("ws")),
            Err(AuthError::MissingToken)
        );
    }
}
