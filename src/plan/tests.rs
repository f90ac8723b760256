use super::*;
use proptest::prelude::*;

fn v(s: &str) -> EtcdVersion {
    s.parse().unwrap()
}
fn vf(s: &str) -> VersionFile {
    s.parse().unwrap()
}
fn bundle(list: &str) -> BundledVersions {
    BundledVersions::new(list.split_whitespace().map(v))
}
/// The Kubernetes etcd image's bundle.
const K8S: &str = "2.2.1 2.3.7 3.0.17 3.1.20 3.2.32 3.3.17 3.4.18 3.5.1";
/// What `make bundle` assembles here.
const HERE: &str = "3.4.23 3.5.0 3.5.1";

fn one() -> DataFacts {
    DataFacts::default()
}
fn v2_boot() -> DataFacts {
    DataFacts {
        members: 1,
        boot_cluster_version_v2: true,
    }
}
fn up(from: &str, to: &str) -> Step {
    Step::Upgrade {
        from: vf(from),
        to: vf(to),
        cut_snapshot: false,
    }
}
fn up_cut(from: &str, to: &str) -> Step {
    Step::Upgrade {
        from: vf(from),
        to: vf(to),
        cut_snapshot: true,
    }
}
fn mig(from: &str, at: &str, cut: bool) -> Step {
    Step::MigrateStorage {
        from: vf(from),
        at: v(at),
        cut_snapshot: cut,
    }
}
fn rb(from: &str, to: &str) -> Step {
    Step::MinorRollback {
        from: v(from),
        to: v(to),
    }
}

struct Case {
    name: &'static str,
    current: &'static str,
    target: &'static str,
    bundle: &'static str,
    facts: DataFacts,
    want: Result<Vec<Step>, fn(&PlanError) -> bool>,
}

