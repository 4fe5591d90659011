//! The `wirespan` command line. The work is in the library; this file only wires it up.

use std::io::Write;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use wirespan::{
    capture::{Capture, CaptureConfig, DecodeError, EventSink, Lost, SocketEvent},
    clock::WallClock,
    print::{self, Format},
};

/// Distributed tracing without code changes: eBPF capture of the TCP traffic of running
/// processes.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    capture: CaptureArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print one line per captured socket event (the default when no command is given).
    Capture(CaptureArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct CaptureArgs {
    /// Trace only this process (repeatable). Default: every process except wirespan.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Never trace this process (repeatable).
    #[arg(long = "exclude-pid", value_name = "PID")]
    exclude_pids: Vec<u32>,
    /// Bytes copied from each read or write (the true length is always reported), max 8192.
    #[arg(long, default_value_t = wirespan_common::DEFAULT_CAPTURE, env = "WIRESPAN_CAPTURE_BYTES")]
    capture_bytes: u32,
    /// Kernel ring buffer size in MiB (a power of two).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    ring_mib: u32,
    /// Output format: `text` for people, `json` for tools (one object per line, full payload).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Payload bytes shown per text line.
    #[arg(long, default_value_t = 64)]
    show_bytes: usize,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Capture(args)) => args,
        None => cli.capture,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(capture(args))
}

async fn capture(args: CaptureArgs) -> anyhow::Result<()> {
    if !args.ring_mib.is_power_of_two() {
        anyhow::bail!("--ring-mib must be a power of two, got {}", args.ring_mib);
    }
    let config = CaptureConfig {
        capture_bytes: args.capture_bytes,
        pids: args.pids.clone(),
        exclude_pids: args.exclude_pids.clone(),
        ring_bytes: args.ring_mib * 1024 * 1024,
    };
    let capture = match Capture::start(&config) {
        Ok(c) => c,
        Err(e) => {
            // One clear line, then a non-zero exit.
            eprintln!("wirespan: cannot capture: {}", error_chain(&e));
            std::process::exit(1);
        }
    };
    let clock = WallClock::measure();
    eprintln!(
        "wirespan: ready: {} of {} syscalls traced{}",
        capture.attached.len(),
        wirespan::capture::probes::PROBES.len(),
        if capture.failures.is_empty() {
            String::new()
        } else {
            format!(" ({} probes failed, see warnings)", capture.failures.len())
        }
    );

    let stdout = std::io::stdout();
    let mut printer = Printer {
        out: std::io::BufWriter::with_capacity(64 * 1024, stdout.lock()),
        line: Vec::with_capacity(64 * 1024),
        clock,
        format: args.format,
        show_bytes: args.show_bytes,
        events: 0,
        decode_errors: 0,
    };
    let shutdown = async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let lost = capture.run(&mut printer, shutdown).await?;
    let Printer {
        mut out,
        events,
        decode_errors,
        ..
    } = printer;
    let _ = out.flush();
    eprintln!(
        "wirespan: {events} events; lost in kernel: ring buffer full {}, in-flight table full {}, unreadable buffers {}; malformed records {decode_errors}",
        lost.ringbuf_full, lost.inflight_full, lost.read_failed
    );
    Ok(())
}

/// Writes each event as one line; flushes whenever the kernel's ring buffer is drained.
struct Printer<W: Write> {
    out: W,
    line: Vec<u8>,
    clock: WallClock,
    format: Format,
    show_bytes: usize,
    events: u64,
    decode_errors: u64,
}

impl<W: Write> EventSink for Printer<W> {
    fn event(&mut self, event: Result<SocketEvent<'_>, DecodeError>) {
        match event {
            Ok(ev) => {
                self.events += 1;
                self.line.clear();
                match self.format {
                    Format::Text => {
                        print::text_line(&mut self.line, &ev, &self.clock, self.show_bytes)
                    }
                    Format::Json => print::json_line(&mut self.line, &ev, &self.clock),
                }
                let _ = self.out.write_all(&self.line);
            }
            Err(e) => {
                self.decode_errors += 1;
                log::debug!("dropped a malformed kernel record: {e}");
            }
        }
    }

    fn idle(&mut self, _lost: &Lost) {
        let _ = self.out.flush();
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}
