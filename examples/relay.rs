//! The cheapest proxy there is, for bench/load.sh: a single-thread epoll
//! loop that gives every client connection its own upstream connection
//! and copies bytes between the two, one `read` and one `write` per
//! readable socket. No HTTP, no parsing, no timers, no allocation per
//! request.
//!
//! What it adds over the direct pass is what the machine charges for
//! putting any process in the path: two more loopback hops, and wake-ups
//! on another CPU. A latency target below what it adds cannot be met on
//! that machine by any proxy; what a real proxy adds beyond it is the
//! proxy's own.
//!
//! Writes block (the sockets stay in blocking mode; reads happen only when
//! epoll says a socket is readable). That is safe for the small
//! request-answer exchanges of the benchmark and keeps the loop to the
//! system calls any proxy must make; it is not a general-purpose relay.
//!
//! Usage: relay LISTEN_ADDR UPSTREAM_ADDR

#[cfg(target_os = "linux")]
fn main() {
    linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("relay needs Linux (epoll)");
    std::process::exit(2);
}

#[cfg(target_os = "linux")]
mod linux {
    use rustix::event::epoll;
    use std::io::{ErrorKind, Read, Write};
    use std::net::{TcpListener, TcpStream};

    const LISTENER: u64 = u64::MAX;

    /// One end of a relayed pair; `peer` is the slot of the other end.
    struct Side {
        stream: TcpStream,
        peer: usize,
    }

    pub fn main() {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let [listen, upstream] = args.as_slice() else {
            eprintln!("usage: relay LISTEN_ADDR UPSTREAM_ADDR");
            std::process::exit(2);
        };
        let listener =
            TcpListener::bind(listen).unwrap_or_else(|e| die(&format!("bind {listen}"), &e));
        let e = run(&listener, upstream);
        die("stopped", &e);
    }

