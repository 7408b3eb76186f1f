//! Reading a configuration: YAML text → typed [`Config`] (tolerant of one bad field at a
//! time, so every problem is found in one pass) → environment overrides → validation.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use serde_yaml::Value;

use super::errors::{ConfigError, ConfigErrors, Env};
use super::{env, validate, Config, Route};

/// Where `serve` and `check-config` read their configuration: `-c FILE`, else
/// `$ORCHEO_GATEWAY_CONFIG`, else `./gateway.yaml` if it exists, else none (built-in defaults).
pub fn resolve_path(flag: Option<&Path>, env: &Env) -> Option<PathBuf> {
    if let Some(path) = flag {
        return Some(path.to_path_buf());
    }
    if let Some(path) = env.get("ORCHEO_GATEWAY_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let local = PathBuf::from("gateway.yaml");
    local.is_file().then_some(local)
}

/// Loads the configuration from `path` (or built-in defaults when `None`) and `env`.
pub fn load_file(path: Option<&Path>, env: &Env) -> Result<Config, ConfigErrors> {
    let text = match path {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError::new(
                path.display().to_string(),
                format!("cannot read the configuration file: {e}"),
            )])
        })?,
        None => String::new(),
    };
    load(&text, env)
}

/// Loads a configuration from YAML text and `env`, reporting every problem at once.
pub fn load(text: &str, env: &Env) -> Result<Config, ConfigErrors> {
    let mut errors = ConfigErrors::default();
    let document: Value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_yaml::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError::new(
                "gateway.yaml",
                format!("not valid YAML: {e}"),
            )])
        })?
    };
    let mut config = parse_document(document, &mut errors);
    let applied = env::apply(&mut config, env, &mut errors);
    let before = errors.0.len();
    validate::check(&config, &mut errors);
    let mut found = ConfigErrors(errors.0.split_off(before));
    env::attribute(&mut found, &applied);
    errors.0.extend(found.0);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

fn parse_document(document: Value, errors: &mut ConfigErrors) -> Config {
    let mut mapping = match document {
        Value::Null => return Config::default(),
        Value::Mapping(mapping) => mapping,
        _ => {
            errors.push("gateway.yaml", "the top level must be a mapping of keys");
            return Config::default();
        }
    };
    let routes = mapping.remove("routes");
    let mut config: Config =
        parse_tolerant(Value::Mapping(mapping), "", errors).unwrap_or_default();
    config.routes = match routes {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(items)) => items
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| parse_tolerant::<Route>(item, &format!("routes[{i}]"), errors))
            .collect(),
        Some(_) => {
            errors.push("routes", "must be a list of routes");
            Vec::new()
        }
    };
    config
}

/// Deserializes `value`; on a type error, records it, drops the offending key and tries
/// again, so that one bad field does not hide the others. Unknown keys are errors too.
fn parse_tolerant<T: DeserializeOwned>(
    mut value: Value,
    prefix: &str,
    errors: &mut ConfigErrors,
) -> Option<T> {
    // Each retry removes one key, so the loop ends; the bound is a guard, not a limit in use.
    let mut previous = String::new();
    for _ in 0..256 {
        let mut unknown = Vec::new();
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let deserializer = serde_ignored::Deserializer::new(value.clone(), &mut record);
        match serde_path_to_error::deserialize::<_, T>(deserializer) {
            Ok(parsed) => {
                for path in unknown {
                    errors.push(join(prefix, &dotted(&path)), "unknown key");
                }
                return Some(parsed);
            }
            Err(error) => {
                let segments: Vec<Segment> = error.path().iter().cloned().collect();
                let key = join(prefix, &error.path().to_string());
                if key == previous {
                    return None;
                }
                errors.push(key.clone(), clean_message(&error.inner().to_string()));
                previous = key;
                if !remove_at(&mut value, &segments) {
                    return None;
                }
            }
        }
    }
    None
}

/// serde_ignored prints sequence indices as `.0`; show them as `[0]` like the other paths.
fn dotted(path: &str) -> String {
    let mut out = String::new();
    for part in path.split('.') {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

fn join(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path == "." || path.is_empty()) {
        (true, true) => "gateway.yaml".into(),
        (true, false) => path.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) if path.starts_with('[') => format!("{prefix}{path}"),
        (false, false) => format!("{prefix}.{path}"),
    }
}

/// serde_yaml appends " at line L column C" for the whole-document position, which is
/// misleading once a section was re-parsed on its own; the YAML path is given instead.
fn clean_message(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Removes the key that `path` names. An error inside a list removes the whole list (its
/// default then stands), so that later indices keep meaning what the file says.
/// False if the path is the root or not found.
fn remove_at(value: &mut Value, path: &[Segment]) -> bool {
    let keep = path
        .iter()
        .rposition(|s| matches!(s, Segment::Map { .. }))
        .map_or(0, |i| i + 1);
    let Some((Segment::Map { key }, parents)) = path[..keep].split_last() else {
        return false;
    };
    let mut node = value;
    for segment in parents {
        node = match (segment, node) {
            (Segment::Map { key }, Value::Mapping(m)) => match m.get_mut(key.as_str()) {
                Some(child) => child,
                None => return false,
            },
            (Segment::Seq { index }, Value::Sequence(s)) => match s.get_mut(*index) {
                Some(child) => child,
                None => return false,
            },
            _ => return false,
        };
    }
    match node {
        Value::Mapping(m) => m.remove(key.as_str()).is_some(),
        _ => false,
    }
}
