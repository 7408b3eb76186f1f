//! Authorization (contract §4.2): pure checks of an authenticated caller against a route's
//! scopes and the workspace a request asks for.

use http::HeaderMap;

use crate::auth::failure::AuthError;
use crate::auth::identity::Identity;
use crate::auth::Caller;
use crate::routing::RouteMatch;

/// Whether `caller` may use the matched route: its scopes, and the workspace the request
/// names through the route's `workspace` source. A caller whose authentication was skipped
/// (disabled mode, public route) is not checked.
pub fn authorize_route<T>(
    caller: &Caller,
    matched: &RouteMatch<'_, T>,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(), AuthError> {
    if caller.skipped {
        return Ok(());
    }
    let workspace = requested_workspace(matched, headers, query);
    let scopes = &matched.route.config.scopes.0;
    authorize(&caller.identity, scopes, workspace.as_deref())
}

/// The workspace a request asks for, from the route's `workspace` source.
fn requested_workspace<T>(
    matched: &RouteMatch<'_, T>,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<String> {
    let source = matched.route.config.workspace.as_ref()?;
    if let Some(param) = &source.path_param {
        return matched.param(param).map(str::to_string);
    }
    if let Some(name) = &source.header {
        return headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string());
    }
    let name = source.query.as_ref()?;
    crate::query::first(query, name)
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
