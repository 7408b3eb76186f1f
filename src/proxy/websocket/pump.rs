//! The byte pump of a relayed WebSocket: what one side sends goes to the other as it was
//! read, frame headers followed on the way ([`Frames`]). Reads land in one buffer per
//! worker thread, used only within a poll; a connection holds bytes of its own only while
//! the receiving side is slower than the sending one. An idle relay holds no buffer.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::frames::{Frames, Stop, MAX_HEADER};

/// Bytes read at most per read. Large messages go through in reads of this size.
const READ_SIZE: usize = 16 * 1024;
/// Reads one direction does per poll before letting the other side and other tasks go.
const READS_PER_POLL: usize = 16;

thread_local! {
    /// The worker's read buffer: room for held-back header bytes, then one read.
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_HEADER + READ_SIZE].into());
}

/// How a direction came to a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A frame rule stopped it (after everything before the frame went on).
    Frames(Stop),
    /// The sending side closed its connection.
    Ended,
    /// Reading or writing failed.
    Failed,
}

/// One direction: what it has read and not yet written, and its frame state.
pub struct Direction {
    /// The frame state of the sending side.
    pub frames: Frames,
    /// Read and not yet taken by the receiving side; empty (and unallocated) unless the
    /// receiving side fell behind.
    pending: Vec<u8>,
    written: usize,
    /// A flush is owed to the receiving side.
    flush: bool,
    /// How the direction stopped, told once its last bytes are written.
    stopped: Option<Event>,
    reported: bool,
    /// Data messages passed on.
    pub messages: u64,
    counter: IntCounter,
}

impl Direction {
    /// A direction whose sender's frames are (or are not) masked, counted on `counter`.
    pub fn new(masked: bool, max_message: u64, counter: IntCounter) -> Self {
        Direction {
            frames: Frames::new(masked, max_message),
            pending: Vec::new(),
            written: 0,
            flush: false,
            stopped: None,
            reported: false,
            messages: 0,
            counter,
        }
    }

