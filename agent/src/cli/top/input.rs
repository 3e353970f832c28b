//! `top`'s terminal I/O below ratatui: keys read with `poll(2)` on the terminal itself, and
//! the screen written through a writer that gives up once a signal asked `top` to stop.
//!
//! crossterm's own event reader is not used: on a terminal that went away (its tmux pane or
//! ssh session closed) every read returns end-of-file or `EIO`, and that reader retries such a
//! read forever, at full CPU, without returning to the loop that checks for signals. Here a
//! hang-up, an error or end-of-file on the terminal is the end of `top`.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, RawFd},
    sync::atomic::Ordering,
    time::Duration,
};

use super::tui::STOP;

/// What the user asked for, from the bytes the terminal sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Key {
    /// `q`, Esc or Ctrl-C (raw mode turns Ctrl-C into a byte instead of SIGINT).
    Quit,
    /// `s`: the next sort column.
    Sort,
    /// Anything else (arrows and other escape sequences included): redraws, nothing more.
    Other,
}

/// The keys in one read. An escape sequence (an arrow key, a function key) arrives whole in
/// one read and starts with Esc; Esc alone is the Esc key.
pub(super) fn keys(bytes: &[u8]) -> Vec<Key> {
    if bytes.first() == Some(&0x1b) {
        return vec![if bytes.len() == 1 {
            Key::Quit
        } else {
            Key::Other
        }];
    }
    bytes
        .iter()
        .map(|b| match b {
            b'q' | 0x03 => Key::Quit,
            b's' => Key::Sort,
            _ => Key::Other,
        })
        .collect()
}

/// What one wait on the terminal gave.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Input {
    /// Nothing within the wait, or a signal interrupted it.
    Nothing,
    Keys(Vec<Key>),
    /// The terminal hung up, errored, or reached end-of-file: nobody is there any more.
    Gone,
}

/// The terminal `top` reads keys from: stdin when it is one, else `/dev/tty`.
pub(super) struct Tty {
    fd: RawFd,
    /// Kept open for `fd` when it is `/dev/tty`.
    _owned: Option<File>,
}

impl Tty {
    pub(super) fn open() -> io::Result<Tty> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } == 1 {
            return Ok(Tty::from_fd(libc::STDIN_FILENO));
        }
        let f = File::options().read(true).write(true).open("/dev/tty")?;
        Ok(Tty {
            fd: f.as_raw_fd(),
            _owned: Some(f),
        })
    }

    /// A terminal already open as `fd` (which must stay open while this lives).
    pub(super) fn from_fd(fd: RawFd) -> Tty {
        Tty { fd, _owned: None }
    }

    /// Waits up to `timeout` for keys. A signal ends the wait early (`Nothing`), so that the
    /// caller sees [`STOP`] at once.
    pub(super) fn wait(&self, timeout: Duration) -> io::Result<Input> {
        let mut p = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, and its count.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Input::Nothing)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(Input::Nothing);
        }
        if p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            return Ok(Input::Gone);
        }
        if p.revents & libc::POLLIN == 0 {
            return Ok(Input::Nothing);
        }
        let mut buf = [0u8; 256];
        // SAFETY: reads at most buf.len() bytes into buf. In raw mode (VMIN 1) a read after
        // POLLIN returns what is there without waiting.
        let r = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
        match r {
            0 => Ok(Input::Gone),
            n if n > 0 => Ok(Input::Keys(keys(&buf[..n as usize]))),
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => Ok(Input::Nothing),
                    // EIO is what a hung-up terminal answers; any other error is as final.
                    _ => Ok(Input::Gone),
                }
            }
        }
    }

    /// Whether the terminal is gone, without reading from it.
    pub(super) fn hung_up(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and its count; no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }

    /// The terminal's size (columns, rows), straight from the kernel (crossterm's fallback
    /// would start `tput` on a terminal that cannot answer).
    pub(super) fn size(&self) -> Option<(u16, u16)> {
        // SAFETY: TIOCGWINSZ fills one winsize.
        unsafe {
            let mut ws: libc::winsize = std::mem::zeroed();
            (libc::ioctl(self.fd, libc::TIOCGWINSZ, &mut ws) == 0).then_some((ws.ws_col, ws.ws_row))
        }
    }
}

