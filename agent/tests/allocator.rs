//! The allocator keeps freed memory for a moment (reused without page faults under load) and
//! gives it back when the agent asks after the delay (an idle agent stays small).

use std::time::Duration;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn freed_memory_is_kept_for_the_delay_then_given_back_when_asked() {
    wirespan::configure_allocator();
    const MIB: u64 = 1024;
    // 64 MiB in blocks of the size of the agent's larger buffers, every page written.
    let blocks: Vec<Vec<u8>> = (0..1024).map(|_| vec![1u8; 64 * 1024]).collect();
    let full = rss_kib();
    drop(blocks);
    wirespan::return_idle_memory();
    let freed = rss_kib();
    assert!(
        freed + 16 * MIB > full,
        "freed memory went back at once ({full} -> {freed} KiB): it would be faulted in again"
    );
    std::thread::sleep(Duration::from_millis(wirespan::PURGE_DELAY_MS as u64 + 300));
    wirespan::return_idle_memory();
    let idle = rss_kib();
    assert!(
        idle + 48 * MIB < full,
        "memory freed {} ms ago is still resident ({full} -> {idle} KiB)",
        wirespan::PURGE_DELAY_MS + 300
    );
}
