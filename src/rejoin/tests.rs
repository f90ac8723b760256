use std::ffi::OsString;
use std::path::Path;

use super::*;
use crate::etcd::peers::PeerError;

fn started(id: u64, name: &str, port: u16) -> PeerMember {
    PeerMember {
        id,
        name: name.into(),
        peer_urls: vec![format!("http://127.0.0.1:{port}")],
        client_urls: vec![format!("http://127.0.0.1:{}", port + 1000)],
    }
}

fn added(id: u64, port: u16) -> PeerMember {
    PeerMember {
        id,
        name: String::new(),
        peer_urls: vec![format!("http://127.0.0.1:{port}")],
        client_urls: vec![],
    }
}

fn named_unstarted(id: u64, name: &str, port: u16) -> PeerMember {
    PeerMember {
        client_urls: vec![],
        ..started(id, name, port)
    }
}

fn answer(members: Vec<PeerMember>) -> Result<PeerAnswer, PeerError> {
    Ok(PeerAnswer {
        peer_url: "http://127.0.0.1:2".into(),
        members,
        cluster_version: Some("3.4.0".into()),
    })
}

fn down() -> Result<PeerAnswer, PeerError> {
    Err(PeerError {
        peer_url: "http://127.0.0.1:9".into(),
        message: "connection refused".into(),
    })
}

fn me(opt_in: bool, others: usize, removed_by_us: bool) -> (Vec<String>, bool, usize, bool) {
    (
        vec!["http://127.0.0.1:3".to_string()],
        opt_in,
        others,
        removed_by_us,
    )
}

fn run(
    (urls, opt_in, others, removed_by_us): (Vec<String>, bool, usize, bool),
    answers: &[Result<PeerAnswer, PeerError>],
) -> Result<Situation, RejoinRefusal> {
    let asking = Asking {
        name: "m3",
        peer_urls: &urls,
        others,
        opt_in,
        removed_by_us,
        data_dir: Path::new("/d"),
    };
    assess(&asking, answers, None)
}

fn lost(urls: &[&str]) -> Situation {
    Situation::Lost {
        client_urls: urls.iter().map(|u| u.to_string()).collect(),
        cluster_version: Some("3.4.0".into()),
    }
}

