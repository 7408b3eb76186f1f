//! Frame boundaries of one relayed direction. The relay passes a side's bytes on as they
//! come, without reassembling messages; this follows the frame headers in them to count
//! messages, bound a message's size, see a close frame (and its code) pass, refuse what
//! breaks the protocol, and know when the stream towards the other side sits between two
//! frames — the only place the gateway can put a close frame of its own.

use std::io::Cursor;

use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

/// The longest frame header: 2 bytes, an 8-byte length and a 4-byte mask.
pub const MAX_HEADER: usize = 14;
/// The longest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: u64 = 125;

/// Why a direction stops passing bytes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A close frame passed, with its status code if it had one.
    Close(Option<u16>),
    /// The next frame would make its message larger than allowed; it was not passed on.
    TooBig,
    /// The next frame breaks the protocol; it was not passed on.
    Invalid,
}

/// What one chunk of input came to.
#[derive(Debug, PartialEq, Eq)]
pub struct Fed {
    /// How many of the chunk's bytes go on, from its start. The rest is either an
    /// incomplete frame header, held back (see [`Frames::held`]), or what came after a
    /// stop.
    pub forward: usize,
    /// Data messages completed in the chunk.
    pub messages: u64,
    /// Set when the direction must stop after the forwarded bytes.
    pub stop: Option<Stop>,
}

/// The frame state of one direction.
pub struct Frames {
    /// Whether this side's frames are masked: a client's always are, a server's never.
    masked: bool,
    max_message: u64,
    /// Payload bytes of the current frame still to come; `None` between frames.
    remaining: Option<u64>,
    /// The current frame is the last of a data message.
    ends_message: bool,
    /// The current frame is a close frame: its mask, and the payload's first two bytes
    /// as they arrive.
    close: Option<CloseCode>,
    /// Payload bytes of a fragmented data message under way.
    message: Option<u64>,
    /// The start of a frame header that has not all arrived yet, held back so that
    /// nothing of a frame goes on before its header has been checked.
    held: [u8; MAX_HEADER],
    held_len: u8,
}

struct CloseCode {
    mask: [u8; 4],
    seen: u8,
    code: [u8; 2],
}

impl Frames {
    /// The state of a direction whose frames must be masked (`masked`, frames from a
    /// client) or unmasked (from a server), with messages of at most `max_message` bytes.
    pub fn new(masked: bool, max_message: u64) -> Self {
        Frames {
            masked,
            max_message,
            remaining: None,
            ends_message: false,
            close: None,
            message: None,
            held: [0; MAX_HEADER],
            held_len: 0,
        }
    }

    /// The bytes held back from the last chunk: the caller puts them in front of the
    /// next one.
    pub fn held(&self) -> &[u8] {
        &self.held[..usize::from(self.held_len)]
    }

    /// Whether the bytes passed on so far end on a frame boundary.
    pub fn between_frames(&self) -> bool {
        self.remaining.is_none()
    }

