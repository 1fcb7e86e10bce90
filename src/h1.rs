//! The in-future HTTP/1.1 client for plaintext upstreams.
//!
//! hyper's client runs every upstream connection as a task of its own and
//! talks to it through channels: a request crosses two tasks and wakes
//! each. Here the request's own future writes the head and reads the
//! answer, and the response body reads the socket when the server side
//! polls it. `bench/instructions.sh` measured 0.82× the instructions per
//! request of the hyper path on a prototype (BENCHMARKS.md).
//!
//! The scope is deliberately small, and stricter than hyper where framing
//! is ambiguous:
//!
//! - Only requests without a body come here (GET, HEAD, DELETE, ... with no
//!   content), those whose body came whole with the head to the
//!   listener's own loop (at most 16 KiB, framed by its one
//!   `Content-Length`, written after the head in the same write), and
//!   those whose body of at most [`MAX_STREAMED`] bytes the loop is still
//!   streaming (written part by part as it comes, while an answer that
//!   starts early ends the sending and the connection's reuse). A larger
//!   body still streaming keeps hyper's client, which streams it while the
//!   answer may already be arriving.
//! - A response is framed by RFC 9112 §6.3: no body after HEAD, 1xx, 204 and
//!   304; `Transfer-Encoding: chunked` (decoded here); `Content-Length`;
//!   otherwise until the upstream closes.
//! - Ambiguous framing is refused (502), never guessed: `Transfer-Encoding`
//!   with `Content-Length`, any transfer coding but a single `chunked`,
//!   differing or malformed lengths, chunk-size lines that are not hex
//!   digits with optional extensions, data not followed by CRLF.
//! - Interim 1xx answers (100, 103) are skipped; 101 is refused (the
//!   gateway never asks for an upgrade).
//! - A connection goes back to the pool only after a complete HTTP/1.1
//!   answer without `Connection: close`, with no byte left over.
//!
//! The parsing is sans-IO ([`parse_head`], [`Chunked`]) so the property
//! tests and the fuzz target drive it with arbitrary bytes; the pool tests
//! and `tests/h1_differential.rs` compare it, through real sockets, with
//! hyper's client.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version, request};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head (status line and headers) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head (hyper's client default).
pub const MAX_HEADERS: usize = 100;
/// Most interim (1xx) answers before the final one.
pub const MAX_INTERIM: usize = 16;
/// Longest chunk-size line, extensions included.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section.
pub const MAX_TRAILERS: usize = 64 * 1024;
/// How much is read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;
/// A response head is read into what is left of the read buffer while at
/// least this much is: one `READ_CHUNK` then serves many small answers
/// instead of one allocation (and a copy of the leftover) per answer.
const MIN_HEAD_READ: usize = 1024;

/// Why an answer could not be read. Every one is a 502 before the head, or
/// an aborted body after it; the connection is never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H1Error {
    /// Not a valid HTTP/1.x response head, or too large.
    Head,
    /// 101, or more interim answers than [`MAX_INTERIM`].
    Status,
    /// The framing headers are ambiguous or malformed.
    Framing,
    /// Malformed chunked coding or trailers.
    Chunk,
    /// The upstream closed before the answer was complete.
    Closed,
    /// The upstream closed or reset the connection without a byte of an
    /// answer: on a reused connection, the keep-alive race (the upstream
    /// timed the connection out as the request went out).
    NoAnswer,
}

impl std::fmt::Display for H1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            H1Error::Head => "malformed or oversized response head",
            H1Error::Status => "unexpected interim response",
            H1Error::Framing => "ambiguous or malformed response framing",
            H1Error::Chunk => "malformed chunked body",
            H1Error::Closed => "upstream closed before the response was complete",
            H1Error::NoAnswer => "upstream closed the connection without answering",
        })
    }
}

impl std::error::Error for H1Error {}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the upstream closes the connection.
    Eof,
}

/// A final response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// HTTP/1.1 without `Connection: close`, and a body framing that ends
    /// before the connection does.
    pub keep_alive: bool,
}

/// What [`parse_head`] found at the start of a buffer.
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An interim (1xx) answer of this many bytes, to be skipped.
    Interim(usize),
    /// The final head, and how many bytes it took.
    Final(Head, usize),
}

/// Parse a response head at the start of `buf`, answering a HEAD request
/// when `head_request`. Header values are slices of `buf`, without copies.
pub fn parse_head(buf: &Bytes, head_request: bool) -> Result<Parsed, H1Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(H1Error::Head),
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(_) => return Err(H1Error::Head),
    };
    if n > MAX_HEAD {
        return Err(H1Error::Head);
    }
    let code = resp.code.ok_or(H1Error::Head)?;
    let status = StatusCode::from_u16(code).map_err(|_| H1Error::Head)?;
    let version = match resp.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(H1Error::Head),
    };
    if status.is_informational() {
        return if status == StatusCode::SWITCHING_PROTOCOLS {
            Err(H1Error::Status)
        } else {
            Ok(Parsed::Interim(n))
        };
    }
    // One more than received: the gateway adds X-Request-Id when the
    // upstream did not, and a full map would grow (rehash) for it.
    let mut headers = HeaderMap::with_capacity(resp.headers.len() + 1);
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| H1Error::Head)?;
        let value =
            HeaderValue::from_maybe_shared(buf.slice_ref(h.value)).map_err(|_| H1Error::Head)?;
        headers.append(name, value);
    }
    let framing = framing(&headers, version, status, head_request)?;
    let keep_alive = version == Version::HTTP_11
        && framing != Framing::Eof
        && !headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"close"));
    Ok(Parsed::Final(
        Head {
            status,
            version,
            headers,
            framing,
            keep_alive,
        },
        n,
    ))
}

