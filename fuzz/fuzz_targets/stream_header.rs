#![no_main]
//! See `grapevine_agent::fuzz::stream_header`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| grapevine_agent::fuzz::stream_header(data));