    /// Follows `input` (the held bytes, then what was read) through its frames.
    pub fn feed(&mut self, input: &[u8]) -> Fed {
        self.held_len = 0;
        let mut fed = Fed {
            forward: 0,
            messages: 0,
            stop: None,
        };
        let mut at = 0;
        loop {
            if let Some(remaining) = self.remaining {
                let available = (input.len() - at) as u64;
                let take = remaining.min(available) as usize;
                if let Some(close) = &mut self.close {
                    close.observe(&input[at..at + take]);
                }
                at += take;
                if remaining > take as u64 {
                    self.remaining = Some(remaining - take as u64);
                    fed.forward = at;
                    return fed;
                }
                self.remaining = None;
                if std::mem::take(&mut self.ends_message) {
                    fed.messages += 1;
                }
                if let Some(close) = self.close.take() {
                    fed.forward = at;
                    fed.stop = Some(Stop::Close(close.code()));
                    return fed;
                }
            }
            if at == input.len() {
                fed.forward = at;
                return fed;
            }
            let mut cursor = Cursor::new(&input[at..]);
            let (header, length) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => {
                    // The header's start, held back until the rest of it arrives.
                    let rest = &input[at..];
                    self.held[..rest.len()].copy_from_slice(rest);
                    self.held_len = rest.len() as u8;
                    fed.forward = at;
                    return fed;
                }
                Err(_) => {
                    fed.forward = at;
                    fed.stop = Some(Stop::Invalid);
                    return fed;
                }
            };
            if let Err(stop) = self.begin(&header, length) {
                fed.forward = at;
                fed.stop = Some(stop);
                return fed;
            }
            at += cursor.position() as usize;
        }
    }

    /// Checks a frame's header and takes up its frame.
    fn begin(&mut self, header: &FrameHeader, length: u64) -> Result<(), Stop> {
        if header.rsv1 || header.rsv2 || header.rsv3 || header.mask.is_some() != self.masked {
            // No extension is ever negotiated through the gateway.
            return Err(Stop::Invalid);
        }
        match header.opcode {
            OpCode::Control(control) => {
                if !header.is_final || length > MAX_CONTROL {
                    return Err(Stop::Invalid);
                }
                match control {
                    Control::Close if length == 1 => return Err(Stop::Invalid),
                    Control::Close => {
                        self.close = Some(CloseCode {
                            mask: header.mask.unwrap_or_default(),
                            seen: 0,
                            code: [0; 2],
                        })
                    }
                    Control::Ping | Control::Pong => {}
                    Control::Reserved(_) => return Err(Stop::Invalid),
                }
            }
            OpCode::Data(data) => {
                let so_far = match (data, self.message) {
                    (Data::Continue, Some(so_far)) => so_far,
                    (Data::Text | Data::Binary, None) => 0,
                    _ => return Err(Stop::Invalid),
                };
                let total = so_far.saturating_add(length);
                if total > self.max_message {
                    return Err(Stop::TooBig);
                }
                self.message = (!header.is_final).then_some(total);
                self.ends_message = header.is_final;
            }
        }
        self.remaining = Some(length);
        Ok(())
    }
}

impl CloseCode {
    /// Takes in the next payload bytes of the close frame.
    fn observe(&mut self, payload: &[u8]) {
        for &byte in payload {
            if self.seen >= 2 {
                return;
            }
            let i = usize::from(self.seen);
            self.code[i] = byte ^ self.mask[i];
            self.seen += 1;
        }
    }

