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
/// ended with `/`. The segments are kept as one text, each after a `/` (a decoded segment
/// never holds a `/`: an encoded one is refused), so a path costs one allocation however
/// many segments it has.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NormalizedPath {
    /// `/segment` for each decoded segment; empty for the root.
    text: String,
    /// How many segments `text` holds: counted once, read for every route tried.
    count: usize,
    /// The path ended with `/` (kept when forwarding).
    pub trailing_slash: bool,
}

impl NormalizedPath {
    /// Decodes and normalises a raw request path (without the query).
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        match Self::parse_plain(raw) {
            Some(path) => Ok(path),
            None => Self::parse_any(raw),
        }
    }

    /// The common case in one pass: a path already in normal form, whose segments are
    /// plain characters (nothing to decode, no `;`), none empty, `.` or `..` — except an
    /// empty last one, the trailing `/`. Gives the same as [`Self::parse_any`], or `None`
    /// when the path is not such a path.
    fn parse_plain(raw: &str) -> Option<Self> {
        let bytes = raw.as_bytes();
        if bytes.first() != Some(&b'/') {
            return None;
        }
        let mut count = 0;
        let mut start = 1;
        loop {
            let length = bytes[start..]
                .iter()
                .position(|&b| !is_plain(b))
                .unwrap_or(bytes.len() - start);
            let end = start + length;
            let segment = &bytes[start..end];
            match (bytes.get(end), segment) {
                // The root, or a trailing `/` after at least one segment.
                (None, b"") => break,
                (_, b"" | b"." | b"..") => return None,
                (None, _) => {
                    count += 1;
                    break;
                }
                (Some(b'/'), _) => {
                    count += 1;
                    start = end + 1;
                }
                (Some(_), _) => return None,
            }
        }
        let trailing_slash = raw.len() > 1 && raw.ends_with('/');
        let text = &raw[..raw.len() - usize::from(trailing_slash)];
        Some(NormalizedPath {
            text: if text == "/" {
                String::new()
            } else {
                text.to_string()
            },
            count,
            trailing_slash,
        })
    }

    fn parse_any(raw: &str) -> Result<Self, PathError> {
        let Some(rest) = raw.strip_prefix('/') else {
            return Err(PathError::NotAbsolute);
        };
        let mut text: Vec<u8> = Vec::with_capacity(raw.len());
        let mut trailing_slash = false;
        for piece in rest.split('/') {
            let start = text.len();
            text.push(b'/');
            decode(piece, &mut text)?;
            let segment = &text[start + 1..];
            if segment.contains(&b';') {
                return Err(PathError::Semicolon);
            }
            trailing_slash = matches!(segment, b"" | b"." | b"..");
            match segment {
                b"" | b"." => text.truncate(start),
                b".." => {
                    text.truncate(start);
                    // The segment before goes too (none above the root).
                    let before = text.iter().rposition(|&b| b == b'/').unwrap_or(0);
                    text.truncate(before);
                }
                _ => {}
            }
        }
        let text = String::from_utf8(text).map_err(|_| PathError::BadBytes)?;
        Ok(NormalizedPath {
            count: text.bytes().filter(|&b| b == b'/').count(),
            text,
            trailing_slash: trailing_slash && raw.len() > 1,
        })
    }

    /// The decoded segments, in order.
    pub fn segments(&self) -> Segments<'_> {
        Segments { rest: &self.text }
    }

    /// How many segments the path has.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the path is the root.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Whether the path begins with the segments `prefix`.
    pub fn starts_with<S: AsRef<str>>(&self, prefix: &[S]) -> bool {
        let mut segments = self.segments();
        prefix
            .iter()
            .all(|wanted| segments.next() == Some(wanted.as_ref()))
    }

    /// The path re-encoded for the upstream, starting with `/`.
    pub fn encode(&self, skip: usize) -> String {
        let mut out = String::with_capacity(self.text.len() + 1);
        self.encode_into(skip, &mut out);
        out
    }

    /// Appends the path re-encoded for the upstream, without its first `skip` segments,
    /// to `out`; it starts with `/`.
    pub fn encode_into(&self, skip: usize, out: &mut String) {
        let from = match skip {
            0 => 0,
            _ => self
                .text
                .match_indices('/')
                .nth(skip)
                .map_or(self.text.len(), |(at, _)| at),
        };
        let rest = &self.text[from..];
        let before = out.len();
        if rest.bytes().all(|b| b == b'/' || is_pchar(b)) {
            out.push_str(rest);
        } else {
            for segment in rest.split('/').skip(1) {
                out.push('/');
                encode_segment(segment, out);
            }
        }
        if out.len() == before || self.trailing_slash {
            out.push('/');
        }
    }
}

