//! The listener's own HTTP/1 loop for the common request: a head with no
//! body, or one framed by `Content-Length`, answered with a response it
//! can frame the way hyper's server would.
//!
//! hyper's server side was the largest cost left on the request path:
//! about 8.5k of 26.8k instructions a PAT request, running at about one
//! instruction a nanosecond (BENCHMARKS.md, sessions 12 and 13). This loop
//! parses heads with httparse (hyper's own parser, with the same default
//! configuration) and writes the response head and body in one write when
//! the body is ready at once.
//!
//! It serves a request only when every one of these holds, and otherwise
//! gives the whole connection to hyper, with the bytes it has read and not
//! used (see [`Next::Handoff`]), and never takes it back:
//! - the head parses completely, within `max_header_bytes`, with at most
//!   [`MAX_HEADERS`] fields, as HTTP/1.1 or HTTP/1.0;
//! - the method is not `CONNECT`, and the target is
//!   origin-form (starts with `/`) and no longer than hyper allows;
//! - there is no `Transfer-Encoding`, `Upgrade` or `TE` field, no
//!   `Expect` but one `100-continue`, and no `Connection` other than one
//!   `keep-alive` or one `close`: nothing that frames a body in chunks,
//!   changes the connection, or lets a client ask for trailers (that one
//!   `Connection` field is the loop's: being hop-by-hop, it is not passed
//!   on in the request);
//! - there is at most one `Content-Length`, all digits;
//! - every name and value is one `http` accepts, and the target is a `Uri`.
//!
//! A body of at most [`MAX_BODY`] bytes that is all in the read buffer once
//! the socket's ready bytes are read is the buffer's own bytes, shared, not
//! copied. Any other (larger, or not all there) is streamed: the request
//! goes on at once and the loop hands the body's bytes to its reader as
//! they come and as it takes them ([`super::streamed`]), never waiting for
//! the whole (SPEC §7). An answer that comes first (a denial, an upstream
//! that answers early) stops the feeding: the reader, if still reading,
//! gets an error, and after the answer the rest is dropped from what is at
//! hand, without waiting; if that is not all of it, the connection ends,
//! as hyper's `poll_drain_or_close_read` ends it, so no byte of a body is
//! ever read as a request.
//!
//! A body whose head says `Expect: 100-continue` (HTTP/1.1, a non-empty
//! body) is always streamed, and `100 Continue` is written when its reader
//! first asks for it, as hyper's server writes it: a request denied before
//! then gets its answer alone, and the body the client may not have sent
//! is dropped as above.
//!
//! Anything else (a chunked body, HTTP/2's preface, a malformed head, a
//! head over the limit, a client that closed mid-head) is hyper's to
//! answer, exactly as before, because hyper then reads exactly the bytes it
//! would have read from the socket. `tests/fast_h1.rs` checks the two paths
//! answer alike, byte for byte but for `date` and the request id, and for
//! one difference: after this loop served an HTTP/1.0 request, hyper, new
//! to the connection, answers a head it cannot parse with `HTTP/1.1` and
//! `connection: close`, where hyper that had served the HTTP/1.0 request
//! answers `HTTP/1.0` (its `enforce_version` keeps the last request's
//! version). Either way the client gets the same status and the close.
//!
//! What it keeps of hyper's behaviour, by reading hyper 1.x's
//! `proto/h1/role.rs` (`Server::encode`):
//! - the status line (`200 OK` for the usual case, a custom reason phrase
//!   when the response carries one; `HTTP/1.0` to an HTTP/1.0 request,
//!   with `connection: keep-alive` when the connection is kept);
//! - the response framing: an ended body gets `content-length: 0` (none on
//!   204 and 304), and any `Content-Length` header of such a response is
//!   dropped; a body of known size gets it; a `Content-Length` header is
//!   trusted and written once; a body of unknown size is chunked, or to
//!   HTTP/1.0 written as it comes and ended by closing; 204 and 304 never
//!   carry a body; after HEAD no body is written, a `Content-Length` field
//!   is kept even for an ended body, and none is made up for one;
//! - a `date` field when the response has none (cached per second);
//! - a request or a response with `Connection: close` ends the connection
//!   after the response, and a response that ends it (for the request, or
//!   because the gateway is draining) says `connection: close`, as hyper's
//!   `enforce_version` adds it;
//! - a body that fails, or ends short of its length, ends the connection
//!   without the chunked terminator, so the client sees an incomplete
//!   answer and never a complete wrong one;
//! - reading goes on while a request is in progress: a client that closes
//!   its end cancels the request, as with hyper (no half-close), mid-body
//!   too;
//! - the clock's verdicts (`Activity`): a head that does not arrive in
//!   time closes at once; idle or drain finishes the response in progress
//!   and closes.
//!
//! Where it is stricter: a response that would need hyper to guess (an
//! informational status as the final answer, `Transfer-Encoding` or
//! `Trailer` in a response, or two different lengths) closes the
//! connection without an answer; hyper errors in those cases too. The
//! gateway never produces them: it strips hop-by-hop fields from upstream
//! answers and both upstream clients handle 1xx themselves.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::streamed::{Feed, Put};
use super::{ActiveGuard, Activity, KEEP};
use crate::proxy::{Gateway, Peer, RequestBody, ResponseBody};

/// Header fields a head may have here; more goes to hyper (which allows
/// 100, and answers 431 beyond).
const MAX_HEADERS: usize = 100;
/// hyper's limit on a request target (`proto/h1/role.rs`, `MAX_URI_LEN`).
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;
/// The size of a connection's first read (see [`make_room`]).
const FIRST_READ: usize = 1024;
/// The response buffer's first size: a usual head and a small body.
const FIRST_OUT: usize = 1024;
/// The largest request body the loop takes whole (see [`Parsed::Body`]);
/// larger ones are streamed ([`Parsed::Stream`]).
pub const MAX_BODY: usize = 16 * 1024;
/// The most of a streamed request body read at once (see [`watching`]):
/// fewer, larger reads against the memory each upload holds.
const BODY_READ: usize = 32 * 1024;
/// Response bytes gathered before a write even while the body has more
/// ready at once.
const FLUSH_AT: usize = 64 * 1024;

/// How the loop ended.
pub(super) enum Next {
    /// The connection is finished (closed by either side, or broken).
    Close,
    /// The rest of the connection is hyper's, starting with these bytes:
    /// a head this loop does not serve, in part or whole, and whatever the
    /// client sent after it.
    Handoff(Bytes),
}

/// A head this loop serves, or why not.
// Moved once a request; boxing the request would allocate for every one.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// The loop serves it; its bytes were taken from the buffer.
    Request(Request<RequestBody>),
    /// The loop serves it, and reads its body from the client as the
    /// request takes it, through the [`Feed`]: a `Content-Length` body over
    /// [`MAX_BODY`] bytes, one not all there with its head, or one whose
    /// head says `Expect: 100-continue`. The head was taken from the
    /// buffer; the body's first bytes, if any, are next.
    Stream(Request<RequestBody>, Feed),
    /// More bytes are needed; the buffer is untouched.
    Partial,
    /// The head is complete and one this loop serves, with a
    /// `Content-Length` body of at most [`MAX_BODY`] bytes, but the body is
    /// not all in the buffer: it needs this many bytes from its start, head
    /// included. The buffer is untouched. The loop takes what the socket
    /// has ready without waiting and parses again; a body still short is
    /// then streamed ([`Parsed::Stream`]).
    Body(usize),
    /// hyper's to answer; the buffer is untouched.
    NotMine,
}

