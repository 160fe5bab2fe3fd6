//! The extremes (0, 1, 2^64 - 1 bytes; durations at and past the 100-year
//! bound; priorities at and past 65535) thrown at the settings, the planner
//! and the simulated card: settings either build within their bounds or
//! are refused naming a key; plans never over-commit; the card's books
//! never wrap.

use std::time::Duration;

use proptest::prelude::*;
use vram_manager::config::{GpuTotal, MAX_DURATION, Settings};
use vram_manager::gpu::SimCard;
use vram_manager::{Catalog, Kind, Kinds, Ledger, ModelSpec, Plan, plan};

fn size() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0B".to_string()),
        Just("1B".to_string()),
        Just("18446744073709551615B".to_string()),
        Just("18446744073709551616B".to_string()),
        Just("16EiB".to_string()),
        Just("15.9EiB".to_string()),
        Just("100000000000TiB".to_string()),
        (1u64..64).prop_map(|g| format!("{g}GiB")),
    ]
}

fn duration() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0s".to_string()),
        Just("1ms".to_string()),
        Just("100y".to_string()),
        Just("36500days".to_string()),
        Just("36600days".to_string()),
        Just("101y".to_string()),
        Just("500000000000y".to_string()),
        (1u64..600).prop_map(|s| format!("{s}s")),
    ]
}

fn priority() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(65_535),
        Just(65_536),
        Just(u64::from(u32::MAX))
    ]
}

fn byte_count() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        1u64..(1 << 40)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn settings_build_within_bounds_or_name_the_key(
        total in size(),
        reserve in size(),
        external in size(),
        vram in size(),
        lease_wait in duration(),
        release_poll in duration(),
        ttl in duration(),
        priority in priority(),
    ) {
        let text = format!(
            "[gpu]\ntotal = \"{total}\"\nreserve = \"{reserve}\"\nexternal = \"{external}\"\n\
             release_poll = \"{release_poll}\"\n\
             [policy]\nlease_wait = \"{lease_wait}\"\n\
             [kinds.llm]\npriority = {priority}\nttl = \"{ttl}\"\n\
             [[models]]\nid = \"m\"\nkind = \"llm\"\nvram = \"{vram}\"\n"
        );
        match Settings::parse(&text) {
            Ok(s) => {
                prop_assert!(s.policy.lease_wait <= MAX_DURATION);
                prop_assert!(s.gpu.release_poll >= Duration::from_millis(1));
                prop_assert!(s.gpu.release_poll <= MAX_DURATION);
                prop_assert!(s.kinds.get("llm").unwrap().priority <= 65_535);
                prop_assert!(s.models[0].ttl.is_some_and(|t| !t.is_zero() && t <= MAX_DURATION));
                let GpuTotal::Bytes(total) = s.gpu.total else {
                    return Err(TestCaseError::fail("a fixed total"));
                };
                prop_assert!(total > 0 && s.gpu.reserve < total);
                prop_assert!(s.models[0].spec.bytes > 0);
            }
            Err(e) => {
                let message = e.to_string();
                let named = ["gpu.", "policy.", "kinds.llm.", "models[0]."]
                    .iter()
                    .any(|key| message.contains(key));
                prop_assert!(named, "{text}\n-> {message}");
            }
        }
    }

    #[test]
    fn plans_at_the_extremes_never_over_commit(
        capacity in byte_count(),
        sizes in proptest::collection::vec(byte_count(), 1..6),
        request in byte_count(),
        priorities in proptest::collection::vec(0u32..=u32::MAX, 3),
    ) {
        let kinds: Kinds = ["a", "b", "c"]
            .iter()
            .zip(&priorities)
            .map(|(name, p)| Kind::new(*name, *p, false))
            .collect();
        let mut catalog = Catalog::new();
        let mut ledger = Ledger::new(capacity);
        for (i, bytes) in sizes.iter().enumerate() {
            let spec = ModelSpec::new(format!("m{i}"), ["a", "b", "c"][i % 3], *bytes);
            catalog.insert(spec.clone());
            // Only what fits goes on, as a real ledger would hold.
            if ledger.free() >= *bytes {
                ledger.insert_resident(&spec);
            }
        }
        catalog.insert(ModelSpec::new("r", "c", request));
        let free = ledger.free();
        match plan(&ledger, &kinds, &catalog, "r", free) {
            Ok(Plan::Load { victims }) => {
                let freed: u128 = victims
                    .iter()
                    .map(|v| u128::from(ledger.get(v).unwrap().bytes))
                    .sum();
                prop_assert!(
                    u128::from(ledger.used()) - freed + u128::from(request) <= u128::from(capacity),
                    "victims {victims:?} leave no room"
                );
            }
            Ok(Plan::Resident) => prop_assert!(false, "r was never loaded"),
            Err(e) => prop_assert!(!e.code().is_empty()),
        }
    }

    #[test]
    fn the_simulated_card_never_wraps(
        total in byte_count(),
        external in byte_count(),
        loads in proptest::collection::vec(byte_count(), 0..6),
    ) {
        let card = SimCard::new(total, external);
        for (i, bytes) in loads.iter().enumerate() {
            let before = card.memory_now();
            let allocated = card.allocate(format!("m{i}"), *bytes);
            let after = card.memory_now();
            prop_assert_eq!(allocated.is_ok(), *bytes <= before.free);
            prop_assert_eq!(after.free, total.saturating_sub(after.used));
            prop_assert!(after.used >= before.used, "use never falls on an allocation");
            if allocated.is_err() {
                prop_assert!(card.overcommitted());
            }
        }
        let any_refused = {
            let mut used = external;
            let mut refused = false;
            for bytes in &loads {
                if *bytes > total.saturating_sub(used) {
                    refused = true;
                } else {
                    used = used.saturating_add(*bytes);
                }
            }
            refused
        };
        prop_assert_eq!(card.overcommitted(), any_refused);
        prop_assert_eq!(card.external_peak(), external);
    }
}
