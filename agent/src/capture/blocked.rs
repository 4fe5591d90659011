//! Threads that were already inside a socket syscall when the programs attached.
//!
//! Their enter tracepoint fired before wirespan was there, so their exit would find no record:
//! typically a server waiting in `accept`, or a write blocked on a full socket buffer.
//! /proc/PID/task/TID/syscall names the syscall and its arguments; the agent seeds an
//! in-flight record for each such thread after attaching, without overwriting a record a live
//! enter program already made. The kernel re-checks at exit that the descriptor is a TCP
//! socket. Receiving calls (a keep-alive server waiting in `recv`) need no seed: their exit
//! programs read the arguments from the thread's saved registers.

use std::path::Path;

use wirespan_common::{Inflight, syscall};

/// `NR a0 a1 a2 a3 a4 a5 sp pc` of a thread blocked in a syscall; None for "running" or a
/// thread not in a syscall (`-1 sp pc`).
pub fn parse_syscall_line(line: &str) -> Option<(i64, [u64; 6])> {
    let mut parts = line.split_whitespace();
    let nr: i64 = parts.next()?.parse().ok()?;
    if nr < 0 {
        return None;
    }
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = u64::from_str_radix(parts.next()?.trim_start_matches("0x"), 16).ok()?;
    }
    Some((nr, args))
}

/// The in-flight record the enter program would have made for this syscall, if it is one the
/// programs follow.
pub fn seed_for(nr: i64, a: [u64; 6]) -> Option<Inflight> {
    let (id, buf, iovcnt) = match nr {
        libc::SYS_write => (syscall::WRITE, a[1], 0),
        libc::SYS_writev => (syscall::WRITEV, a[1], a[2]),
        libc::SYS_sendto => (syscall::SENDTO, a[1], 0),
        libc::SYS_sendmsg => (syscall::SENDMSG, a[1], 0),
        libc::SYS_accept => (syscall::ACCEPT, 0, 0),
        libc::SYS_accept4 => (syscall::ACCEPT4, 0, 0),
        _ => return None,
    };
    Some(Inflight {
        buf,
        iovcnt,
        sk: 0,
        ino: 0,
        family: 0,
        fd: i32::try_from(a[0]).ok()?,
        syscall: id,
        enter_ns: 0,
        after_loss: 0,
        _pad: 0,
    })
}

/// (pid_tgid key, record) for every thread of the processes `traced` selects that is blocked
/// in a followed syscall on a socket descriptor.
pub fn scan(proc: &Path, traced: impl Fn(u32) -> bool) -> Vec<(u64, Inflight)> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir(proc) else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if !traced(pid) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(line) = std::fs::read_to_string(t.path().join("syscall")) else {
                continue;
            };
            let Some(seed) = parse_syscall_line(&line).and_then(|(nr, a)| seed_for(nr, a)) else {
                continue;
            };
            let link = std::fs::read_link(p.path().join("fd").join(seed.fd.to_string()));
            if !link.is_ok_and(|l| l.to_string_lossy().starts_with("socket:[")) {
                continue;
            }
            found.push(((u64::from(pid) << 32) | u64::from(tid), seed));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_blocked_running_and_idle_threads() {
        let line = format!(
            "{} 0x4 0x7f00aa001000 0x10000 0x0 0x0 0x0 0x7ffd5e1b2c40 0x7f00ab2c3d4e\n",
            libc::SYS_recvfrom
        );
        let (nr, a) = parse_syscall_line(&line).unwrap();
        assert_eq!(nr, libc::SYS_recvfrom);
        assert_eq!(a[..3], [4, 0x7f00aa001000, 0x10000]);
        assert_eq!(parse_syscall_line("running\n"), None);
        assert_eq!(
            parse_syscall_line("-1 0x7ffd5e1b2c40 0x7f00ab2c3d4e\n"),
            None
        );
        assert_eq!(parse_syscall_line(""), None);
    }

    #[test]
    fn seeds_the_record_the_enter_program_would_have_made() {
        let s = seed_for(libc::SYS_sendto, [5, 0x1000, 64, 0, 0, 0]).unwrap();
        assert_eq!(
            (s.fd, s.syscall, s.buf, s.sk),
            (5, syscall::SENDTO, 0x1000, 0)
        );
        let s = seed_for(libc::SYS_writev, [6, 0x2000, 3, 0, 0, 0]).unwrap();
        assert_eq!((s.syscall, s.iovcnt), (syscall::WRITEV, 3));
        // Receiving calls read their arguments at exit: nothing to seed.
        for nr in [
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
        ] {
            assert_eq!(seed_for(nr, [5, 0x1000, 64, 0, 0, 0]), None);
        }
        assert_eq!(
            seed_for(libc::SYS_accept4, [3, 0, 0, 0, 0, 0])
                .unwrap()
                .syscall,
            syscall::ACCEPT4
        );
        assert_eq!(seed_for(libc::SYS_nanosleep, [0; 6]), None);
        assert_eq!(seed_for(libc::SYS_write, [u64::MAX, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn finds_this_threads_blocked_accept_on_a_real_socket() {
        if !Path::new("/proc/self/task").exists() {
            eprintln!("skipped: needs procfs");
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let acceptor = std::thread::spawn(move || {
            // A plain accept(2) (std's TcpListener::accept uses accept4).
            // SAFETY: null address pointers are allowed; fd stays open because `listener`
            // lives here.
            let conn = unsafe { libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut()) };
            if conn >= 0 {
                // SAFETY: conn is the descriptor accept just returned, closed once.
                unsafe { libc::close(conn) };
            }
            drop(listener);
        });
        let me = std::process::id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let seeds = loop {
            let seeds = scan(Path::new("/proc"), |pid| pid == me);
            if seeds.iter().any(|(_, s)| s.fd == fd) || std::time::Instant::now() > deadline {
                break seeds;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let seed = seeds
            .iter()
            .find(|(_, s)| s.fd == fd)
            .expect("the blocked accept");
        assert_eq!(seed.1.syscall, syscall::ACCEPT);
        assert_eq!(seed.0 >> 32, u64::from(me));
        let _client = std::net::TcpStream::connect(addr).unwrap();
        acceptor.join().unwrap();
    }
}
