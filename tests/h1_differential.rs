//! The in-future upstream client (src/h1.rs) against hyper's client, on
//! the same bytes from a real socket: generated answers of every framing
//! (lengths right, short, long, repeated; chunked with extensions and
//! trailers split anywhere; read-until-close; interim 1xx; HEAD, 204, 304)
//! must give the same status, headers, body and trailers through both, or
//! an error through both. The in-future client may refuse more than hyper,
//! but only the ambiguous framings it documents.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::large_enum_variant)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use scopegate::h1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, PartialEq)]
enum Outcome {
    Answer {
        status: u16,
        headers: HeaderMap,
        body: Vec<u8>,
        trailers: Option<HeaderMap>,
    },
    HeadError,
    BodyError,
    Timeout,
}

/// Counts the connections the in-future client gives back.
struct Returned(AtomicUsize);

impl h1::Return for Returned {
    fn give_back(&self, _conn: h1::Conn) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Accept one connection, read the request head, write `answer`, close.
async fn upstream(answer: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s.write_all(&answer).await;
        let _ = s.shutdown().await;
    });
    addr
}

fn request(method: &Method) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method.clone())
        .uri("/v1/tenants/acme/markers")
        .header("host", "upstream")
        .body(Empty::new())
        .expect("request")
}

async fn collect<B>(status: u16, headers: HeaderMap, mut body: B) -> Outcome
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Outcome::BodyError;
        };
        match frame.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    Outcome::Answer {
        status,
        headers,
        body: data,
        trailers,
    }
}