/// RFC 9112 §6.3, refusing what a smuggling attempt would need.
fn framing(
    headers: &HeaderMap,
    version: Version,
    status: StatusCode,
    head_request: bool,
) -> Result<Framing, H1Error> {
    let te = headers.get_all(header::TRANSFER_ENCODING);
    let cl = headers.get_all(header::CONTENT_LENGTH);
    let has_te = te.iter().next().is_some();
    let has_cl = cl.iter().next().is_some();
    if has_te && has_cl {
        return Err(H1Error::Framing);
    }
    // Validated even where the status says there is no body: a malformed
    // value is a broken upstream either way.
    let length = if has_cl {
        let mut length = None;
        for v in cl.iter() {
            for part in v.as_bytes().split(|&b| b == b',') {
                let n = parse_decimal(trim(part)).ok_or(H1Error::Framing)?;
                if length.is_some_and(|l| l != n) {
                    return Err(H1Error::Framing);
                }
                length = Some(n);
            }
        }
        length
    } else {
        None
    };
    if has_te {
        if version != Version::HTTP_11 {
            return Err(H1Error::Framing);
        }
        let mut values = te.iter();
        let only = values.next().map(|v| trim(v.as_bytes()));
        if values.next().is_some() || !only.is_some_and(|v| v.eq_ignore_ascii_case(b"chunked")) {
            return Err(H1Error::Framing);
        }
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    Ok(match (has_te, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Eof,
    })
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// 1 to 19 ASCII digits (fits in u64 without overflow checks being hit).
pub(crate) fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// `n` in decimal, with leading zeros to at least `width` digits, without
/// allocating: content lengths, and the access log's numbers and times.
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut tmp = [b'0'; 20];
    let mut at = tmp.len();
    loop {
        at -= 1;
        tmp[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[at.min(tmp.len().saturating_sub(width))..]);
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim(t).eq_ignore_ascii_case(token))
}

/// What [`Chunked::decode`] produced.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The trailer section (only when it has fields); the body has ended.
    Trailers(HeaderMap),
    /// The body has ended.
    End,
    /// More input is needed.
    NeedMore,
}

/// A decoder of the chunked transfer coding (RFC 9112 §7.1).
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

impl Chunked {
    /// Decode from the front of `buf`, consuming what was used.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(eol) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n')
                    else {
                        return if buf.len() >= MAX_CHUNK_LINE {
                            Err(H1Error::Chunk)
                        } else {
                            Ok(Decoded::NeedMore)
                        };
                    };
                    let size = chunk_size(&buf[..eol])?;
                    buf.advance(eol + 1);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Chunk);
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let (n, fields) = match httparse::parse_headers(buf, &mut slots) {
                        Ok(httparse::Status::Complete((n, fields))) => (n, fields),
                        Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                            return Err(H1Error::Chunk);
                        }
                        Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                        Err(_) => return Err(H1Error::Chunk),
                    };
                    // httparse takes a bare LF as a line end; hyper, and
                    // this decoder everywhere else, want CRLF.
                    if n > MAX_TRAILERS || bare_lf(&buf[..n]) {
                        return Err(H1Error::Chunk);
                    }
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for f in fields.iter() {
                        let name = HeaderName::from_bytes(f.name.as_bytes())
                            .map_err(|_| H1Error::Chunk)?;
                        let value = HeaderValue::from_bytes(f.value).map_err(|_| H1Error::Chunk)?;
                        trailers.append(name, value);
                    }
                    buf.advance(n);
                    self.state = ChunkState::Done;
                    return Ok(if trailers.is_empty() {
                        Decoded::End
                    } else {
                        Decoded::Trailers(trailers)
                    });
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// A chunk-size line without its LF: hex digits, then optionally
/// extensions (`;` and visible text), then CR.
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let line = line.strip_suffix(b"\r").ok_or(H1Error::Chunk)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(H1Error::Chunk);
    }
    let rest = trim_start(&line[digits..]);
    if !rest.is_empty()
        && (rest[0] != b';'
            || rest
                .iter()
                .any(|&b| b != b'\t' && !(b' '..=b'~').contains(&b)))
    {
        return Err(H1Error::Chunk);
    }
    let mut n = 0u64;
    for &d in &line[..digits] {
        // At most 16 hex digits: fits.
        n = (n << 4) | u64::from((d as char).to_digit(16).unwrap_or(0));
    }
    Ok(n)
}

/// Whether any LF in `b` is not preceded by CR.
fn bare_lf(b: &[u8]) -> bool {
    b.iter()
        .enumerate()
        .any(|(i, &c)| c == b'\n' && (i == 0 || b[i - 1] != b'\r'))
}

fn trim_start(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .unwrap_or(b.len());
    &b[start..]
}

