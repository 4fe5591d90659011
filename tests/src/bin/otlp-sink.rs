//! A counting OTLP receiver for `cargo xtask bench`: prints `grpc=ADDR http=ADDR` when it
//! listens, then `spans=N` (received so far) for each line read on stdin, and exits at EOF.

use std::io::BufRead as _;

fn main() -> anyhow::Result<()> {
    let receiver = wirespan_tests::otlp::Receiver::start_counting()?;
    println!("grpc={} http={}", receiver.grpc, receiver.http);
    for line in std::io::stdin().lock().lines() {
        line?;
        println!("spans={}", receiver.count());
    }
    Ok(())
}
