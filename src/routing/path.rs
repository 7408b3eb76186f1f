//! Request-path normalisation: percent-decoding and dot-segment removal, done once so
//! that routing and the upstream see the same path and `..`, `%2e%2e` or `//` can never
//! lead a request out of the route it matched.

use std::fmt::Write;

/// Why a request path was refused (400 `request.invalid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// The path does not start with `/`.
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// `%2F` or `%5C` (or a raw `\`): a separator hidden inside a segment.
    EncodedSeparator,
    /// A NUL byte, or bytes that are not UTF-8 once decoded.
    BadBytes,
    /// A `;` in a segment (raw or encoded): servlet containers read `..;` as `..` and
    /// `/admin;x` as `/admin`, so a path the gateway matched could mean another upstream.
    Semicolon,
}

impl PathError {
    /// The message the client sees.
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "Request path must start with /",
            PathError::BadEscape => "Request path has an invalid percent-encoding",
            PathError::EncodedSeparator => "Request path must not contain an encoded / or \\",
            PathError::BadBytes => "Request path is not valid UTF-8",
            PathError::Semicolon => "Request path must not contain ;",
        }
    }
}

/// A decoded, normalised path: its segments (never empty, `.` or `..`) and whether it
/// ended with `/`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NormalizedPath {
    /// Decoded segments.
    pub segments: Vec<String>,
    /// The path ended with `/` (kept when forwarding).
    pub trailing_slash: bool,
}

impl NormalizedPath {
    /// Decodes and normalises a raw request path (without the query).
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        if !raw.starts_with('/') {
            return Err(PathError::NotAbsolute);
        }
        let mut segments: Vec<String> = Vec::new();
        let mut trailing_slash = false;
        for piece in raw[1..].split('/') {
            let segment = decode(piece)?;
            if segment.contains(';') {
                return Err(PathError::Semicolon);
            }
            trailing_slash = matches!(segment.as_str(), "" | "." | "..");
            match segment.as_str() {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                _ => segments.push(segment),
            }
        }
        Ok(NormalizedPath {
            segments,
            trailing_slash: trailing_slash && raw.len() > 1,
        })
    }

    /// The path re-encoded for the upstream, starting with `/`.
    pub fn encode(&self, skip: usize) -> String {
        let mut out = String::with_capacity(64);
        for segment in self.segments.iter().skip(skip) {
            out.push('/');
            encode_segment(segment, &mut out);
        }
        if out.is_empty() || self.trailing_slash {
            out.push('/');
        }
        out
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode(piece: &str) -> Result<String, PathError> {
    if !piece.contains(['%', '\\']) {
        return if piece.contains('\0') {
            Err(PathError::BadBytes)
        } else {
            Ok(piece.to_string())
        };
    }
    let bytes = piece.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = match bytes[i] {
            b'%' => {
                let high = bytes.get(i + 1).copied().and_then(hex);
                let low = bytes.get(i + 2).copied().and_then(hex);
                let (Some(high), Some(low)) = (high, low) else {
                    return Err(PathError::BadEscape);
                };
                i += 3;
                high << 4 | low
            }
            other => {
                i += 1;
                other
            }
        };
        match byte {
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            0 => return Err(PathError::BadBytes),
            _ => out.push(byte),
        }
    }
    String::from_utf8(out).map_err(|_| PathError::BadBytes)
}

/// Characters a path segment may carry unescaped (RFC 3986 `pchar` less `%`).
fn is_pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

fn encode_segment(segment: &str, out: &mut String) {
    for &b in segment.as_bytes() {
        if is_pchar(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}
