//! The systemd workload attestor: the unit a process runs in.
//!
//! Selectors produced (type `systemd`):
//! - `id:<unit>`: the unit, from the process's cgroup path (as systemd
//!   itself reads it, see [`cgroup::systemd_unit`]), e.g.
//!   `id:nginx.service`;
//! - `fragment_path:<path>`: the unit file that defines it: the first
//!   `<dir>/<unit>` found in the unit search path (for a template instance
//!   `name@instance.service` without its own file, `<dir>/name@.service`),
//!   with symbolic links resolved as systemd does for aliases. A masked
//!   unit (linked to `/dev/null`) and a unit without a file (a transient
//!   scope) have no fragment path.
//!
//! A process outside any unit gets no `systemd` selector.

use std::path::{Path, PathBuf};

use sigil::Selectors;

use super::settings::SystemdConfig;
use super::{Facts, add, cgroup};

/// The selector type this attestor produces.
const SELECTOR_TYPE: &str = "systemd";

/// Attests the systemd unit of processes.
#[derive(Debug)]
pub(crate) struct SystemdAttestor {
    unit_paths: Vec<PathBuf>,
}

impl SystemdAttestor {
    /// An attestor searching `config.unit_paths` for unit files.
    pub(crate) fn new(config: &SystemdConfig) -> Self {
        Self {
            unit_paths: config.unit_paths.clone(),
        }
    }

    /// Adds the selectors of the process `facts` describe.
    pub(crate) fn collect(&self, facts: &Facts, selectors: &mut Selectors) {
        let Some(unit) = cgroup::systemd_unit(&facts.cgroup) else {
            return;
        };
        add(selectors, facts.pid, SELECTOR_TYPE, &format!("id:{unit}"));
        if let Some(path) = self.fragment_path(unit)
            && let Some(path) = path.to_str()
        {
            add(
                selectors,
                facts.pid,
                SELECTOR_TYPE,
                &format!("fragment_path:{path}"),
            );
        }
    }

    /// The unit file of `unit`, or `None` if it has none.
    fn fragment_path(&self, unit: &str) -> Option<PathBuf> {
        let template = template_of(unit);
        let names = std::iter::once(unit).chain(template.as_deref());
        for name in names {
            for dir in &self.unit_paths {
                let candidate = dir.join(name);
                // `symlink_metadata` first: a dangling link is not a file.
                if std::fs::symlink_metadata(&candidate).is_err() {
                    continue;
                }
                return resolve(&candidate);
            }
        }
        None
    }
}

/// The template of an instance name: `getty@tty1.service` is an instance
/// of `getty@.service`. `None` for a name that is not an instance.
fn template_of(unit: &str) -> Option<String> {
    let (prefix, rest) = unit.split_once('@')?;
    let (instance, suffix) = rest.rsplit_once('.')?;
    (!instance.is_empty()).then(|| format!("{prefix}@.{suffix}"))
}

