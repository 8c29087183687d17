//! The socket under the protocol: `SOCK_SEQPACKET` Unix sockets (message
//! boundaries kept, a reliable connection), messages with optional
//! `SCM_RIGHTS`, and the peer's credentials. Shared by the client and the
//! daemon.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use rustix::net::{
    self, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

/// The most fds one message may carry in either direction: the daemon
/// sends one; more from a client are received only to be closed.
pub const MAX_FDS: usize = 8;

/// A new `SOCK_SEQPACKET` socket connected to `path`.
///
/// # Errors
/// `socket` or `connect`'s errno.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(fd)
}

/// A `SOCK_SEQPACKET` socket bound to `path` and listening.
///
/// # Errors
/// `socket`, `bind` or `listen`'s errno.
pub fn listen(path: &Path, backlog: i32) -> io::Result<OwnedFd> {
    let fd = net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    net::bind(&fd, &SocketAddrUnix::new(path)?)?;
    net::listen(&fd, backlog)?;
    Ok(fd)
}

/// Accepts one connection (close-on-exec).
///
/// # Errors
/// `accept4`'s errno.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(net::accept_with(listener, SocketFlags::CLOEXEC)?)
}

/// Sends one message, with `fds` as `SCM_RIGHTS` when there are any.
///
/// # Errors
/// `sendmsg`'s errno (`EPIPE` once the peer is gone: the daemon and the
/// client both ignore SIGPIPE through `MSG_NOSIGNAL`).
pub fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::from_raw_os_error(libc::E2BIG));
    }
    let n = net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if n != bytes.len() {
        return Err(io::Error::other(format!(
            "sent {n} of {} bytes",
            bytes.len()
        )));
    }
    Ok(())
}

/// One received message.
#[derive(Debug, Default)]
pub struct Received {
    /// The bytes (at most the `max` passed to [`recv`]).
    pub bytes: Vec<u8>,
    /// The fds that came with it (close-on-exec; closed when dropped).
    pub fds: Vec<OwnedFd>,
    /// The message was longer than `max`: the rest is lost.
    pub truncated: bool,
    /// The control message did not fit (`MSG_CTRUNC`): the kernel dropped
    /// the fds that did not fit.
    pub control_truncated: bool,
    /// A control message other than `SCM_RIGHTS` came.
    pub other_control: bool,
}

/// Receives one message of at most `max` bytes; `None` at end of stream.
///
/// # Errors
/// `recvmsg`'s errno.
pub fn recv(sock: BorrowedFd<'_>, max: usize) -> io::Result<Option<Received>> {
    let mut buf = vec![0u8; max];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut flags = RecvFlags::CMSG_CLOEXEC;
    let r = loop {
        match net::recvmsg(sock, &mut [IoSliceMut::new(&mut buf)], &mut control, flags) {
            Err(rustix::io::Errno::INTR) => continue,
            // A peer that closed with data of ours unread leaves
            // ECONNRESET, reported before what it sent last is read:
            // the error is consumed, so look once more for that message.
            Err(rustix::io::Errno::CONNRESET) if !flags.contains(RecvFlags::DONTWAIT) => {
                flags |= RecvFlags::DONTWAIT;
                continue;
            }
            Err(rustix::io::Errno::AGAIN) if flags.contains(RecvFlags::DONTWAIT) => {
                return Err(io::Error::from_raw_os_error(libc::ECONNRESET));
            }
            other => break other?,
        }
    };
    let mut out = Received {
        truncated: r.flags.contains(ReturnFlags::TRUNC),
        control_truncated: r.flags.contains(ReturnFlags::CTRUNC),
        ..Received::default()
    };
    for m in control.drain() {
        match m {
            RecvAncillaryMessage::ScmRights(fds) => out.fds.extend(fds),
            _ => out.other_control = true,
        }
    }
    if r.bytes == 0 && out.fds.is_empty() && !out.truncated {
        return Ok(None);
    }
    buf.truncate(r.bytes.min(max));
    out.bytes = buf;
    Ok(Some(out))
}

/// The peer's pid, uid and gid as the kernel recorded them at `connect`
/// (`SO_PEERCRED`).
///
/// # Errors
/// `getsockopt`'s errno.
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    let c = net::sockopt::socket_peercred(sock)?;
    Ok((c.pid.as_raw_nonzero().get(), c.uid.as_raw(), c.gid.as_raw()))
}

/// The peer's supplementary groups (`SO_PEERGROUPS`, Linux 4.13, commit
/// 28b5ba2aa0f5).
///
/// # Errors
/// `getsockopt`'s errno.
pub fn peer_groups(sock: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    const SO_PEERGROUPS: libc::c_int = 59;
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * 4) as libc::socklen_t;
        // SAFETY: `groups` has `len` writable bytes; the kernel writes at
        // most that and sets `len`.
        let r = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            groups.truncate(len as usize / 4);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && groups.len() < 65536 {
            groups.resize((len as usize / 4).max(groups.len() * 2), 0);
            continue;
        }
        return Err(e);
    }
}

/// A pidfd of the peer (`SO_PEERPIDFD`, Linux 6.5, commit 7b26952a91cf);
/// `None` where the kernel does not have it.
pub fn peer_pidfd(sock: BorrowedFd<'_>) -> Option<OwnedFd> {
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int-sized option written into `fd`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // SAFETY: on success the kernel installed a new fd that we own.
    (r == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}
