//! Fuzzes the in-flight journal on its own against a model: every request accepted comes back
//! exactly once (completed, poisoned, refused or failed by a quarantine) unless the guest gave
//! it up; order is kept on the ring; a suspect is alone on the ring; capacity holds.
#![no_main]

use std::collections::{BTreeSet, HashMap};

use ddvmm_translation::journal::Journal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut j: Journal<u32> = Journal::new(8);
    let mut next = 0u32;
    // Items the guest still waits for, and the ring id each is on.
    let mut live: BTreeSet<u32> = BTreeSet::new();
    let mut on_ring: HashMap<u64, u32> = HashMap::new();
    let mut last_sent: Option<u32> = None;
    let back = |item: u32, live: &mut BTreeSet<u32>| {
        assert!(
            live.remove(&item),
            "item {item} came back twice or was never live"
        );
    };
    for &op in data.iter().take(512) {
        match op % 9 {
            0 => {
                if j.push(next).is_ok() {
                    live.insert(next);
                } else {
                    assert_eq!(j.len(), 8);
                }
                next += 1;
            }
            1 => {
                if let Some((seq, &item, suspect)) = j.next_to_send() {
                    if suspect {
                        assert_eq!(j.on_ring(), 0, "a suspect goes alone");
                    }
                    let id = j.sent(seq).expect("waiting");
                    on_ring.insert(id, item);
                    if let Some(prev) = last_sent {
                        // Within one generation, sending follows acceptance order.
                        assert!(item > prev, "{item} sent after {prev}");
                    }
                    last_sent = Some(item);
                }
            }
            2 | 3 => {
                let ids: Vec<u64> = on_ring.keys().copied().collect();
                if let Some(&id) = ids.get(usize::from(op / 9) % ids.len().max(1)) {
                    let item = on_ring.remove(&id).expect("on ring");
                    if let Some(got) = j.complete(id) {
                        assert_eq!(got, item);
                        back(got, &mut live);
                    }
                    assert_eq!(j.complete(id), None, "exactly once");
                }
            }
            4 => {
                let r = j.renew(u32::from(op / 9) % 4);
                on_ring.clear();
                last_sent = None;
                for item in r.poisoned {
                    back(item, &mut live);
                }
            }
            5 => {
                j.forget_guest();
                live.clear();
            }
            6 => {
                for item in j.take_all() {
                    back(item, &mut live);
                }
                assert!(live.is_empty(), "take_all returns every live item");
            }
            7 => j.set_hold(op & 0x80 != 0),
            _ => {
                if let Some((seq, &item, _)) = j.next_to_send() {
                    assert_eq!(j.refuse(seq), Some(item));
                    back(item, &mut live);
                }
            }
        }
        assert!(j.len() <= 8);
        assert_eq!(j.on_ring() + j.waiting(), j.len());
        assert_eq!(j.on_ring(), on_ring.len());
    }
});
