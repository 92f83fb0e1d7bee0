#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| calls_benches::fuzz_bodies::relay_frames(data));