    /// Relays every connection `listener` accepts to `upstream`, until an
    /// epoll call fails (its error is returned).
    pub fn run(listener: &TcpListener, upstream: &str) -> std::io::Error {
        if let Err(e) = listener.set_nonblocking(true) {
            return e;
        }
        let ep = match epoll::create(epoll::CreateFlags::CLOEXEC) {
            Ok(ep) => ep,
            Err(e) => return e.into(),
        };
        if let Err(e) = epoll::add(
            &ep,
            listener,
            epoll::EventData::new_u64(LISTENER),
            epoll::EventFlags::IN,
        ) {
            return e.into();
        }
        let mut sides: Vec<Option<Side>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        // Slots closed in this batch of events: reused only after it, so a
        // later event of the batch for a closed slot cannot reach a new
        // connection (whose blocking read could then wait).
        let mut retired: Vec<usize> = Vec::new();
        let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            events.clear();
            if let Err(e) = epoll::wait(&ep, rustix::buffer::spare_capacity(&mut events), None) {
                if e == rustix::io::Errno::INTR {
                    continue;
                }
                return e.into();
            }
            for ev in &events {
                match ev.data.u64() {
                    LISTENER => {
                        if let Err(e) = accept_all(listener, upstream, &ep, &mut sides, &mut free) {
                            return e;
                        }
                    }
                    key => {
                        let i = key as usize;
                        if !relay_once(&mut sides, i, &mut buf) {
                            close_pair(&mut sides, &mut retired, i);
                        }
                    }
                }
            }
            free.append(&mut retired);
        }
    }

    /// Accepts every waiting client and connects each to the upstream.
    /// Fails only if epoll does.
    fn accept_all(
        listener: &TcpListener,
        upstream: &str,
        ep: &std::os::fd::OwnedFd,
        sides: &mut Vec<Option<Side>>,
        free: &mut Vec<usize>,
    ) -> std::io::Result<()> {
        loop {
            let client = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => {
                    // Out of descriptors, say: the client waits in the
                    // backlog, and the next event retries.
                    eprintln!("relay: accept: {e}");
                    return Ok(());
                }
            };
            let up = match TcpStream::connect(upstream) {
                Ok(s) => s,
                Err(e) => {
                    // The client sees its connection closed, as from any
                    // proxy whose upstream is down.
                    eprintln!("relay: connect {upstream}: {e}");
                    continue;
                }
            };
            for s in [&client, &up] {
                // Accepted sockets do not inherit the listener's O_NONBLOCK
                // on Linux, but say so rather than rely on it.
                let _ = s.set_nonblocking(false);
                let _ = s.set_nodelay(true);
            }
            let (a, b) = (slot(sides, free), slot(sides, free));
            for (i, s) in [(a, &client), (b, &up)] {
                epoll::add(
                    ep,
                    s,
                    epoll::EventData::new_u64(i as u64),
                    epoll::EventFlags::IN,
                )?;
            }
            sides[a] = Some(Side {
                stream: client,
                peer: b,
            });
            sides[b] = Some(Side {
                stream: up,
                peer: a,
            });
        }
    }

    /// A free slot's index, reusing closed ones first.
    fn slot(sides: &mut Vec<Option<Side>>, free: &mut Vec<usize>) -> usize {
        free.pop().unwrap_or_else(|| {
            sides.push(None);
            sides.len() - 1
        })
    }

    /// Reads what side `i` has and writes it all to its peer. False when
    /// the pair is done: end of stream or an error on either side.
    fn relay_once(sides: &mut [Option<Side>], i: usize, buf: &mut [u8]) -> bool {
        let Some(Some(side)) = sides.get_mut(i) else {
            // An event for a pair closed earlier in the same batch.
            return true;
        };
        let peer = side.peer;
        let n = match side.stream.read(buf) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::WouldBlock => {
                return true;
            }
            Err(_) => return false,
        };
        match sides.get_mut(peer) {
            Some(Some(p)) => p.stream.write_all(&buf[..n]).is_ok(),
            _ => false,
        }
    }

    /// Closes both sockets of the pair side `i` belongs to (closing a
    /// socket also takes it out of the epoll set).
    fn close_pair(sides: &mut [Option<Side>], retired: &mut Vec<usize>, i: usize) {
        if let Some(side) = sides.get_mut(i).and_then(Option::take) {
            retired.push(i);
            if sides.get_mut(side.peer).and_then(Option::take).is_some() {
                retired.push(side.peer);
            }
        }
    }

    fn die(what: &str, e: &dyn std::fmt::Display) -> ! {
        eprintln!("relay: {what}: {e}");
        std::process::exit(1);
    }

    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    mod tests {
        use super::*;
        use std::time::Duration;

        /// An upstream that answers every chunk it reads with the same
        /// bytes upper-cased, and closes its side after reading "bye".
        fn upper_upstream() -> String {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap().to_string();
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let mut s = s.unwrap();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 4096];
                        loop {
                            let n = match s.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if &buf[..n] == b"bye" {
                                return;
                            }
                            if s.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            addr
        }

        fn relay_to(upstream: String) -> String {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap().to_string();
            std::thread::spawn(move || run(&l, &upstream));
            addr
        }

        fn connect(addr: &str) -> TcpStream {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        }

        #[test]
        fn bytes_pass_both_ways_on_several_connections_at_once() {
            let relay = relay_to(upper_upstream());
            let mut conns: Vec<TcpStream> = (0..3).map(|_| connect(&relay)).collect();
            for round in 0..3 {
                for (i, c) in conns.iter_mut().enumerate() {
                    // 10 kB: more than one read of the upstream's buffer.
                    let msg: Vec<u8> = (0..10_000)
                        .map(|k| b'a' + ((k + i + round) % 26) as u8)
                        .collect();
                    c.write_all(&msg).unwrap();
                    let mut back = vec![0u8; msg.len()];
                    c.read_exact(&mut back).unwrap();
                    assert_eq!(
                        back,
                        msg.to_ascii_uppercase(),
                        "connection {i}, round {round}"
                    );
                }
            }
        }

        #[test]
        fn the_client_sees_the_upstream_close() {
            let relay = relay_to(upper_upstream());
            let mut c = connect(&relay);
            c.write_all(b"hi").unwrap();
            let mut back = [0u8; 2];
            c.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"HI");
            c.write_all(b"bye").unwrap();
            let mut rest = Vec::new();
            assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
            // The relay keeps serving new connections after closing one.
            let mut d = connect(&relay);
            d.write_all(b"ok").unwrap();
            d.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"OK");
        }

        #[test]
        fn a_client_whose_upstream_is_down_is_closed() {
            // A port nothing listens on: bind one, note it, drop it.
            let down = {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().to_string()
            };
            let relay = relay_to(down);
            let mut c = connect(&relay);
            let mut rest = Vec::new();
            // Closed (EOF or reset), not left hanging until the timeout.
            match c.read_to_end(&mut rest) {
                Ok(n) => assert_eq!(n, 0),
                Err(e) => assert_ne!(e.kind(), ErrorKind::WouldBlock, "timed out"),
            }
        }
    }
}