/// [`parse`] on its own, for the property tests and the fuzz target
/// (tests/properties/mod.rs): what the loop makes of the head at the start
/// of `buf`.
#[doc(hidden)]
pub fn parse_head(buf: &mut BytesMut, max_head: usize) -> Parsed {
    let mut scratch = Scratch::default();
    parse(buf, max_head, false, &mut scratch)
}

/// Per-connection state kept between requests, so a request allocates
/// nothing here once the connection is warm (and nothing before its first
/// request: every part starts empty).
#[derive(Default)]
struct Scratch {
    /// Names and value ranges of the head being built.
    fields: Vec<(HeaderName, usize, usize)>,
    /// The previous response's header map, cleared: its capacity holds the
    /// next request's fields (hyper does the same).
    spare: HeaderMap,
    /// The response being written.
    out: Vec<u8>,
    /// The head last parsed said `Connection: close` (read from its field
    /// while parsing: looking it up again in the map cost 84 instructions
    /// a request).
    closes: bool,
    date: DateCache,
}

/// The most [`Scratch`]es a thread keeps for its next connections.
const SPARES: usize = 16;
/// The most field entries (in `fields`, and in `spare`'s capacity) and
/// response bytes (`out`) a [`Scratch`] may hold to be kept: one a large
/// answer grew is let go.
const SPARE_FIELDS: usize = 64;
const SPARE_OUT: usize = 16 * 1024;

thread_local! {
    /// Scratches that connections ended on this thread left, cleared.
    static SPARE_SCRATCH: RefCell<Vec<Scratch>> = const { RefCell::new(Vec::new()) };
}

/// A connection's [`Scratch`], taken at its first request from those
/// connections on the same thread left, and left for the next when it
/// ends. A client that opens a connection for each request then costs no
/// allocation here (four, growing from empty: sg-close 1.2% of its
/// instructions), and an upstream that sends no `Date` no date formatted
/// for each connection (once a second instead). An idle connection holds
/// an empty one, as before.
#[derive(Default)]
struct Pooled(Scratch);

impl Pooled {
    /// A head is about to be parsed: take a spare if this one is empty.
    fn ready(&mut self) {
        if self.0.fields.capacity() == 0
            && let Ok(Some(spare)) = SPARE_SCRATCH.try_with(|s| s.try_borrow_mut().ok()?.pop())
        {
            self.0 = spare;
        }
    }
}

impl std::ops::Deref for Pooled {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        &self.0
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Scratch {
        &mut self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let s = &mut self.0;
        if s.fields.capacity() == 0
            || s.fields.capacity() > SPARE_FIELDS
            || s.spare.capacity() > SPARE_FIELDS
            || s.out.capacity() > SPARE_OUT
        {
            return;
        }
        s.fields.clear();
        s.spare.clear();
        s.out.clear();
        s.closes = false;
        let s = std::mem::take(s);
        // At thread exit the list may be gone: the scratch is just freed.
        let _ = SPARE_SCRATCH.try_with(|spares| {
            if let Ok(mut spares) = spares.try_borrow_mut()
                && spares.len() < SPARES
            {
                spares.push(s);
            }
        });
    }
}

/// Serve requests on `io` until the connection ends or a request is not
/// this loop's to serve. `max_head` is hyper's `max_buf_size` on the same
/// connection.
pub(super) async fn serve<T>(
    io: &mut T,
    gw: &Gateway,
    peer: &Peer,
    activity: &Arc<Activity>,
    max_head: usize,
) -> Next
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut served = Served { gw, n: 0 };
    let mut buf = BytesMut::new();
    // Nothing but the read buffer is allocated before the first request:
    // an idle connection costs what it costs hyper.
    let mut scratch = Pooled::default();
    loop {
        // The next head, from what is buffered and then from the socket.
        // A small body not all there is looked for among the bytes the
        // socket has ready, and streamed if still short (`late`).
        let mut late = false;
        let (req, mut feed) = loop {
            if !buf.is_empty() {
                scratch.ready();
                match parse(&mut buf, max_head, late, &mut scratch) {
                    Parsed::Request(req) => break (req, None),
                    Parsed::Stream(req, feed) => break (req, Some(feed)),
                    Parsed::NotMine => return Next::Handoff(buf.freeze()),
                    Parsed::Partial => {}
                    Parsed::Body(whole) => {
                        late = !read_ready(io, &mut buf, whole).await;
                        continue;
                    }
                }
            }
            if buf.len() >= max_head {
                // hyper answers 431.
                return Next::Handoff(buf.freeze());
            }
            make_room(&mut buf);
            let mut read = pin!(io.read_buf(&mut buf));
            // The clock's verdict is looked at on every wake-up: the
            // connection task is woken when it changes.
            let got = poll_fn(|cx| {
                if activity.verdict.load(Ordering::Acquire) != KEEP {
                    return Poll::Ready(None);
                }
                read.as_mut().poll(cx).map(Some)
            })
            .await;
            match got {
                // Idle, draining, or the head timed out (the connection
                // task stops polling this loop for the last).
                None => {
                    let _ = io.shutdown().await;
                    return Next::Close;
                }
                Some(Ok(0)) if buf.is_empty() => return Next::Close,
                // Closed mid-head: whatever hyper does with that.
                Some(Ok(0)) => return Next::Handoff(buf.freeze()),
                Some(Ok(_)) => {}
                Some(Err(_)) => return Next::Close,
            }
        };

        // The request said `Connection: close`, or was HTTP/1.0 without
        // `keep-alive`: answer, then end the connection.
        let client_closes = scratch.closes;
        let asked = Asked {
            head: req.method() == Method::HEAD,
            http10: req.version() == Version::HTTP_10,
        };
        let guard = ActiveGuard::new(activity);
        let resp = {
            // Kept in the connection's task, not boxed: a box cost a 4.6 KB
            // copy and an allocation a request (about 2% of its
            // instructions), and the task's unused room is not resident
            // while a connection waits.
            let handled = pin!(gw.handle(req, peer));
            match watching(io, &mut buf, max_head, handled, feed.as_mut()).await {
                Some(resp) => resp,
                None => return Next::Close,
            }
        };
        // A streamed body the answer came before is not read for its
        // reader any more: if still reading, it gets an error, never a
        // short body. The rest is dropped after the answer (see below).
        let mut unread = feed.take().filter(|f| f.left() > 0);
        if let Some(feed) = unread.as_mut() {
            feed.stop();
        }

        let mut keep_alive = !client_closes && activity.verdict.load(Ordering::Acquire) == KEEP;
        let (mut parts, body) = resp.into_parts();
        let say = connection_line(&mut parts, asked, &mut keep_alive);
        scratch.out.clear();
        let Ok(head) = encode_head(&mut parts, &body, keep_alive, asked, say, &mut scratch) else {
            return Next::Close;
        };
        scratch.spare = std::mem::take(&mut parts.headers);
        scratch.spare.clear();
        let sent = write_body(io, &mut buf, max_head, body, head.framing, &mut scratch.out).await;
        drop(guard);
        if !sent {
            return Next::Close;
        }
        served.n += 1;
        if head.last || activity.verdict.load(Ordering::Acquire) != KEEP {
            let _ = io.shutdown().await;
            return Next::Close;
        }
        // The unread rest of a streamed body, as hyper's server drops it
        // (`poll_drain_or_close_read`): what is at hand. If that ends the
        // body the connection goes on; if not, it ends, without reading a
        // body it has no use for (the answer did not say so: neither does
        // hyper's).
        if let Some(mut feed) = unread
            && !skip_rest(io, &mut buf, &mut feed).await
        {
            let _ = io.shutdown().await;
            return Next::Close;
        }
    }
}

