//! Reading the facts about a process that the kernel publishes in `/proc`.
//!
//! The parsers are pure functions over the files' contents, so they can be
//! tested on fixtures; the readers around them only do the I/O.

use std::io;
use std::path::PathBuf;

/// Why a `/proc` file could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    /// `/proc/<pid>/stat` has no `)` closing the command name.
    #[error("stat has no closing `)` after the command name")]
    NoCommEnd,
    /// `/proc/<pid>/stat` has fewer fields than expected.
    #[error("stat has no field {0}")]
    MissingField(usize),
    /// A numeric field is not a number.
    #[error("{field} is not a number: {value:?}")]
    NotANumber {
        /// The field's name.
        field: &'static str,
        /// What was there instead.
        value: String,
    },
    /// `/proc/<pid>/status` has no `Groups:` line.
    #[error("status has no Groups line")]
    NoGroups,
}

/// The 1-based number of the `starttime` field of `/proc/<pid>/stat`
/// (proc(5)).
const START_TIME_FIELD: usize = 22;

/// The process start time (clock ticks after boot) from the contents of
/// `/proc/<pid>/stat`.
///
/// The second field is the command name in parentheses, and that name may
/// itself hold spaces and parentheses (`(a) b (c)`), so the fields are
/// counted from the *last* `)`; the field after it is field 3 (`state`).
pub(crate) fn start_time_from_stat(stat: &str) -> Result<u64, ParseError> {
    let (_, rest) = stat.rsplit_once(')').ok_or(ParseError::NoCommEnd)?;
    let value = rest
        .split_ascii_whitespace()
        .nth(START_TIME_FIELD - 3)
        .ok_or(ParseError::MissingField(START_TIME_FIELD))?;
    value.parse().map_err(|_| ParseError::NotANumber {
        field: "starttime",
        value: value.to_owned(),
    })
}

/// The supplementary group IDs from the contents of `/proc/<pid>/status`
/// (the `Groups:` line; it is empty for a process with no supplementary
/// groups).
pub(crate) fn groups_from_status(status: &str) -> Result<Vec<u32>, ParseError> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .ok_or(ParseError::NoGroups)?;
    line.split_ascii_whitespace()
        .map(|gid| {
            gid.parse().map_err(|_| ParseError::NotANumber {
                field: "Groups",
                value: gid.to_owned(),
            })
        })
        .collect()
}

/// The path of a process's directory in `/proc`.
pub(crate) fn proc_path(pid: u32, file: &str) -> PathBuf {
    let mut path = PathBuf::from("/proc");
    path.push(pid.to_string());
    path.push(file);
    path
}

/// Reads a small `/proc` file into a string. Bytes that are not UTF-8 (a
/// command name may hold any) are replaced, which leaves the fields the
/// parsers look for intact.
pub(crate) fn read(pid: u32, file: &str) -> io::Result<String> {
    let bytes = std::fs::read(proc_path(pid, file))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Reads the `exe` link: the path of the executable the process runs, as
/// the kernel resolved it (in the process's mount namespace; a deleted file
/// reads `<path> (deleted)`).
pub(crate) fn read_exe(pid: u32) -> io::Result<PathBuf> {
    std::fs::read_link(proc_path(pid, "exe"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line of `/proc/self/stat` (Linux 6.x, 52 fields).
    const STAT: &str = "4242 (sigil-agent) S 1 4242 4242 0 -1 4194560 1503 0 0 0 12 7 0 0 20 0 \
                        9 0 987654 1181937664 2873 18446744073709551615 1 1 0 0 0 0 0 4096 17922 \
                        0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    fn stat_with_comm(comm: &str) -> String {
        STAT.replace("(sigil-agent)", &format!("({comm})"))
    }

    #[test]
    fn start_time_is_field_22() {
        assert_eq!(start_time_from_stat(STAT), Ok(987_654));
    }

    #[test]
    fn start_time_survives_tricky_command_names() {
        for comm in [
            "a b",
            "x) 1 2 3 (y",
            ")",
            "((",
            ") S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
            "",
        ] {
            assert_eq!(
                start_time_from_stat(&stat_with_comm(comm)),
                Ok(987_654),
                "comm {comm:?}"
            );
        }
    }

    #[test]
    fn truncated_or_malformed_stat_is_an_error() {
        assert_eq!(
            start_time_from_stat("4242 sigil-agent S 1"),
            Err(ParseError::NoCommEnd)
        );
        assert_eq!(
            start_time_from_stat("4242 (sigil) S 1 2 3"),
            Err(ParseError::MissingField(22))
        );
        let bad = STAT.replace(" 987654 ", " 98x654 ");
        assert_eq!(
            start_time_from_stat(&bad),
            Err(ParseError::NotANumber {
                field: "starttime",
                value: "98x654".into()
            })
        );
    }

    const STATUS: &str = "Name:\tbash\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
                          Uid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n\
                          FDSize:\t256\nGroups:\t4 24 27 1000 \nNStgid:\t4242\n";

    #[test]
    fn groups_are_read_from_the_groups_line() {
        assert_eq!(groups_from_status(STATUS), Ok(vec![4, 24, 27, 1000]));
    }

    #[test]
    fn a_process_without_supplementary_groups_has_an_empty_line() {
        let status = STATUS.replace("Groups:\t4 24 27 1000 \n", "Groups:\t\n");
        assert_eq!(groups_from_status(&status), Ok(vec![]));
    }

    #[test]
    fn a_name_that_looks_like_a_groups_line_is_not_one() {
        // `Name:` comes first and may hold any text, but it never starts a
        // line with `Groups:` because the kernel escapes newlines in it.
        let status = STATUS.replace("Name:\tbash", "Name:\tGroups: 0");
        assert_eq!(groups_from_status(&status), Ok(vec![4, 24, 27, 1000]));
    }

    #[test]
    fn missing_or_garbled_groups_are_errors() {
        let status = STATUS.replace("Groups:\t4 24 27 1000 \n", "");
        assert_eq!(groups_from_status(&status), Err(ParseError::NoGroups));
        let status = STATUS.replace("Groups:\t4 24", "Groups:\t4 x24");
        assert_eq!(
            groups_from_status(&status),
            Err(ParseError::NotANumber {
                field: "Groups",
                value: "x24".into()
            })
        );
    }

    #[test]
    fn the_test_process_own_files_parse() {
        let pid = std::process::id();
        assert!(start_time_from_stat(&read(pid, "stat").unwrap()).unwrap() > 0);
        groups_from_status(&read(pid, "status").unwrap()).unwrap();
        assert_eq!(read_exe(pid).unwrap(), std::env::current_exe().unwrap());
    }
}
