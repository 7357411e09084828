# ddvmm: the commands a newcomer needs. `make demo` runs a driver VM serving two clients and
# recovers it from an injected fault; `make test` runs every test. Both install what they need first.

CARGO ?= cargo
# Debian packages the build, the images and the tests use.
APT_PACKAGES := qemu-system-x86 cpio xz-utils util-linux ca-certificates iperf3 iproute2

.PHONY: all deps images agent driver-image build nextest test test-long demo bench bench-io bench-driver \
	bench-recovery soak-recovery bench-fairness bench-idle bench-passthrough bench-net bench-confinement fuzz fuzz-smoke lint clean-images

all: build

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "deps: installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "deps: all installed"; fi

images: deps
	bash guest-images/build-images.sh

build:
	$(CARGO) build --release --workspace --all-targets

# The translation agent runs in driver VMs: a static binary (its own target dir, so the
# static-link flags do not rebuild the workspace).
AGENT := target/x86_64-unknown-linux-gnu/release/ddvmm-agent
agent:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release -p ddvmm-translation \
	    --bin ddvmm-agent --target x86_64-unknown-linux-gnu

# Driver-VM image: the base from `images` plus the agent.
driver-image: images agent
	bash guest-images/pack-driver.sh $(AGENT)

# nextest runs every test in its own process, two at a time, longest first
# (.config/nextest.toml); installed from crates.io where a machine lacks it.
nextest:
	@$(CARGO) nextest --version >/dev/null 2>&1 || $(CARGO) install cargo-nextest --locked

# One profile (release) for the binary under test and the tests themselves. The report at the
# end: every test's time and test-host attempts, every retry with its cause and evidence.
LOGS := target/testhost-logs
# Before a run: no records of an earlier one. After it: the report, whatever the result.
FORGET_RUNS := mkdir -p $(LOGS) && rm -f $(LOGS)/runs.jsonl $(LOGS)/retries.jsonl \
	target/nextest/default/junit.xml
REPORT := $(CARGO) run --release -q -p ddvmm-tests --bin test-report
test: deps images build driver-image nextest
	@$(FORGET_RUNS)
	@rc=0; \
	$(CARGO) nextest run --release --workspace $(NEXTEST_ARGS) || rc=$$?; \
	$(CARGO) test --release --workspace --doc -q || rc=$$?; \
	[ -n "$(SKIP_FUZZ)" ] || $(MAKE) -s fuzz-smoke || rc=$$?; \
	$(REPORT); \
	exit $$rc

# The long campaigns: the 20-fault recovery campaign (one of each kind, then 14 mixed faults).
# The 1000-fault soak is `make soak-recovery`.
test-long: deps images build driver-image nextest
	@$(FORGET_RUNS)
	@rc=0; \
	DDVMM_MIXED_FAULTS=14 $(CARGO) nextest run --release -p ddvmm-tests --test recovery \
	    -E 'test(=every_fault_kind_is_detected_and_recovered_without_client_errors)' || rc=$$?; \
	$(REPORT); \
	exit $$rc

demo: deps images build driver-image
	$(CARGO) run --release -q -p ddvmm-tests --bin testhost -- --echo --memory-mib 3072 \
	    --driver-image --program ip=$$(command -v ip) --lib bench/lib.sh \
	    --guest-script scripts/demo-guest.sh scripts/demo.sh

# Boot time and VMM memory, ddvmm vs QEMU microvm, same kernel/initramfs/host, one run.
bench: deps images build
	$(CARGO) run --release -q -p ddvmm-tests --bin testhost -- --echo --memory-mib 4096 \
	    --program boot-timer=target/release/boot-timer \
	    --program qemu-system-x86_64=/usr/bin/qemu-system-x86_64 \
	    --host-file /usr/share/qemu/bios-microvm.bin \
	    --host-file /usr/share/qemu/linuxboot_dma.bin \
	    bench/boot-time.sh

# Device performance, ddvmm vs QEMU: fio and iperf3 in the same guest, one run.
bench-io: deps images build
	$(CARGO) run --release -q -p ddvmm-tests --bin testhost -- --echo --memory-mib 4096 \
	    --program qemu-system-x86_64=/usr/bin/qemu-system-x86_64 \
	    --program iperf3=/usr/bin/iperf3 \
	    --host-file /usr/share/qemu/bios-microvm.bin \
	    --host-file /usr/share/qemu/linuxboot_dma.bin \
	    --guest-script bench/guest-blk.sh --guest-script bench/guest-io-net.sh \
	    --lib bench/lib.sh bench/io-net.sh