/// Read what the socket has ready, without waiting, until `buf` holds
/// `want` bytes: whether it does. A client that closed or failed leaves
/// that for hyper to meet, with the bytes read.
async fn read_ready<T>(io: &mut T, buf: &mut BytesMut, want: usize) -> bool
where
    T: AsyncRead + Unpin,
{
    poll_fn(|cx| {
        while buf.len() < want {
            buf.reserve(want - buf.len());
            match pin!(io.read_buf(&mut *buf)).poll(cx) {
                Poll::Ready(Ok(n)) if n > 0 => {}
                _ => return Poll::Ready(false),
            }
        }
        Poll::Ready(true)
    })
    .await
}

/// Drop the rest of a streamed body: what `buf` holds of it, and if that
/// is not all, what one read of the bytes the socket has ready brings
/// (never waited for), with room for the rest up to 8 KiB, as hyper's
/// server reads it into its buffer (`INIT_BUFFER_SIZE`): a longer rest
/// ends the connection with either. Whether that was all of it.
async fn skip_rest<T>(io: &mut T, buf: &mut BytesMut, feed: &mut Feed) -> bool
where
    T: AsyncRead + Unpin,
{
    feed.skip(buf);
    if feed.left() > 0 {
        // Not `make_room`: a buffer used to its end has no room left, and
        // would be given a first read's 1 KiB.
        buf.reserve(feed.left_up_to(8192));
        let ready = poll_fn(|cx| Poll::Ready(pin!(io.read_buf(&mut *buf)).poll(cx))).await;
        if matches!(ready, Poll::Ready(Ok(n)) if n > 0) {
            feed.skip(buf);
        }
    }
    feed.left() == 0
}

/// Make room in `buf` for a read. A connection's first read gets
/// [`FIRST_READ`] bytes, enough for a usual head: a client that connects
/// and sends nothing holds that much, not the 8 KiB hyper reserves (3,500
/// idle connections: 6 MiB more resident than with hyper when this loop
/// reserved 8 KiB too, 2-5 MiB less since).
/// Later reads get 8 KiB, reclaimed in place once the heads before are
/// dropped.
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        buf.reserve(FIRST_READ);
    } else if buf.capacity() - buf.len() < 1024 {
        buf.reserve(8192);
    }
}

/// Adds a connection's count to [`Gateway::own_h1_served`] when it ends,
/// however it ends.
struct Served<'g> {
    gw: &'g Gateway,
    n: u64,
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        self.gw.own_h1_served.fetch_add(self.n, Ordering::Relaxed);
    }
}

/// Parse the head at the start of `buf`; when it is one this loop serves,
/// take it out of `buf` and build the request, sharing the head's bytes.
/// With `stream`, a small body not all in `buf` is streamed
/// ([`Parsed::Stream`]) instead of asked for ([`Parsed::Body`]).
fn parse(buf: &mut BytesMut, max_head: usize, stream: bool, scratch: &mut Scratch) -> Parsed {
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut r = httparse::Request::new(&mut []);
    let len = match r.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::NotMine,
    };
    let version = match r.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Parsed::NotMine,
    };
    if len > max_head {
        return Parsed::NotMine;
    }
    let (Some(method), Some(path)) = (r.method, r.path) else {
        return Parsed::NotMine;
    };
    let method = match method {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        "CONNECT" => return Parsed::NotMine,
        other => match Method::from_bytes(other.as_bytes()) {
            Ok(m) => m,
            Err(_) => return Parsed::NotMine,
        },
    };
    if !path.starts_with('/') || path.len() > MAX_URI_LEN {
        return Parsed::NotMine;
    }
    // Offsets into the head: the slices borrow `buf`, which is split below.
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| (s.as_ptr() as usize).checked_sub(base);
    let Some(path_at) = offset(path.as_bytes()) else {
        return Parsed::NotMine;
    };
    let path_range = (path_at, path_at + path.len());
    scratch.fields.clear();
    // Room for the head's fields at once (it grew from 4, twice, on each
    // connection's first request).
    scratch.fields.reserve(r.headers.len());
    // HTTP/1.1 is kept alive unless it says `close`; HTTP/1.0 only when it
    // says `keep-alive` (hyper's `Server::parse`).
    scratch.closes = version == Version::HTTP_10;
    let mut length = None;
    let mut saw_connection = false;
    let mut expects = false;
    for h in r.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Parsed::NotMine;
        };
        if name == header::CONTENT_LENGTH {
            // One field, digits only (hyper takes the same, and equal
            // repeats and lists, which go to it).
            match crate::h1::parse_decimal(h.value) {
                Some(n) if length.is_none() => length = Some(n),
                _ => return Parsed::NotMine,
            }
        } else if name == header::CONNECTION {
            // One `keep-alive` or one `close`; a list, or anything that
            // names other fields to drop, is hyper's.
            let v = h.value.trim_ascii();
            if saw_connection
                || !(v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close"))
            {
                return Parsed::NotMine;
            }
            saw_connection = true;
            scratch.closes = v.eq_ignore_ascii_case(b"close");
            // Taken in here, and hop-by-hop: not passed on, so the proxy
            // has nothing to strip (with `close`, that cost an allocation
            // and three lookups a request).
            continue;
        } else if name == header::EXPECT {
            // One `100-continue`, in any case (hyper compares it so): the
            // body is streamed and `100 Continue` sent when it is first
            // wanted (src/server/streamed.rs). Passed on, as hyper passes
            // it. Another expectation, or two fields, are hyper's.
            if expects || !h.value.eq_ignore_ascii_case(b"100-continue") {
                return Parsed::NotMine;
            }
            expects = true;
        } else if name == header::TRANSFER_ENCODING || name == header::UPGRADE || name == header::TE
        {
            return Parsed::NotMine;
        }
        let Some(at) = offset(h.value) else {
            return Parsed::NotMine;
        };
        scratch.fields.push((name, at, at + h.value.len()));
    }
    let length = length.unwrap_or(0);
    let at_hand = (buf.len() - len) as u64;
    // As hyper: no `100 Continue` for an empty body, nor in HTTP/1.0.
    let expects = expects && length > 0 && version == Version::HTTP_11;
    let streamed = expects || length > MAX_BODY as u64 || (length > at_hand && stream);
    if length > at_hand && !streamed {
        // At most MAX_BODY: fits a usize.
        return Parsed::Body(len + length as usize);
    }
    let head = buf.split_to(len).freeze();
    // From here the head is consumed: a failure must not hand the rest of
    // the connection to hyper without it, so it is answered as hyper
    // would have answered it, by hyper: put it back.
    let Some(mut built) = build(&head, method, version, path_range, scratch) else {
        let mut whole = BytesMut::with_capacity(head.len() + buf.len());
        whole.extend_from_slice(&head);
        whole.extend_from_slice(buf);
        *buf = whole;
        return Parsed::NotMine;
    };
    if streamed {
        let (feed, body) = super::streamed::channel(length, expects);
        *built.body_mut() = RequestBody::Streamed(body);
        return Parsed::Stream(built, feed);
    }
    if length > 0 {
        // At most what is at hand, so a usize.
        *built.body_mut() = RequestBody::Arrived(Some(buf.split_to(length as usize).freeze()));
    }
    Parsed::Request(built)
}

