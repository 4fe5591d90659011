//! Processes the xtask tasks start (servers, the agent, receivers): stopped by their PID when
//! dropped, and the loopback ports they listen on.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A child stopped by its PID (SIGINT, then SIGKILL) when dropped.
pub struct Started {
    pub child: Child,
    pub name: String,
}

impl Started {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT, and SIGKILL if it has not stopped after 15 s.
    pub fn stop(&mut self) {
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        eprintln!("xtask: {} did not stop on SIGINT, killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn wait_port(port: u16) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after 30 s");
        }
        sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub fn start(name: &str, cmd: &mut Command) -> anyhow::Result<Started> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Started {
        child,
        name: name.into(),
    })
}
