//! What `/proc/<pid>/cgroup` tells about a process: the container it runs
//! in, the Kubernetes pod of that container, and the systemd unit it
//! belongs to.
//!
//! Each line of the file is `<hierarchy-id>:<controllers>:<path>`; cgroup v2
//! has the single line `0::<path>`, cgroup v1 one line per hierarchy (and a
//! hybrid system both). The paths name containers and pods the way the
//! container runtime and the cgroup driver chose:
//!
//! | runtime, driver        | leaf component                       | pod component                            |
//! |------------------------|--------------------------------------|------------------------------------------|
//! | docker, cgroupfs       | `docker/<id>`                        | `pod<uid>` (under `kubepods`)            |
//! | docker, systemd        | `docker-<id>.scope`                  | `kubepods-<qos>-pod<uid_>.slice`         |
//! | containerd, cgroupfs   | `<id>`                               | `pod<uid>`                               |
//! | containerd, systemd    | `cri-containerd-<id>.scope`          | `kubepods-<qos>-pod<uid_>.slice`         |
//! | cri-o, cgroupfs        | `crio-<id>`                          | `pod<uid>`                               |
//! | cri-o, systemd         | `crio-<id>.scope`                    | `kubepods-<qos>-pod<uid_>.slice`         |
//!
//! where `<id>` is the 64 hex digit container ID and `<uid_>` the pod UID
//! with `_` for `-` (systemd reserves `-` in slice names). cri-o's
//! `crio-conmon-<id>.scope` holds the container's monitor process, not the
//! container, and is not taken for one.
//!
//! These are the paths in the agent's cgroup namespace: the agent must run
//! in the host's (or, in a kind cluster, the node container's), else a
//! containerized process's path reads `/`.
//!
//! A process may create cgroups only below its own (in a subtree delegated
//! to it: a user's service manager, a container's own cgroup), so the
//! components it could forge are always deeper than the ones its runtime
//! made. The outermost container component therefore counts, and nothing
//! below a `.service` unit (whose subtree may be delegated, as
//! `user@<uid>.service`'s is) is taken for a container or a pod: a user
//! cannot name a cgroup `docker-<another container>.scope` and pass for
//! that container.

/// Length of a container ID in hex digits.
const CONTAINER_ID_LEN: usize = 64;

/// The prefixes runtimes put before a container ID in a cgroup name.
const CONTAINER_PREFIXES: &[&str] = &["docker-", "cri-containerd-", "crio-", "containerd-"];

/// A container and pod found in a process's cgroup paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Container {
    /// The container ID: 64 lowercase hex digits.
    pub(crate) id: String,
    /// The Kubernetes pod UID, when the container runs in a pod.
    pub(crate) pod_uid: Option<String>,
}

/// The cgroup paths of a process, from the contents of `/proc/<pid>/cgroup`
/// (the third field of each line, which may itself hold `:`).
pub(crate) fn paths(contents: &str) -> impl Iterator<Item = CgroupLine<'_>> {
    contents.lines().filter_map(|line| {
        let (hierarchy, rest) = line.split_once(':')?;
        let (controllers, path) = rest.split_once(':')?;
        Some(CgroupLine {
            hierarchy,
            controllers,
            path,
        })
    })
}

/// One line of `/proc/<pid>/cgroup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CgroupLine<'a> {
    /// The hierarchy ID; `0` for cgroup v2.
    pub(crate) hierarchy: &'a str,
    /// The controllers (v1), or `name=systemd`, or empty (v2).
    pub(crate) controllers: &'a str,
    /// The cgroup's path.
    pub(crate) path: &'a str,
}

/// The container of a process, from the contents of `/proc/<pid>/cgroup`,
/// or `None` for a process that is not in a container.
///
/// The first line naming a container is used (all lines of a containerized
/// process name the same container); within a path, the outermost
/// container component and the pod component above it count (see the
/// module documentation).
pub(crate) fn container(contents: &str) -> Option<Container> {
    paths(contents).find_map(|line| container_in_path(line.path))
}