    /// Moves bytes from `from` to `to` until neither can go on now (`Pending`) or the
    /// direction stops (`Ready`, once). `activity` is set at every read.
    pub fn poll_pump<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        activity: &mut Instant,
    ) -> Poll<Event>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.reported {
            return Poll::Pending;
        }
        for _ in 0..READS_PER_POLL {
            if let Err(()) = ready!(self.poll_drain(cx, to)) {
                return self.report(Event::Failed);
            }
            if let Some(event) = self.stopped {
                return self.report(event);
            }
            match ready!(self.poll_read_through(cx, from, to)) {
                Ok(true) => *activity = Instant::now(),
                Ok(false) => self.stopped = Some(Event::Ended),
                Err(()) => self.stopped = Some(Event::Failed),
            }
        }
        // A busy sender: the rest after the other side and other tasks had a turn.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes out what is pending and flushes.
    pub fn poll_drain<W>(&mut self, cx: &mut Context<'_>, to: &mut W) -> Poll<Result<(), ()>>
    where
        W: AsyncWrite + Unpin,
    {
        while self.written < self.pending.len() {
            match ready!(Pin::new(&mut *to).poll_write(cx, &self.pending[self.written..])) {
                Ok(0) | Err(_) => return Poll::Ready(Err(())),
                Ok(n) => self.written += n,
            }
        }
        if !self.pending.is_empty() {
            // Given back: an idle connection keeps no buffer.
            self.pending = Vec::new();
            self.written = 0;
        }
        if self.flush {
            if ready!(Pin::new(&mut *to).poll_flush(cx)).is_err() {
                return Poll::Ready(Err(()));
            }
            self.flush = false;
        }
        Poll::Ready(Ok(()))
    }

    /// One read from `from`, its frames followed and what may go on written to `to`
    /// (the part `to` does not take at once is kept). `Ok(false)`: `from` ended.
    fn poll_read_through<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<Result<bool, ()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        BUFFER.with(|buffer| match buffer.try_borrow_mut() {
            Ok(mut buffer) => self.read_through(cx, &mut buffer, from, to),
            // Never expected (a poll does not nest in another); a buffer of its own then.
            Err(_) => self.read_through(cx, &mut vec![0; MAX_HEADER + READ_SIZE], from, to),
        })
    }

    fn read_through<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        buffer: &mut [u8],
        from: &mut R,
        to: &mut W,
    ) -> Poll<Result<bool, ()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let held = self.frames.held().len();
        buffer[..held].copy_from_slice(self.frames.held());
        let mut read = ReadBuf::new(&mut buffer[held..]);
        if ready!(Pin::new(from).poll_read(cx, &mut read)).is_err() {
            return Poll::Ready(Err(()));
        }
        let got = read.filled().len();
        if got == 0 {
            return Poll::Ready(Ok(false));
        }
        let input = &buffer[..held + got];
        let fed = self.frames.feed(input);
        if fed.messages > 0 {
            self.messages += fed.messages;
            self.counter.inc_by(fed.messages);
        }
        if let Some(stop) = fed.stop {
            self.stopped = Some(Event::Frames(stop));
        }
        let mut out = &input[..fed.forward];
        while !out.is_empty() {
            match Pin::new(&mut *to).poll_write(cx, out) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
                Poll::Ready(Ok(n)) => out = &out[n..],
                Poll::Pending => {
                    self.pending.extend_from_slice(out);
                    break;
                }
            }
        }
        self.flush |= fed.forward > 0;
        Poll::Ready(Ok(true))
    }

    fn report(&mut self, event: Event) -> Poll<Event> {
        self.reported = true;
        Poll::Ready(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn counter() -> IntCounter {
        IntCounter::new("messages", "test").unwrap()
    }

    fn masked_text(payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![0x81, 0x80 | payload.len() as u8];
        out.extend(mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[tokio::test]
    async fn bytes_go_through_and_a_slow_reader_is_waited_for() {
        // The receiving pipe holds 64 bytes: most of each message waits as pending.
        let (mut sender, mut from) = tokio::io::duplex(1 << 16);
        let (mut to, mut receiver) = tokio::io::duplex(64);
        let counted = counter();
        let mut direction = Direction::new(true, 1 << 20, counted.clone());
        let mut input = Vec::new();
        for i in 0..50u8 {
            input.extend(masked_text(&[i; 100]));
        }
        sender.write_all(&input).await.unwrap();
        drop(sender);
        let pump = async {
            let mut activity = Instant::now();
            std::future::poll_fn(|cx| direction.poll_pump(cx, &mut from, &mut to, &mut activity))
                .await
        };
        let read = async {
            let mut out = vec![0; input.len()];
            receiver.read_exact(&mut out).await.unwrap();
            out
        };
        let (event, out) = tokio::join!(pump, read);
        assert_eq!(event, Event::Ended);
        assert_eq!(out, input);
        assert_eq!(counted.get(), 50);
        assert_eq!(direction.pending.capacity(), 0);
    }

    #[tokio::test]
    async fn a_stop_is_told_after_the_bytes_before_it_went_on() {
        let (mut sender, mut from) = tokio::io::duplex(1 << 16);
        let (mut to, mut receiver) = tokio::io::duplex(1 << 16);
        let mut direction = Direction::new(true, 1 << 20, counter());
        let good = masked_text(b"fine");
        let mut input = good.clone();
        input.extend([0x81, 0x05, b'n', b'o', b'm', b'a', b's']);
        sender.write_all(&input).await.unwrap();
        let mut activity = Instant::now();
        let event =
            std::future::poll_fn(|cx| direction.poll_pump(cx, &mut from, &mut to, &mut activity))
                .await;
        assert_eq!(event, Event::Frames(Stop::Invalid));
        drop(to);
        let mut out = Vec::new();
        receiver.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, good);
    }
}