/// Write a request head, as hyper's client would: the origin-form
/// target, `extra` (the gateway's own headers, `Host` first), then the
/// headers of the map (names lower-case; the caller makes sure no name in
/// `extra` is also in the map), no added framing.
/// Header values cannot hold CR, LF or NUL (`http`'s `HeaderValue`
/// invariant, which hyper's encoder relies on too).
pub fn encode_head<'a>(
    out: &mut Vec<u8>,
    parts: &request::Parts,
    extra: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    match parts.uri.path_and_query() {
        Some(pq) => out.extend_from_slice(pq.as_str().as_bytes()),
        None => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut field = |name: &HeaderName, value: &HeaderValue| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in extra {
        field(name, value);
    }
    for (name, value) in &parts.headers {
        field(name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// The write buffer's room a pooled connection keeps between requests:
/// enough for any usual head.
const KEEP_WBUF: usize = 8 * 1024;

/// Whether a request may use this client: not a tunnel, and no body, or
/// one whole in hand that its one `Content-Length` field frames exactly
/// (anything else would let the upstream read the bytes differently).
pub fn eligible(method: &Method, headers: &http::HeaderMap, body: Option<&[u8]>) -> bool {
    eligible_length(method, headers, body.map(|b| b.len() as u64))
}

/// [`eligible`] for a body of `length` bytes, in hand or still coming.
pub fn eligible_length(method: &Method, headers: &http::HeaderMap, length: Option<u64>) -> bool {
    if method == Method::CONNECT {
        return false;
    }
    let Some(length) = length else {
        return true;
    };
    let mut lengths = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let one = lengths.next().and_then(|v| parse_decimal(v.as_bytes()));
    lengths.next().is_none()
        && one == Some(length)
        && !headers.contains_key(http::header::TRANSFER_ENCODING)
}

/// The largest body still arriving that [`exchange_body`] takes: one
/// the socket's send buffer holds whole, so writing it never waits on an
/// upstream that answers without reading it.
pub const MAX_STREAMED: u64 = 16 * 1024;

/// One upstream connection and its buffers.
pub struct Conn {
    io: TcpStream,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
}

impl Conn {
    pub fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
        }
    }

    /// Whether an idle connection can carry a request: the upstream has not
    /// closed it or sent anything unasked. Costs no system call when the
    /// runtime has seen no event on the socket since the last read.
    pub fn idle_ok(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Write a request's head and then `body`, whole, which the head's
    /// own `Content-Length` frames (the caller checks it does). `Err`
    /// carries whether the upstream can have received the whole head: when
    /// not, it cannot have acted on the request.
    pub async fn write_request<'a>(
        &mut self,
        parts: &request::Parts,
        extra: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
        body: &[u8],
    ) -> Result<(), bool> {
        encode_head(&mut self.wbuf, parts, extra);
        let head = self.wbuf.len();
        // One write for both, as for a head alone: a body here is at most
        // what the listener's loop takes (16 KiB), and a copy of it costs
        // less than a second system call.
        self.wbuf.extend_from_slice(body);
        let mut at = 0;
        while at < self.wbuf.len() {
            match self.io.write(&self.wbuf[at..]).await {
                Ok(0) | Err(_) => return Err(at >= head),
                Ok(n) => at += n,
            }
        }
        if self.wbuf.capacity() > KEEP_WBUF {
            // An idle pooled connection does not keep a body's room.
            self.wbuf = Vec::new();
        }
        Ok(())
    }

    /// Read up to the final response head.
    pub async fn read_head(&mut self, head_request: bool) -> Result<Head, H1Error> {
        let mut interim = 0;
        loop {
            if !self.rbuf.is_empty() {
                // Parse a frozen view, so header values share its memory.
                // What follows the head goes back into the buffer's own
                // spare room after it (a copy of at most one read, without
                // an allocation while the room lasts).
                let view = self.rbuf.split().freeze();
                let parsed = parse_head(&view, head_request);
                match parsed {
                    Ok(Parsed::Partial) => {
                        // Nothing holds the view now: back to a mutable
                        // buffer without a copy, once the room after it is
                        // let go.
                        self.rbuf = BytesMut::new();
                        self.rbuf = restore(view);
                    }
                    Ok(Parsed::Interim(n)) => {
                        interim += 1;
                        if interim > MAX_INTERIM {
                            return Err(H1Error::Status);
                        }
                        self.rbuf.extend_from_slice(&view[n..]);
                        continue;
                    }
                    Ok(Parsed::Final(head, n)) => {
                        self.rbuf.extend_from_slice(&view[n..]);
                        return Ok(head);
                    }
                    Err(e) => return Err(e),
                }
            }
            let nothing_yet = interim == 0 && self.rbuf.is_empty();
            match std::future::poll_fn(|cx| self.poll_fill(cx, MIN_HEAD_READ)).await {
                Ok(0) | Err(_) if nothing_yet => return Err(H1Error::NoAnswer),
                Ok(0) => return Err(H1Error::Closed),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
    }

    /// Read more into `rbuf`, first making room for `READ_CHUNK` when less
    /// than `want` is free; `Ok(0)` is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<Result<usize, H1Error>> {
        if self.rbuf.capacity() - self.rbuf.len() < want {
            self.rbuf.reserve(READ_CHUNK);
        }
        // tokio's read_buf fills the spare capacity without zeroing it
        // first; the future holds no state, so one per poll is free.
        let read = std::pin::pin!(self.io.read_buf(&mut self.rbuf));
        match ready!(read.poll(cx)) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(H1Error::Closed)),
        }
    }
}

