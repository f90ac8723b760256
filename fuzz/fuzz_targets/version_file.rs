//! version.txt: `VersionFile::from_str` on arbitrary bytes (read as etcd-migrate reads the
//! file: lossy UTF-8). Nothing may panic, and whatever parses must print back as the
//! canonical text it was parsed from and parse again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;

use etcd_migrate::version::{EtcdVersion, Storage, VersionFile};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let s: &str = &text;
    match s.parse::<VersionFile>() {
        Ok(vf) => {
            let shown = vf.to_string();
            // Strict parser: the accepted text is the canonical form, minus one newline.
            assert_eq!(shown, s.strip_suffix('\n').unwrap_or(s), "display of {s:?}");
            assert_eq!(shown.parse::<VersionFile>(), Ok(vf), "reparse of {shown:?}");
            // What `progress::record` writes must read back.
            assert_eq!(format!("{vf}\n").parse::<VersionFile>(), Ok(vf));
            assert_eq!(
                vf.version.to_string().parse::<EtcdVersion>(),
                Ok(vf.version)
            );
            assert_eq!(vf.storage.to_string().parse::<Storage>(), Ok(vf.storage));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    match s.parse::<EtcdVersion>() {
        Ok(v) => {
            assert_eq!(v.to_string(), s, "display of version {s:?}");
            let _ = v.minor_line().to_string();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Ok(st) = s.parse::<Storage>() {
        assert_eq!(st.to_string(), s);
    }
});