fn build(
    head: &Bytes,
    method: Method,
    version: Version,
    path: (usize, usize),
    scratch: &mut Scratch,
) -> Option<Request<RequestBody>> {
    head.get(path.0..path.1)?;
    let uri = Uri::from_maybe_shared(head.slice(path.0..path.1)).ok()?;
    let mut headers = std::mem::take(&mut scratch.spare);
    headers.reserve(scratch.fields.len());
    for (name, from, to) in scratch.fields.drain(..) {
        head.get(from..to)?;
        let value = HeaderValue::from_maybe_shared(head.slice(from..to)).ok()?;
        headers.append(name, value);
    }
    let mut req = Request::new(RequestBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    Some(req)
}

/// How the body is written after the head.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    /// Exactly this many bytes (none for 204 and 304).
    Length(u64),
    Chunked,
    /// As the bytes come, ended by closing the connection (HTTP/1.0, a
    /// body of unknown size).
    UntilClose,
}

struct Head {
    framing: Framing,
    /// The connection ends after this response.
    last: bool,
}

/// The body's length as hyper's server sees it: `None` when it has ended
/// already, `Some(None)` when unknown.
fn body_length(body: &ResponseBody) -> Option<Option<u64>> {
    if body.is_end_stream() {
        None
    } else {
        Some(body.size_hint().exact())
    }
}

/// What the request asked of its answer.
#[derive(Clone, Copy)]
struct Asked {
    /// `HEAD`: the answer has no body, whatever its length says.
    head: bool,
    /// HTTP/1.0: the answer says `HTTP/1.0`, is kept alive only when the
    /// request asked so, and ends a body of unknown size by closing.
    http10: bool,
}

/// What hyper's `enforce_version` (proto/h1/conn.rs) does to the answer's
/// `Connection` field, and to whether the connection is kept: the line
/// `encode_head` is to write last among the fields, or the map changed
/// where it has that field already (which the proxy's stripping leaves
/// none of: inserting into a full map grew it on every such answer).
fn connection_line(
    parts: &mut http::response::Parts,
    asked: Asked,
    keep_alive: &mut bool,
) -> Option<&'static [u8]> {
    if !asked.http10 {
        // HTTP/1.1 on a connection not kept says `close`.
        if *keep_alive {
            return None;
        }
        if parts.headers.contains_key(header::CONNECTION) {
            say_close(&mut parts.headers);
            return None;
        }
        return Some(b"connection: close\r\n");
    }
    // HTTP/1.0 (`fix_keep_alive`): an answer that says `keep-alive` is left
    // alone; otherwise an HTTP/1.0 answer ends the connection, and an
    // HTTP/1.1 one (every answer here: the proxy answers in HTTP/1.1) on a
    // connection kept says `keep-alive`. Nothing says `close`: HTTP/1.0
    // without `keep-alive` closes.
    let has_field = parts.headers.contains_key(header::CONNECTION);
    if has_field
        && parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| crate::h1::has_token(v.as_bytes(), b"keep-alive"))
    {
        return None;
    }
    if parts.version == Version::HTTP_10 {
        *keep_alive = false;
    }
    if !*keep_alive {
        return None;
    }
    if has_field {
        parts
            .headers
            .append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        return None;
    }
    Some(b"connection: keep-alive\r\n")
}

/// What hyper's `enforce_version` does to the response on a connection it
/// will not keep: add `close` to its `Connection` field unless a value
/// there says so already.
fn say_close(headers: &mut HeaderMap) {
    const CLOSE: HeaderValue = HeaderValue::from_static("close");
    match headers.entry(header::CONNECTION) {
        header::Entry::Occupied(mut e) => {
            if !e
                .iter()
                .any(|v| crate::h1::has_token(v.as_bytes(), b"close"))
            {
                e.append(CLOSE);
            }
        }
        header::Entry::Vacant(e) => {
            e.insert(CLOSE);
        }
    }
}

