//! The clock checker catches a node that lets a far-ahead peer clock in.
//! (The CRDT checkers are proven by the `wrong-merge` feature, which CI
//! builds and runs separately.)

use std::time::Duration;

use concord_sim::{FaultKind, Options};

#[test]
fn a_node_accepting_far_ahead_clocks_fails_the_run() {
    concord_sim::panics::install();
    let options = Options {
        faults: [FaultKind::SkewBeyond].into_iter().collect(),
        duration: Duration::from_secs(4),
        drift_check: false,
        ..Options::default()
    };
    let mut caught = None;
    for seed in 0..10 {
        let outcome = concord_sim::run(seed, &options, None).expect("the run starts");
        if let Some(v) = outcome
            .violations
            .iter()
            .find(|v| v.contains("ahead of true time"))
        {
            caught = Some((seed, v.clone()));
            break;
        }
    }
    let (seed, violation) = caught.expect("some seed of ten puts a clock far ahead");
    eprintln!("seed {seed}: {violation}");
}

#[test]
fn the_same_seeds_pass_with_the_check_on() {
    concord_sim::panics::install();
    let options = Options {
        faults: [FaultKind::SkewBeyond].into_iter().collect(),
        duration: Duration::from_secs(4),
        ..Options::default()
    };
    for seed in 0..3 {
        let outcome = concord_sim::run(seed, &options, None).expect("the run starts");
        assert!(outcome.passed(), "seed {seed}: {:?}", outcome.violations);
    }
}
