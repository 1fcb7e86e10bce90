//! A request body the own HTTP/1 loop reads from the client while the
//! upstream takes it: a `Content-Length` body too large to take whole
//! ([`super::fast::MAX_BODY`]) or not all there with its head.
//!
//! One slot between the loop ([`Feed`], the sending side) and whatever
//! polls the body ([`Streamed`], inside the request): the loop puts the
//! body's next bytes in the slot only when it is empty, so at most one
//! slot's worth waits besides the loop's read buffer, and a reader that
//! stops reading stops the loop reading the client (hyper's body channel
//! does the same with its `want` signal). The slot is shared across tasks:
//! hyper's upstream client polls the body from its connection's task.
//!
//! The body ends when its length has been taken. If the loop stops before
//! that (the client closed, or the answer was ready first), the reader's
//! next poll gets [`Incomplete`], never a short body that looks whole.
//!
//! A request that said `Expect: 100-continue` gets its `100 Continue` when
//! the reader first asks for the body, as from hyper's server: the loop
//! waits for that ([`Feed::poll_wanted`]) before it feeds any of the body,
//! so a request denied before its body is wanted gets no `100`, and its
//! client need not send the body at all.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

/// A streamed body that ended before its length: the client went away
/// mid-body, or the answer came first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incomplete;

impl std::fmt::Display for Incomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body ended before its length")
    }
}

impl std::error::Error for Incomplete {}

#[derive(Default)]
struct State {
    /// The next bytes, put by the loop, taken by the reader.
    data: Option<Bytes>,
    /// The loop stopped before the length was sent.
    failed: bool,
    /// The reader was dropped.
    reader_gone: bool,
    /// The reader has asked for the body, or need not be waited for (no
    /// `100 Continue` is owed): no wake-up for every streamed body.
    wanted: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// The reader, waiting for bytes.
    reader: AtomicWaker,
    /// The loop, waiting for room.
    feeder: AtomicWaker,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it, and each change is whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A body of `len` bytes: the loop's side and the request's. `expects`:
/// the client waits for `100 Continue` before it sends the body.
pub(crate) fn channel(len: u64, expects: bool) -> (Feed, Streamed) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            wanted: !expects,
            ..State::default()
        }),
        ..Shared::default()
    });
    (
        Feed {
            shared: shared.clone(),
            left: len,
            expects,
        },
        Streamed { shared, left: len },
    )
}

/// The request's side: a body of a known length.
pub struct Streamed {
    shared: Arc<Shared>,
    /// Bytes not yet taken.
    left: u64,
}

impl Streamed {
    /// Bytes of the body not yet taken.
    pub fn left(&self) -> u64 {
        self.left
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = Incomplete;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Incomplete>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        // Registered before looking, so bytes put after the look wake it.
        self.shared.reader.register(cx.waker());
        let mut state = self.shared.lock();
        if !state.wanted {
            state.wanted = true;
            self.shared.feeder.wake();
        }
        if let Some(data) = state.data.take() {
            drop(state);
            self.shared.feeder.wake();
            // The loop never puts more than is left.
            self.left = self.left.saturating_sub(data.len() as u64);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if state.failed {
            return Poll::Ready(Some(Err(Incomplete)));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        self.shared.lock().reader_gone = true;
        self.shared.feeder.wake();
    }
}

/// What [`Feed::poll_put`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Put {
    /// Moved this many bytes from the buffer to the reader.
    Moved(usize),
    /// The slot is full; the loop is woken when it empties.
    Full,
    /// The reader is gone: nothing more is wanted.
    ReaderGone,
}

/// The loop's side.
pub struct Feed {
    shared: Arc<Shared>,
    /// Bytes of the body not yet read from the client.
    left: u64,
    /// `100 Continue` is owed before the body: not yet sent.
    expects: bool,
}

impl Feed {
    /// Whether the client still waits for `100 Continue` (see
    /// [`Feed::poll_wanted`] and [`Feed::continued`]).
    pub(crate) fn expects(&self) -> bool {
        self.expects
    }

