//! Which kernel programs wirespan attaches, where, and what each needs from the kernel.

/// What a probe contributes; used to decide whether enough attached to be useful.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Bytes received.
    Ingress,
    /// Bytes sent.
    Egress,
    /// Connection life cycle (accept, connect, close): roles and ends of connections.
    Lifecycle,
}

/// One syscall's programs. Every program here needs only syscall tracepoints (tracefs), BPF
/// ring buffers (5.8+) and BTF for the derived offsets; no kprobes, no fentry.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    /// Tracepoint name after `sys_enter_` / `sys_exit_`.
    pub syscall: &'static str,
    /// None for syscalls handled at exit only (receiving calls: their arguments are read from
    /// the saved registers there).
    pub enter: Option<&'static str>,
    /// None for syscalls handled at enter only (close).
    pub exit: Option<&'static str>,
    pub role: Role,
}

const fn pair(syscall: &'static str, enter: &'static str, exit: &'static str, role: Role) -> Probe {
    Probe {
        syscall,
        enter: Some(enter),
        exit: Some(exit),
        role,
    }
}

const fn exit_only(syscall: &'static str, exit: &'static str) -> Probe {
    Probe {
        syscall,
        enter: None,
        exit: Some(exit),
        role: Role::Ingress,
    }
}

pub const PROBES: &[Probe] = &[
    exit_only("read", "sock_exit_read"),
    pair("write", "sock_enter_write", "sock_exit_write", Role::Egress),
    exit_only("readv", "sock_exit_readv"),
    pair(
        "writev",
        "sock_enter_writev",
        "sock_exit_writev",
        Role::Egress,
    ),
    exit_only("recvfrom", "sock_exit_recvfrom"),
    pair(
        "sendto",
        "sock_enter_sendto",
        "sock_exit_sendto",
        Role::Egress,
    ),
    exit_only("recvmsg", "sock_exit_recvmsg"),
    pair(
        "sendmsg",
        "sock_enter_sendmsg",
        "sock_exit_sendmsg",
        Role::Egress,
    ),
    pair(
        "sendfile64",
        "sock_enter_sendfile64",
        "sock_exit_sendfile64",
        Role::Egress,
    ),
    Probe {
        syscall: "accept",
        enter: None,
        exit: Some("sock_exit_accept"),
        role: Role::Lifecycle,
    },
    Probe {
        syscall: "accept4",
        enter: None,
        exit: Some("sock_exit_accept4"),
        role: Role::Lifecycle,
    },
    Probe {
        syscall: "connect",
        enter: None,
        exit: Some("sock_exit_connect"),
        role: Role::Lifecycle,
    },
    Probe {
        syscall: "close",
        enter: Some("sock_enter_close"),
        exit: None,
        role: Role::Lifecycle,
    },
];

/// Whether what attached can still see traffic: at least one way to see bytes in each
/// direction. Returns the reason when it cannot.
pub fn useful(attached: &[Probe]) -> Result<(), String> {
    let has = |role| attached.iter().any(|p| p.role == role);
    match (has(Role::Ingress), has(Role::Egress)) {
        (true, true) => Ok(()),
        (false, false) => Err("no socket read or write probe attached".into()),
        (false, true) => {
            Err("no socket read probe attached (received bytes would be invisible)".into())
        }
        (true, false) => {
            Err("no socket write probe attached (sent bytes would be invisible)".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_syscall_in_the_common_table_has_a_probe() {
        use wirespan_common::syscall;
        for id in 1..=13 {
            let name = syscall::tracepoint_name(id);
            assert!(PROBES.iter().any(|p| p.syscall == name), "{name}");
        }
    }

    #[test]
    fn program_names_follow_the_convention() {
        for p in PROBES {
            assert!(p.enter.is_some() || p.exit.is_some());
            if let Some(enter) = p.enter {
                assert_eq!(enter, format!("sock_enter_{}", p.syscall));
            }
            if let Some(exit) = p.exit {
                assert_eq!(exit, format!("sock_exit_{}", p.syscall));
            }
        }
    }

    #[test]
    fn usefulness_needs_both_directions() {
        assert!(useful(PROBES).is_ok());
        let reads: Vec<_> = PROBES
            .iter()
            .copied()
            .filter(|p| p.role == Role::Ingress)
            .collect();
        assert!(useful(&reads).unwrap_err().contains("write"));
        assert!(useful(&[]).is_err());
    }
}
