//! Decoding kernel ring-buffer records: any bytes give an event or an error, never a panic, and
//! a decoded event's payload lies within the record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wirespan::capture::SocketEvent;

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = SocketEvent::decode(data) {
        assert!(ev.payload.len() <= data.len());
        assert_eq!(ev.payload.len(), ev.header.captured as usize);
        let _ = (ev.local(), ev.remote(), ev.comm(), ev.syscall_name());
    }
});
