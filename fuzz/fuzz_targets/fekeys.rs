#![no_main]
// See refblk_fuzz::harness::fekeys for what is fed in and what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| refblk_fuzz::harness::fekeys::run(data));
