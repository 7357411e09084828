//! Fuzzes virtio-net TX gathering and RX scattering with hostile descriptor chains.
#![no_main]

use ddvmm::devices::virtio::net::{gather, scatter, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mem = common::memory();
    let descs = common::decode(data, &mem);
    let mut buf = vec![0u8; MAX_FRAME];
    if let Ok(len) = gather(&mem, descs.clone().into_iter(), &mut buf) {
        assert!(len <= MAX_FRAME);
    }
    let frame = &data[..data.len().min(MAX_FRAME)];
    let written = scatter(&mem, descs.into_iter(), frame);
    assert!(written as usize <= frame.len());
});
