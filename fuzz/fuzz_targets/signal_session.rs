#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| calls_benches::fuzz_bodies::signal_session(data));