# Cost of confinement: boot and fio on ddvmm with its filters off vs filtered and jailed (what
# the daemon runs), alternating, CONF_ROUNDS rounds (default 2).
CONF_ROUNDS ?= 2
bench-confinement: deps images build
	$(CARGO) run --release -q -p ddvmm-tests --bin testhost -- --echo --memory-mib 4096 \
	    --program boot-timer=target/release/boot-timer --env ROUNDS=$(CONF_ROUNDS) \
	    --guest-script bench/guest-blk.sh --lib bench/lib.sh bench/confinement.sh

# Block I/O through a driver VM vs ddvmm's direct virtio-blk: same guest, fio jobs and backing
# file, one run; plus the driver VM's resident memory and idle CPU.
bench-driver: deps images build driver-image
	$(CARGO) run --release -q -p ddvmm-tests --bin testhost -- --echo --memory-mib 4096 \
	    --driver-image --guest-script bench/guest-blk.sh --lib bench/lib.sh bench/driver-blk.sh

# Fairness: a QD1 victim beside a QD64 aggressor on one driver VM (p99 vs alone), two
# saturating clients of weights 2:1, a client limited to LIMIT_IOPS (default 100: the emulated
# driver path does a few hundred IOPS); with and without the agent's weighted scheduler
# (FAIR_SECS per phase, default 15; the victim's phases FAIR_REPEATS times, medians).
FAIR_SECS ?= 15
FAIR_REPEATS ?= 1
# FAIR_ARMS: fair (depth 2), fair1 (depth 1), fifo; DEVICE_IOPS: the driver VM's disk slowed
# to this many IOPS (the device, not the emulated CPU, as the bottleneck); AGENT_OPTS: more
# agent options for every arm (e.g. ddvmm.agent.grace_ms=N).
FAIR_ARMS ?= fair fifo
DEVICE_IOPS ?=
LIMIT_IOPS ?= 100
AGENT_OPTS ?=
bench-fairness: deps images build driver-image
	$(CARGO) run --release -q -p ddvmm-tests --bin testhost -- --echo --memory-mib 4096 \
	    --timeout 7200 --driver-image --guest-script bench/guest-fairness.sh \
	    --env FAIR_SECS=$(FAIR_SECS) --env "FAIR_ARMS=$(FAIR_ARMS)" --env DEVICE_IOPS=$(DEVICE_IOPS) \
	    --env LIMIT_IOPS=$(LIMIT_IOPS) --env "AGENT_OPTS=$(AGENT_OPTS)" \
	    --env FAIR_REPEATS=$(FAIR_REPEATS) bench/fairness.sh

# What a driver VM costs at rest (CPU, exits, halts, interrupts per second) against a client VM
# of the same kernel, one IDLE_SECS sample each.
IDLE_SECS ?= 30
bench-idle: deps images build driver-image
	$(CARGO) run --release -q -p ddvmm-tests --bin testhost -- --echo --memory-mib 2048 \
	    --driver-image --guest-script bench/guest-idle.sh --lib bench/lib.sh \
	    --env IDLE_SECS=$(IDLE_SECS) --env "AGENT_OPTS=$(AGENT_OPTS)" bench/idle.sh

# Network path, driver VM vs direct virtio-net on the same TAP and peer: TCP both ways and
# ping latency (median, p99), one run of NET_ROUNDS alternating rounds.
NET_ROUNDS ?= 2
bench-net: deps images build driver-image
	$(CARGO) run --release -q -p ddvmm-tests --bin testhost -- --echo --memory-mib 4096 \
	    --driver-image --program iperf3=/usr/bin/iperf3 --program ip=$$(command -v ip) \
	    --env ROUNDS=$(NET_ROUNDS) \
	    --guest-script bench/guest-net.sh --lib bench/lib.sh bench/driver-net.sh

# Driver VM recovery: cold boot, then FAULTS_PER_KIND faults of each kind under fio verify;
# detection latency and outage per kind (median, p95, max) and outage / cold boot.
# Optional: ARMS="restore" (skip the boot arm), KINDS="kill panic", BOOT_KINDS=... (the control
# arm's kinds), TIMELINE=1 (the daemon's and the driver VMM's timestamps per restart).
FAULTS_PER_KIND ?= 5
RECOVERY_ENV = $(foreach v,ARMS KINDS BOOT_KINDS TIMELINE,$(if $($(v)),--env "$(v)=$($(v))"))
bench-recovery: deps images build driver-image
	$(CARGO) run --release -q -p ddvmm-tests --bin testhost -- --echo --memory-mib 4096 \
	    --timeout 14400 --driver-image --guest-script bench/guest-recovery.sh \
	    --env FAULTS_PER_KIND=$(FAULTS_PER_KIND) $(RECOVERY_ENV) bench/recovery.sh