#[test]
fn assess_decides_every_case() {
    let cluster = vec![
        started(1, "m1", 1),
        started(2, "m2", 2),
        started(3, "m3", 3),
    ];
    let after_remove = vec![started(1, "m1", 1), started(2, "m2", 2)];
    let after_add = vec![started(1, "m1", 1), started(2, "m2", 2), added(9, 3)];
    let forming = vec![
        started(1, "m1", 1),
        named_unstarted(2, "m2", 2),
        named_unstarted(3, "m3", 3),
    ];
    let others = &["http://127.0.0.1:1001", "http://127.0.0.1:1002"];
    // (what, opt in, other members, removed by us, answers, expected)
    type Want = Result<Situation, &'static str>;
    let cases: Vec<(&str, bool, usize, bool, Vec<_>, Want)> = vec![
        (
            "lone member, no opt-in",
            false,
            0,
            false,
            vec![],
            Ok(Situation::Fresh),
        ),
        (
            "lone member, opt-in",
            true,
            0,
            false,
            vec![],
            Err("OnlyMember"),
        ),
        (
            "nobody answers, no opt-in",
            false,
            2,
            false,
            vec![down(), down()],
            Ok(Situation::Fresh),
        ),
        (
            "nobody answers, opt-in",
            true,
            2,
            false,
            vec![down(), down()],
            Err("Unreachable"),
        ),
        (
            "lost, no opt-in",
            false,
            2,
            false,
            vec![down(), answer(cluster.clone())],
            Err("LostWithoutOptIn"),
        ),
        (
            "lost, opt-in",
            true,
            2,
            false,
            vec![answer(cluster.clone())],
            Ok(lost(others)),
        ),
        (
            "killed after the add",
            true,
            2,
            false,
            vec![answer(after_add.clone())],
            Ok(lost(others)),
        ),
        (
            "killed after the remove",
            true,
            2,
            true,
            vec![answer(after_remove.clone())],
            Ok(lost(others)),
        ),
        (
            "unknown name, opt-in",
            true,
            2,
            false,
            vec![answer(after_remove.clone())],
            Err("UnknownName"),
        ),
        (
            "unknown name, no opt-in",
            false,
            2,
            false,
            vec![answer(after_remove)],
            Ok(Situation::Fresh),
        ),
        (
            "added by hand, no opt-in",
            false,
            2,
            false,
            vec![answer(after_add)],
            Ok(Situation::Fresh),
        ),
        (
            "new cluster forming, opt-in",
            true,
            2,
            false,
            vec![answer(forming.clone())],
            Ok(Situation::Fresh),
        ),
        (
            "new cluster forming, no opt-in",
            false,
            2,
            false,
            vec![answer(forming)],
            Ok(Situation::Fresh),
        ),
    ];
    for (what, opt_in, n, removed, answers, want) in cases {
        let got = run(me(opt_in, n, removed), &answers);
        match (&got, &want) {
            (Ok(g), Ok(w)) => assert_eq!(g, w, "{what}"),
            (Err(e), Err(variant)) => {
                assert!(format!("{e:?}").starts_with(variant), "{what}: {e:?}");
                assert!(!e.to_string().is_empty());
            }
            _ => panic!("{what}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn every_refusal_names_the_next_manual_step() {
    let refusals = [
        RejoinRefusal::OnlyMember { name: "m3".into() },
        RejoinRefusal::Unreachable {
            name: "m3".into(),
            errors: vec!["x".into()],
        },
        RejoinRefusal::NoQuorum {
            name: "m3".into(),
            why: "x".into(),
        },
        RejoinRefusal::UnknownName {
            name: "m3".into(),
            known: vec!["m1".into()],
        },
        RejoinRefusal::ClusterVersion {
            cluster: "3.5.0".into(),
            target: "3.4.23".parse().unwrap(),
        },
        RejoinRefusal::LostWithoutOptIn {
            data_dir: "/d".into(),
            name: "m3".into(),
            asked: "http://p".into(),
        },
    ];
    for r in refusals {
        let text = r.to_string();
        let next = [
            "restore",
            "Start them",
            "Bring back",
            "member add",
            "Set TARGET_VERSION",
            "REJOIN_IF_EMPTY=true",
        ];
        assert!(next.iter().any(|n| text.contains(n)), "{text}");
        assert_eq!(RejoinError::Refused(r).exit_code(), 2);
    }
}

#[test]
fn endpoints_given_win_over_the_peers_client_urls() {
    let asking = Asking {
        name: "m3",
        peer_urls: &["http://127.0.0.1:3".to_string()],
        others: 2,
        opt_in: true,
        removed_by_us: false,
        data_dir: Path::new("/d"),
    };
    let eps = vec!["https://10.0.0.1:2379".to_string()];
    let got = assess(&asking, &[answer(vec![started(3, "m3", 3)])], Some(&eps)).unwrap();
    assert_eq!(
        got,
        Situation::Lost {
            client_urls: eps,
            cluster_version: Some("3.4.0".into())
        }
    );
}

#[test]
fn a_member_joins_its_minor_or_one_older_cluster_only() {
    let v = |s: &str| s.parse::<EtcdVersion>().unwrap();
    assert!(can_join(v("3.4.23"), "3.4.0"));
    assert!(can_join(v("3.5.30"), "3.4.0"));
    assert!(!can_join(v("3.6.0"), "3.4.0"));
    assert!(!can_join(v("3.4.23"), "3.5.0"));
    assert!(can_join(v("3.4.23"), "garbage"), "unknown: etcd decides");
}

#[test]
fn initial_cluster_lists_every_member_and_names_the_new_one() {
    let m = |id, name: &str, urls: &[&str]| ListedMember {
        id,
        name: name.into(),
        peer_urls: urls.iter().map(|u| u.to_string()).collect(),
        client_urls: vec![],
        is_learner: false,
    };
    let members = [
        m(1, "m1", &["http://a:2380"]),
        m(9, "", &["http://c:2380"]),
        m(2, "m2", &["http://b:2380", "http://b2:2380"]),
    ];
    assert_eq!(
        initial_cluster(&members, 9, "m3"),
        "m1=http://a:2380,m3=http://c:2380,m2=http://b:2380,m2=http://b2:2380"
    );
}

#[test]
fn the_exec_joins_as_existing() {
    let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
    assert_eq!(
        existing_state(&args(&[
            "--name",
            "m3",
            "--initial-cluster-state",
            "new",
            "--x"
        ])),
        args(&["--name", "m3", "--initial-cluster-state", "existing", "--x"])
    );
    assert_eq!(
        existing_state(&args(&["--initial-cluster-state=new"])),
        args(&["--initial-cluster-state=existing"])
    );
    assert_eq!(
        existing_state(&args(&["--name", "m3"])),
        args(&["--name", "m3"])
    );
}
