#![no_main]
//! See `grapevine_agent::fuzz::gossip_frame`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| grapevine_agent::fuzz::gossip_frame(data));