fn cases() -> Vec<Case> {
    vec![
        Case { name: "at target: nothing to do", current: "3.5.1/etcd3", target: "3.5.1/etcd3", bundle: HERE, facts: one(), want: Ok(vec![]) },
        Case { name: "at target even when nothing is bundled", current: "3.5.1/etcd3", target: "3.5.1/etcd3", bundle: "", facts: one(), want: Ok(vec![]) },
        Case { name: "one minor up", current: "3.4.23/etcd3", target: "3.5.1/etcd3", bundle: HERE, facts: one(), want: Ok(vec![up("3.4.23/etcd3", "3.5.1/etcd3")]) },
        Case { name: "patch up is one step with the target binary", current: "3.5.0/etcd3", target: "3.5.1/etcd3", bundle: HERE, facts: one(), want: Ok(vec![up("3.5.0/etcd3", "3.5.1/etcd3")]) },
        Case { name: "patch down is one step with the target binary", current: "3.5.1/etcd3", target: "3.5.0/etcd3", bundle: HERE, facts: one(), want: Ok(vec![up("3.5.1/etcd3", "3.5.0/etcd3")]) },
        Case { name: "unbundled current patch upgrades straight to the next minor", current: "3.4.18/etcd3", target: "3.5.1/etcd3", bundle: HERE, facts: one(), want: Ok(vec![up("3.4.18/etcd3", "3.5.1/etcd3")]) },
        Case {
            name: "kubernetes path from 2.2.1 to 3.5.1 passes every minor and migrates storage at 3.0.17",
            current: "2.2.1/etcd2", target: "3.5.1/etcd3", bundle: K8S, facts: one(),
            want: Ok(vec![
                up("2.2.1/etcd2", "2.3.7/etcd2"),
                mig("2.3.7/etcd2", "3.0.17", false),
                up("3.0.17/etcd3", "3.1.20/etcd3"),
                up("3.1.20/etcd3", "3.2.32/etcd3"),
                up("3.2.32/etcd3", "3.3.17/etcd3"),
                up_cut("3.3.17/etcd3", "3.4.18/etcd3"),
                up("3.4.18/etcd3", "3.5.1/etcd3"),
            ]),
        },
        Case { name: "etcd2 kept through 3.0", current: "2.2.1/etcd2", target: "3.0.17/etcd2", bundle: K8S, facts: one(), want: Ok(vec![up("2.2.1/etcd2", "2.3.7/etcd2"), up("2.3.7/etcd2", "3.0.17/etcd2")]) },
        Case { name: "storage migrated at the first 3.x release", current: "2.2.1/etcd2", target: "3.0.17/etcd3", bundle: K8S, facts: one(), want: Ok(vec![up("2.2.1/etcd2", "2.3.7/etcd2"), mig("2.3.7/etcd2", "3.0.17", false)]) },
        Case { name: "storage migrated in place at 3.4", current: "3.4.23/etcd2", target: "3.4.23/etcd3", bundle: HERE, facts: one(), want: Ok(vec![mig("3.4.23/etcd2", "3.4.23", false)]) },
        Case {
            name: "storage migrated at 3.4 cuts a snapshot before 3.5",
            current: "3.4.23/etcd2", target: "3.5.1/etcd3", bundle: HERE, facts: one(),
            want: Ok(vec![mig("3.4.23/etcd2", "3.4.23", true), up("3.4.23/etcd3", "3.5.1/etcd3")]),
        },
        Case {
            name: "v2-era data already at 3.4 gets one extra pass before 3.5",
            current: "3.4.23/etcd3", target: "3.5.1/etcd3", bundle: HERE, facts: v2_boot(),
            want: Ok(vec![up_cut("3.4.23/etcd3", "3.4.23/etcd3"), up("3.4.23/etcd3", "3.5.1/etcd3")]),
        },
        Case {
            name: "v2-era data at 3.3 cuts the snapshot during the 3.4 step",
            current: "3.3.17/etcd3", target: "3.5.1/etcd3", bundle: K8S, facts: v2_boot(),
            want: Ok(vec![up_cut("3.3.17/etcd3", "3.4.18/etcd3"), up("3.4.18/etcd3", "3.5.1/etcd3")]),
        },
        Case { name: "etcd2 kept up to 3.5", current: "3.3.17/etcd2", target: "3.5.1/etcd2", bundle: K8S, facts: one(), want: Ok(vec![up("3.3.17/etcd2", "3.4.18/etcd2"), up("3.4.18/etcd2", "3.5.1/etcd2")]) },
        Case { name: "etcd2 3.x upgrade", current: "3.0.17/etcd2", target: "3.2.32/etcd2", bundle: K8S, facts: one(), want: Ok(vec![up("3.0.17/etcd2", "3.1.20/etcd2"), up("3.1.20/etcd2", "3.2.32/etcd2")]) },
        Case { name: "native rollback from 3.0", current: "3.0.17/etcd3", target: "2.2.1/etcd2", bundle: K8S, facts: one(), want: Ok(vec![Step::RollbackToEtcd2 { from: v("3.0.17") }]) },
        Case {
            name: "rollback to etcd2 from 3.2 chains minor rollbacks down to 3.0",
            current: "3.2.32/etcd3", target: "2.2.1/etcd2", bundle: K8S, facts: one(),
            want: Ok(vec![rb("3.2.32", "3.1.20"), rb("3.1.20", "3.0.17"), Step::RollbackToEtcd2 { from: v("3.0.17") }]),
        },
        Case { name: "minor rollback", current: "3.5.1/etcd3", target: "3.4.23/etcd3", bundle: HERE, facts: one(), want: Ok(vec![rb("3.5.1", "3.4.23")]) },
        Case { name: "two minor rollbacks", current: "3.5.1/etcd3", target: "3.3.17/etcd3", bundle: K8S, facts: one(), want: Ok(vec![rb("3.5.1", "3.4.18"), rb("3.4.18", "3.3.17")]) },
        Case { name: "rollback runs an unbundled current patch with its minor's bundled patch", current: "3.5.3/etcd3", target: "3.4.23/etcd3", bundle: HERE, facts: one(), want: Ok(vec![rb("3.5.1", "3.4.23")]) },
        Case { name: "upgrade of a three-member cluster is allowed", current: "3.4.23/etcd3", target: "3.5.1/etcd3", bundle: HERE, facts: DataFacts { members: 3, boot_cluster_version_v2: false }, want: Ok(vec![up("3.4.23/etcd3", "3.5.1/etcd3")]) },
        // Into 3.6 and 3.7 (no binaries here: the rules come from etcd's source and docs).
        Case { name: "3.5.1 to 3.6 steps through the newest 3.5 >= 3.5.20 first", current: "3.5.1/etcd3", target: "3.6.0/etcd3", bundle: "3.4.23 3.5.1 3.5.30 3.6.0", facts: one(), want: Ok(vec![up("3.5.1/etcd3", "3.5.30/etcd3"), up("3.5.30/etcd3", "3.6.0/etcd3")]) },
        Case { name: "3.4 to 3.6 passes 3.5 at the newest bundled patch", current: "3.4.23/etcd3", target: "3.6.0/etcd3", bundle: "3.4.23 3.5.1 3.5.30 3.6.0", facts: one(), want: Ok(vec![up("3.4.23/etcd3", "3.5.30/etcd3"), up("3.5.30/etcd3", "3.6.0/etcd3")]) },
        Case { name: "3.5.20 goes straight to 3.6", current: "3.5.20/etcd3", target: "3.6.0/etcd3", bundle: "3.5.20 3.6.0", facts: one(), want: Ok(vec![up("3.5.20/etcd3", "3.6.0/etcd3")]) },
        Case { name: "an unbundled 3.5.25 goes straight to 3.6", current: "3.5.25/etcd3", target: "3.6.0/etcd3", bundle: "3.5.1 3.6.0", facts: one(), want: Ok(vec![up("3.5.25/etcd3", "3.6.0/etcd3")]) },
        Case { name: "3.5.30 to 3.7 passes 3.6", current: "3.5.30/etcd3", target: "3.7.0/etcd3", bundle: "3.5.30 3.6.14 3.7.0", facts: one(), want: Ok(vec![up("3.5.30/etcd3", "3.6.14/etcd3"), up("3.6.14/etcd3", "3.7.0/etcd3")]) },
        Case { name: "3.6.5 to 3.7 steps through a 3.6 >= 3.6.11", current: "3.6.5/etcd3", target: "3.7.0/etcd3", bundle: "3.6.5 3.6.14 3.7.0", facts: one(), want: Ok(vec![up("3.6.5/etcd3", "3.6.14/etcd3"), up("3.6.14/etcd3", "3.7.0/etcd3")]) },
        Case { name: "3.6.5 to 3.7 without a 3.6 >= 3.6.11 is refused", current: "3.6.5/etcd3", target: "3.7.0/etcd3", bundle: "3.6.5 3.7.0", facts: one(), want: Err(|e| matches!(e, PlanError::PatchTooOld { .. })) },
        Case { name: "a three-member 3.5.30 cluster member goes to 3.6", current: "3.5.30/etcd3", target: "3.6.0/etcd3", bundle: "3.5.30 3.6.0", facts: DataFacts { members: 3, boot_cluster_version_v2: false }, want: Ok(vec![up("3.5.30/etcd3", "3.6.0/etcd3")]) },
        Case { name: "3.5.1 to 3.6 without a 3.5 >= 3.5.20 is refused", current: "3.5.1/etcd3", target: "3.6.0/etcd3", bundle: "3.5.1 3.6.0", facts: one(), want: Err(|e| matches!(e, PlanError::PatchTooOld { .. })) },
        Case { name: "3.4 to 3.6 with only 3.5.1 is refused", current: "3.4.23/etcd3", target: "3.6.0/etcd3", bundle: "3.4.23 3.5.1 3.6.0", facts: one(), want: Err(|e| matches!(e, PlanError::PatchTooOld { .. })) },
        Case { name: "rollback from 3.6 is refused with etcd's downgrade path", current: "3.6.0/etcd3", target: "3.5.30/etcd3", bundle: "3.5.30 3.6.0", facts: one(), want: Err(|e| matches!(e, PlanError::RollbackFrom36 { .. })) },
        Case { name: "rollback from 3.7 is refused too", current: "3.7.0/etcd3", target: "3.6.0/etcd3", bundle: "3.6.0 3.7.0", facts: one(), want: Err(|e| matches!(e, PlanError::RollbackFrom36 { .. })) },
        Case { name: "a release newer than the known table is refused", current: "3.7.0/etcd3", target: "3.8.0/etcd3", bundle: "3.7.0 3.8.0", facts: one(), want: Err(|e| matches!(e, PlanError::UnknownRelease { .. })) },
        // Errors.
        Case { name: "target not bundled", current: "3.4.23/etcd3", target: "3.6.0/etcd3", bundle: HERE, facts: one(), want: Err(|e| matches!(e, PlanError::TargetNotBundled { .. })) },
        Case { name: "target not bundled on rollback", current: "3.5.1/etcd3", target: "3.4.18/etcd3", bundle: HERE, facts: one(), want: Err(|e| matches!(e, PlanError::TargetNotBundled { .. })) },
        Case { name: "needed minor not bundled", current: "3.2.32/etcd3", target: "3.5.1/etcd3", bundle: "3.2.32 3.4.18 3.5.1", facts: one(), want: Err(|e| matches!(e, PlanError::MinorNotBundled { minor, .. } if *minor == Minor::new(3, 3))) },
        Case { name: "rollback through an unbundled minor", current: "3.2.32/etcd3", target: "2.2.1/etcd2", bundle: "3.0.17 3.2.32", facts: one(), want: Err(|e| matches!(e, PlanError::MinorNotBundled { minor, .. } if *minor == Minor::new(3, 1))) },
        Case { name: "2.x to 3.x needs 2.3", current: "2.2.1/etcd2", target: "3.0.17/etcd2", bundle: "2.2.1 3.0.17", facts: one(), want: Err(|e| matches!(e, PlanError::MinorNotBundled { minor, .. } if *minor == Minor::new(2, 3))) },
        Case { name: "etcd3 to etcd2 upward is refused", current: "3.4.23/etcd3", target: "3.5.1/etcd2", bundle: HERE, facts: one(), want: Err(|e| matches!(e, PlanError::Unsupported { .. })) },
        Case { name: "etcd3 to etcd2 in place is refused", current: "3.4.23/etcd3", target: "3.4.23/etcd2", bundle: HERE, facts: one(), want: Err(|e| matches!(e, PlanError::Unsupported { .. })) },
        Case { name: "rollback from etcd2 storage is refused", current: "3.0.17/etcd2", target: "2.2.1/etcd2", bundle: K8S, facts: one(), want: Err(|e| matches!(e, PlanError::Unsupported { .. })) },
        Case { name: "rollback to an etcd2 release other than 2.2.1 is refused", current: "3.0.17/etcd3", target: "2.3.7/etcd2", bundle: K8S, facts: one(), want: Err(|e| matches!(e, PlanError::Unsupported { .. })) },
        Case { name: "2.3 to 2.2 is refused", current: "2.3.7/etcd2", target: "2.2.1/etcd2", bundle: K8S, facts: one(), want: Err(|e| matches!(e, PlanError::Unsupported { .. })) },
        Case { name: "etcd3 on a 2.x release is unservable", current: "3.0.17/etcd3", target: "2.2.1/etcd3", bundle: K8S, facts: one(), want: Err(|e| matches!(e, PlanError::StorageUnservable { .. })) },
        Case { name: "etcd2 on 3.6 is unservable", current: "3.5.1/etcd2", target: "3.6.0/etcd2", bundle: "3.5.1 3.6.0", facts: one(), want: Err(|e| matches!(e, PlanError::StorageUnservable { .. })) },
        Case { name: "etcd2 data through 3.6 is unservable", current: "3.5.1/etcd2", target: "3.6.0/etcd3", bundle: "3.5.1 3.5.30 3.6.0", facts: one(), want: Err(|e| matches!(e, PlanError::NoStorageMigrationRelease { .. })) },
        Case { name: "storage migration needs 3.0-3.4", current: "3.5.1/etcd2", target: "3.5.1/etcd3", bundle: HERE, facts: one(), want: Err(|e| matches!(e, PlanError::NoStorageMigrationRelease { .. })) },
        Case { name: "storage migration moves to the first step when the current minor is not bundled", current: "3.3.17/etcd2", target: "3.4.23/etcd3", bundle: HERE, facts: one(), want: Ok(vec![mig("3.3.17/etcd2", "3.4.23", false)]) },
        Case { name: "rollback from an unbundled current minor", current: "3.5.3/etcd3", target: "3.4.23/etcd3", bundle: "3.4.23", facts: one(), want: Err(|e| matches!(e, PlanError::CurrentMinorNotBundled { .. })) },
        Case { name: "snapshot pass at an unbundled current minor", current: "3.4.18/etcd3", target: "3.5.1/etcd3", bundle: "3.5.1", facts: v2_boot(), want: Err(|e| matches!(e, PlanError::CurrentMinorNotBundled { .. })) },
        Case { name: "storage migration of a three-member cluster is refused", current: "3.4.23/etcd2", target: "3.4.23/etcd3", bundle: HERE, facts: DataFacts { members: 3, boot_cluster_version_v2: false }, want: Err(|e| matches!(e, PlanError::MultiMember { members: 3, .. })) },
        Case { name: "minor rollback of a three-member cluster is refused", current: "3.5.1/etcd3", target: "3.4.23/etcd3", bundle: HERE, facts: DataFacts { members: 3, boot_cluster_version_v2: false }, want: Err(|e| matches!(e, PlanError::MultiMember { .. })) },
        Case { name: "native rollback of a two-member cluster is refused", current: "3.0.17/etcd3", target: "2.2.1/etcd2", bundle: K8S, facts: DataFacts { members: 2, boot_cluster_version_v2: false }, want: Err(|e| matches!(e, PlanError::MultiMember { members: 2, .. })) },
    ]
}