async fn via_raw(answer: Vec<u8>, method: &Method) -> (Outcome, usize) {
    let addr = upstream(answer).await;
    let returned = Arc::new(Returned(AtomicUsize::new(0)));
    let back: Arc<dyn h1::Return> = returned.clone();
    let run = async {
        let conn = h1::Conn::new(TcpStream::connect(addr).await.expect("connect"));
        let (parts, _) = request(method).into_parts();
        match h1::exchange(conn, &parts, [], &[], back).await {
            Err(_) => Outcome::HeadError,
            Ok(resp) => {
                let (p, body) = resp.into_parts();
                collect(p.status.as_u16(), p.headers, body).await
            }
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap_or(Outcome::Timeout);
    (outcome, returned.0.load(Ordering::Relaxed))
}

async fn via_hyper(answer: Vec<u8>, method: &Method) -> Outcome {
    let addr = upstream(answer).await;
    let run = async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        match tx.send_request(request(method)).await {
            Err(_) => Outcome::HeadError,
            Ok(resp) => {
                let (p, body) = resp.into_parts();
                collect(p.status.as_u16(), p.headers, body).await
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap_or(Outcome::Timeout)
}

/// How the generated answer delimits its body.
#[derive(Debug, Clone)]
enum Framing {
    Length,
    /// Announces more than it sends, then closes.
    LengthShort(usize),
    /// Announces less than it sends.
    LengthLong(usize),
    LengthTwiceSame,
    LengthTwiceDiffering,
    Chunked {
        splits: Vec<usize>,
        ext: bool,
        trailers: bool,
        upper_hex: bool,
    },
    /// Chunked, cut off before the last chunk.
    ChunkedTruncated,
    Eof,
    // Ambiguous: the in-future client may refuse these.
    TeAndLength,
    TeGzipChunked,
    TeTwice,
}

impl Framing {
    fn ambiguous(&self) -> bool {
        matches!(
            self,
            Framing::TeAndLength
                | Framing::TeGzipChunked
                | Framing::TeTwice
                | Framing::LengthTwiceDiffering
        )
    }
    fn chunked(&self) -> bool {
        matches!(
            self,
            Framing::Chunked { .. }
                | Framing::ChunkedTruncated
                | Framing::TeAndLength
                | Framing::TeGzipChunked
                | Framing::TeTwice
        )
    }
}

#[derive(Debug, Clone)]
struct Answer {
    http10: bool,
    interim: Vec<u16>,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    framing: Framing,
    close: bool,
}

fn chunk(out: &mut Vec<u8>, data: &[u8], ext: bool, upper: bool) {
    let size = if upper {
        format!("{:X}", data.len())
    } else {
        format!("{:x}", data.len())
    };
    out.extend_from_slice(size.as_bytes());
    if ext {
        out.extend_from_slice(b";name=\"v\"");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

impl Answer {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for code in &self.interim {
            out.extend_from_slice(
                format!("HTTP/1.1 {code} Interim\r\nlink: </s.css>\r\n\r\n").as_bytes(),
            );
        }
        let version = if self.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        out.extend_from_slice(format!("{version} {} Answer\r\n", self.status).as_bytes());
        for (n, v) in &self.headers {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        if self.close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        let len = self.body.len();
        match &self.framing {
            Framing::Length => {
                out.extend_from_slice(format!("content-length: {len}\r\n").as_bytes())
            }
            Framing::LengthShort(extra) => {
                out.extend_from_slice(format!("content-length: {}\r\n", len + extra).as_bytes())
            }
            Framing::LengthLong(less) => out.extend_from_slice(
                format!("content-length: {}\r\n", len.saturating_sub(*less)).as_bytes(),
            ),
            Framing::LengthTwiceSame => out.extend_from_slice(
                format!("content-length: {len}\r\nContent-Length: {len}\r\n").as_bytes(),
            ),
            Framing::LengthTwiceDiffering => out.extend_from_slice(
                format!("content-length: {len}\r\ncontent-length: {}\r\n", len + 1).as_bytes(),
            ),
            Framing::Chunked { .. } | Framing::ChunkedTruncated => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n")
            }
            Framing::TeAndLength => out.extend_from_slice(
                format!("transfer-encoding: chunked\r\ncontent-length: {len}\r\n").as_bytes(),
            ),
            Framing::TeGzipChunked => {
                out.extend_from_slice(b"transfer-encoding: gzip, chunked\r\n")
            }
            Framing::TeTwice => out
                .extend_from_slice(b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n"),
            Framing::Eof => {}
        }
        out.extend_from_slice(b"\r\n");
        if self.framing.chunked() {
            let (splits, ext, trailers, upper) = match &self.framing {
                Framing::Chunked {
                    splits,
                    ext,
                    trailers,
                    upper_hex,
                } => (splits.clone(), *ext, *trailers, *upper_hex),
                _ => (vec![], false, false, false),
            };
            let mut at = 0;
            for s in splits {
                let end = (at + s).min(self.body.len());
                if end > at {
                    chunk(&mut out, &self.body[at..end], ext, upper);
                }
                at = end;
            }
            if at < self.body.len() {
                chunk(&mut out, &self.body[at..], ext, upper);
            }
            if matches!(self.framing, Framing::ChunkedTruncated) {
                return out;
            }
            out.extend_from_slice(b"0\r\n");
            if trailers {
                out.extend_from_slice(b"x-checksum: abc\r\n");
            }
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        3 => Just(Framing::Length),
        1 => (1usize..20).prop_map(Framing::LengthShort),
        1 => (1usize..20).prop_map(Framing::LengthLong),
        1 => Just(Framing::LengthTwiceSame),
        1 => Just(Framing::LengthTwiceDiffering),
        3 => (prop::collection::vec(1usize..40, 0..6), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(splits, ext, trailers, upper_hex)| Framing::Chunked { splits, ext, trailers, upper_hex }),
        1 => Just(Framing::ChunkedTruncated),
        2 => Just(Framing::Eof),
        1 => Just(Framing::TeAndLength),
        1 => Just(Framing::TeGzipChunked),
        1 => Just(Framing::TeTwice),
    ]
}

fn answer() -> impl Strategy<Value = Answer> {
    (
        prop::bool::weighted(0.15),
        prop::collection::vec(prop::sample::select(vec![100u16, 102, 103]), 0..3),
        prop::sample::select(vec![200u16, 201, 204, 206, 301, 304, 400, 404, 500, 503]),
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    "x-a",
                    "X-Mixed-Case",
                    "server",
                    "set-cookie",
                    "etag",
                    "content-type",
                ]),
                "[!-~]([ !-~]{0,18}[!-~])?",
            ),
            0..5,
        ),
        prop::collection::vec(any::<u8>(), 0..200),
        framing(),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(http10, interim, status, headers, body, framing, close)| Answer {
                http10,
                interim,
                status,
                headers: headers
                    .into_iter()
                    .map(|(n, v)| (n.to_owned(), v))
                    .collect(),
                body,
                framing,
                close,
            },
        )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The differential rule, for one answer to one method.
fn agree(a: &Answer, method: &Method, rt: &tokio::runtime::Runtime) -> Result<(), TestCaseError> {
    let bytes = a.bytes();
    let (raw, returned) = rt.block_on(via_raw(bytes.clone(), method));
    let hyper = rt.block_on(via_hyper(bytes, method));
    prop_assert_ne!(&raw, &Outcome::Timeout, "the in-future client hung");
    let refused = matches!(raw, Outcome::HeadError | Outcome::BodyError);
    let strict = refused && (a.framing.ambiguous() || (a.http10 && a.framing.chunked()));
    if !strict {
        prop_assert_eq!(
            &raw,
            &hyper,
            "answer: {:?}",
            String::from_utf8_lossy(&a.bytes())
        );
    }
    // Reused only after a complete HTTP/1.1 answer with nothing left over.
    if returned > 0 {
        prop_assert!(!a.http10 && !a.close, "reused after HTTP/1.0 or close");
        prop_assert!(
            matches!(raw, Outcome::Answer { .. }),
            "reused after an error"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn the_in_future_client_answers_as_hyper_does(a in answer(), head in prop::bool::weighted(0.2)) {
        let rt = runtime();
        let method = if head { Method::HEAD } else { Method::GET };
        agree(&a, &method, &rt)?;
    }
}

/// One chunk of a chunked body, with the ways a broken upstream gets it
/// wrong: a size off by one, odd extensions, bare LF or CR line ends,
/// something other than CRLF after the data.
#[derive(Debug, Clone)]
struct Chunk {
    data: Vec<u8>,
    size_off: i8,
    size_text: &'static str,
    ext: &'static str,
    line_end: &'static str,
    data_end: &'static str,
}

fn chunks() -> impl Strategy<Value = (Vec<Chunk>, &'static str, &'static str)> {
    let chunk = (
        prop::collection::vec(any::<u8>(), 1..30),
        prop_oneof![8 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)],
        prop::sample::select(vec!["", "", "", "", "0", "00000000", " ", "\t", "+", "0x"]),
        prop::sample::select(vec![
            "",
            "",
            "",
            ";a",
            ";a=b",
            "; a = \"b c\"",
            ";",
            ";\x01",
            ";\x7f",
            " ;a",
            ";a\u{80}",
        ]),
        prop::sample::select(vec!["\r\n", "\r\n", "\r\n", "\r\n", "\n", "\r", "\r\r\n"]),
        prop::sample::select(vec!["\r\n", "\r\n", "\r\n", "\r\n", "\n", "X\n", "\rX", ""]),
    )
        .prop_map(
            |(data, size_off, size_text, ext, line_end, data_end)| Chunk {
                data,
                size_off,
                size_text,
                ext,
                line_end,
                data_end,
            },
        );
    (
        prop::collection::vec(chunk, 0..4),
        prop::sample::select(vec![
            "0\r\n", "0\r\n", "0\r\n", "000\r\n", "0;x\r\n", "0\n", "",
        ]),
        prop::sample::select(vec![
            "\r\n",
            "\r\n",
            "x-t: 1\r\n\r\n",
            "bad\r\n\r\n",
            "\n",
            "x-t: 1\r\n",
            "",
        ]),
    )
}

fn chunked_answer(chunks: &[Chunk], last: &str, trailer: &str) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for c in chunks {
        let size = (c.data.len() as i64 + i64::from(c.size_off)).max(0);
        out.extend_from_slice(format!("{}{size:x}{}{}", c.size_text, c.ext, c.line_end).as_bytes());
        out.extend_from_slice(&c.data);
        out.extend_from_slice(c.data_end.as_bytes());
    }
    out.extend_from_slice(last.as_bytes());
    out.extend_from_slice(trailer.as_bytes());
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    /// Chunked bodies, well- and ill-formed: what the in-future client
    /// accepts, hyper accepts with the same body and trailers; what hyper
    /// refuses, it refuses.
    #[test]
    fn chunked_bodies_decode_as_hyper_decodes_them((c, last, trailer) in chunks()) {
        let rt = runtime();
        let bytes = chunked_answer(&c, last, trailer);
        let (raw, _) = rt.block_on(via_raw(bytes.clone(), &Method::GET));
        let hyper = rt.block_on(via_hyper(bytes.clone(), &Method::GET));
        prop_assert_ne!(&raw, &Outcome::Timeout);
        if matches!(raw, Outcome::Answer { .. }) || matches!(hyper, Outcome::HeadError | Outcome::BodyError) {
            prop_assert_eq!(&raw, &hyper, "answer: {:?}", String::from_utf8_lossy(&bytes));
        }
    }
}

/// The generator reaches every framing, and the strict cases do differ:
/// without these, a generator bug could make the property vacuous.
#[test]
fn the_strict_cases_are_refused_and_the_plain_ones_answered() {
    let rt = runtime();
    let base = Answer {
        http10: false,
        interim: vec![],
        status: 200,
        headers: vec![("x-a".into(), "1".into())],
        body: b"hello, world".to_vec(),
        framing: Framing::Length,
        close: false,
    };
    for f in [
        Framing::TeAndLength,
        Framing::TeGzipChunked,
        Framing::TeTwice,
    ] {
        let a = Answer {
            framing: f.clone(),
            ..base.clone()
        };
        let (raw, _) = rt.block_on(via_raw(a.bytes(), &Method::GET));
        assert_eq!(raw, Outcome::HeadError, "{f:?}");
    }
    for f in [
        Framing::Length,
        Framing::Eof,
        Framing::LengthTwiceSame,
        Framing::Chunked {
            splits: vec![3, 4],
            ext: true,
            trailers: true,
            upper_hex: true,
        },
    ] {
        let a = Answer {
            framing: f.clone(),
            interim: vec![100, 103],
            ..base.clone()
        };
        let (raw, returned) = rt.block_on(via_raw(a.bytes(), &Method::GET));
        let Outcome::Answer { body, trailers, .. } = &raw else {
            panic!("{f:?}: {raw:?}")
        };
        assert_eq!(body, b"hello, world", "{f:?}");
        assert_eq!(
            trailers.is_some(),
            matches!(f, Framing::Chunked { trailers: true, .. })
        );
        assert_eq!(returned, usize::from(!matches!(f, Framing::Eof)), "{f:?}");
        assert_eq!(
            raw,
            rt.block_on(via_hyper(a.bytes(), &Method::GET)),
            "{f:?}"
        );
    }
    for f in [Framing::LengthShort(5), Framing::ChunkedTruncated] {
        let a = Answer {
            framing: f.clone(),
            ..base.clone()
        };
        let (raw, returned) = rt.block_on(via_raw(a.bytes(), &Method::GET));
        assert_eq!(raw, Outcome::BodyError, "{f:?}");
        assert_eq!(returned, 0);
    }
}
