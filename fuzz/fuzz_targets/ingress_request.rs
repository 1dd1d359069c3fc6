#![no_main]
//! See `grapevine_agent::fuzz::ingress_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| grapevine_agent::fuzz::ingress_request(data));
