//! Fuzzes virtio-blk request parsing and execution with hostile descriptor chains.
#![no_main]

use std::fs::File;

use ddvmm::devices::virtio::block::request::{execute, Disk, Request};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mem = common::memory();
    let descs = common::decode(data, &mem);
    let file: File = ddvmm::memory::create_memfd(c"fuzz-disk").expect("memfd");
    file.set_len(64 * 1024).expect("size");
    let disk = Disk::new(
        file,
        64 * 1024,
        data.first().is_some_and(|b| b & 0x80 != 0),
        "fuzz",
    );
    if let Ok(req) = Request::parse(&descs, &mem) {
        let c = execute(&req, &mem, &disk);
        assert!(c.status <= 2);
        assert!(c.written >= 1);
    }
});
