//! Named crash points for the crash harness (feature `failpoints`). Configured by the
//! `FAILPOINTS` variable the `fail` crate reads, e.g. `FAILPOINTS=swap-after-exchange=panic`.

/// Activates failpoints from the environment when built with the feature; nothing otherwise.
pub fn setup() {
    #[cfg(feature = "failpoints")]
    {
        let scenario = fail::FailScenario::setup();
        // Keep the configuration for the whole process.
        std::mem::forget(scenario);
    }
}