# The soak: SOAK_FAULTS mixed faults (1000 by default) on restores, in segments of
# SOAK_SEGMENT faults, each a daemon in a test host of its own: an emulator wedge (about one per
# 10 soak minutes here) then costs the harness's retry of one segment, not the soak. Each
# segment also injects one fault of every kind first. Prints each segment's result and the
# totals (target/soak-N.log).
SOAK_FAULTS ?= 1000
SOAK_SEGMENT ?= 100
soak-recovery: deps images build driver-image
	@done=0; seg=0; rm -f target/soak-*.log; \
	while [ $$done -lt $(SOAK_FAULTS) ]; do \
	    seg=$$((seg + 1)); n=$(SOAK_SEGMENT); [ $$((done + n)) -gt $(SOAK_FAULTS) ] && n=$$(($(SOAK_FAULTS) - done)); \
	    echo "=== soak segment $$seg: $$n mixed faults"; \
	    $(CARGO) run --release -q -p ddvmm-tests --bin testhost -- --echo --memory-mib 4096 \
	        --timeout 14400 --driver-image --guest-script bench/guest-recovery.sh \
	        --env FAULTS_PER_KIND=1 --env SOAK_FAULTS=$$n --env SOAK_SEED=$$((10 + seg)) \
	        --env ARMS=restore $(foreach v,KINDS TIMELINE,$(if $($(v)),--env "$(v)=$($(v))")) \
	        bench/recovery.sh > target/soak-$$seg.log 2>&1; rc=$$?; \
	    grep -a -E "^(SOAK-|restore: CLIENT-RESULT|testhost RETRY)" target/soak-$$seg.log | sed "s/^/  /"; \
	    [ $$rc -eq 0 ] || { echo "soak segment $$seg failed (rc $$rc): target/soak-$$seg.log"; exit 1; }; \
	    done=$$((done + n)); \
	done; \
	cat target/soak-*.log | tr -d '\r' | awk '/^SOAK-RESULT/ { for (i = 2; i <= NF; i++) { split($$i, kv, "="); t[kv[1]] += kv[2] } } \
	    /^SOAK-DAEMON/ { printf "  daemon of segment %d: %s\n", ++s, substr($$0, 13) } \
	    END { printf "soak totals: faults %d (restores %d, of them standby %d), fallbacks %d, quarantined %d, client fio failures %d\n", \
	        t["faults"], t["restores"], t["standby"], t["fallbacks"], t["quarantined"], t["fio_failures"] }'

# VFIO passthrough vs ddvmm's virtio-blk on the same NVMe controller and backing file: the fio
# jobs of bench/guest-blk.sh (4 KiB random read QD32, 128 KiB sequential read, ...) in the same
# guest, one run.
bench-passthrough: deps images build
	truncate -s 256M target/bench-passthrough.img
	$(CARGO) run --release -q -p ddvmm-tests --bin testhost -- --echo --memory-mib 4096 \
	    --passthrough-disk target/bench-passthrough.img \
	    --guest-script bench/guest-blk.sh --lib bench/lib.sh bench/passthrough.sh

# Fuzz the virtio descriptor-chain parsers, the ring, the journal and the ring frontends with a
# hostile agent and guest (`fuzz`: nightly toolchain, AddressSanitizer; installs cargo-fuzz).
# `make test` runs `fuzz-smoke`: every target built on the default (stable) toolchain without a
# sanitizer and run briefly; a crash fails it.
FUZZ_TARGETS := virtio_blk_request virtio_net_frames ring_completions journal ring_frontends api_request
FUZZ_SECONDS ?= 180
FUZZ_SMOKE_SECONDS ?= 5
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	    cargo +nightly fuzz run -O $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 \
	        2>&1 | grep -E "^Done|ERROR|panicked|SUMMARY" ; \
	done

fuzz-smoke:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	mkdir -p fuzz/target
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	    $(CARGO) fuzz run -O -s none $$t -- -max_total_time=$(FUZZ_SMOKE_SECONDS) \
	        -rss_limit_mb=4096 > target/smoke-$$t.log 2>&1 \
	        || { tail -40 target/smoke-$$t.log; echo "fuzz target $$t FAILED"; exit 1; }; \
	    grep -E "^Done" target/smoke-$$t.log | sed "s/^/fuzz $$t: /"; \
	done

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean-images:
	rm -rf guest-images/out