/// Back to a mutable buffer after a partial head: without a copy, as
/// nothing else holds the bytes by then; with one if something does.
fn restore(b: Bytes) -> BytesMut {
    match b.try_into_mut() {
        Ok(m) => m,
        Err(b) => BytesMut::from(&b[..]),
    }
}

/// Where an ended body's connection goes.
pub trait Return: Send + Sync {
    fn give_back(&self, conn: Conn);
}

/// A response body read from the connection as the server side polls it.
/// The connection goes back to its pool when the body ends cleanly with
/// nothing left over; dropped earlier, or after an error, it closes.
pub struct RawBody {
    conn: Option<Conn>,
    state: BodyState,
    keep_alive: bool,
    pool: Arc<dyn Return>,
}

enum BodyState {
    Length(u64),
    Chunked(Chunked),
    Eof,
    Done,
}

impl RawBody {
    /// The body that follows `head` on `conn`. An empty body ends at once.
    pub fn new(conn: Conn, head: &Head, pool: Arc<dyn Return>) -> RawBody {
        let state = match head.framing {
            Framing::Empty | Framing::Length(0) => BodyState::Length(0),
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(Chunked::default()),
            Framing::Eof => BodyState::Eof,
        };
        let mut body = RawBody {
            conn: Some(conn),
            state,
            keep_alive: head.keep_alive,
            pool,
        };
        if matches!(body.state, BodyState::Length(0)) {
            body.finish();
        }
        body
    }

