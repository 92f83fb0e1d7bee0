#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| calls_benches::fuzz_bodies::red_payload(data));