/// Standard output for the screen, unbuffered (ratatui's backend is given it inside a
/// `BufWriter`). A write that a signal interrupts is not retried once [`STOP`] is set: when
/// the terminal stopped taking output (an ssh session whose network died), the write blocks,
/// and the standard library's retry would block again, forever, with the signal ignored.
pub(super) struct Screen;

impl io::Write for Screen {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            if STOP.load(Ordering::SeqCst) {
                return Err(io::Error::other("stopped by a signal"));
            }
            // SAFETY: writes at most buf.len() bytes from buf.
            let r = unsafe { libc::write(libc::STDOUT_FILENO, buf.as_ptr().cast(), buf.len()) };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes `bytes` to standard output only if the terminal takes them within `within`: the
/// sequences that give the terminal back are worth a try, not a hang.
pub(super) fn write_if_ready(bytes: &[u8], within: Duration) {
    let mut rest = bytes;
    while !rest.is_empty() {
        let mut p = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = within.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, and its count.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n <= 0 || p.revents & libc::POLLOUT == 0 || p.revents & libc::POLLHUP != 0 {
            return;
        }
        // SAFETY: writes at most rest.len() bytes from rest.
        let r = unsafe { libc::write(libc::STDOUT_FILENO, rest.as_ptr().cast(), rest.len()) };
        if r <= 0 {
            return;
        }
        rest = &rest[r as usize..];
    }
}

/// Blocks SIGTERM, SIGHUP and SIGINT in the calling thread (and the threads it starts), so
/// that they reach the thread that draws: the one whose blocked write they must interrupt.
pub(super) fn block_stop_signals_here() {
    // SAFETY: a sigset built with sigemptyset/sigaddset, applied to this thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_bytes() {
        assert_eq!(keys(b"q"), [Key::Quit]);
        assert_eq!(keys(b"\x03"), [Key::Quit]);
        assert_eq!(keys(b"\x1b"), [Key::Quit]);
        assert_eq!(keys(b"s"), [Key::Sort]);
        assert_eq!(keys(b"ss"), [Key::Sort, Key::Sort]);
        // An arrow key is one escape sequence, not Esc.
        assert_eq!(keys(b"\x1b[A"), [Key::Other]);
        assert_eq!(keys(b"x"), [Key::Other]);
    }

    /// A pseudo-terminal whose other end is closed reads as gone, at once, however often it
    /// is asked (crossterm's reader would spin on it).
    #[test]
    fn a_closed_terminal_is_gone() {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty fills two descriptors; the rest may be null.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty: {}", io::Error::last_os_error());
        // A process another test starts must not inherit the master and keep it open.
        for fd in [master, slave] {
            // SAFETY: fcntl on descriptors we just opened.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        // Raw, as `top` leaves it: a key is readable without a newline.
        // SAFETY: tcgetattr/cfmakeraw/tcsetattr on one termios of a terminal we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(slave, &mut t), 0);
            libc::cfmakeraw(&mut t);
            assert_eq!(libc::tcsetattr(slave, libc::TCSANOW, &t), 0);
        }
        let tty = Tty::from_fd(slave);
        assert_eq!(tty.wait(Duration::from_millis(10)).unwrap(), Input::Nothing);
        assert!(!tty.hung_up());
        assert!(tty.size().is_some());
        // SAFETY: writes one byte to the master we own.
        unsafe { libc::write(master, b"s".as_ptr().cast(), 1) };
        assert_eq!(
            tty.wait(Duration::from_secs(1)).unwrap(),
            Input::Keys(vec![Key::Sort])
        );
        // SAFETY: closes the master we own.
        unsafe { libc::close(master) };
        let start = std::time::Instant::now();
        for _ in 0..3 {
            assert_eq!(tty.wait(Duration::from_secs(5)).unwrap(), Input::Gone);
        }
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(tty.hung_up());
        // SAFETY: closes the slave we own.
        unsafe { libc::close(slave) };
    }
}