    /// The body has ended: lend the connection out again if it may be.
    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.rbuf.is_empty()
        {
            self.pool.give_back(conn);
        }
    }

    fn fail(&mut self, e: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.state = BodyState::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(left) => {
                    if conn.rbuf.is_empty() {
                        match ready!(conn.poll_fill(cx, READ_CHUNK)) {
                            Ok(0) => return this.fail(H1Error::Closed),
                            Ok(_) => continue,
                            Err(e) => return this.fail(e),
                        }
                    }
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(conn.rbuf.len());
                    let data = conn.rbuf.split_to(n).freeze();
                    *left -= n as u64;
                    if *left == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::Chunked(dec) => match dec.decode(&mut conn.rbuf) {
                    Err(e) => return this.fail(e),
                    Ok(Decoded::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                    Ok(Decoded::Trailers(t)) => {
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Decoded::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => match ready!(conn.poll_fill(cx, READ_CHUNK)) {
                        Ok(0) => return this.fail(H1Error::Closed),
                        Ok(_) => {}
                        Err(e) => return this.fail(e),
                    },
                },
                BodyState::Eof => {
                    if !conn.rbuf.is_empty() {
                        let data = conn.rbuf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(conn.poll_fill(cx, READ_CHUNK)) {
                        Ok(0) => {
                            this.state = BodyState::Done;
                            this.conn = None;
                            return Poll::Ready(None);
                        }
                        Ok(_) => {}
                        Err(e) => return this.fail(e),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done | BodyState::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// A request's body for [`exchange_body`]: whole in hand, or still
/// arriving (see [`eligible_length`]; at most [`MAX_STREAMED`] bytes).
pub enum Outgoing<'b, B> {
    Whole(&'b [u8]),
    Streaming(B),
}

/// Send a request on `conn`, with the `extra` headers before the map's,
/// and `body` after the head (see [`eligible`]), and read the answer's
/// head. `Err` carries whether the request may be retried on another
/// connection (`true` only when the head was not wholly written).
pub async fn exchange<'a>(
    conn: Conn,
    parts: &request::Parts,
    extra: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    body: &[u8],
    pool: Arc<dyn Return>,
) -> Result<Response<RawBody>, (H1Error, bool)> {
    let body = Outgoing::<http_body_util::Empty<Bytes>>::Whole(body);
    exchange_body(conn, parts, extra, body, pool).await
}

/// [`exchange`] for either kind of body. A body still arriving is sent
/// part by part after the head as it comes, while the upstream is watched:
/// an answer that starts before the body has all gone ends the sending,
/// and its connection is not reused; a body that fails (its client went
/// away) fails the exchange. Such a request may be retried only when its
/// head was not wholly written, and so no part of the body was taken.
///
/// One function for both, so the gateway has one call of each part of the
/// exchange: with a second, the compiler stopped inlining reading the
/// head and writing the request, and a bodiless GET cost about 110
/// instructions more (bench/instructions.sh).
pub async fn exchange_body<'a, B>(
    mut conn: Conn,
    parts: &request::Parts,
    extra: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    body: Outgoing<'_, B>,
    pool: Arc<dyn Return>,
) -> Result<Response<RawBody>, (H1Error, bool)>
where
    B: Body<Data = Bytes> + Unpin,
{
    let (whole, mut streaming) = match body {
        Outgoing::Whole(b) => (b, None),
        Outgoing::Streaming(b) => (&[][..], Some(b)),
    };
    if let Err(head_whole) = conn.write_request(parts, extra, whole).await {
        return Err((H1Error::Closed, !head_whole));
    }
    let mut sent = true;
    if let Some(body) = streaming.as_mut() {
        sent = send_streaming(&mut conn, body).await?;
    }
    let mut head = conn
        .read_head(parts.method == Method::HEAD)
        .await
        .map_err(|e| (e, false))?;
    // Bytes of the request still owed: the connection cannot carry another.
    head.keep_alive &= sent;
    let body = RawBody::new(conn, &head, pool);
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    Ok(resp)
}

/// Write `body` to `conn` as it comes, until it ends (`Ok(true)`) or the
/// upstream starts to answer or fails a write (`Ok(false)`: its answer, if
/// any, is read next).
async fn send_streaming<B>(conn: &mut Conn, body: &mut B) -> Result<bool, (H1Error, bool)>
where
    B: Body<Data = Bytes> + Unpin,
{
    enum Next {
        Data(Bytes),
        End,
        Failed,
        Answer,
    }
    while !body.is_end_stream() {
        let next = std::future::poll_fn(|cx| {
            loop {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => return Poll::Ready(Next::Data(data)),
                        // No trailers after a `Content-Length` body.
                        Err(_) => continue,
                    },
                    Poll::Ready(Some(Err(_))) => return Poll::Ready(Next::Failed),
                    Poll::Ready(None) => return Poll::Ready(Next::End),
                    Poll::Pending => break,
                }
            }
            // Bytes from the upstream before the body has gone: its answer
            // (or its close, which reading the head reports).
            conn.poll_fill(cx, MIN_HEAD_READ).map(|_| Next::Answer)
        })
        .await;
        match next {
            // At most MAX_STREAMED in all: the send buffer takes it
            // without waiting on the upstream to read.
            Next::Data(data) => {
                if conn.io.write_all(&data).await.is_err() {
                    return Ok(false);
                }
            }
            Next::End => return Ok(true),
            Next::Failed => return Err((H1Error::Closed, false)),
            Next::Answer => return Ok(false),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, head_request: bool) -> Result<Head, H1Error> {
        match parse_head(&Bytes::copy_from_slice(raw.as_bytes()), head_request)? {
            Parsed::Final(h, n) => {
                assert_eq!(n, raw.len(), "the whole head is consumed");
                Ok(h)
            }
            other => panic!("not a final head: {other:?}"),
        }
    }

    fn framing_of(headers: &str) -> Result<Framing, H1Error> {
        head(&format!("HTTP/1.1 200 OK\r\n{headers}\r\n"), false).map(|h| h.framing)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(
            framing_of("content-length: 12\r\n"),
            Ok(Framing::Length(12))
        );
        assert_eq!(framing_of("Content-Length: 0\r\n"), Ok(Framing::Length(0)));
        assert_eq!(
            framing_of("transfer-encoding: chunked\r\n"),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing_of("Transfer-Encoding:  Chunked \r\n"),
            Ok(Framing::Chunked)
        );
        assert_eq!(framing_of(""), Ok(Framing::Eof));
        // Repeated equal lengths are one length (RFC 9110 §8.6).
        assert_eq!(
            framing_of("content-length: 7\r\ncontent-length: 7\r\n"),
            Ok(Framing::Length(7))
        );
        assert_eq!(
            framing_of("content-length: 7, 7\r\n"),
            Ok(Framing::Length(7))
        );
        // Spaces and tabs around each member, on either side.
        assert_eq!(
            framing_of("content-length: 7 ,\t7\t, 7\r\n"),
            Ok(Framing::Length(7))
        );
        // 19 digits always fit a u64 and are read; 20 are refused.
        assert_eq!(
            parse_decimal(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(parse_decimal(b"00000000000000000001"), None);
        assert_eq!(
            framing_of("content-length: 00000000000000000001\r\n"),
            Err(H1Error::Framing)
        );
        // No body whatever the headers say.
        for (status, head_request) in [
            ("204 No Content", false),
            ("304 Not Modified", false),
            ("200 OK", true),
        ] {
            let h = head(
                &format!("HTTP/1.1 {status}\r\ncontent-length: 50\r\n\r\n"),
                head_request,
            )
            .expect("head");
            assert_eq!(h.framing, Framing::Empty, "{status} head={head_request}");
        }
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for headers in [
            "content-length: 7\r\ntransfer-encoding: chunked\r\n",
            "transfer-encoding: chunked\r\ncontent-length: 7\r\n",
            "content-length: 7\r\ncontent-length: 8\r\n",
            "content-length: 7, 8\r\n",
            "content-length: +7\r\n",
            "content-length: -1\r\n",
            "content-length: 0x10\r\n",
            "content-length: 1 2\r\n",
            "content-length: \r\n",
            "content-length: 99999999999999999999\r\n",
            "transfer-encoding: gzip, chunked\r\n",
            "transfer-encoding: chunked, gzip\r\n",
            "transfer-encoding: gzip\r\n",
            "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
            "transfer-encoding: xchunked\r\n",
            "transfer-encoding: \r\n",
        ] {
            assert_eq!(
                framing_of(headers).err(),
                Some(H1Error::Framing),
                "{headers:?}"
            );
        }
        // Transfer-Encoding from an HTTP/1.0 upstream is a broken upstream.
        let r = head(
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(r.err(), Some(H1Error::Framing));
    }

    #[test]
    fn keep_alive_needs_http_1_1_a_delimited_body_and_no_close() {
        let ka = |raw: &str| head(raw, false).expect("head").keep_alive;
        assert!(ka("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(ka(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(!ka(
            "HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(!ka(
            "HTTP/1.1 200 OK\r\nconnection: upgrade, close\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(!ka("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(!ka(
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(
            !ka("HTTP/1.1 200 OK\r\n\r\n"),
            "read-until-close is never reused"
        );
    }

    #[test]
    fn interim_answers_are_skipped_and_101_refused() {
        let b = Bytes::from_static(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n");
        assert!(matches!(parse_head(&b, false), Ok(Parsed::Interim(25))));
        let b = Bytes::from_static(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n");
        assert_eq!(parse_head(&b, false).err(), Some(H1Error::Status));
    }

    #[test]
    fn malformed_and_oversized_heads_are_refused() {
        for raw in [
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 20 OK\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "ICY 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx\0: a\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: a\0b\r\n\r\n",
        ] {
            let r = parse_head(&Bytes::copy_from_slice(raw.as_bytes()), false);
            assert_eq!(r.err(), Some(H1Error::Head), "{raw:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let raw = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        let r = parse_head(&Bytes::from(raw), false);
        assert_eq!(r.err(), Some(H1Error::Head), "too many headers");
        let big = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        let r = parse_head(&Bytes::from(big), false);
        assert_eq!(
            r.err(),
            Some(H1Error::Head),
            "an unterminated head past the limit"
        );
        let partial = Bytes::from_static(b"HTTP/1.1 200 OK\r\ncontent-len");
        assert!(matches!(parse_head(&partial, false), Ok(Parsed::Partial)));
        // The bound, to the byte: a whole head of MAX_HEAD bytes is taken,
        // one byte more is not; an unfinished one of MAX_HEAD bytes may
        // still end, one byte more may not.
        let sized = |len: usize, end: &str| {
            let start = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx: ";
            let fill = "a".repeat(len - start.len() - end.len());
            Bytes::from(format!("{start}{fill}{end}"))
        };
        let whole = sized(MAX_HEAD, "\r\n\r\n");
        assert!(matches!(parse_head(&whole, false), Ok(Parsed::Final(_, n)) if n == MAX_HEAD));
        let over = sized(MAX_HEAD + 1, "\r\n\r\n");
        assert_eq!(parse_head(&over, false).err(), Some(H1Error::Head));
        let unfinished = sized(MAX_HEAD, "");
        assert!(matches!(
            parse_head(&unfinished, false),
            Ok(Parsed::Partial)
        ));
        let unfinished = sized(MAX_HEAD + 1, "");
        assert_eq!(parse_head(&unfinished, false).err(), Some(H1Error::Head));
    }

    #[test]
    fn header_values_share_the_read_buffer() {
        let b = Bytes::from_static(b"HTTP/1.1 200 OK\r\nx-a: hello\r\n\r\n");
        let Ok(Parsed::Final(h, _)) = parse_head(&b, false) else {
            panic!("head")
        };
        let v = h.headers.get("x-a").expect("x-a");
        assert_eq!(v, "hello");
        let inside = b.as_ptr_range().contains(&v.as_bytes().as_ptr());
        assert!(inside, "the value was copied");
    }

    /// Decode all of `input`, fed in pieces of `step` bytes.
    fn dechunk(input: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>, usize), H1Error> {
        let mut dec = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match dec.decode(&mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::Trailers(t) => return Ok((out, Some(t), buf.len() + input.len() - fed)),
                Decoded::End => return Ok((out, None, buf.len() + input.len() - fed)),
                Decoded::NeedMore => {
                    if fed == input.len() {
                        return Err(H1Error::Closed);
                    }
                    let n = step.min(input.len() - fed);
                    buf.extend_from_slice(&input[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let input =
            b"5\r\nhello\r\n1;ext=1\r\n \r\nA ; a=\"b\"\r\n0123456789\r\n0\r\nx-sum: 3\r\n\r\nNEXT";
        for step in 1..=input.len() {
            let (body, trailers, left) = dechunk(input, step).expect("valid");
            assert_eq!(body, b"hello 0123456789", "step {step}");
            let t = trailers.expect("trailers");
            assert_eq!(t.get("x-sum").map(|v| v.as_bytes()), Some(&b"3"[..]));
            assert_eq!(left, 4, "the bytes after the body are left alone");
        }
        let (body, trailers, _) = dechunk(b"0\r\n\r\n", 1).expect("empty");
        assert!(body.is_empty() && trailers.is_none());
        // Up to 16 hex digits (a u64), leading zeros included; the
        // refusal of 17 is in malformed_chunked_bodies_are_refused.
        let (body, _, _) =
            dechunk(b"0000000000000005\r\nhello\r\n0\r\n\r\n", 64).expect("16 digits");
        assert_eq!(body, b"hello");
        // Whitespace after the size is tolerated, as hyper does.
        let (body, _, _) = dechunk(b"5 \r\nhello\r\n0\r\n\r\n", 4).expect("size with BWS");
        assert_eq!(body, b"hello");
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for input in [
            &b"5\r\nhelloX\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"x\r\n",
            b"\r\n",
            b"-5\r\nhello\r\n",
            b"+5\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
            b"5 5\r\nhello\r\n",
            b"5;\x01\r\nhello\r\n",
            b"11111111111111111\r\n",
            b"0\r\nbad trailer\r\n\r\n",
        ] {
            let r = dechunk(input, 3);
            assert_eq!(
                r.err(),
                Some(H1Error::Chunk),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(dechunk(long.as_bytes(), 512).err(), Some(H1Error::Chunk));
        // Truncated: more input needed, none comes.
        assert_eq!(dechunk(b"5\r\nhel", 2).err(), Some(H1Error::Closed));
        // The trailer section's bound, to the byte, finished or not (an
        // unfinished one at the bound may still end: more is wanted).
        let trailers = |len: usize, end: &str| {
            let fill = "a".repeat(len - "x: ".len() - end.len());
            format!("0\r\nx: {fill}{end}").into_bytes()
        };
        let at = dechunk(&trailers(MAX_TRAILERS, "\r\n\r\n"), usize::MAX).expect("at the bound");
        assert!(at.1.is_some_and(|t| t.contains_key("x")));
        for (input, err) in [
            (trailers(MAX_TRAILERS + 1, "\r\n\r\n"), H1Error::Chunk),
            (trailers(MAX_TRAILERS, ""), H1Error::Closed),
            (trailers(MAX_TRAILERS + 1, ""), H1Error::Chunk),
        ] {
            assert_eq!(
                dechunk(&input, usize::MAX).err(),
                Some(err),
                "{}",
                input.len()
            );
        }
    }

    #[test]
    fn a_chunk_s_line_end_is_taken_as_soon_as_it_is_there() {
        let mut dec = Chunked::default();
        let mut buf = BytesMut::from(&b"5\r\nhello\r\n"[..]);
        assert!(matches!(dec.decode(&mut buf), Ok(Decoded::Data(d)) if d == "hello"));
        assert!(matches!(dec.decode(&mut buf), Ok(Decoded::NeedMore)));
        assert!(buf.is_empty(), "{buf:?} left");
        buf.extend_from_slice(b"0\r\n\r\n");
        assert!(matches!(dec.decode(&mut buf), Ok(Decoded::End)));
    }

    /// Keeps the connection a finished body gives back.
    struct Keep(std::sync::Mutex<Option<Conn>>);

    impl Return for Keep {
        fn give_back(&self, conn: Conn) {
            if let Ok(mut c) = self.0.lock() {
                *c = Some(conn);
            }
        }
    }

    #[tokio::test]
    async fn answers_split_across_reads_and_following_one_another_on_a_connection() {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Each answer is written in pieces, cut inside the head, between an
        // interim answer and the final one, and inside the body; the last
        // piece of one answer and the next request's answer never share a
        // write, but a head and its body may.
        let answers: Vec<Vec<&'static [u8]>> = vec![
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-le",
                b"ngth: 5\r\n\r\nhel",
                b"lo",
            ],
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 20",
                b"1 Created\r\ncontent-length: 2\r\n\r\nok",
            ],
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
            vec![b"H", b"TTP/1.1 204 No Content\r\n", b"\r\n"],
        ];
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            for pieces in answers {
                let _ = s.read(&mut buf).await.expect("request");
                for p in pieces {
                    s.write_all(p).await.expect("write");
                    s.flush().await.expect("flush");
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
        });
        let keep = Arc::new(Keep(std::sync::Mutex::new(None)));
        let mut conn = Conn::new(TcpStream::connect(addr).await.expect("connect"));
        let req = http::Request::get("/x").body(()).expect("request");
        let (parts, ()) = req.into_parts();
        let want: [(u16, &[u8]); 4] = [(200, b"hello"), (201, b"ok"), (200, b"abc"), (204, b"")];
        let within = std::time::Duration::from_secs(5);
        for (status, body) in want {
            let resp = tokio::time::timeout(within, exchange(conn, &parts, [], &[], keep.clone()))
                .await
                .expect("an answer in time")
                .map_err(|(e, _)| e)
                .expect("answer");
            assert_eq!(resp.status(), status);
            let got = tokio::time::timeout(within, resp.into_body().collect())
                .await
                .expect("the body in time")
                .expect("body")
                .to_bytes();
            assert_eq!(&got[..], body);
            conn = keep
                .0
                .lock()
                .expect("lock")
                .take()
                .expect("the connection came back after a complete answer");
        }
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_request_that_could_not_be_written_may_be_sent_again() {
        // The upstream resets the connection (what a closed pooled one
        // answers a write with): nothing of the request can have arrived,
        // so another connection may carry it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        server.set_zero_linger().expect("linger");
        drop(server);
        let mut probe = [0u8; 1];
        let reset = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                client.readable().await.expect("readable");
                match client.try_read(&mut probe) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => break other,
                }
            }
        })
        .await
        .expect("the reset in time");
        assert!(reset.is_err(), "a reset, not {reset:?}");
        let req = http::Request::get("/x").body(()).expect("request");
        let (parts, ()) = req.into_parts();
        let keep = Arc::new(Keep(std::sync::Mutex::new(None)));
        let got = exchange(Conn::new(client), &parts, [], b"", keep).await;
        assert!(
            matches!(got, Err((H1Error::Closed, true))),
            "{:?}",
            got.err()
        );
    }

    /// One exchange of a bodiless GET with an upstream that answers with
    /// `answer` in one write: the status, the connection given back, and
    /// the upstream's end of it (still open).
    async fn answered_with(answer: Vec<u8>) -> Result<(u16, Conn, TcpStream), H1Error> {
        let (got, upstream) = exchange_with(answer, false).await;
        let (status, conn) = got?;
        Ok((status, conn, upstream.expect("kept open")))
    }

    /// [`answered_with`], the upstream closing after its answer when
    /// `close`.
    async fn exchange_with(
        answer: Vec<u8>,
        close: bool,
    ) -> (Result<(u16, Conn), H1Error>, Option<TcpStream>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await.expect("request");
            s.write_all(&answer).await.expect("write");
            (!close).then_some(s)
        });
        let conn = Conn::new(TcpStream::connect(addr).await.expect("connect"));
        let keep = Arc::new(Keep(std::sync::Mutex::new(None)));
        let (parts, ()) = http::Request::get("/x")
            .body(())
            .expect("request")
            .into_parts();
        let within = std::time::Duration::from_secs(5);
        let got = tokio::time::timeout(within, exchange(conn, &parts, [], b"", keep.clone()))
            .await
            .expect("an answer in time");
        let upstream = server.await.expect("server");
        let got = got.map_err(|(e, _)| e).map(|resp| {
            let status = resp.status().as_u16();
            drop(resp);
            let conn = keep.0.lock().expect("lock").take().expect("given back");
            (status, conn)
        });
        (got, upstream)
    }

    #[tokio::test]
    async fn a_close_after_part_of_an_answer_is_not_a_close_without_one() {
        // Only a close before any byte is the keep-alive race that a
        // bodiless request is sent again for; after part of a head, or
        // after an interim answer, the upstream may have acted on it.
        for (answer, want) in [
            (&b""[..], H1Error::NoAnswer),
            (b"HTTP/1.1 200 OK\r\ncontent-le", H1Error::Closed),
            (b"HTTP/1.1 100 Continue\r\n\r\n", H1Error::Closed),
        ] {
            let (got, _) = exchange_with(answer.to_vec(), true).await;
            assert_eq!(
                got.map(|(s, _)| s),
                Err(want),
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_up_to_their_bound() {
        let answer = |interim: usize| {
            let mut a = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(interim);
            a.extend_from_slice(b"HTTP/1.1 204 No Content\r\n\r\n");
            a
        };
        assert_eq!(
            answered_with(answer(MAX_INTERIM)).await.map(|(s, ..)| s),
            Ok(204)
        );
        assert_eq!(
            answered_with(answer(MAX_INTERIM + 1))
                .await
                .map(|(s, ..)| s),
            Err(H1Error::Status)
        );
    }

    #[tokio::test]
    async fn a_pooled_connection_keeps_the_room_of_a_head_not_of_a_body() {
        let (_, mut conn, _upstream) = answered_with(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec())
            .await
            .expect("answer");
        // A head's room stays for the next request, and what is left of
        // the one read chunk takes the next answer's head.
        assert!(conn.wbuf.capacity() > 0);
        assert!(
            conn.rbuf.capacity() >= MIN_HEAD_READ,
            "{}",
            conn.rbuf.capacity()
        );
        let (parts, ()) = http::Request::post("/x")
            .body(())
            .expect("request")
            .into_parts();
        let body = vec![b'x'; 4 * KEEP_WBUF];
        conn.write_request(&parts, [], &body).await.expect("write");
        assert_eq!(conn.wbuf.capacity(), 0);
    }

    #[test]
    fn each_error_says_what_went_wrong() {
        // The text is what the debug log gives for a 502.
        use H1Error::*;
        let all = [Head, Status, Framing, Chunk, Closed, NoAnswer];
        let texts: std::collections::HashSet<String> = all.iter().map(|e| e.to_string()).collect();
        assert_eq!(texts.len(), all.len(), "{texts:?}");
        assert!(texts.iter().all(|t| t.len() > 10), "{texts:?}");
    }

    #[test]
    fn request_heads_are_written_as_hyper_writes_them() {
        let req = http::Request::builder()
            .method("DELETE")
            .uri("/v1/a?b=c")
            .header("host", "up:8080")
            .header("x-airbrx-tenant", "acme")
            .header("accept", "a")
            .header("accept", "b")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        let plan = (
            HeaderName::from_static("x-airbrx-plan"),
            HeaderValue::from_static("pro"),
        );
        encode_head(&mut out, &parts, [(&plan.0, &plan.1)]);
        assert_eq!(
            out,
            b"DELETE /v1/a?b=c HTTP/1.1\r\nx-airbrx-plan: pro\r\nhost: up:8080\r\nx-airbrx-tenant: acme\r\naccept: a\r\naccept: b\r\n\r\n"
        );
    }

    #[test]
    fn a_body_goes_only_when_its_one_length_frames_it() {
        let map = |fields: &[(&str, &str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in fields {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                );
            }
            m
        };
        let none = map(&[]);
        assert!(eligible(&Method::GET, &none, None));
        assert!(!eligible(&Method::CONNECT, &none, None));
        let five = map(&[("content-length", "5")]);
        assert!(eligible(&Method::POST, &five, Some(b"hello")));
        assert!(eligible(
            &Method::POST,
            &map(&[("content-length", "05")]),
            Some(b"hello")
        ));
        assert!(!eligible(&Method::POST, &five, Some(b"hell")));
        assert!(!eligible(&Method::POST, &none, Some(b"hello")));
        assert!(!eligible(
            &Method::POST,
            &map(&[("content-length", "5"), ("content-length", "5")]),
            Some(b"hello")
        ));
        assert!(!eligible(
            &Method::POST,
            &map(&[("content-length", "5, 5")]),
            Some(b"hello")
        ));
        assert!(!eligible(
            &Method::POST,
            &map(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
            Some(b"hello")
        ));
        assert!(!eligible(&Method::CONNECT, &five, Some(b"hello")));
    }
}
