//! End-to-end virtio-net: a stock guest gets an address on a TAP link inside the test host,
//! pings the host end, and sends a TCP stream with iperf3 (Debian's) whose byte count the
//! receiving side checks. All traffic stays between the guest and the test host's TAP.

use std::time::Duration;

use ddvmm_tests::{client_initrd_with_script, TestHost};

const TIMEOUT: Duration = Duration::from_secs(900);
const BYTES: u64 = 16 << 20;

fn guest_initrd(script: &str) -> Vec<u8> {
    client_initrd_with_script(script).expect("client image with script")
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

/// The `"bytes"` value that follows `"sum_received"` in iperf3's JSON report.
fn received_bytes(json: &str) -> Option<u64> {
    let at = json.find("\"sum_received\"")?;
    let rest = &json[at..];
    let b = rest.find("\"bytes\"")?;
    let digits: String = rest[b + 7..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

#[test]
fn guest_pings_and_streams_tcp_over_tap() {
    let guest = format!(
        r#"
ip addr add 10.77.0.2/24 dev eth0
ip link set eth0 up
echo "GUEST-MAC $(cat /sys/class/net/eth0/address)"
# The host configures its end of the TAP once the VMM has created it: wait until it answers,
# then three pings that must all come back.
n=0
while ! ping -c 1 -W 2 10.77.0.1 > /dev/null 2>&1 && [ $n -lt 60 ]; do n=$((n + 1)); done
ping -c 3 -W 10 10.77.0.1 > /tmp/ping.txt 2>&1
echo "PING-RC $?"
cat /tmp/ping.txt
iperf3 -c 10.77.0.1 -n {BYTES} --connect-timeout 20000 > /tmp/iperf.txt 2>&1
echo "IPERF-RC $?"
cat /tmp/iperf.txt
# Exact byte counts both ways: a random file sent to the host (TX) and one fetched (RX).
dd if=/dev/urandom of=/tmp/out.bin bs=1M count=8 2>/dev/null
echo "GUEST-TX-SHA $(sha256sum /tmp/out.bin | cut -d' ' -f1)"
mkdir -p /tmp/srv && mv /tmp/out.bin /tmp/srv/
httpd -p 8081 -h /tmp/srv
# The host fetches it, then publishes tx-done.
i=0
until wget -q -O /dev/null http://10.77.0.1:8080/tx-done 2>/dev/null || [ $i -ge 300 ]; do
    sleep 1; i=$((i + 1))
done
wget -q -O /tmp/in.bin http://10.77.0.1:8080/rx.bin
echo "WGET-RC $?"
echo "GUEST-RX $(wc -c < /tmp/in.bin) $(sha256sum /tmp/in.bin | cut -d' ' -f1)"
"#
    );
    let host_script = r#"
$DDVMM --log-level info run --kernel $IMAGES/vmlinuz --initrd guest.img --mem 512M --cpus 2 \
  --net tap=ddtap0,mac=52:54:00:aa:bb:01 --cmdline "console=ttyS0 ddvmm.action=run-script" &
vmm=$!
i=0
while [ ! -e /sys/class/net/ddtap0 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
ip addr add 10.77.0.1/24 dev ddtap0
echo "HOST-TAP-STATE $(cat /sys/class/net/ddtap0/operstate)"
iperf3 -s -1 -J > $WORK/server.json 2>&1 &
(
    i=0
    until wget -q -O $WORK/tx.bin http://10.77.0.2:8081/out.bin 2>/dev/null || [ $i -ge 300 ]; do
        sleep 1; i=$((i + 1))
    done
    touch $WORK/www/tx-done
) &
mkdir -p $WORK/www && dd if=/dev/urandom of=$WORK/www/rx.bin bs=1M count=8 2>/dev/null
echo "HOST-RX $(wc -c < $WORK/www/rx.bin) $(sha256sum $WORK/www/rx.bin | cut -d' ' -f1)"
httpd -p 8080 -h $WORK/www
wait $vmm
echo "VMM-RC=$?"
echo "HOST-TX $(wc -c < $WORK/tx.bin) $(sha256sum $WORK/tx.bin | cut -d' ' -f1)"
echo "=== server report ==="
cat $WORK/server.json
"#;
    let host = TestHost::new("net-iperf")
        .expect("test host")
        .program("iperf3", "/usr/bin/iperf3")
        .busybox_applets(&["httpd", "wget"])
        .file("guest.img", guest_initrd(&guest), 0o644);
    let out = host.run(host_script, TIMEOUT).expect("test host run");
    let log = &out.output;
    assert_eq!(out.status, 0, "{log}");
    assert!(log.contains("VMM-RC=0"), "{log}");
    ddvmm_tests::assert_no_kernel_errors(log);
    assert!(log.contains("GUEST-MAC 52:54:00:aa:bb:01"), "{log}");
    assert!(log.contains("PING-RC 0"), "{log}");
    assert!(log.contains("3 packets received"), "{log}");
    assert!(log.contains("IPERF-RC 0"), "{log}");
    // iperf3's own accounting: the client sent exactly BYTES; the server's report can stop
    // counting a little early when the client closes, so it is only checked to be non-zero.
    let report = log.split("=== server report ===").nth(1).unwrap_or("");
    assert!(received_bytes(report).is_some_and(|b| b > 0), "{log}");
    // The client's summary: at least BYTES sent (iperf3 may count one more buffer than -n).
    let sent_mib = log.lines().find(|l| l.contains("sender")).and_then(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "MBytes")?;
        words.get(at.checked_sub(1)?)?.parse::<f64>().ok()
    });
    assert!(sent_mib.is_some_and(|m| m >= 16.0), "{log}");
    // Exact transfers over TCP: every byte arrived, in both directions.
    let tx_sha = field(log, "GUEST-TX-SHA");
    assert_eq!(
        field(log, "HOST-TX"),
        format!("{} {tx_sha}", 8 << 20),
        "{log}"
    );
    assert!(log.contains("WGET-RC 0"), "{log}");
    assert_eq!(field(log, "GUEST-RX"), field(log, "HOST-RX"), "{log}");
}

#[test]
fn json_byte_count_parser() {
    let json =
        r#"{"end":{"sum_sent":{"bytes":1},"sum_received":{"start":0,"bytes":   16777216,"x":1}}}"#;
    assert_eq!(received_bytes(json), Some(16777216));
    assert_eq!(received_bytes("{}"), None);
}
