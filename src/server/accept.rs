//! Accepting connections without the failed `accept4` after each one.
//!
//! tokio's `TcpListener` accepts until the kernel answers `EAGAIN`: its
//! readiness is edge-triggered and only a failed call clears it. With
//! connections coming one at a time that is a failed `accept4` for most
//! connections (0.68 a request under `wrk -c32` with `Connection: close`;
//! nginx, which accepts once per level-triggered wake-up, makes none).
//! Linux makes that failure dear: `accept4` allocates the new socket's
//! inode, dentry and file before it looks at the queue, and frees them
//! again when the queue is empty. Timed here from Python, a failed
//! `accept4` costs about 4 µs more than a failed `getsockopt`, and a `poll`
//! of the listener costs what a `getsockopt` does.
//!
//! So after each connection the listener is polled with no timeout: when
//! nothing more is queued its readiness is cleared, and the next accept
//! waits for epoll instead of failing. Clearing is safe against a
//! connection that arrives just after the look: epoll queues its edge, and
//! tokio's readiness ticks keep a clear from undoing a newer readiness.
//! Elsewhere than Linux the listener is tokio's, unchanged.
//!
//! One thing tokio's accept did is lost: it marks the streams it accepts
//! readable (crate-private), so the first read tries the socket at once.
//! `TcpStream::from_std` cannot, and the first read waits for the epoll
//! event that registering the socket raises anyway. That is one more poll
//! of the connection's task (about 480 user-space instructions a
//! connection, 1.6%), against a failed system call saved.

use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use tokio::net::{TcpListener, TcpStream};

/// The proxy's listening socket, as [`super::serve_with`] accepts from it.
pub(super) struct Listener {
    #[cfg(target_os = "linux")]
    fd: tokio::io::unix::AsyncFd<std::net::TcpListener>,
    #[cfg(not(target_os = "linux"))]
    inner: TcpListener,
}

#[cfg(target_os = "linux")]
impl Listener {
    pub(super) fn new(listener: TcpListener) -> io::Result<Listener> {
        // Deprecated in tokio 1.54 for want of I/O safety in general: its
        // replacement is `unsafe`, which this crate forbids. Sound here, by
        // the replacement's own terms: a `std::net::TcpListener` owns its
        // descriptor, keeps it open until it is dropped with the `AsyncFd`,
        // and always gives the same one.
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::with_interest(
            listener.into_std()?,
            tokio::io::Interest::READABLE,
        )?;
        Ok(Listener { fd })
    }

    pub(super) fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        use rustix::net::{SocketFlags, acceptfrom_with};
        loop {
            let mut ready = match self.fd.poll_read_ready(cx) {
                Poll::Ready(r) => r?,
                Poll::Pending => return Poll::Pending,
            };
            let listener = self.fd.get_ref();
            match acceptfrom_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
                Ok((fd, addr)) => {
                    if !queued(listener) {
                        ready.clear_ready();
                    }
                    let stream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
                    let peer = match addr.map(SocketAddr::try_from) {
                        Some(Ok(peer)) => peer,
                        // Never for a TCP listener; asked of the socket.
                        _ => stream.peer_addr()?,
                    };
                    return Poll::Ready(Ok((stream, peer)));
                }
                Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

/// Whether another connection waits in `listener`'s accept queue: a
/// `poll` that does not wait. An error reads as "maybe", so the next
/// accept asks the kernel itself.
#[cfg(target_os = "linux")]
fn queued(listener: &std::net::TcpListener) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&now)) {
        Ok(0) => false,
        Ok(_) | Err(_) => true,
    }
}

#[cfg(not(target_os = "linux"))]
impl Listener {
    pub(super) fn new(listener: TcpListener) -> io::Result<Listener> {
        Ok(Listener { inner: listener })
    }

    pub(super) fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        self.inner.poll_accept(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn listener() -> (Listener, SocketAddr) {
        // Room in the queue for every client of the racing test: past
        // the backlog the kernel drops SYNs, and a client waits a second.
        let l = super::super::bind(([127, 0, 0, 1], 0).into(), 1024).expect("bind");
        let addr = l.local_addr().expect("addr");
        (Listener::new(l).expect("listener"), addr)
    }

    async fn accept(l: &Listener) -> (TcpStream, SocketAddr) {
        tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| l.poll_accept(cx)),
        )
        .await
        .expect("accepted in time")
        .expect("accept")
    }

    /// Connected: on loopback the handshake is done when `connect`
    /// returns, so the connection is in the accept queue.
    async fn connect(addr: SocketAddr) -> TcpStream {
        TcpStream::connect(addr).await.expect("connect")
    }

    /// Every connection queued before the first accept is accepted, each
    /// with its own peer address, though epoll told of them once.
    #[tokio::test]
    async fn a_queue_of_connections_is_accepted_whole() {
        let (l, addr) = listener().await;
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(connect(addr).await);
        }
        for (i, client) in clients.iter().enumerate() {
            let (stream, peer) = accept(&l).await;
            assert_eq!(peer, client.local_addr().expect("addr"), "{i}");
            assert_eq!(stream.peer_addr().expect("peer"), peer, "{i}");
        }
    }

    /// The accept that empties the queue clears the listener's readiness,
    /// so the next one waits for epoll instead of failing; with more
    /// queued it stays ready. A connection that comes later still wakes
    /// the listener.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn readiness_is_cleared_exactly_when_the_queue_is_empty() {
        let (l, addr) = listener().await;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _a = connect(addr).await;
        let _b = connect(addr).await;
        accept(&l).await;
        assert!(
            l.fd.poll_read_ready(&mut cx).is_ready(),
            "one more is queued: still ready"
        );
        accept(&l).await;
        assert!(
            l.fd.poll_read_ready(&mut cx).is_pending(),
            "the queue is empty: readiness cleared"
        );
        assert!(!queued(l.fd.get_ref()));
        let c = connect(addr).await;
        assert!(queued(l.fd.get_ref()));
        let (_, peer) = accept(&l).await;
        assert_eq!(peer, c.local_addr().expect("addr"));
    }

    /// Clients connecting from many tasks at once, while the listener
    /// accepts: none is left waiting in the queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_racing_the_look_at_the_queue_are_all_accepted() {
        let (l, addr) = listener().await;
        let n = 400;
        let clients: Vec<_> = (0..n)
            .map(|_| tokio::spawn(async move { connect(addr).await }))
            .collect();
        for _ in 0..n {
            accept(&l).await;
        }
        for c in clients {
            c.await.expect("client");
        }
    }
}
