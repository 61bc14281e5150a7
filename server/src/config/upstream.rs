//! The `[upstream_authority]` section of the configuration.

use std::path::PathBuf;

use super::{string_key, unknown_keys};
use crate::ca::upstream::DiskUpstreamConfig;

/// Parses the `[upstream_authority]` table: one `[upstream_authority.disk]`
/// section. The files are read when the server starts.
pub(crate) fn upstream_authority(
    table: toml::Table,
    problems: &mut Vec<String>,
) -> Option<DiskUpstreamConfig> {
    let mut config = None;
    for (name, value) in table {
        let key = format!("upstream_authority.{name}");
        let toml::Value::Table(mut section) = value else {
            problems.push(format!("{key}: expected a table"));
            continue;
        };
        if name != "disk" {
            problems.push(format!("{key}: unknown upstream authority (known: disk)"));
            continue;
        }
        let mut path = |field: &str, required: bool| {
            let present = section.contains_key(field);
            let value = string_key(&mut section, &key, field, problems);
            match value {
                Some(v) if v.is_empty() => {
                    problems.push(format!("{key}.{field}: must not be empty"));
                    None
                }
                Some(v) => Some(PathBuf::from(v)),
                None => {
                    if required && !present {
                        problems.push(format!("{key}.{field}: is required"));
                    }
                    None
                }
            }
        };
        let cert_file_path = path("cert_file_path", true);
        let key_file_path = path("key_file_path", true);
        let bundle_file_path = path("bundle_file_path", false);
        unknown_keys(&section, &key, problems);
        if let (Some(cert_file_path), Some(key_file_path)) = (cert_file_path, key_file_path) {
            config = Some(DiskUpstreamConfig {
                cert_file_path,
                key_file_path,
                bundle_file_path,
            });
        }
    }
    config
}