/// The container named by one cgroup path.
pub(crate) fn container_in_path(path: &str) -> Option<Container> {
    let mut pod_uid = None;
    for component in path.split('/') {
        if let Some(id) = container_id(component) {
            return Some(Container {
                id: id.to_owned(),
                pod_uid,
            });
        }
        if component.ends_with(".service") {
            return None;
        }
        if let Some(found) = pod_uid_of(component) {
            pod_uid = Some(found);
        }
    }
    None
}

/// The container ID a cgroup name holds: `<id>`, `<prefix><id>` or
/// `<prefix><id>.scope`.
fn container_id(component: &str) -> Option<&str> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    let id = CONTAINER_PREFIXES
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    is_container_id(id).then_some(id)
}

fn is_container_id(s: &str) -> bool {
    s.len() == CONTAINER_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The pod UID a cgroup name holds: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid with _>.slice` (systemd), as a UID with `-`.
fn pod_uid_of(component: &str) -> Option<String> {
    let raw = if let Some(slice) = component.strip_suffix(".slice") {
        let (_, uid) = slice.rsplit_once("-pod")?;
        if !slice.contains("kubepods") {
            return None;
        }
        uid
    } else {
        component.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    is_pod_uid(&uid).then_some(uid)
}

/// A pod UID: a UUID (`8-4-4-4-12` hex digits), or for static pods the 32
/// hex digit hash the kubelet gives them.
fn is_pod_uid(s: &str) -> bool {
    let hex =
        |part: &str, len: usize| part.len() == len && part.bytes().all(|b| b.is_ascii_hexdigit());
    if hex(s, 32) {
        return true;
    }
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .all(|(len, part)| hex(part, *len))
}

/// The systemd unit of a process, from the contents of `/proc/<pid>/cgroup`:
/// the first unit that is not a slice in its systemd-managed path (the
/// cgroup v2 line, or the v1 `name=systemd` line), as systemd itself reads
/// it. A service's own sub-cgroups (delegation, a user's service manager)
/// belong to that service: `/user.slice/user-1000.slice/user@1000.service/
/// app.slice/x.service` is `user@1000.service`.
///
/// `None` for a process outside any unit (the root cgroup, a slice).
pub(crate) fn systemd_unit(contents: &str) -> Option<&str> {
    let line = paths(contents)
        .find(|line| line.controllers == "name=systemd")
        .or_else(|| paths(contents).find(|line| line.hierarchy == "0"))?;
    line.path
        .split('/')
        .filter(|c| !c.is_empty())
        .find(|c| !c.ends_with(".slice"))
        .filter(|c| is_unit_name(c))
}

/// A unit name: `<name>.<type>` for a unit type processes run in.
fn is_unit_name(s: &str) -> bool {
    [".service", ".scope"].iter().any(|suffix| {
        s.strip_suffix(suffix)
            .is_some_and(|name| !name.is_empty() && !name.contains(['/', '\0']))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "3f4b2c1d9e8a7f6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b";
    const POD: &str = "7d2a6c3e-91b4-4f0a-8e5d-2b1c9a8f7e6d";
    const POD_: &str = "7d2a6c3e_91b4_4f0a_8e5d_2b1c9a8f7e6d";

    fn fixture(template: &str) -> String {
        template
            .replace("{cid}", CID)
            .replace("{pod}", POD)
            .replace("{pod_}", POD_)
    }

    fn in_pod() -> Option<Container> {
        Some(Container {
            id: CID.to_owned(),
            pod_uid: Some(POD.to_owned()),
        })
    }

    fn not_in_pod() -> Option<Container> {
        Some(Container {
            id: CID.to_owned(),
            pod_uid: None,
        })
    }

    /// cgroup v1 as Docker 19/20 with the cgroupfs driver writes it.
    const V1_DOCKER_CGROUPFS: &str = "12:pids:/docker/{cid}\n\
        11:hugetlb:/docker/{cid}\n\
        10:net_cls,net_prio:/docker/{cid}\n\
        9:perf_event:/docker/{cid}\n\
        8:blkio:/docker/{cid}\n\
        7:cpuset:/docker/{cid}\n\
        6:devices:/docker/{cid}\n\
        5:memory:/docker/{cid}\n\
        4:cpu,cpuacct:/docker/{cid}\n\
        3:freezer:/docker/{cid}\n\
        2:rdma:/\n\
        1:name=systemd:/docker/{cid}\n\
        0::/system.slice/containerd.service\n";

    /// cgroup v2, Docker with the systemd driver (the default on v2).
    const V2_DOCKER_SYSTEMD: &str = "0::/system.slice/docker-{cid}.scope\n";

    /// cgroup v1, Kubernetes with dockershim and the cgroupfs driver.
    const V1_K8S_DOCKER_CGROUPFS: &str = "11:memory:/kubepods/burstable/pod{pod}/{cid}\n\
        10:cpu,cpuacct:/kubepods/burstable/pod{pod}/{cid}\n\
        1:name=systemd:/kubepods/burstable/pod{pod}/{cid}\n";

    /// cgroup v1, Kubernetes with dockershim and the systemd driver.
    const V1_K8S_DOCKER_SYSTEMD: &str = "11:memory:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_}.slice/docker-{cid}.scope\n\
        1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_}.slice/docker-{cid}.scope\n";

    /// cgroup v2, containerd with the systemd driver (kubeadm's default).
    const V2_CONTAINERD_SYSTEMD: &str = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n";

    /// cgroup v1, containerd with the cgroupfs driver, a Guaranteed pod (no
    /// QoS level in the path).
    const V1_CONTAINERD_CGROUPFS: &str = "12:hugetlb:/kubepods/pod{pod}/{cid}\n\
        4:memory:/kubepods/pod{pod}/{cid}\n\
        1:name=systemd:/kubepods/pod{pod}/{cid}\n";

    /// cgroup v2, containerd with the cgroupfs driver.
    const V2_CONTAINERD_CGROUPFS: &str = "0::/kubepods/besteffort/pod{pod}/{cid}\n";

    /// cgroup v2, cri-o with the systemd driver (OpenShift), Guaranteed pod.
    const V2_CRIO_SYSTEMD: &str = "0::/kubepods.slice/kubepods-pod{pod_}.slice/crio-{cid}.scope\n";

    /// cgroup v1, cri-o with the cgroupfs driver.
    const V1_CRIO_CGROUPFS: &str = "11:memory:/kubepods/burstable/pod{pod}/crio-{cid}\n\
        1:name=systemd:/kubepods/burstable/pod{pod}/crio-{cid}\n";

    /// cgroup v1, containerd with the systemd driver: every hierarchy holds
    /// the path kubelet and runc make, as on a hybrid host.
    const V1_CONTAINERD_SYSTEMD: &str = "12:hugetlb:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n\
        11:pids:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n\
        10:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n\
        9:cpu,cpuacct:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n\
        8:blkio:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n\
        7:net_cls,net_prio:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n\
        6:devices:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n\
        5:freezer:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n\
        4:cpuset:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n\
        3:perf_event:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n\
        2:rdma:/\n\
        1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n\
        0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cid}.scope\n";

    /// cgroup v1, cri-o with the systemd driver, a BestEffort pod.
    const V1_CRIO_SYSTEMD: &str = "11:memory:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_}.slice/crio-{cid}.scope\n\
        10:cpu,cpuacct:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_}.slice/crio-{cid}.scope\n\
        9:pids:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_}.slice/crio-{cid}.scope\n\
        2:devices:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_}.slice/crio-{cid}.scope\n\
        1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_}.slice/crio-{cid}.scope\n";

    /// cgroup v2, cri-o with the cgroupfs driver (`cgroup_manager =
    /// "cgroupfs"`).
    const V2_CRIO_CGROUPFS: &str = "0::/kubepods/burstable/pod{pod}/crio-{cid}\n";

    /// cgroup v2, Kubernetes with Docker (cri-dockerd) and the systemd
    /// driver.
    const V2_K8S_DOCKER_SYSTEMD: &str = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_}.slice/docker-{cid}.scope\n";

    /// cgroup v2, Kubernetes with Docker (cri-dockerd) and the cgroupfs
    /// driver: Docker puts the container directly in the pod's cgroup.
    const V2_K8S_DOCKER_CGROUPFS: &str = "0::/kubepods/burstable/pod{pod}/{cid}\n";

    /// kind: the node is itself a container, whose kubelet nests pods under
    /// its own slice; an agent in the node's cgroup namespace reads this.
    const V2_KIND: &str = "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{pod_}.slice/cri-containerd-{cid}.scope\n";

    #[test]
    fn docker_without_kubernetes() {
        assert_eq!(container(&fixture(V1_DOCKER_CGROUPFS)), not_in_pod());
        assert_eq!(container(&fixture(V2_DOCKER_SYSTEMD)), not_in_pod());
    }

    #[test]
    fn every_runtime_and_driver_in_kubernetes() {
        for (name, template) in [
            ("v1 docker cgroupfs", V1_K8S_DOCKER_CGROUPFS),
            ("v1 docker systemd", V1_K8S_DOCKER_SYSTEMD),
            ("v2 docker cgroupfs", V2_K8S_DOCKER_CGROUPFS),
            ("v2 docker systemd", V2_K8S_DOCKER_SYSTEMD),
            ("v1 containerd cgroupfs", V1_CONTAINERD_CGROUPFS),
            ("v1 containerd systemd", V1_CONTAINERD_SYSTEMD),
            ("v2 containerd cgroupfs", V2_CONTAINERD_CGROUPFS),
            ("v2 containerd systemd", V2_CONTAINERD_SYSTEMD),
            ("v1 cri-o cgroupfs", V1_CRIO_CGROUPFS),
            ("v1 cri-o systemd", V1_CRIO_SYSTEMD),
            ("v2 cri-o cgroupfs", V2_CRIO_CGROUPFS),
            ("v2 cri-o systemd", V2_CRIO_SYSTEMD),
        ] {
            assert_eq!(container(&fixture(template)), in_pod(), "{name}");
        }
    }

    #[test]
    fn kind_nodes_nest_pods_in_the_kubelet_slice() {
        assert_eq!(container(&fixture(V2_KIND)), in_pod());
    }

    #[test]
    fn cgroups_a_process_creates_below_its_own_are_not_believed() {
        let other = "1".repeat(64);
        let other_pod = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
        // Root in a container names a sub-cgroup after another container
        // (and pod): its own container still counts.
        let text = fixture(&format!(
            "0::/kubepods/burstable/pod{{pod}}/{{cid}}/pod{other_pod}/{other}\n"
        ));
        assert_eq!(container(&text), in_pod());
        let text = fixture(&format!(
            "0::/system.slice/docker-{{cid}}.scope/docker-{other}.scope\n"
        ));
        assert_eq!(container(&text), not_in_pod());
        // A user's service manager may create any scope or slice below
        // user@<uid>.service.
        for forged in [
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{cid}.scope\n",
            "0::/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-pod{pod_}.slice/cri-containerd-{cid}.scope\n",
            "1:name=systemd:/system.slice/build.service/docker/{cid}\n",
        ] {
            assert_eq!(container(&fixture(forged)), None, "{forged}");
        }
    }

    #[test]
    fn a_static_pod_uid_is_a_hash() {
        let hash = "2f1a8e3ba3ed9c2e4c9b4b4f7b3c4d5e";
        let text = format!("0::/kubepods/burstable/pod{hash}/{CID}\n");
        assert_eq!(
            container(&text),
            Some(Container {
                id: CID.to_owned(),
                pod_uid: Some(hash.to_owned())
            })
        );
    }

    #[test]
    fn processes_outside_containers_have_none() {
        for text in [
            "0::/user.slice/user-1000.slice/session-2.scope\n",
            "0::/system.slice/sshd.service\n",
            "0::/\n",
            "12:pids:/user.slice/user-1000.slice\n1:name=systemd:/user.slice/user-1000.slice/session-1.scope\n0::/user.slice/user-1000.slice/session-1.scope\n",
            // The pod's sandbox cgroup and cri-o's monitor are not containers.
            &fixture("0::/kubepods.slice/kubepods-pod{pod_}.slice\n"),
            &fixture("0::/kubepods.slice/kubepods-pod{pod_}.slice/crio-conmon-{cid}.scope\n"),
            "",
            "garbage",
        ] {
            assert_eq!(container(text), None, "{text:?}");
        }
    }

    #[test]
    fn almost_container_ids_are_not_taken() {
        let upper = CID.to_uppercase();
        let short = &CID[..63];
        let long = format!("{CID}0");
        for id in [upper.as_str(), short, &long, &CID.replace('3', "g")] {
            let text = format!("0::/system.slice/docker-{id}.scope\n");
            assert_eq!(container(&text), None, "{id}");
        }
    }

    #[test]
    fn malformed_pod_uids_are_left_out() {
        let text = format!("0::/kubepods/burstable/podnot-a-uid/{CID}\n");
        assert_eq!(container(&text), not_in_pod());
        let text = fixture("0::/other.slice/other-pod{pod_}.slice/cri-containerd-{cid}.scope\n");
        assert_eq!(container(&text), not_in_pod());
    }

    #[test]
    fn a_path_may_hold_colons() {
        let text = format!("0::/odd:name/docker-{CID}.scope\n");
        assert_eq!(container(&text), not_in_pod());
    }

    #[test]
    fn systemd_units_from_v2_and_v1() {
        for (text, unit) in [
            ("0::/system.slice/nginx.service\n", Some("nginx.service")),
            (
                "0::/system.slice/system-getty.slice/getty@tty1.service\n",
                Some("getty@tty1.service"),
            ),
            (
                "0::/user.slice/user-1000.slice/session-4.scope\n",
                Some("session-4.scope"),
            ),
            (
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.service\n",
                Some("user@1000.service"),
            ),
            (
                "0::/system.slice/docker.service/sub/group\n",
                Some("docker.service"),
            ),
            ("0::/init.scope\n", Some("init.scope")),
            ("0::/\n", None),
            ("0::/system.slice\n", None),
            ("0::/kubepods/besteffort/podx/y\n", None),
            // cgroup v1 (and hybrid): the name=systemd hierarchy counts.
            (
                "5:memory:/\n1:name=systemd:/system.slice/cron.service\n0::/\n",
                Some("cron.service"),
            ),
        ] {
            assert_eq!(systemd_unit(text), unit, "{text:?}");
        }
    }

    #[test]
    fn a_docker_container_is_in_its_scope_unit() {
        let text = fixture(V2_DOCKER_SYSTEMD);
        let unit = format!("docker-{CID}.scope");
        assert_eq!(systemd_unit(&text), Some(unit.as_str()));
    }

    /// Each cgroup the test process's own `/proc/self/cgroup` names, as
    /// read, is one the kernel lists the process in: `cgroup.procs` of that
    /// path, under where its hierarchy is mounted, holds the process ID.
    #[test]
    fn the_paths_read_from_the_own_cgroup_file_hold_the_process() {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let pid = std::process::id().to_string();
        let mut checked = 0;
        for line in paths(&text) {
            let Some(dir) = mounted_dir(&mountinfo, line) else {
                continue;
            };
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|p| p == pid),
                "{line:?}: {} does not list {pid}",
                dir.display()
            );
            checked += 1;
        }
        assert!(checked > 0, "no hierarchy mounted: {text:?}");
    }

    /// Where the cgroup of `line` is in the file system, from
    /// `/proc/self/mountinfo` (`<id> <parent> <dev> <root> <mount point>
    /// <options> [<optional>...] - <type> <source> <super options>`), if its
    /// hierarchy is mounted at a root above it.
    fn mounted_dir(mountinfo: &str, line: CgroupLine<'_>) -> Option<std::path::PathBuf> {
        let wanted: Vec<&str> = line.controllers.split(',').collect();
        mountinfo.lines().find_map(|mount| {
            let (mount_fields, fs_fields) = mount.split_once(" - ")?;
            let mount_fields: Vec<&str> = mount_fields.split(' ').collect();
            let fs_fields: Vec<&str> = fs_fields.split(' ').collect();
            let (root, point) = (*mount_fields.get(3)?, *mount_fields.get(4)?);
            let fs_type = *fs_fields.first()?;
            let matches = if line.hierarchy == "0" {
                fs_type == "cgroup2"
            } else {
                let options: Vec<&str> = fs_fields.get(2)?.split(',').collect();
                fs_type == "cgroup" && wanted.iter().all(|c| options.contains(c))
            };
            if !matches {
                return None;
            }
            let below = if root == "/" {
                line.path
            } else {
                line.path
                    .strip_prefix(root)
                    .filter(|rest| rest.is_empty() || rest.starts_with('/'))?
            };
            Some(std::path::Path::new(point).join(below.trim_start_matches('/')))
        })
    }
}