/// The file a unit path designates: the path itself, or where its
/// symbolic links lead. `None` for a masked unit (`/dev/null`) or a link
/// that leads nowhere.
fn resolve(path: &Path) -> Option<PathBuf> {
    let target = std::fs::canonicalize(path).ok()?;
    if target == Path::new("/dev/null") || !target.is_file() {
        return None;
    }
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    Some(if is_link { target } else { path.to_owned() })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    struct Roots {
        dir: tempfile::TempDir,
    }

    impl Roots {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for root in ["etc", "run", "usr"] {
                std::fs::create_dir(dir.path().join(root)).unwrap();
            }
            Self { dir }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        fn unit(&self, rel: &str) -> PathBuf {
            let path = self.path(rel);
            std::fs::write(&path, "[Service]\nExecStart=/bin/true\n").unwrap();
            path
        }

        fn attestor(&self) -> SystemdAttestor {
            SystemdAttestor::new(&SystemdConfig {
                unit_paths: vec![self.path("etc"), self.path("run"), self.path("usr")],
            })
        }
    }

    fn selectors_of(attestor: &SystemdAttestor, cgroup: &str) -> Vec<String> {
        let mut selectors = Selectors::new();
        let facts = Facts {
            pid: 1,
            cgroup: cgroup.to_owned(),
        };
        attestor.collect(&facts, &mut selectors);
        selectors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_service_gets_its_id_and_unit_file() {
        let roots = Roots::new();
        let file = roots.unit("usr/nginx.service");
        assert_eq!(
            selectors_of(&roots.attestor(), "0::/system.slice/nginx.service\n"),
            [
                format!("systemd:fragment_path:{}", file.display()),
                "systemd:id:nginx.service".to_owned(),
            ]
        );
    }

    #[test]
    fn earlier_directories_win() {
        let roots = Roots::new();
        roots.unit("usr/nginx.service");
        let local = roots.unit("etc/nginx.service");
        let got = selectors_of(&roots.attestor(), "0::/system.slice/nginx.service\n");
        assert!(
            got.contains(&format!("systemd:fragment_path:{}", local.display())),
            "{got:?}"
        );
        assert_eq!(got.len(), 2, "{got:?}");
    }

    #[test]
    fn an_instance_uses_its_template_unless_it_has_its_own_file() {
        let roots = Roots::new();
        let template = roots.unit("usr/getty@.service");
        let cgroup = "0::/system.slice/system-getty.slice/getty@tty1.service\n";
        assert_eq!(
            selectors_of(&roots.attestor(), cgroup),
            [
                format!("systemd:fragment_path:{}", template.display()),
                "systemd:id:getty@tty1.service".to_owned(),
            ]
        );
        let own = roots.unit("run/getty@tty1.service");
        assert!(
            selectors_of(&roots.attestor(), cgroup)
                .contains(&format!("systemd:fragment_path:{}", own.display()))
        );
    }

    #[test]
    fn an_alias_resolves_and_a_masked_unit_has_no_file() {
        let roots = Roots::new();
        let real = roots.unit("usr/systemd-resolved.service");
        symlink(
            &real,
            roots.path("etc/dbus-org.freedesktop.resolve1.service"),
        )
        .unwrap();
        let got = selectors_of(
            &roots.attestor(),
            "0::/system.slice/dbus-org.freedesktop.resolve1.service\n",
        );
        assert!(
            got.contains(&format!(
                "systemd:fragment_path:{}",
                real.canonicalize().unwrap().display()
            )),
            "{got:?}"
        );

        roots.unit("usr/cups.service");
        symlink("/dev/null", roots.path("etc/cups.service")).unwrap();
        assert_eq!(
            selectors_of(&roots.attestor(), "0::/system.slice/cups.service\n"),
            ["systemd:id:cups.service"]
        );
    }

    #[test]
    fn a_scope_without_a_file_has_only_its_id() {
        let roots = Roots::new();
        assert_eq!(
            selectors_of(
                &roots.attestor(),
                "0::/user.slice/user-1000.slice/session-3.scope\n"
            ),
            ["systemd:id:session-3.scope"]
        );
    }

    #[test]
    fn a_process_outside_units_gets_nothing() {
        let roots = Roots::new();
        roots.unit("usr/kubepods.slice");
        for cgroup in [
            "0::/\n",
            "0::/kubepods.slice/kubepods-besteffort.slice\n",
            "",
        ] {
            assert!(
                selectors_of(&roots.attestor(), cgroup).is_empty(),
                "{cgroup:?}"
            );
        }
    }

    #[test]
    fn template_names() {
        assert_eq!(
            template_of("getty@tty1.service").as_deref(),
            Some("getty@.service")
        );
        assert_eq!(
            template_of("user@1000.service").as_deref(),
            Some("user@.service")
        );
        assert_eq!(template_of("getty@.service"), None);
        assert_eq!(template_of("nginx.service"), None);
    }
}