/// Write the status line and header fields into `scratch.out` as hyper's
/// `Server::encode` does for a response to a request that is not CONNECT. `Err` where hyper errors too (see the module's notes).
/// `say` is the `Connection` line from [`connection_line`].
fn encode_head(
    parts: &mut http::response::Parts,
    body: &ResponseBody,
    keep_alive: bool,
    asked: Asked,
    say: Option<&'static [u8]>,
    scratch: &mut Scratch,
) -> Result<Head, ()> {
    let status = parts.status;
    if status.is_informational() {
        return Err(());
    }
    let out = &mut scratch.out;
    // A connection's first answer: room for a usual head (and a small
    // body after it) at once, where growing from empty took five
    // reallocations.
    if out.capacity() == 0 {
        out.reserve(FIRST_OUT);
    }
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if status == StatusCode::OK && reason.is_none() && !asked.http10 {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(if asked.http10 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match reason {
            Some(r) => out.extend_from_slice(r.as_bytes()),
            None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
    }
    // hyper's `can_have_content_length`; with neither HEAD nor HTTP/1.0,
    // also `can_chunked` and `can_have_implicit_zero_content_length`.
    let can_length = !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    let can_body = can_length && !asked.head;
    let length = body_length(body);
    let mut framing = Framing::Length(0);
    let mut wrote_len = false;
    let mut wrote_date = false;
    let mut last = !keep_alive;
    for (name, value) in parts.headers.iter() {
        if name == header::CONTENT_LENGTH {
            match length {
                // An ended body: hyper drops the field (and adds its own
                // `0` below where one is allowed); after HEAD it keeps it,
                // once.
                None if !asked.head => continue,
                None => {
                    if wrote_len {
                        return Err(());
                    }
                }
                Some(Some(known)) => {
                    if wrote_len {
                        continue;
                    }
                    framing = Framing::Length(known);
                }
                Some(None) => {
                    let len = crate::h1::parse_decimal(value.as_bytes()).ok_or(())?;
                    if wrote_len {
                        if framing != Framing::Length(len) {
                            return Err(());
                        }
                        continue;
                    }
                    framing = Framing::Length(len);
                }
            }
            wrote_len = true;
        } else if name == header::TRANSFER_ENCODING || name == header::TRAILER {
            return Err(());
        } else if name == header::CONNECTION {
            last |= crate::h1::has_token(value.as_bytes(), b"close");
        } else if name == header::DATE {
            wrote_date = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(line) = say {
        // Where hyper's insert would have put it: last in the map.
        out.extend_from_slice(line);
    }
    if !wrote_len {
        match length {
            // HTTP/1.0 has no chunks: the end of the body is the end of
            // the connection.
            Some(None) if can_body && asked.http10 => {
                framing = Framing::UntilClose;
                last = true;
            }
            Some(None) if can_body => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                framing = Framing::Chunked;
            }
            Some(None) => {}
            None | Some(Some(0)) => {
                if can_body {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
            }
            Some(Some(n)) => {
                if can_length {
                    out.extend_from_slice(b"content-length: ");
                    crate::h1::push_decimal(out, n, 1);
                    out.extend_from_slice(b"\r\n");
                    framing = Framing::Length(n);
                }
            }
        }
    }
    if !can_body {
        framing = Framing::Length(0);
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(scratch.date.get());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Head { framing, last })
}

/// Write the head in `out` and then the body, framed. Data that is ready
/// at once is gathered into one write; the rest is written as it comes,
/// while the client is watched for going away. False when the connection
/// cannot go on: a write failed, the client left, the body failed or did
/// not match its length.
async fn write_body<T>(
    io: &mut T,
    buf: &mut BytesMut,
    max_head: usize,
    body: ResponseBody,
    framing: Framing,
    out: &mut Vec<u8>,
) -> bool
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut left = match framing {
        Framing::Length(0) => {
            // Nothing of the body is sent (204, 304, an ended body); it is
            // dropped, as hyper drops it.
            drop(body);
            return io.write_all(out).await.is_ok();
        }
        Framing::Length(n) => n,
        Framing::Chunked | Framing::UntilClose => u64::MAX,
    };
    let until_close = framing == Framing::UntilClose;
    let chunked = framing == Framing::Chunked;
    let mut body = pin!(body);
    loop {
        // Take the next frame if it is ready; otherwise write what is
        // gathered and wait for it, watching the client.
        let frame = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !out.is_empty() {
                    if io.write_all(out).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
                let next = pin!(poll_fn(|cx| body.as_mut().poll_frame(cx)));
                match watching(io, buf, max_head, next, None).await {
                    Some(f) => f,
                    None => return false,
                }
            }
        };
        match frame {
            None => break,
            // What is gathered is dropped, as hyper drops it: the missing
            // end tells the client the answer is incomplete.
            Some(Err(_)) => return false,
            Some(Ok(frame)) => {
                // Trailers are dropped: they are sent only to a client that
                // asked with `TE: trailers`, which goes to hyper.
                let Ok(mut data) = frame.into_data() else {
                    continue;
                };
                let n = data.remaining() as u64;
                if n == 0 {
                    continue;
                }
                if !chunked && n > left {
                    // More than the length said: never write past it.
                    return false;
                }
                if chunked {
                    push_hex(out, n);
                    out.extend_from_slice(b"\r\n");
                } else {
                    left -= n;
                }
                while data.has_remaining() {
                    let c = data.chunk();
                    let l = c.len();
                    out.extend_from_slice(c);
                    data.advance(l);
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                } else if left == 0 {
                    // All the length said: the answer is complete, as for
                    // hyper, without waiting for the body to say it ended.
                    break;
                }
                if out.len() >= FLUSH_AT {
                    if io.write_all(out).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
            }
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    } else if left != 0 && !until_close {
        // Ended short of its length.
        return false;
    }
    let ok = io.write_all(out).await.is_ok();
    out.clear();
    ok
}

/// Run `fut` while reading the client, to see one that goes away (hyper's
/// server does the same): `None` when it has. Pipelined bytes wait in
/// `buf`, up to the head limit; past it the client is not read until they
/// are used. With a `feed`, the request's streamed body is given to its
/// reader from `buf` as the reader takes it: a reader that stops taking
/// stops the reading once `buf` is full. A client that expects `100
/// Continue` gets it when the reader first asks for the body, and none of
/// the body is fed before. `fut` stays pinned where it was made: moving
/// the request's future in would copy its 4.6 KB.
async fn watching<T, F>(
    io: &mut T,
    buf: &mut BytesMut,
    max_head: usize,
    mut fut: Pin<&mut F>,
    mut feed: Option<&mut Feed>,
) -> Option<F::Output>
where
    T: AsyncRead + AsyncWrite + Unpin,
    F: Future,
{
    // Bytes of `100 Continue` written.
    let mut continued = 0;
    poll_fn(|cx| {
        loop {
            // A `100 Continue` begun is finished before anything else: a
            // client that does not read can leave it part-written, and the
            // answer must not follow mid-line.
            if continued > 0
                && continued < CONTINUE.len()
                && let Some(feed) = feed.as_deref_mut()
            {
                match poll_expecting(feed, io, &mut continued, cx) {
                    Poll::Ready(true) => {}
                    Poll::Ready(false) => return Poll::Ready(None),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            let mut again = false;
            if let Some(feed) = feed.as_deref_mut()
                && feed.left() > 0
            {
                if feed.expects() {
                    match poll_expecting(feed, io, &mut continued, cx) {
                        Poll::Ready(true) => again = true,
                        Poll::Ready(false) => return Poll::Ready(None),
                        Poll::Pending => {}
                    }
                } else if !buf.is_empty() {
                    // Full or reader gone: woken when the slot empties; a
                    // reader gone leaves the rest for after the answer.
                    again = matches!(feed.poll_put(buf, cx), Put::Moved(_));
                }
            }
            // While a body streams, reads take up to BODY_READ of it at a
            // time: in 8 KiB reads a 64 KiB body cost 1.6 times hyper's
            // instructions (a chunk, a wake-up and a write upstream each;
            // bench/instructions.sh, sg-post-64k), 0.81 times in 32 KiB
            // reads and 0.74 times in 64 KiB ones. So a streaming
            // connection holds at most BODY_READ (or `max_head`) in the
            // buffer and as much again in the reader's slot. With 256
            // clients uploading 1 MB bodies at once the most RSS is 1.07
            // times hyper's server's, at 1.27 times its req/s
            // (bench/uploads.sh, the allocator as deployed).
            // While `100 Continue` is owed, the socket is read as for a
            // request without a body: the client may not send it yet.
            let body = feed
                .as_deref()
                .filter(|f| !f.expects())
                .map_or(0, |f| f.left_up_to(BODY_READ));
            if buf.len() < max_head.max(body) {
                if body > 0 {
                    buf.reserve(body);
                } else if buf.len() == buf.capacity() {
                    // Only a full buffer grows here. This read is there to
                    // see the client close (or a pipelined head arrive),
                    // and the room left after the head is enough for that;
                    // growing it while the head's bytes are still shared
                    // allocated 8 KiB anew, past mimalloc's fast path, on
                    // every connection for a single request. After the
                    // answer the head is gone and `make_room` reclaims
                    // the buffer in place.
                    make_room(buf);
                }
                match pin!(io.read_buf(&mut *buf)).poll(cx) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                    Poll::Ready(Ok(_)) => again = true,
                    Poll::Pending => {}
                }
            }
            if !again {
                return Poll::Pending;
            }
        }
    })
    .await
}

/// What a client that sent `Expect: 100-continue` is told when the body
/// is wanted (hyper's bytes).
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// `100 Continue` once the body's reader first asks for the body (hyper's
/// server writes it on the body's first poll too, the answer not having
/// begun: it is written only once the request's future is done). Ready
/// with whether it went; the body may then be fed. Out of line: rare, and
/// inlined it kept the loop from being inlined into the connection's task
/// (+109 instructions a request, callgrind).
#[cold]
#[inline(never)]
fn poll_expecting<T>(
    feed: &mut Feed,
    io: &mut T,
    continued: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<bool>
where
    T: AsyncWrite + Unpin,
{
    if feed.poll_wanted(cx).is_pending() {
        return Poll::Pending;
    }
    let sent = poll_continue(io, continued, cx);
    if sent == Poll::Ready(true) {
        feed.continued();
    }
    sent
}

/// Write the rest of [`CONTINUE`] after its first `sent` bytes, and flush:
/// whether it all went (a client that went away ends the connection).
fn poll_continue<T>(io: &mut T, sent: &mut usize, cx: &mut Context<'_>) -> Poll<bool>
where
    T: AsyncWrite + Unpin,
{
    while let Some(rest) = CONTINUE.get(*sent..).filter(|r| !r.is_empty()) {
        match Pin::new(&mut *io).poll_write(cx, rest) {
            Poll::Ready(Ok(n)) if n > 0 => *sent += n,
            Poll::Ready(_) => return Poll::Ready(false),
            Poll::Pending => return Poll::Pending,
        }
    }
    Pin::new(&mut *io).poll_flush(cx).map(|r| r.is_ok())
}

/// `n` in upper-case hex (a chunk size, as hyper writes it), without
/// allocating.
fn push_hex(out: &mut Vec<u8>, n: u64) {
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789ABCDEF"[((n >> (i * 4)) & 0xf) as usize]);
    }
}

/// The `date` field's value, formatted at most once a second.
#[derive(Default)]
struct DateCache {
    secs: u64,
    text: Vec<u8>,
}

impl DateCache {
    fn get(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if secs != self.secs || self.text.is_empty() {
            self.secs = secs;
            self.text = httpdate::fmt_http_date(now).into_bytes();
        }
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `parse` left in the buffer, and the request when it took one.
    fn run(input: &[u8]) -> (Vec<u8>, Option<Request<RequestBody>>, bool) {
        let mut buf = BytesMut::from(input);
        match parse_head(&mut buf, 8192) {
            Parsed::Request(r) | Parsed::Stream(r, _) => (buf.to_vec(), Some(r), false),
            Parsed::Partial | Parsed::Body(_) => (buf.to_vec(), None, true),
            Parsed::NotMine => (buf.to_vec(), None, false),
        }
    }

    fn body(req: Request<RequestBody>) -> Option<Bytes> {
        match req.into_body() {
            RequestBody::Arrived(b) => b,
            _ => None,
        }
    }

    /// The length of a streamed body, `None` for any other kind.
    fn streamed(req: &Request<RequestBody>) -> Option<u64> {
        match req.body() {
            RequestBody::Streamed(b) => Some(b.left()),
            _ => None,
        }
    }

    #[test]
    fn a_body_is_taken_only_when_it_is_all_there() {
        let post = |len: &str, body: &str| {
            format!("POST /x HTTP/1.1\r\ncontent-length: {len}\r\n\r\n{body}")
        };
        // Whole, with the next request's bytes left as they were.
        let (left, req, _) = run(format!("{}GET / HTTP/1.1\r\n", post("5", "hello")).as_bytes());
        assert_eq!(left, b"GET / HTTP/1.1\r\n");
        assert_eq!(body(req.expect("served")).as_deref(), Some(&b"hello"[..]));
        // A leading zero is still a number, and httparse drops the
        // spaces after a value (as for hyper, which parses with it).
        for len in ["03", "3 \t"] {
            let (_, req, _) = run(post(len, "abc").as_bytes());
            assert_eq!(body(req.expect("served")).as_deref(), Some(&b"abc"[..]));
        }
        // Short: how many bytes the request needs, the buffer untouched.
        let short = post("5", "hel");
        let mut buf = BytesMut::from(short.as_bytes());
        let head = short.len() - 3;
        assert!(matches!(parse_head(&mut buf, 8192), Parsed::Body(n) if n == head + 5));
        assert_eq!(&buf[..], short.as_bytes());
        // Short and asked to stream: the head is taken, the body's bytes
        // at hand stay first in the buffer for the feed.
        let mut buf = BytesMut::from(short.as_bytes());
        let mut scratch = Scratch::default();
        let Parsed::Stream(req, feed) = parse(&mut buf, 8192, true, &mut scratch) else {
            panic!("not streamed");
        };
        assert_eq!(
            (streamed(&req), feed.left(), &buf[..]),
            (Some(5), 5, &b"hel"[..])
        );
        // At the bound, taken whole; past it, streamed even when all there.
        let at = "a".repeat(MAX_BODY);
        let (_, req, _) = run(post(&MAX_BODY.to_string(), &at).as_bytes());
        assert_eq!(body(req.expect("served")).map(|b| b.len()), Some(MAX_BODY));
        let over = format!("{at}a");
        let text = post(&(MAX_BODY + 1).to_string(), &over);
        let (left, req, _) = run(text.as_bytes());
        assert_eq!(streamed(&req.expect("served")), Some(MAX_BODY as u64 + 1));
        assert_eq!(left, over.as_bytes());
        // Anything but plain digits, once, goes to hyper.
        for len in ["+5", " 5x", "5,5", "0x5", "", "99999999999999999999"] {
            let text = post(len, "hello");
            let (left, req, partial) = run(text.as_bytes());
            assert!(req.is_none() && !partial, "{len:?}");
            assert_eq!(left, text.as_bytes());
        }
        let text = "POST /x HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello";
        assert!(run(text.as_bytes()).1.is_none());
    }

    #[test]
    fn the_connection_field_is_what_hyper_s_enforce_version_makes_it() {
        // (request HTTP/1.0, answer's version, kept before, answer's
        // `Connection` values) → (line to add, values after, kept after).
        type Case = (
            bool,
            Version,
            bool,
            &'static [&'static str],
            Option<&'static [u8]>,
            &'static [&'static str],
            bool,
        );
        let cases: [Case; 10] = [
            (false, Version::HTTP_11, true, &[], None, &[], true),
            (
                false,
                Version::HTTP_11,
                false,
                &[],
                Some(b"connection: close\r\n"),
                &[],
                false,
            ),
            // A field there already gets `close` added, once.
            (
                false,
                Version::HTTP_11,
                false,
                &["upgrade"],
                None,
                &["upgrade", "close"],
                false,
            ),
            (
                false,
                Version::HTTP_11,
                false,
                &["Close"],
                None,
                &["Close"],
                false,
            ),
            (
                false,
                Version::HTTP_11,
                false,
                &["x, close"],
                None,
                &["x, close"],
                false,
            ),
            // HTTP/1.0: `keep-alive` left alone; otherwise said on a kept
            // connection, in the field when there is one.
            (
                true,
                Version::HTTP_11,
                true,
                &["Keep-Alive"],
                None,
                &["Keep-Alive"],
                true,
            ),
            (
                true,
                Version::HTTP_11,
                true,
                &[],
                Some(b"connection: keep-alive\r\n"),
                &[],
                true,
            ),
            (
                true,
                Version::HTTP_11,
                true,
                &["upgrade"],
                None,
                &["upgrade", "keep-alive"],
                true,
            ),
            // An HTTP/1.0 answer, or a connection not kept: nothing said.
            (
                true,
                Version::HTTP_10,
                true,
                &["upgrade"],
                None,
                &["upgrade"],
                false,
            ),
            (true, Version::HTTP_11, false, &[], None, &[], false),
        ];
        for (http10, version, kept, before, line, after, kept_after) in cases {
            let mut resp = http::Response::new(());
            *resp.version_mut() = version;
            for v in before {
                resp.headers_mut()
                    .append(header::CONNECTION, HeaderValue::from_static(v));
            }
            let (mut parts, ()) = resp.into_parts();
            let mut keep = kept;
            let asked = Asked {
                head: false,
                http10,
            };
            let got = connection_line(&mut parts, asked, &mut keep);
            let values: Vec<&str> = parts
                .headers
                .get_all(header::CONNECTION)
                .iter()
                .map(|v| v.to_str().unwrap_or("?"))
                .collect();
            let case = format!("{http10} {version:?} {kept} {before:?}");
            assert_eq!(got, line, "{case}");
            assert_eq!(values, after, "{case}");
            assert_eq!(keep, kept_after, "{case}");
        }
    }

    #[test]
    fn an_answer_s_head_its_room_its_framing_and_close() {
        let mut scratch = Scratch::default();
        let (mut parts, ()) = http::Response::new(()).into_parts();
        let body: ResponseBody =
            http_body_util::Either::Left(http_body_util::Full::new(Bytes::from_static(b"{}")));
        let asked = Asked {
            head: false,
            http10: false,
        };
        let head = encode_head(&mut parts, &body, true, asked, None, &mut scratch);
        assert_eq!(
            head.map(|h| (h.framing, h.last)),
            Ok((Framing::Length(2), false))
        );
        assert!(
            scratch
                .out
                .starts_with(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n")
        );
        // One allocation, not the five of growing from empty.
        assert!(
            scratch.out.capacity() >= FIRST_OUT,
            "{}",
            scratch.out.capacity()
        );

        // Fields the proxy strips from an upstream's answer, were they
        // there: framing of its own is refused, and `close` ends the
        // connection after the answer.
        for (name, value, want) in [
            ("transfer-encoding", "chunked", None),
            ("trailer", "x-sum", None),
            ("connection", "close", Some(true)),
            ("connection", "upgrade", Some(false)),
        ] {
            let (mut parts, ()) = http::Response::new(()).into_parts();
            parts.headers.insert(name, HeaderValue::from_static(value));
            let head = encode_head(&mut parts, &body, true, asked, None, &mut scratch);
            assert_eq!(head.map(|h| h.last).ok(), want, "{name}: {value}");
        }
    }

    #[test]
    fn what_is_served_and_what_is_not() {
        let served = |h: &str| run(h.as_bytes()).1.is_some();
        assert!(served("GET / HTTP/1.1\r\nhost: a\r\n\r\n"));
        assert!(served("DELETE /x HTTP/1.1\r\ncontent-length: 0\r\n\r\n"));
        assert!(served("GET / HTTP/1.1\r\nConnection:  keep-alive \r\n\r\n"));
        assert!(served("GET / HTTP/1.1\r\nconnection: Close\r\n\r\n"));
        assert!(served("HEAD / HTTP/1.1\r\n\r\n"));
        assert!(served("GET / HTTP/1.0\r\n\r\n"));
        assert!(served("GET / HTTP/1.0\r\nconnection: close\r\n\r\n"));
        assert!(served("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        // One `100-continue` expectation: with a body, streamed (and `100
        // Continue` sent when it is wanted), even when all of it is here.
        assert!(served("GET / HTTP/1.1\r\nexpect: 100-continue\r\n\r\n"));
        let (left, req, _) =
            run(b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\ncontent-length: 2\r\n\r\nhi");
        assert_eq!(req.as_ref().and_then(streamed), Some(2));
        assert_eq!(left, b"hi");
        // Not in HTTP/1.0 (hyper ignores it there): taken whole.
        let req = run(b"POST / HTTP/1.0\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\nhi").1;
        assert_eq!(req.and_then(body).as_deref(), Some(&b"hi"[..]));
        for h in [
            "CONNECT h:1 HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "GET http://h/ HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nexpect: 100-continue\r\nexpect: 100-continue\r\n\r\n",
            "POST / HTTP/1.1\r\nexpect: something\r\ncontent-length: 1\r\n\r\nx",
            "GET / HTTP/1.1\r\nupgrade: h2c\r\n\r\n",
            "GET / HTTP/1.1\r\nte: trailers\r\n\r\n",
            "GET / HTTP/1.1\r\nconnection: keep-alive\r\nconnection: keep-alive\r\n\r\n",
            "GET / HTTP/1.1\r\nconnection: close\r\nconnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nconnection: close, x-a\r\n\r\n",
            "GET / HTTP/1.1\r\nconnection: x-a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(!served(h), "{h:?}");
        }
        // A target httparse takes and `Uri` does not: found only after the
        // head was split off, and put back whole, with what follows.
        let odd = b"GET /a<b> HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\n";
        let (left, req, _) = run(odd);
        assert!(req.is_none());
        assert_eq!(left, odd);
        // Over the limit, even when complete.
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(9000));
        let mut buf = BytesMut::from(big.as_bytes());
        assert!(matches!(parse_head(&mut buf, 8192), Parsed::NotMine));
        assert_eq!(&buf[..], big.as_bytes());
    }

    /// A client waiting for `100 Continue` whose receive window is nearly
    /// full: each write takes at most three bytes, and every other one
    /// waits (waking at once). It has nothing to read.
    #[derive(Default)]
    struct Trickle {
        written: Vec<u8>,
        stall: bool,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.stall = !self.stall;
            if !self.stall {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = data.len().min(3);
            self.written.extend_from_slice(&data[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The answer is decided while `100 Continue` is part-written (as when
    /// the upstream answers before taking the body): the 100 is finished
    /// before the request's future is done with, so the answer written
    /// next never starts mid-line.
    #[tokio::test]
    async fn a_part_written_100_continue_is_finished_before_the_answer() {
        let mut io = Trickle::default();
        let mut buf = BytesMut::new();
        let (mut feed, body) = super::super::streamed::channel(5, true);
        let mut body = pin!(body);
        // Asks for the body once, then is done without it.
        let mut asked = false;
        let answer = pin!(poll_fn(|cx| {
            if asked {
                return Poll::Ready("answered");
            }
            asked = true;
            assert!(body.as_mut().poll_frame(cx).is_pending());
            cx.waker().wake_by_ref();
            Poll::Pending
        }));
        let out = watching(&mut io, &mut buf, 8192, answer, Some(&mut feed)).await;
        assert_eq!(out, Some("answered"));
        assert_eq!(
            String::from_utf8_lossy(&io.written),
            String::from_utf8_lossy(CONTINUE)
        );
        assert!(!feed.expects());
    }

    #[test]
    fn numbers_are_written_as_hyper_writes_them() {
        for (n, hex, dec) in [
            (0u64, "0", "0"),
            (9, "9", "9"),
            (30, "1E", "30"),
            (4096, "1000", "4096"),
            (u64::MAX, "FFFFFFFFFFFFFFFF", "18446744073709551615"),
        ] {
            let mut v = Vec::new();
            push_hex(&mut v, n);
            assert_eq!(v, hex.as_bytes());
            v.clear();
            crate::h1::push_decimal(&mut v, n, 1);
            assert_eq!(v, dec.as_bytes());
        }
    }

    /// hyper answers a target over 65,534 bytes with 414 (`MAX_URI_LEN`
    /// in its `proto/h1/role.rs`, `>`): such a head is hyper's, and one
    /// at the bound is served here.
    #[test]
    fn a_target_is_served_up_to_hyper_s_limit() {
        for (len, served) in [(65_534, true), (65_535, false)] {
            let head = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(len - 1));
            let mut buf = BytesMut::from(head.as_bytes());
            match parse_head(&mut buf, 128 * 1024) {
                Parsed::Request(req) => {
                    assert!(served, "{len} served");
                    assert_eq!(req.uri().path().len(), len);
                }
                Parsed::NotMine => {
                    assert!(!served, "{len} handed to hyper");
                    assert_eq!(buf.len(), head.len(), "the buffer untouched");
                }
                _ => panic!("{len}: neither served nor hyper's"),
            }
        }
    }

    /// A small body not all there with its head is looked for among the
    /// bytes the socket has ready, never waited for.
    #[tokio::test]
    async fn bytes_at_hand_are_read_and_no_more_awaited() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        client.write_all(b"0123456789").await.expect("write");
        // Exactly what is wanted: done, without another read.
        assert!(read_ready(&mut server, &mut buf, 10).await);
        assert_eq!(&buf[..], b"0123456789");
        // Short: what is ready is read, and the rest not waited for.
        client.write_all(b"abc").await.expect("write");
        assert!(!read_ready(&mut server, &mut buf, 20).await);
        assert_eq!(&buf[..], b"0123456789abc");
        // Closed short: left for hyper to meet.
        drop(client);
        assert!(!read_ready(&mut server, &mut buf, 20).await);
        assert_eq!(buf.len(), 13);
    }

    /// An idle connection holds a small read buffer, not hyper's 8 KiB;
    /// later reads get room for 8 KiB once less than 1 KiB is left.
    #[test]
    fn a_read_gets_room_small_at_first_and_then_8_kib() {
        let mut buf = BytesMut::new();
        make_room(&mut buf);
        let first = buf.capacity();
        assert!((FIRST_READ..8192).contains(&first), "{first}");
        // 1 KiB left exactly: enough, nothing reserved.
        buf.resize(first - 1024, b'x');
        make_room(&mut buf);
        assert_eq!(buf.capacity(), first);
        // Less: room for 8 KiB more.
        buf.resize(first - 1000, b'x');
        make_room(&mut buf);
        assert!(buf.capacity() - buf.len() >= 8192, "{}", buf.capacity());
    }

    /// The cached `date` is formatted again once the second it was made
    /// in has passed, and is an HTTP date of now.
    #[test]
    fn the_date_is_made_again_when_its_second_has_passed() {
        let mut cache = DateCache {
            secs: 1,
            text: b"Thu, 01 Jan 1970 00:00:01 GMT".to_vec(),
        };
        let text = String::from_utf8(cache.get().to_vec()).expect("text");
        let made = httpdate::parse_http_date(&text).expect("an HTTP date");
        let age = SystemTime::now().duration_since(made).unwrap_or_default();
        assert!(age.as_secs() < 60, "{text}");
        assert_eq!(text.len(), 29, "{text}");
    }

    /// A write that takes no byte (the client is gone) ends `100
    /// Continue` as not sent, never a loop that writes for ever.
    #[test]
    fn a_100_continue_no_byte_of_which_goes_is_not_sent() {
        struct Gone;
        impl AsyncWrite for Gone {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &[u8],
            ) -> Poll<std::io::Result<usize>> {
                Poll::Ready(Ok(0))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<std::io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut sent = 0;
        assert_eq!(
            poll_continue(&mut Gone, &mut sent, &mut cx),
            Poll::Ready(false)
        );
        assert_eq!(sent, 0);
        // Written whole: sent, and all of it counted.
        let mut io = Trickle::default();
        let sent = &mut 0;
        let done = loop {
            if let Poll::Ready(done) = poll_continue(&mut io, sent, &mut cx) {
                break done;
            }
        };
        assert!(done);
        assert_eq!((*sent, &io.written[..]), (CONTINUE.len(), CONTINUE));
    }

    /// The body is written by its framing, never past its length: a body
    /// longer than its length, or one ending short of it, fails (the
    /// connection ends), and nothing of a longer one goes out.
    #[tokio::test]
    async fn a_body_is_written_to_its_length_and_never_past_it() {
        for (framing, sent, wire) in [
            (Framing::Length(3), true, &b"head|abc"[..]),
            (Framing::Length(2), false, b""),
            (Framing::Length(4), false, b""),
            (Framing::Chunked, true, b"head|3\r\nabc\r\n0\r\n\r\n"),
            (Framing::UntilClose, true, b"head|abc"),
        ] {
            let (mut client, mut server) = tokio::io::duplex(1024);
            let body: ResponseBody =
                http_body_util::Either::Left(http_body_util::Full::new(Bytes::from_static(b"abc")));
            let mut out = b"head|".to_vec();
            let mut buf = BytesMut::new();
            let ok = write_body(&mut server, &mut buf, 8192, body, framing, &mut out).await;
            assert_eq!(ok, sent, "{framing:?}");
            drop(server);
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(wire),
                "{framing:?}"
            );
        }
    }

    /// Bytes a client sent ahead wait in the buffer up to the head limit:
    /// past it the client is not read while a request runs.
    #[tokio::test]
    async fn a_full_buffer_is_not_read_into_while_a_request_runs() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"more").await.expect("write");
        let mut buf = BytesMut::from(&b"0123456789abcdef"[..]);
        for (limit, after) in [
            (16, &b"0123456789abcdef"[..]),
            (32, b"0123456789abcdefmore"),
        ] {
            let out = watching(&mut server, &mut buf, limit, pin!(third_poll()), None).await;
            assert_eq!(out, Some("answered"));
            assert_eq!(&buf[..], after, "{limit}");
        }
    }

    /// A connection's scratch is left for the next connection on the same
    /// thread, cleared; an unused one, one a large answer grew, and more
    /// than [`SPARES`] are not kept.
    #[test]
    fn a_connections_scratch_is_left_cleared_for_the_next_on_its_thread() {
        std::thread::spawn(|| {
            let spares = || SPARE_SCRATCH.with_borrow(Vec::len);
            let used = || {
                let mut s = Pooled::default();
                s.ready();
                s.fields.push((HeaderName::from_static("x-field"), 0, 1));
                s.spare.insert("x-left", HeaderValue::from_static("over"));
                s.out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
                s.closes = true;
                s
            };
            let mut first = Pooled::default();
            first.ready();
            assert_eq!(first.fields.capacity(), 0, "a spare on a new thread");
            drop(first);
            assert_eq!(spares(), 0, "an unused scratch kept");

            drop(used());
            assert_eq!(spares(), 1);
            let mut next = Pooled::default();
            next.ready();
            assert_eq!(spares(), 0);
            assert!(next.fields.capacity() > 0 && next.out.capacity() > 0);
            assert!(next.fields.is_empty() && next.spare.is_empty() && next.out.is_empty());
            assert!(!next.closes);
            drop(next);

            type Grow = fn(&mut Scratch);
            let outsized: [Grow; 3] = [
                |s| s.fields.reserve(SPARE_FIELDS + 1),
                |s| s.spare.reserve(SPARE_FIELDS + 1),
                |s| s.out.reserve(SPARE_OUT + 1),
            ];
            for (i, grow) in outsized.into_iter().enumerate() {
                let mut s = Pooled::default();
                s.ready();
                assert_eq!(spares(), 0, "{i}");
                grow(&mut s);
                drop(s);
                assert_eq!(spares(), 0, "an outsized scratch kept: {i}");
                drop(used());
            }

            // At the bounds, kept.
            let mut s = Pooled::default();
            s.ready();
            // Cleared when kept: reserving the bound holds exactly it.
            s.fields.reserve_exact(SPARE_FIELDS);
            s.out.reserve_exact(SPARE_OUT);
            assert_eq!(
                (s.fields.capacity(), s.out.capacity()),
                (SPARE_FIELDS, SPARE_OUT)
            );
            drop(s);
            assert_eq!(spares(), 1, "kept at the bounds");

            let many: Vec<Pooled> = (0..SPARES + 3).map(|_| used()).collect();
            drop(many);
            assert_eq!(spares(), SPARES);
        })
        .join()
        .expect("the test thread");
    }

    /// An answer done on its third poll, waking itself until then.
    fn third_poll() -> impl Future<Output = &'static str> {
        let mut polls = 0;
        poll_fn(move |cx| {
            polls += 1;
            if polls < 3 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready("answered")
        })
    }

    /// While a request runs the client is read into the room its head
    /// left, which is enough to see it close or a pipelined head arrive:
    /// the buffer is not grown while the head still shares it (that
    /// allocated 8 KiB anew on every connection for a single request). A
    /// full buffer is grown (the test above).
    #[tokio::test]
    async fn the_room_a_head_left_is_read_into_while_its_request_runs() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"next").await.expect("write");
        let mut buf = BytesMut::with_capacity(FIRST_READ);
        buf.extend_from_slice(&[b'h'; 100]);
        // Held, as the running request holds its head.
        let head = buf.split_to(100);
        let room = buf.capacity();
        assert!(room > 0 && room < 1024, "{room}");
        let out = watching(&mut server, &mut buf, 8192, pin!(third_poll()), None).await;
        assert_eq!(out, Some("answered"));
        assert_eq!(&buf[..], b"next");
        assert_eq!(buf.capacity(), room, "grown while the head shares it");
        assert_eq!(head.len(), 100);
    }
}
