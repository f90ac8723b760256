//! Our own open TCP connections to a port: the proof that every client of a step's etcd is
//! closed before that etcd is stopped. etcd 3.2.32 and 3.5.30 hold SIGTERM for 5-9 s while a
//! client connection is open (their gRPC server drains it gracefully).
//!
//! Read from this process's file descriptors (`getpeername` on each socket) rather than from
//! `/proc/net/tcp`, which the kernel builds by walking its whole connection table: 5 ms a read
//! here, too slow to poll.

use std::fs;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::sys::socket::{getpeername, SockaddrLike, SockaddrStorage};

/// The remote port of socket `fd`, if it is a connected IPv4 or IPv6 socket.
fn peer_port(fd: RawFd) -> Option<u16> {
    // SAFETY: `fd` is borrowed only for the getpeername call; if it was closed and reused in the
    // meantime the call reads another socket's peer (or fails), which is harmless here.
    #[allow(unsafe_code)]
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let addr: SockaddrStorage = getpeername(fd.as_raw_fd()).ok()?;
    addr.as_sockaddr_in()
        .map(|a| a.port())
        .or_else(|| addr.as_sockaddr_in6().map(|a| a.port()))
        .filter(|_| addr.family().is_some())
}

/// How many TCP connections this process holds open to `port` (any address).
pub fn open_to(port: u16) -> usize {
    let Ok(fds) = fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    fds.filter_map(|e| {
        let e = e.ok()?;
        let target = fs::read_link(e.path()).ok()?;
        if !target.to_str()?.starts_with("socket:[") {
            return None;
        }
        e.file_name().to_str()?.parse::<RawFd>().ok()
    })
    .filter(|&fd| peer_port(fd) == Some(port))
    .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_real_connection_is_seen_until_dropped() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(
            open_to(port),
            0,
            "a listener is not a connection to its port"
        );
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let c2 = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(
            open_to(port),
            2,
            "the two client sides; the accepted side's remote port is theirs"
        );
        drop(c);
        assert_eq!(open_to(port), 1);
        drop(c2);
        assert_eq!(open_to(port), 0);
        drop(s);
    }
}