#[test]
fn planner_table() {
    let cases = cases();
    assert!(cases.len() >= 25, "the table must keep at least 25 cases");
    for c in cases {
        let got = plan(vf(c.current), vf(c.target), &bundle(c.bundle), c.facts);
        match (&c.want, got) {
            (Ok(want), Ok(p)) => assert_eq!(&p.steps, want, "{}", c.name),
            (Err(pred), Err(e)) => assert!(pred(&e), "{}: wrong error {e}", c.name),
            (want, got) => panic!(
                "{}: want {want:?}, got {got:?}",
                c.name,
                want = want.as_ref().map(|_| "plan").map_err(|_| "error")
            ),
        }
    }
}

#[test]
fn skipped_patches_and_known_bad_releases_are_noted() {
    let p = plan(vf("3.4.23/etcd3"), vf("3.5.1/etcd3"), &bundle(HERE), one()).unwrap();
    assert!(p.notes.iter().any(|n| matches!(n, Note::SkippedPatches { used, skipped, .. } if *used == v("3.5.1") && skipped == &vec![v("3.5.0")])), "{:?}", p.notes);
    assert!(p
        .notes
        .iter()
        .any(|n| matches!(n, Note::KnownBad { version, .. } if *version == v("3.5.1"))));
    assert!(p
        .notes
        .iter()
        .any(|n| n.to_string().contains("skipping 3.5.0 as older patches")));
}

