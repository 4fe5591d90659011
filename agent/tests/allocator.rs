//! The allocator gives freed memory back at once while the agent starts, then keeps it for a
//! moment (reused without page faults under load) and gives it back when the agent asks after
//! the delay (an idle agent stays small).

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

/// 64 MiB in blocks of the size of the agent's larger buffers, every page written, freed;
/// the RSS with them and after they were freed and the freed memory asked back.
fn fill_and_free() -> (u64, u64) {
    let blocks: Vec<Vec<u8>> = (0..1024).map(|_| vec![1u8; 64 * 1024]).collect();
    let full = rss_kib();
    drop(blocks);
    wirespan::return_idle_memory();
    (full, rss_kib())
}

#[test]
fn freed_memory_goes_back_at_once_at_start_up_and_after_the_delay_once_settled() {
    const MIB: u64 = 1024;
    // Start-up (loading the programs): given back at once, no peak made of garbage.
    wirespan::configure_allocator();
    let (full, freed) = fill_and_free();
    assert!(
        freed + 48 * MIB < full,
        "memory freed at start-up stayed resident ({full} -> {freed} KiB)"
    );
    // Steady work: kept for the delay (reused without page faults under load)...
    wirespan::settle_allocator();
    let (full, freed) = fill_and_free();
    assert!(
        freed + 16 * MIB > full,
        "freed memory went back at once ({full} -> {freed} KiB): it would be faulted in again"
    );
    // ... and given back when asked after it.
    std::thread::sleep(Duration::from_millis(wirespan::PURGE_DELAY_MS as u64 + 300));
    wirespan::return_idle_memory();
    let idle = rss_kib();
    assert!(
        idle + 48 * MIB < full,
        "memory freed {} ms ago is still resident ({full} -> {idle} KiB)",
        wirespan::PURGE_DELAY_MS + 300
    );
}
