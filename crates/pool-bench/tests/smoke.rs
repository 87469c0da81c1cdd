//! The benchmark's only test: the library runs one cheap scenario with quick settings and
//! its JSON has the documented shape. The benchmark itself never runs under `cargo test`.

use pool_bench::{Options, Pinning, CONTENDERS, SCENARIOS};

#[test]
fn quick_floor_run_has_every_scenario_key() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    let opts = Options {
        quick: true,
        only: vec!["floor".into(), "poll_ns".into()],
        // Pinning would move the test harness's threads too.
        pinnings: vec![Pinning::Unpinned],
        command: "smoke test".into(),
        progress: false,
    };
    let started = std::time::Instant::now();
    let report = pool_bench::run_with_server(&pg, &opts).expect("the benchmark runs");
    let json = report.to_json();
    let root = json.as_object().expect("an object");
    assert!(root.contains_key("meta"));
    for scenario in SCENARIOS {
        let value = root
            .get(scenario)
            .unwrap_or_else(|| panic!("scenario {scenario} missing from {json}"));
        assert!(value.is_null() || value.is_object(), "{scenario}: {value}");
    }
    // Not selected: skipped, with the reason.
    assert!(root["spike"]["skipped"].is_string(), "{}", root["spike"]);
    // Selected: every contender key, measured or skipped with a reason.
    for scenario in ["floor", "poll_ns"] {
        for contender in CONTENDERS {
            let entry = &root[scenario][contender];
            assert!(
                entry.get("median_ns").is_some() || entry["skipped"].is_string(),
                "{scenario}.{contender}: {entry}"
            );
        }
    }
    let floor = root["floor"]["raw"]["median_ns"].as_f64().expect("a floor");
    assert!(floor > 1_000.0 && floor < 100_000_000.0, "floor {floor} ns");
    let poll = root["poll_ns"]["raw"]["median_ns"]
        .as_f64()
        .expect("a poll cost");
    assert!(poll > 0.0 && poll < 1_000_000.0, "poll {poll} ns");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "the smoke run must stay short: {:?}",
        started.elapsed()
    );
    // The text form renders too.
    assert!(report.to_text().contains("## floor"));
}
