//! `sniff IFACE MAC STOPFILE`: counts the Ethernet frames seen on IFACE whose source address
//! is MAC, and all frames, until STOPFILE exists; then prints `SNIFF IFACE MAC N TOTAL`.
//! Used inside the test host to prove that frames a client sends with a spoofed source
//! address never leave the driver VM (the busybox userland has no packet capture).

use std::ffi::CString;
use std::path::Path;
use std::process::ExitCode;

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(iface), Some(mac), Some(stop)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: sniff IFACE MAC STOPFILE");
        return ExitCode::from(2);
    };
    let Some(want) = parse_mac(mac) else {
        eprintln!("sniff: bad MAC address {mac}");
        return ExitCode::from(2);
    };
    let Ok(name) = CString::new(iface.as_str()) else {
        return ExitCode::from(2);
    };
    // SAFETY: if_nametoindex reads the NUL-terminated string `name` owns.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        eprintln!("sniff: no interface {iface}");
        return ExitCode::from(1);
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        eprintln!("sniff: socket: {}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    // SAFETY: an all-zero sockaddr_ll is a valid value; the fields are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a sockaddr_ll that lives across the call, its size passed with it.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        eprintln!("sniff: bind {iface}: {}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    // Wake up at least once a second to look for the stop file.
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: `tv` is a timeval that lives across the call, its size passed with it.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    println!("SNIFF-READY {iface}");
    let (mut matched, mut total) = (0u64, 0u64);
    let mut frame = [0u8; 65536];
    while !Path::new(stop).exists() {
        // SAFETY: recv writes at most `frame.len()` bytes into `frame`, which it owns.
        let n = unsafe { libc::recv(fd, frame.as_mut_ptr().cast(), frame.len(), 0) };
        if n < 12 {
            continue;
        }
        total += 1;
        if frame[6..12] == want {
            matched += 1;
        }
    }
    println!("SNIFF {iface} {mac} {matched} {total}");
    ExitCode::SUCCESS
}
