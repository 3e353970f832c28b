//! A pseudo-terminal for running the real binary's interactive views (`tollgate top`) as a
//! user's terminal would host them, and for taking that terminal away: its output stopped
//! (an ssh session whose network died), or its other end closed (a tmux pane or ssh session
//! closed). Also what a process cost in CPU, from /proc.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

/// Both ends of a pseudo-terminal. The test keeps the master (the terminal emulator's end);
/// the child gets the slave as stdin, stdout and stderr, without making it its controlling
/// terminal (so closing the master sends it no SIGHUP: it must notice by itself).
pub struct Pty {
    master: Option<OwnedFd>,
    slave: OwnedFd,
}

impl Pty {
    /// A terminal of `cols` × `rows`.
    pub fn open(cols: u16, rows: u16) -> Pty {
        let (mut master, mut slave) = (-1, -1);
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty fills two descriptors; the name and termios may be null.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &ws,
            )
        };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // Not inherited by the children: a child holding the master would keep the terminal
        // alive after the test closed its own.
        for fd in [master, slave] {
            // SAFETY: fcntl on descriptors we just opened.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        // SAFETY: both descriptors were just opened and are owned by nobody else.
        unsafe {
            Pty {
                master: Some(OwnedFd::from_raw_fd(master)),
                slave: OwnedFd::from_raw_fd(slave),
            }
        }
    }

    /// Starts `cmd` on the terminal (stdin, stdout and stderr).
    pub fn spawn(&self, cmd: &mut Command) -> Child {
        let io = || Stdio::from(self.slave.try_clone().expect("dup of the pty slave"));
        cmd.stdin(io())
            .stdout(io())
            .stderr(io())
            .env("TERM", "xterm-256color")
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
    }

    /// Bytes written to the terminal and not yet read by the test.
    pub fn unread(&self) -> usize {
        let mut n: libc::c_int = 0;
        let fd = self
            .master
            .as_ref()
            .expect("the master is open")
            .as_raw_fd();
        // SAFETY: FIONREAD stores one int.
        let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
        assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        n as usize
    }

    /// What was written to the terminal and not yet read, read now (without waiting).
    pub fn take_output(&self) -> String {
        let n = self.unread();
        let mut buf = vec![0u8; n];
        let fd = self
            .master
            .as_ref()
            .expect("the master is open")
            .as_raw_fd();
        // SAFETY: reads at most n bytes, which FIONREAD said are there.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), n) };
        buf.truncate(r.max(0) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Waits until something was written to the terminal (the program drew), up to `limit`.
    pub fn wait_for_output(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.unread() > 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Stops the terminal's output (`tcflow(TCOOFF)`): every write to it blocks, as when the
    /// far end stops reading.
    pub fn stop_output(&self) {
        // SAFETY: tcflow on a terminal we hold.
        let r = unsafe { libc::tcflow(self.slave.as_raw_fd(), libc::TCOOFF) };
        assert_eq!(r, 0, "tcflow: {}", std::io::Error::last_os_error());
    }

    /// Whether the terminal is in canonical mode with echo: given back by the program that
    /// had put it in raw mode.
    pub fn is_cooked(&self) -> bool {
        // SAFETY: tcgetattr fills one termios.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(self.slave.as_raw_fd(), &mut t), 0);
            t.c_lflag & libc::ICANON != 0 && t.c_lflag & libc::ECHO != 0
        }
    }

    /// Closes the master: the terminal is gone (its window, pane or session closed).
    pub fn close_master(&mut self) {
        self.master = None;
    }
}

/// User plus system CPU time of a process so far, in clock ticks (utime + stime of
/// /proc/PID/stat); `None` once it is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    cpu_ticks_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn cpu_ticks_of(stat: &str) -> Option<u64> {
    // The command name is in parentheses and may hold spaces: count fields after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the line, utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Each thread of a process: its name, state and where it waits in the kernel (for the
/// message when a process did not exit).
pub fn threads(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("pid {pid}: gone");
    };
    let mut out = Vec::new();
    for t in tasks.filter_map(Result::ok) {
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .unwrap_or("?")
            .to_owned();
        out.push(format!(
            "{} {} state {state} wchan {} ticks {:?}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
            cpu_ticks_of(&stat),
        ));
    }
    out.join("; ")
}

/// Waits up to `limit` for `child` to exit, and returns how it ended with the CPU ticks it
/// used during the wait (read until it ended). `None`: still running at the deadline (the
/// child is then killed, so that nothing outlives the test), with the ticks it used; its
/// threads as they were are printed to stderr.
pub fn wait_exit(child: &mut Child, limit: Duration) -> (Option<ExitStatus>, u64) {
    let pid = child.id();
    let start_ticks = cpu_ticks(pid).unwrap_or(0);
    let mut last = start_ticks;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = cpu_ticks(pid) {
            last = last.max(t);
        }
        if let Some(status) = child.try_wait().expect("polling the child") {
            return (Some(status), last - start_ticks);
        }
        if Instant::now() >= deadline {
            eprintln!("pid {pid} still running after {limit:?}: {}", threads(pid));
            let _ = child.kill();
            let _ = child.wait();
            return (None, last - start_ticks);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