    fn code(&self) -> Option<u16> {
        (self.seen == 2).then(|| u16::from_be_bytes(self.code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a peer would send it.
    fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![first];
        let flag = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(flag | n as u8),
            n if n < 65536 => {
                out.push(flag | 126);
                out.extend((n as u16).to_be_bytes());
            }
            n => {
                out.push(flag | 127);
                out.extend((n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(mask) => {
                out.extend(mask);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            }
            None => out.extend(payload),
        }
        out
    }

    const TEXT: u8 = 0x81;
    const BINARY_START: u8 = 0x02;
    const CONTINUE: u8 = 0x00;
    const CONTINUE_END: u8 = 0x80;
    const CLOSE: u8 = 0x88;
    const PING: u8 = 0x89;
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    #[test]
    fn whole_messages_pass_and_are_counted() {
        let mut frames = Frames::new(false, 1 << 20);
        let mut input = frame(TEXT, b"hello", None);
        input.extend(frame(PING, b"", None));
        input.extend(frame(BINARY_START, &[1; 300], None));
        input.extend(frame(CONTINUE, &[2; 70_000], None));
        input.extend(frame(CONTINUE_END, b"", None));
        let fed = frames.feed(&input);
        assert_eq!(
            fed,
            Fed {
                forward: input.len(),
                messages: 2,
                stop: None
            }
        );
        assert!(frames.between_frames());
    }

    #[test]
    fn any_split_gives_the_same_stream_and_holds_back_only_partial_headers() {
        let mut input = frame(TEXT, &[b'a'; 200], Some(MASK));
        input.extend(frame(PING, b"p", Some(MASK)));
        input.extend(frame(BINARY_START, &[9; 70_000], Some(MASK)));
        input.extend(frame(CONTINUE_END, b"end", Some(MASK)));
        input.extend(frame(CLOSE, &[0x0f, 0xa1, b'b', b'y', b'e'], Some(MASK)));
        for split in [1, 2, 3, 7, 13, 100, 4096] {
            let mut frames = Frames::new(true, 1 << 20);
            let (mut out, mut messages, mut stop) = (Vec::new(), 0, None);
            for chunk in input.chunks(split) {
                let mut next = frames.held().to_vec();
                next.extend_from_slice(chunk);
                let fed = frames.feed(&next);
                assert!(next.len() - fed.forward < MAX_HEADER || fed.stop.is_some());
                out.extend_from_slice(&next[..fed.forward]);
                messages += fed.messages;
                if fed.stop.is_some() {
                    stop = fed.stop;
                    break;
                }
            }
            assert_eq!(out, input, "split {split}");
            assert_eq!(messages, 2, "split {split}");
            // 0x0fa1 = 4001, read through the mask.
            assert_eq!(stop, Some(Stop::Close(Some(4001))), "split {split}");
        }
    }

    #[test]
    fn a_partial_header_is_not_passed_on_and_mid_frame_is_not_a_boundary() {
        let mut frames = Frames::new(false, 1 << 20);
        let input = frame(BINARY_START | 0x80, &[0; 1000], None);
        let fed = frames.feed(&input[..3]);
        assert_eq!(fed.forward, 0);
        assert_eq!(frames.held(), &input[..3]);
        assert!(frames.between_frames());
        let mut next = frames.held().to_vec();
        next.extend_from_slice(&input[3..10]);
        let fed = frames.feed(&next);
        assert_eq!(fed.forward, next.len());
        assert!(!frames.between_frames());
        assert!(frames.held().is_empty());
    }

    #[test]
    fn messages_over_the_limit_stop_before_their_frame() {
        let mut frames = Frames::new(false, 1000);
        let mut input = frame(TEXT, &[1; 10], None);
        let first = input.len();
        input.extend(frame(TEXT, &[1; 1001], None));
        let fed = frames.feed(&input);
        assert_eq!((fed.forward, fed.stop), (first, Some(Stop::TooBig)));
        // Fragments count towards their message.
        let mut frames = Frames::new(false, 1000);
        let mut input = frame(BINARY_START, &[1; 600], None);
        let first = input.len();
        input.extend(frame(CONTINUE_END, &[1; 600], None));
        let fed = frames.feed(&input);
        assert_eq!((fed.forward, fed.stop), (first, Some(Stop::TooBig)));
    }

    #[test]
    fn protocol_breaches_stop_before_their_frame() {
        let cases: [(&str, bool, Vec<u8>); 8] = [
            ("unmasked from a client", true, frame(TEXT, b"x", None)),
            ("masked from a server", false, frame(TEXT, b"x", Some(MASK))),
            ("reserved bit", false, frame(TEXT | 0x40, b"x", None)),
            ("reserved opcode", false, frame(0x83, b"x", None)),
            ("fragmented control", false, frame(0x09, b"x", None)),
            ("long control", false, frame(PING, &[0; 126], None)),
            ("continuation first", false, frame(CONTINUE_END, b"x", None)),
            ("one-byte close", false, frame(CLOSE, b"x", None)),
        ];
        for (what, masked, bad) in cases {
            let mut frames = Frames::new(masked, 1 << 20);
            let mut input = frame(PING, b"", if masked { Some(MASK) } else { None });
            let good = input.len();
            input.extend(&bad);
            let fed = frames.feed(&input);
            assert_eq!(
                (fed.forward, fed.stop),
                (good, Some(Stop::Invalid)),
                "{what}"
            );
        }
        // A new message while a fragmented one is under way.
        let mut frames = Frames::new(false, 1 << 20);
        let mut input = frame(BINARY_START, b"a", None);
        let good = input.len();
        input.extend(frame(TEXT, b"b", None));
        let fed = frames.feed(&input);
        assert_eq!((fed.forward, fed.stop), (good, Some(Stop::Invalid)));
    }

    #[test]
    fn close_frames_give_their_code_or_none() {
        let mut frames = Frames::new(false, 100);
        let input = frame(CLOSE, b"", None);
        assert_eq!(frames.feed(&input).stop, Some(Stop::Close(None)));
        let mut frames = Frames::new(false, 100);
        let mut input = frame(CLOSE, &1000u16.to_be_bytes(), None);
        let end = input.len();
        input.extend(frame(TEXT, b"after the close", None));
        let fed = frames.feed(&input);
        assert_eq!(
            (fed.forward, fed.stop),
            (end, Some(Stop::Close(Some(1000))))
        );
    }
}
