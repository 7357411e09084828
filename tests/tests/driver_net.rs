//! Network through a driver VM, end to end: the driver VM owns a NIC (emulated virtio-net on a
//! TAP in the test host) and runs the agent, which gives each client a port on the driver
//! VM's own Linux bridge; two stock client VMs see plain virtio-net devices. Each pings the
//! peer (behind a veth pair in its own network namespace) and the other client, streams TCP
//! to the peer with iperf3, and one of them tries to send with another MAC address.

use std::time::Duration;

use ddvmm_tests::sniff_binary;
use ddvmm_tests::system::{
    assert_clean_ending, assert_no_faults, backing_file, client_ip, client_mac, client_net_up,
    console, metric, metrics_section, section, System, PEER_IP,
};

const TIMEOUT: Duration = Duration::from_secs(2400);
const BYTES: u64 = 16 << 20;
const SPOOFED_MAC: &str = "52:54:00:dd:00:99";

/// The value of `KEY` in a console line `KEY value`.
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no '{key}' in:\n{text}"))
}

/// Client `i`: link facts, ping the peer and client `other`, an iperf3 stream to the peer on
/// `port`; with `spoof`, a ping with a foreign source MAC, then one with its own again.
fn client_script(i: usize, other: usize, port: u16, spoof: bool) -> String {
    let mut s = client_net_up(i);
    if !spoof {
        // The other client counts, on its own NIC, alpha's frames and any with the spoofed
        // source, until the host says alpha is done.
        s.push_str(&format!(
            "sniff eth0 {SPOOFED_MAC} /tmp/sniff-stop > /tmp/sniff-spoofed.txt 2>&1 &\n\
             S1=$!\n\
             sniff eth0 {alpha} /tmp/sniff-stop > /tmp/sniff-alpha.txt 2>&1 &\n\
             S2=$!\n",
            alpha = client_mac(other)
        ));
    }
    s.push_str(&format!(
        r#"
ping -c 3 -W 10 {PEER_IP} > /tmp/p.txt 2>&1; echo "PING-PEER rc=$?"
echo "LINK $(cat /sys/class/net/eth0/operstate) $(cat /sys/class/net/eth0/address)"
n=0
while ! ping -c 1 -W 2 {other_ip} > /dev/null 2>&1 && [ $n -lt 120 ]; do n=$((n + 1)); done
ping -c 3 -W 10 {other_ip} > /tmp/p2.txt 2>&1; echo "PING-OTHER rc=$?"
iperf3 -c {PEER_IP} -p {port} -n {BYTES} --connect-timeout 30000 > /tmp/iperf.txt 2>&1
echo "IPERF-RC $?"
# Without iperf3's "[  5]" prefix: the console listing drops lines starting with '['.
grep -E "sender|receiver" /tmp/iperf.txt | sed 's/^\[[ 0-9]*\]/STREAM/'
"#,
        other_ip = client_ip(other),
    ));
    if spoof {
        s.push_str(&format!(
            r#"
# Broadcasts the other client must see (its capture works), then the same with a spoofed
# source, which must reach nobody.
arping -c 3 -w 5 -I eth0 {other_ip} > /dev/null 2>&1; echo "ARPING rc=$?"
ip link set eth0 address {SPOOFED_MAC}
ping -c 3 -W 3 {PEER_IP} > /dev/null 2>&1; echo "SPOOF-PING rc=$?"
arping -c 3 -w 5 -I eth0 {other_ip} > /dev/null 2>&1; echo "SPOOF-ARPING rc=$?"
ip link set eth0 address {mac}
ping -c 3 -W 10 {PEER_IP} > /dev/null 2>&1; echo "PING-AFTER rc=$?"
"#,
            mac = client_mac(i),
            other_ip = client_ip(other),
        ));
    } else {
        s.push_str(&format!(
            r#"
until wget -q -O /dev/null http://{PEER_IP}:8080/sniff-stop 2>/dev/null; do sleep 1; done
touch /tmp/sniff-stop; wait $S1 $S2
cat /tmp/sniff-spoofed.txt /tmp/sniff-alpha.txt
"#
        ));
    }
    s
}

/// The frames from `mac` a `sniff` on `iface` counted (its `SNIFF IFACE MAC N TOTAL` line).
fn sniff_count(text: &str, iface: &str, mac: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("SNIFF {iface} {mac} ")))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no capture result on {iface} for {mac}:\n{text}"))
}

