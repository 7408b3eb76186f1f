//! PROXY protocol v1 (text) and v2 (binary) headers, read before anything else on a
//! `listen.proxy_protocol` listener. Only the header's bytes are read, so the stream can
//! be handed on untouched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (spec §2.1).
const V1_MAX: usize = 107;
/// The largest v2 payload accepted: addresses plus generous TLVs. The spec allows 64 KiB,
/// but nothing a load balancer sends comes near this.
const V2_MAX_PAYLOAD: usize = 4096;

/// A malformed or missing PROXY header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// Reading failed or the peer closed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a PROXY header.
    #[error("not a PROXY protocol header")]
    Missing,
    /// A PROXY header that breaks the specification.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

/// Reads one PROXY header. `Ok(None)`: a valid header that carries no client address
/// (`UNKNOWN`, `LOCAL`, or a non-IP family); the socket peer stands.
pub async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut start = [0u8; 12];
    stream.read_exact(&mut start[..6]).await?;
    if &start[..6] == b"PROXY " {
        return read_v1(stream).await;
    }
    if start[..6] != V2_SIGNATURE[..6] {
        return Err(ProxyHeaderError::Missing);
    }
    stream.read_exact(&mut start[6..]).await?;
    if start != V2_SIGNATURE {
        return Err(ProxyHeaderError::Missing);
    }
    read_v2(stream).await
}

async fn read_v1<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // Byte by byte, so that nothing past the CRLF is consumed; at most ~100 reads, once
    // per connection.
    let mut line = Vec::with_capacity(V1_MAX);
    line.extend_from_slice(b"PROXY ");
    loop {
        let byte = stream.read_u8().await?;
        line.push(byte);
        if line.ends_with(b"\r\n") {
            break;
        }
        if line.len() >= V1_MAX {
            return Err(ProxyHeaderError::Malformed("v1 line too long"));
        }
    }
    let text = std::str::from_utf8(&line[6..line.len() - 2])
        .map_err(|_| ProxyHeaderError::Malformed("v1 line is not text"))?;
    parse_v1(text)
}

/// Parses the part of a v1 line after `PROXY `.
pub fn parse_v1(text: &str) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.first().copied() {
        Some("UNKNOWN") => return Ok(None),
        Some("TCP4") | Some("TCP6") if fields.len() == 5 => {}
        _ => {
            return Err(ProxyHeaderError::Malformed(
                "v1 needs TCP4/TCP6 and four fields",
            ))
        }
    }
    let ip: IpAddr = fields[1]
        .parse()
        .map_err(|_| ProxyHeaderError::Malformed("v1 source address"))?;
    let _destination: IpAddr = fields[2]
        .parse()
        .map_err(|_| ProxyHeaderError::Malformed("v1 destination address"))?;
    let port: u16 = fields[3]
        .parse()
        .map_err(|_| ProxyHeaderError::Malformed("v1 source port"))?;
    let family_fits = matches!(
        (fields[0], ip),
        ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_))
    );
    if !family_fits {
        return Err(ProxyHeaderError::Malformed("v1 address family mismatch"));
    }
    Ok(Some(SocketAddr::new(ip, port)))
}

async fn read_v2<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut fixed = [0u8; 4];
    stream.read_exact(&mut fixed).await?;
    let (version_command, family) = (fixed[0], fixed[1]);
    let length = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    if version_command >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("v2 version"));
    }
    if length > V2_MAX_PAYLOAD {
        return Err(ProxyHeaderError::Malformed("v2 payload too large"));
    }
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await?;
    match version_command & 0x0f {
        0 => return Ok(None), // LOCAL: health checks of the balancer itself
        1 => {}
        _ => return Err(ProxyHeaderError::Malformed("v2 command")),
    }
    parse_v2_addresses(family, &payload)
}

/// Extracts the source address of a v2 PROXY payload.
pub fn parse_v2_addresses(
    family: u8,
    payload: &[u8],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let short = ProxyHeaderError::Malformed("v2 address block too short");
    match family >> 4 {
        1 => {
            let b = payload.get(..12).ok_or(short)?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = u16::from_be_bytes([b[8], b[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        2 => {
            let b = payload.get(..36).ok_or(short)?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[..16]);
            let port = u16::from_be_bytes([b[32], b[33]]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port,
            )))
        }
        // AF_UNSPEC or AF_UNIX: no IP address to believe.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut cursor = std::io::Cursor::new(bytes.to_vec());
        let result = read_header(&mut cursor).await;
        let position = cursor.position() as usize;
        (result, bytes[position..].to_vec())
    }

    #[tokio::test]
    async fn v1_tcp4_leaves_the_rest_of_the_stream() {
        let (result, rest) =
            read(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n").await;
        assert_eq!(result.unwrap(), Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn v1_tcp6_and_unknown() {
        let (result, _) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 1000 443\r\n").await;
        assert_eq!(result.unwrap(), Some("[2001:db8::1]:1000".parse().unwrap()));
        let (result, _) = read(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(result.unwrap(), None);
    }

    #[tokio::test]
    async fn v1_rejects_garbage() {
        for bad in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n"[..],
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 nope 10.0.0.1 1 2\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                read(bad).await.0.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"PROXY ".as_slice(), &[b'A'; 200]].concat();
        assert!(read(&long).await.0.is_err());
    }

    fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.push(0x20 | command);
        bytes.push(family);
        bytes.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    #[tokio::test]
    async fn v2_inet_inet6_local() {
        let mut payload = vec![198, 51, 100, 9, 10, 0, 0, 1];
        payload.extend_from_slice(&4000u16.to_be_bytes());
        payload.extend_from_slice(&443u16.to_be_bytes());
        let mut bytes = v2(1, 0x11, &payload);
        bytes.extend_from_slice(b"rest");
        let (result, rest) = read(&bytes).await;
        assert_eq!(result.unwrap(), Some("198.51.100.9:4000".parse().unwrap()));
        assert_eq!(rest, b"rest");

        let mut payload = Ipv6Addr::LOCALHOST.octets().to_vec();
        payload.extend_from_slice(&[0u8; 16]);
        payload.extend_from_slice(&[0, 80, 1, 187]);
        let (result, _) = read(&v2(1, 0x21, &payload)).await;
        assert_eq!(result.unwrap(), Some("[::1]:80".parse().unwrap()));

        let (result, _) = read(&v2(0, 0x00, &[])).await;
        assert_eq!(result.unwrap(), None);
    }

    #[tokio::test]
    async fn v2_rejects_short_or_oversized_payloads() {
        assert!(read(&v2(1, 0x11, &[1, 2, 3])).await.0.is_err());
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(read(&bytes).await.0.is_err());
    }
}