/// The segments of a [`NormalizedPath`]: each follows a `/` in its text. A byte loop,
/// as segments are short (a `str::split` costs more to set up than to run here).
#[derive(Clone)]
pub struct Segments<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.rest.strip_prefix('/')?;
        let end = rest.bytes().position(|b| b == b'/').unwrap_or(rest.len());
        let (segment, after) = rest.split_at(end);
        self.rest = after;
        Some(segment)
    }
}

/// Bytes a segment may carry unescaped ([`is_pchar`]), in a table: asked once per byte
/// of every request path.
const PCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
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
            );
        b += 1;
    }
    table
};

/// A byte the plain parse keeps as it is: a [`PCHAR`] other than `;`.
fn is_plain(b: u8) -> bool {
    PCHAR[b as usize] && b != b';'
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends `piece` percent-decoded to `out`.
fn decode(piece: &str, out: &mut Vec<u8>) -> Result<(), PathError> {
    if !piece.contains(['%', '\\']) {
        if piece.contains('\0') {
            return Err(PathError::BadBytes);
        }
        out.extend_from_slice(piece.as_bytes());
        return Ok(());
    }
    let bytes = piece.as_bytes();
    let start = out.len();
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
    // Checked per segment: a segment that is not UTF-8 is refused even when a later `..`
    // would remove it.
    match std::str::from_utf8(&out[start..]) {
        Ok(_) => Ok(()),
        Err(_) => Err(PathError::BadBytes),
    }
}

/// Characters a path segment may carry unescaped (RFC 3986 `pchar` less `%`).
fn is_pchar(b: u8) -> bool {
    PCHAR[b as usize]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_parse_agrees_with_the_full_one() {
        let paths = [
            "/",
            "/a",
            "/a/",
            "/a/b",
            "/a/b/",
            "/api/v1/workflows/42",
            "/a.b/c~d/e-f_g",
            "/a:b@c/!$&'()*+,=",
            "//",
            "/a//b",
            "/a/./b",
            "/a/../b",
            "/..",
            "/.",
            "/a/.",
            "/a/..",
            "/a/.../b",
            "/%61",
            "/a%2Fb",
            "/a;b",
            "/a\\b",
            "/a\0b",
            "/é",
            "/a b",
            "a",
            "",
            "/a?b",
            "/a#b",
            "/.a/b.",
            "/a/b//",
        ];
        let mut plain = 0;
        for raw in paths {
            let full = NormalizedPath::parse_any(raw);
            if let Some(fast) = NormalizedPath::parse_plain(raw) {
                plain += 1;
                assert_eq!(Ok(&fast), full.as_ref(), "{raw:?}");
            }
            assert_eq!(NormalizedPath::parse(raw), full, "{raw:?}");
        }
        assert_eq!(plain, 10, "the plain paths take the one-pass parse");
    }

    #[test]
    fn segments_split_at_each_slash() {
        let path = NormalizedPath::parse("/a/bc/d/").unwrap();
        assert_eq!(path.segments().collect::<Vec<_>>(), ["a", "bc", "d"]);
        assert_eq!(path.len(), 3);
        let root = NormalizedPath::parse("/").unwrap();
        assert_eq!(root.segments().count(), 0);
    }

    #[test]
    fn the_pchar_table_is_rfc_3986_less_percent() {
        let allowed: Vec<u8> = (0..=255u8).filter(|&b| is_pchar(b)).collect();
        let expected: Vec<u8> = (0..=255u8)
            .filter(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(b))
            .collect();
        assert_eq!(allowed, expected);
    }
}