    /// Ready once the reader has asked for the body; until then the loop
    /// is woken when it does.
    pub(crate) fn poll_wanted(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.shared.feeder.register(cx.waker());
        if self.shared.lock().wanted {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// `100 Continue` was sent: the body may be fed.
    pub(crate) fn continued(&mut self) {
        self.expects = false;
    }

    /// Bytes of the body still to come from the client.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// Bytes still to come, but no more than `most`.
    pub(crate) fn left_up_to(&self, most: usize) -> usize {
        usize::try_from(self.left).map_or(most, |left| left.min(most))
    }

    /// Move the body's bytes at the front of `buf` (no more than are left)
    /// to the reader if the slot is empty.
    pub(crate) fn poll_put(&mut self, buf: &mut BytesMut, cx: &mut Context<'_>) -> Put {
        self.shared.feeder.register(cx.waker());
        let mut state = self.shared.lock();
        if state.reader_gone {
            return Put::ReaderGone;
        }
        if state.data.is_some() {
            return Put::Full;
        }
        let n = self.left_up_to(buf.len());
        if n == 0 {
            return Put::Moved(0);
        }
        state.data = Some(buf.split_to(n).freeze());
        drop(state);
        self.left -= n as u64;
        self.shared.reader.wake();
        Put::Moved(n)
    }

    /// Give up feeding the reader: if it reads again, it gets
    /// [`Incomplete`] (unless the body was all sent).
    pub(crate) fn stop(&mut self) {
        if self.left > 0 {
            self.shared.lock().failed = true;
            self.shared.reader.wake();
        }
    }

    /// Drop the body's bytes at the front of `buf` (no more than are
    /// left), unread: the reader stopped wanting them.
    pub(crate) fn skip(&mut self, buf: &mut BytesMut) {
        let n = self.left_up_to(buf.len());
        bytes::Buf::advance(buf, n);
        self.left -= n as u64;
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use http_body_util::BodyExt;
    use std::pin::Pin;

    fn cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    #[tokio::test]
    async fn the_body_comes_through_in_order_and_ends_at_its_length() {
        let (mut feed, body) = channel(10, false);
        let reader = tokio::spawn(body.collect());
        let mut buf = BytesMut::from(&b"hello"[..]);
        assert_eq!(feed.poll_put(&mut buf, &mut cx()), Put::Moved(5));
        // One slot: full until the reader takes it.
        let mut more = BytesMut::from(&b"world, and the next request"[..]);
        while feed.poll_put(&mut more, &mut cx()) == Put::Full {
            tokio::task::yield_now().await;
        }
        // No more than the length is taken from the buffer.
        assert_eq!(&more[..], b", and the next request");
        assert_eq!(feed.left(), 0);
        let got = reader.await.unwrap().expect("whole").to_bytes();
        assert_eq!(&got[..], b"helloworld");
        drop(feed);
    }

    #[tokio::test]
    async fn a_feed_that_stops_short_is_an_error_not_an_end() {
        let (mut feed, mut body) = channel(10, false);
        let mut buf = BytesMut::from(&b"hello"[..]);
        assert_eq!(feed.poll_put(&mut buf, &mut cx()), Put::Moved(5));
        drop(feed);
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"hello"));
        assert!(matches!(body.frame().await, Some(Err(Incomplete))));
        assert!(!body.is_end_stream());
    }

    #[test]
    fn the_feed_learns_that_the_reader_is_gone() {
        let (mut feed, body) = channel(10, false);
        let mut buf = BytesMut::from(&b"hello"[..]);
        drop(body);
        assert_eq!(feed.poll_put(&mut buf, &mut cx()), Put::ReaderGone);
        assert_eq!(&buf[..], b"hello");
        feed.skip(&mut buf);
        assert_eq!((feed.left(), buf.len()), (5, 0));
    }

    #[tokio::test]
    async fn the_loop_learns_when_the_body_is_first_wanted() {
        let (mut feed, mut body) = channel(5, true);
        assert!(feed.expects());
        assert_eq!(feed.poll_wanted(&mut cx()), Poll::Pending);
        // The first poll asks for it, with nothing there yet.
        assert!(matches!(
            Pin::new(&mut body).poll_frame(&mut cx()),
            Poll::Pending
        ));
        assert_eq!(feed.poll_wanted(&mut cx()), Poll::Ready(()));
        feed.continued();
        assert!(!feed.expects());
        let mut buf = BytesMut::from(&b"hello"[..]);
        assert_eq!(feed.poll_put(&mut buf, &mut cx()), Put::Moved(5));
        let got = body.collect().await.expect("whole").to_bytes();
        assert_eq!(&got[..], b"hello");
        // With no 100 owed the body counts as wanted from the start, so a
        // reader's first poll does not wake the loop for nothing.
        let (mut feed, _body) = channel(5, false);
        assert!(!feed.expects());
        assert_eq!(feed.poll_wanted(&mut cx()), Poll::Ready(()));
    }

    #[test]
    fn an_incomplete_body_says_what_happened() {
        assert_eq!(
            Incomplete.to_string(),
            "the request body ended before its length"
        );
    }

    #[test]
    fn the_length_is_the_size_hint() {
        let (_feed, body) = channel(70_000, false);
        assert_eq!(body.size_hint().exact(), Some(70_000));
        assert!(!body.is_end_stream());
        let (_feed, body) = channel(0, false);
        assert!(body.is_end_stream());
    }
}
