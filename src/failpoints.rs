//! Named crash points for the crash harness (feature `failpoints`, on in `make test`). They are
//! configured by the `FAILPOINTS` variable that the `fail` crate reads, e.g.
//! `FAILPOINTS=swap-after-exchange=panic` or `FAILPOINTS='write-durable-before-rename=2*off->panic'`.
//! A failpoint panic aborts the process on the spot, as a crash would: no destructors, no
//! cleanup; the kernel kills our children (PR_SET_PDEATHSIG).

/// Activates failpoints from the environment when built with the feature; nothing otherwise.
pub fn setup() {
    #[cfg(feature = "failpoints")]
    {
        // The fail crate reads FAILPOINTS itself; we only need to know whether any is set.
        if std::env::var_os("FAILPOINTS").is_some_and(|v| !v.is_empty()) {
            std::panic::set_hook(Box::new(|info| {
                eprintln!("etcd-migrate: crashing at a failpoint: {info}");
                std::process::abort();
            }));
        }
        std::mem::forget(fail::FailScenario::setup());
    }
}
