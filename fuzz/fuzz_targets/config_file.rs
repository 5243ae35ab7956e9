//! The TOML config file, through validation.
#![no_main]

use bts_guru::config::{Cli, Config, RawFile};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = toml::from_str::<RawFile>(text) else {
        return;
    };
    let env: HashMap<String, String> = HashMap::new();
    if let Ok(cfg) = Config::from_parts(&Cli::default(), &env, file, vec![0, 1]) {
        assert!(!cfg.apps.is_empty());
        assert!(cfg.shards() >= 1);
    }
});
