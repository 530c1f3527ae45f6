#![no_main]
//! See `trickle_relay_fuzz::checks::server_request` for what this target feeds and asserts.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    trickle_relay_fuzz::checks::server_request(data);
});