#[test]
fn leaving_35_below_the_guides_patch_is_noted() {
    let p = plan(
        vf("3.5.1/etcd3"),
        vf("3.6.0/etcd3"),
        &bundle("3.5.1 3.5.30 3.6.0"),
        one(),
    )
    .unwrap();
    assert!(
        p.notes
            .iter()
            .any(|n| matches!(n, Note::Below35Advice { version } if *version == v("3.5.30"))),
        "{:?}",
        p.notes
    );
    let p = plan(
        vf("3.5.1/etcd3"),
        vf("3.6.0/etcd3"),
        &bundle("3.5.1 3.5.33 3.6.0"),
        one(),
    )
    .unwrap();
    assert!(
        !p.notes
            .iter()
            .any(|n| matches!(n, Note::Below35Advice { .. })),
        "{:?}",
        p.notes
    );
    let e = plan(
        vf("3.5.1/etcd3"),
        vf("3.6.0/etcd3"),
        &bundle("3.5.1 3.6.0"),
        one(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("before 3.6") && e.to_string().contains("etcd-io/etcd#19557"),
        "{e}"
    );
}

#[test]
fn errors_name_the_remedy() {
    let e = plan(vf("3.4.23/etcd3"), vf("3.6.0/etcd3"), &bundle(HERE), one()).unwrap_err();
    assert!(e.to_string().contains("bundled: 3.4.23 3.5.0 3.5.1"), "{e}");
    let e = plan(vf("3.0.17/etcd2"), vf("2.2.1/etcd2"), &bundle(K8S), one()).unwrap_err();
    assert!(e.to_string().contains("supported paths"), "{e}");
    let e = plan(
        vf("3.4.23/etcd2"),
        vf("3.4.23/etcd3"),
        &bundle(HERE),
        DataFacts {
            members: 3,
            boot_cluster_version_v2: false,
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("shrink the cluster to one member"),
        "{e}"
    );
}

#[test]
fn plan_display_reads_as_a_path() {
    let p = plan(vf("2.2.1/etcd2"), vf("3.5.1/etcd3"), &bundle(K8S), one()).unwrap();
    let lines: Vec<String> = p.steps.iter().map(|s| s.to_string()).collect();
    assert_eq!(lines[0], "2.2.1 -> 2.3.7/etcd2");
    assert_eq!(lines[1], "2.3.7 -> 3.0.17/etcd2, then storage etcd2 -> etcd3 at 3.0.17 (etcdctl migrate, TTLs reattached as leases)");
    assert_eq!(lines[6], "3.4.18 -> 3.5.1/etcd3");
}

const UNIVERSE: &[&str] = &[
    "2.2.1", "2.3.7", "3.0.17", "3.1.20", "3.2.32", "3.3.17", "3.3.27", "3.4.18", "3.4.23",
    "3.5.0", "3.5.1", "3.5.9", "3.5.30", "3.6.0", "3.6.14", "3.7.0",
];

fn arb_versionfile() -> impl Strategy<Value = VersionFile> {
    (0..UNIVERSE.len(), any::<bool>()).prop_map(|(i, e3)| VersionFile {
        version: v(UNIVERSE[i]),
        storage: if e3 { Storage::Etcd3 } else { Storage::Etcd2 },
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]
    #[test]
    fn every_plan_is_monotone_one_minor_per_step_and_ends_at_target(
        current in arb_versionfile(),
        target in arb_versionfile(),
        mask in any::<u16>(),
        members in 1usize..4,
        v2boot in any::<bool>(),
    ) {
        let b = BundledVersions::new(UNIVERSE.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, s)| v(s)));
        let facts = DataFacts { members, boot_cluster_version_v2: v2boot };
        let Ok(p) = plan(current, target, &b, facts) else { return Ok(()) };
        let end = p.steps.last().map(|s| s.outcome()).unwrap_or(current);
        prop_assert_eq!(end, target);
        let forward = target.version.minor_line() >= current.version.minor_line();
        let mut at = current;
        for s in &p.steps {
            let next = s.outcome();
            let hop = if forward {
                minors_between(at.version.minor_line(), next.version.minor_line(), &b).len()
            } else {
                minors_between(next.version.minor_line(), at.version.minor_line(), &b).len()
            };
            // The native rollback is the one designed hop across majors: 3.0.x -> 2.2.1.
            if let Step::RollbackToEtcd2 { from } = s {
                prop_assert_eq!(from.minor_line(), Minor::new(3, 0));
            } else {
                prop_assert!(hop <= 1, "{} -> {} skips a minor", at, next);
            }
            if forward {
                prop_assert!(next.version.minor_line() >= at.version.minor_line(), "not monotone: {} -> {}", at, next);
                prop_assert!(next.storage >= at.storage, "storage went back: {} -> {}", at, next);
            } else {
                prop_assert!(next.version <= at.version, "not monotone: {} -> {}", at, next);
            }
            prop_assert!(storage_servable(next.version, next.storage).is_ok(), "{} unservable", next);
            if !matches!(s, Step::RollbackToEtcd2 { .. }) {
                prop_assert!(b.contains(s.runs()), "{} runs unbundled {}", s, s.runs());
            }
            if members > 1 {
                prop_assert!(!s.rewrites_member_alone());
            }
            at = next;
        }
        // A minor is left for the next only from its required patch (3.5.20, 3.6.11).
        let mut at = current;
        for s in &p.steps {
            for (min, _) in LEAVE_MINOR_FROM {
                if s.runs().minor_line() > min.minor_line() && at.version.minor_line() == min.minor_line() {
                    prop_assert!(at.version >= *min, "{} leaves {} from {}", s, min.minor_line(), at);
                }
            }
            at = s.outcome();
        }
        // 3.5+ never starts on data whose first-seen cluster version is 2.x.
        let mut fixed = !v2boot;
        let mut at = current;
        for s in &p.steps {
            if matches!(s, Step::MigrateStorage { cut_snapshot: false, .. }) { fixed = false; }
            if matches!(s, Step::Upgrade { cut_snapshot: true, .. } | Step::MigrateStorage { cut_snapshot: true, .. }) { fixed = true; }
            if s.runs() >= v("3.5.0") && at.version < v("3.5.0") {
                prop_assert!(fixed, "{} starts 3.5+ on unfixed v2-era data", s);
            }
            at = s.outcome();
        }
    }
}