#[test]
fn two_clients_reach_the_peer_and_each_other_through_the_driver_vm() {
    let disk = backing_file("driver-net.img", 16);
    let clients = [
        ("alpha", client_script(0, 1, 5201, true)),
        ("beta", client_script(1, 0, 5202, false)),
    ];
    let system = System {
        name: "driver-net",
        disk: &disk,
        driver_cmdline: "console=ttyS0 quiet ddvmm.action=agent",
        clients: &clients,
        slice_mib: 8,
        extra_config: "",
        passthrough: false,
        network: true,
        net_driver: false,
    };
    let (host, prelude) = system.host_and_prelude();
    // Every frame leaving the driver VM for the host's bridge and the peer crosses the TAP:
    // a capture there counts alpha's genuine frames and any with the spoofed source.
    let host = host.program("sniff", sniff_binary().expect("sniff binary"));
    let alpha_mac = client_mac(0);
    let script = format!(
        r#"{prelude}
$PEER iperf3 -s -1 -p 5201 > /dev/null 2>&1 &
$PEER iperf3 -s -1 -p 5202 > /dev/null 2>&1 &
sniff ddtap0 {SPOOFED_MAC} $WORK/sniff-stop > $WORK/sniff-spoofed.txt 2>&1 &
S1=$!
sniff ddtap0 {alpha_mac} $WORK/sniff-stop > $WORK/sniff-alpha.txt 2>&1 &
S2=$!
# beta stops its capture when alpha is done spoofing (it polls the peer for sniff-stop).
mkdir -p $WORK/www && $PEER httpd -p 8080 -h $WORK/www
wait_console alpha PING-AFTER
touch $WORK/www/sniff-stop
wait_done alpha beta
touch $WORK/sniff-stop; wait $S1 $S2
cat $WORK/sniff-spoofed.txt $WORK/sniff-alpha.txt
echo "=== bridge"; $PEER ip neigh show
echo "=== metrics"; $CTL metrics
{ending}"#,
        ending = system.ending(false),
    );
    let out = host.run(&script, TIMEOUT).expect("test host run");
    let log = &out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{log}");
    assert_clean_ending(log);
    assert_no_faults(log);
    for (i, (name, _)) in clients.iter().enumerate() {
        let c = console(log, name);
        // A plain virtio-net device with the configured MAC, link up.
        assert_eq!(field(c, "LINK"), format!("up {}", client_mac(i)), "{c}");
        assert!(c.contains("PING-PEER rc=0"), "{name} -> peer:\n{c}");
        assert!(
            c.contains("PING-OTHER rc=0"),
            "{name} -> other client:\n{c}"
        );
        assert!(c.contains("IPERF-RC 0"), "{name} iperf3:\n{c}");
        // The client sent at least BYTES (iperf3 may count one more buffer than -n); the
        // peer's count, reported back to the client, can stop a little early when the client
        // closes, so it only has to be most of it.
        let mib = |role: &str| {
            c.lines()
                .find(|l| l.starts_with("STREAM") && l.contains(role))
                .and_then(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    let at = w.iter().position(|x| *x == "MBytes")?;
                    w.get(at.checked_sub(1)?)?.parse::<f64>().ok()
                })
                .unwrap_or_else(|| panic!("no iperf3 {role} line of {name}:\n{c}"))
        };
        assert!(mib("sender") >= 16.0, "{name}:\n{c}");
        assert!(mib("receiver") >= 8.0, "{name}:\n{c}");
    }
    // Spoofing: frames with a foreign source MAC never left alpha's VMM and were counted;
    // with its own address again alpha reaches the peer.
    let alpha = console(log, "alpha");
    assert!(!alpha.contains("SPOOF-PING rc=0"), "{alpha}");
    assert!(alpha.contains("PING-AFTER rc=0"), "{alpha}");
    let m = metrics_section(log);
    let get = |vm: &str, k: &str| {
        metric(
            m,
            &format!("ddvmm_ring_net_{k}_total{{vm=\"{vm}\",nic=\"0\"}}"),
        )
        .unwrap_or_else(|| panic!("no {k} of {vm}:\n{m}"))
    };
    assert!(get("alpha", "tx_dropped_spoofed") >= 3.0, "{m}");
    assert_eq!(get("beta", "tx_dropped_spoofed"), 0.0, "{m}");
    for vm in ["alpha", "beta"] {
        // The stream went out through the ring (what the peer took of it: see above), and
        // replies came back.
        assert!(get(vm, "tx_bytes") >= (BYTES / 2) as f64, "{vm}: {m}");
        assert!(get(vm, "rx_frames") > 0.0, "{vm}: {m}");
        assert_eq!(get(vm, "bogus_completions"), 0.0, "{vm}: {m}");
    }
    // Not one frame with the spoofed source left the driver VM (while the same capture saw
    // alpha's own frames: the stream, the pings).
    let sniffed = |mac: &str| sniff_count(log, "ddtap0", mac);
    assert_eq!(
        sniffed(SPOOFED_MAC),
        0,
        "spoofed frames reached the host's bridge:\n{log}"
    );
    assert!(
        sniffed(&client_mac(0)) > 100,
        "the capture saw too little of alpha:\n{log}"
    );
    // Nor did one reach beta, whose own capture saw alpha's genuine broadcasts.
    let beta_sniffed = |mac: &str| sniff_count(console(log, "beta"), "eth0", mac);
    assert!(console(log, "alpha").contains("ARPING rc=0"), "{log}");
    assert_eq!(
        beta_sniffed(SPOOFED_MAC),
        0,
        "spoofed frames reached beta:\n{log}"
    );
    assert!(
        beta_sniffed(&client_mac(0)) >= 3,
        "beta's capture missed alpha:\n{log}"
    );
    // The peer learnt the clients by their own MACs only.
    let neigh = section(log, "bridge").expect("neighbours");
    assert!(neigh.contains(&client_mac(0)), "{neigh}");
    assert!(!neigh.contains(SPOOFED_MAC), "{neigh}");
}
