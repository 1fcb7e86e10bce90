//! Hand-built HTTP/2 frames and header blocks, so that requests a
//! well-behaved client library refuses to produce still reach the
//! gateway, and a reader for what HPACK representations the gateway chose
//! (which no client library reports).

/// One frame: 24-bit length, type, flags, stream id.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK integer with an `n`-bit prefix.
fn int(out: &mut Vec<u8>, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literal fields without indexing, no Huffman: the
/// bytes arrive exactly as written, uppercase and all.
pub fn block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name);
        int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;

/// One frame as read.
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// The next whole frame from `s`, with `buf` holding what was read past
/// it; `None` when the connection ends, fails or is silent for 5 s.
pub async fn next_frame(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<Frame> {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if buf.len() >= 9 {
            let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
            if buf.len() >= 9 + len {
                let frame = Frame {
                    kind: buf[3],
                    flags: buf[4],
                    stream: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                    payload: buf[9..9 + len].to_vec(),
                };
                buf.drain(..9 + len);
                return Some(frame);
            }
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// How a header block represented one field (RFC 7541 §6). `name` is the
/// index of the name in the static (1-61) or dynamic (62 on) table, 0 when
/// the name is a literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rep {
    /// Name and value from a table.
    Indexed(usize),
    /// A literal value, added to the dynamic table.
    Incremental { name: usize },
    /// A literal value, not added.
    WithoutIndexing { name: usize },
    /// A literal value that no one on the way may add.
    NeverIndexed { name: usize },
    /// A change of the dynamic table's size.
    SizeUpdate(usize),
}

/// The representations in a header block, in order; `None` when it does
/// not parse. Strings are skipped by their length, Huffman-coded or not.
pub fn representations(mut b: &[u8]) -> Option<Vec<Rep>> {
    let mut out = Vec::new();
    while let Some(&first) = b.first() {
        let rep = if first & 0x80 != 0 {
            Rep::Indexed(read_int(&mut b, 7)?)
        } else if first & 0x40 != 0 {
            let name = read_int(&mut b, 6)?;
            skip_literal(&mut b, name)?;
            Rep::Incremental { name }
        } else if first & 0x20 != 0 {
            Rep::SizeUpdate(read_int(&mut b, 5)?)
        } else {
            let never = first & 0x10 != 0;
            let name = read_int(&mut b, 4)?;
            skip_literal(&mut b, name)?;
            if never {
                Rep::NeverIndexed { name }
            } else {
                Rep::WithoutIndexing { name }
            }
        };
        out.push(rep);
    }
    Some(out)
}

/// An HPACK integer with an `n`-bit prefix, from the front of `b`.
fn read_int(b: &mut &[u8], n: u8) -> Option<usize> {
    let max = (1usize << n) - 1;
    let (&first, rest) = b.split_first()?;
    *b = rest;
    let mut v = first as usize & max;
    if v < max {
        return Some(v);
    }
    let mut shift = 0;
    loop {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v += ((byte & 0x7f) as usize) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// Skip a literal field's name (when not indexed) and value.
fn skip_literal(b: &mut &[u8], name: usize) -> Option<()> {
    if name == 0 {
        skip_string(b)?;
    }
    skip_string(b)
}

fn skip_string(b: &mut &[u8]) -> Option<()> {
    // The length's 7-bit prefix sits under the Huffman flag.
    let len = read_int(b, 7)?;
    *b = b.get(len..)?;
    Some(())
}
