//! Deriving the kernel programs' `KernelLayout` on the running kernel.
//!
//! Tracepoint record offsets come from the tracepoints' format files, struct member offsets from
//! the kernel's BTF. Each value is checked (size, not a bitfield, byte aligned) so that a kernel
//! whose layout differs from what the programs read is refused with a reason.

use std::path::{Path, PathBuf};

use super::btf::Btf;
use std::mem::offset_of;

use wirespan_common::{KernelLayout, SYSCALL_ARG_REGS, SockHead, SockHead6, TP_ARGS, TP_RET};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "no tracefs with syscall tracepoints at /sys/kernel/tracing or /sys/kernel/debug/tracing (mount it: mount -t tracefs nodev /sys/kernel/tracing)"
    )]
    NoTracefs,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint}: {reason}")]
    Tracepoint { tracepoint: String, reason: String },
    #[error("kernel BTF at {path} unreadable: {reason}")]
    Btf { path: PathBuf, reason: String },
    #[error("kernel BTF has no usable {what}: {reason}")]
    Member { what: String, reason: String },
}

/// One field of a tracepoint record, from its format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// Parses a tracepoint `format` file into its fields, in order.
pub fn parse_format(text: &str) -> Vec<Field> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let decl = line.strip_prefix("field:")?;
            let mut parts = decl.split(';').map(str::trim);
            let decl = parts.next()?;
            let mut offset = None;
            let mut size = None;
            for part in parts {
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            let name = decl.split_whitespace().last()?;
            let name = name.split('[').next()?.trim_start_matches('*');
            Some(Field {
                name: name.to_string(),
                offset: offset?,
                size: size?,
            })
        })
        .collect()
}

/// Syscall arguments of a `sys_enter_*` record: the fields after `__syscall_nr`.
/// Returns the offset of the first, after checking they are 8 bytes each and contiguous.
pub fn enter_args_offset(fields: &[Field], needed: usize) -> Result<u32, String> {
    let start = fields
        .iter()
        .position(|f| f.name == "__syscall_nr")
        .ok_or("no __syscall_nr field")?;
    let args = &fields[start + 1..];
    if args.len() < needed {
        return Err(format!("{} arguments, {needed} needed", args.len()));
    }
    let first = args.first().ok_or("no arguments")?.offset;
    for (i, a) in args.iter().enumerate() {
        if a.size != 8 || a.offset != first + 8 * i as u32 {
            return Err(format!(
                "argument {} ({}) at offset {} size {}, expected offset {} size 8",
                i,
                a.name,
                a.offset,
                a.size,
                first + 8 * i as u32
            ));
        }
    }
    Ok(first)
}

/// Offset of `ret` in a `sys_exit_*` record.
pub fn exit_ret_offset(fields: &[Field]) -> Result<u32, String> {
    let ret = fields
        .iter()
        .find(|f| f.name == "ret")
        .ok_or("no ret field")?;
    if ret.size != 8 {
        return Err(format!("ret is {} bytes, expected 8", ret.size));
    }
    Ok(ret.offset)
}

/// The tracefs mount that has syscall tracepoints.
pub fn tracefs() -> Result<PathBuf, LayoutError> {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let dir = PathBuf::from(dir);
        if dir.join("events/syscalls").is_dir() {
            return Ok(dir);
        }
    }
    Err(LayoutError::NoTracefs)
}

pub fn read_format(tracefs: &Path, category: &str, name: &str) -> Result<Vec<Field>, LayoutError> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|source| LayoutError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(parse_format(&text))
}

pub use super::btf::MemberInfo;

/// Looks up struct members in the kernel's BTF.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub const DEFAULT_PATH: &str = "/sys/kernel/btf/vmlinux";

    pub fn open(path: &Path) -> Result<Self, LayoutError> {
        let btf = Btf::from_file(path).map_err(|reason| LayoutError::Btf {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Self { btf })
    }

    /// `path` is a dotted member path inside `struct_name`, e.g. `__sk_common.skc_family`.
    pub fn member(&self, struct_name: &str, path: &str) -> Result<MemberInfo, LayoutError> {
        self.btf
            .member(struct_name, path)
            .map_err(|reason| LayoutError::Member {
                what: format!("{struct_name}.{path}"),
                reason,
            })
    }
}

/// The syscalls whose enter records the programs read arguments from, with how many they read.
const ENTER_ARGS: &[(&str, usize)] = &[
    ("read", 2),
    ("write", 2),
    ("readv", 3),
    ("writev", 3),
    ("recvfrom", 4),
    ("sendto", 2),
    ("recvmsg", 3),
    ("sendmsg", 2),
    ("sendfile64", 1),
    ("accept", 1),
    ("accept4", 1),
    ("connect", 1),
    ("close", 1),
];

/// Derives the layout for this kernel, or says what is missing.
pub fn derive(tracefs: &Path, btf: &KernelBtf) -> Result<KernelLayout, LayoutError> {
    let mut tp_args = None;
    let mut tp_ret = None;
    for &(name, needed) in ENTER_ARGS {
        let enter = format!("sys_enter_{name}");
        let fields = read_format(tracefs, "syscalls", &enter)?;
        let off = enter_args_offset(&fields, needed).map_err(|reason| LayoutError::Tracepoint {
            tracepoint: enter.clone(),
            reason,
        })?;
        check_same(&mut tp_args, off, &enter)?;
        if name == "close" {
            continue;
        }
        let exit = format!("sys_exit_{name}");
        let fields = read_format(tracefs, "syscalls", &exit)?;
        let off = exit_ret_offset(&fields).map_err(|reason| LayoutError::Tracepoint {
            tracepoint: exit.clone(),
            reason,
        })?;
        check_same(&mut tp_ret, off, &exit)?;
    }

    let m = |s: &str, p: &str, sizes: &[usize]| -> Result<u32, LayoutError> {
        let info = btf.member(s, p)?;
        if !sizes.contains(&info.size) {
            return Err(LayoutError::Member {
                what: format!("{s}.{p}"),
                reason: format!("{} bytes, expected {sizes:?}", info.size),
            });
        }
        Ok(info.offset)
    };
    check_saved_registers(btf)?;
    check_constant(tp_args, TP_ARGS, "sys_enter_*", "the first argument")?;
    check_constant(tp_ret, TP_RET, "sys_exit_*", "ret")?;
    let sk_daddr = m("sock", "__sk_common.skc_daddr", &[4])?;
    let sk_v6_daddr = m("sock", "__sk_common.skc_v6_daddr", &[16])?;
    check_adjacent(
        btf,
        sk_daddr,
        &[
            ("skc_rcv_saddr", offset_of!(SockHead, rcv_saddr)),
            ("skc_hash", offset_of!(SockHead, hash)),
            ("skc_dport", offset_of!(SockHead, dport)),
            ("skc_num", offset_of!(SockHead, num)),
            ("skc_family", offset_of!(SockHead, family)),
        ],
    )?;
    check_adjacent(
        btf,
        sk_v6_daddr,
        &[("skc_v6_rcv_saddr", offset_of!(SockHead6, rcv_saddr))],
    )?;
    Ok(KernelLayout {
        valid: 1,
        task_files: m("task_struct", "files", &[8])?,
        task_group_leader: m("task_struct", "group_leader", &[8])?,
        task_start_time: m("task_struct", "start_time", &[8])?,
        files_fdt: m("files_struct", "fdt", &[8])?,
        fdt_max_fds: m("fdtable", "max_fds", &[4])?,
        fdt_fd: m("fdtable", "fd", &[8])?,
        file_inode: m("file", "f_inode", &[8])?,
        file_private_data: m("file", "private_data", &[8])?,
        inode_mode: m("inode", "i_mode", &[2])?,
        inode_ino: m("inode", "i_ino", &[8])?,
        socket_type: m("socket", "type", &[2])?,
        socket_sk: m("socket", "sk", &[8])?,
        sk_protocol: m("sock", "sk_protocol", &[2])?,
        sk_daddr,
        sk_v6_daddr,
        inet_sport: m("inet_sock", "inet_sport", &[2])?,
    })
}

/// Checks that a tracepoint field sits where the programs read it (`TP_ARGS`, `TP_RET`).
fn check_constant(
    found: Option<u32>,
    expected: u32,
    tracepoints: &str,
    field: &str,
) -> Result<(), LayoutError> {
    match found {
        Some(offset) if offset != expected => Err(LayoutError::Tracepoint {
            tracepoint: tracepoints.into(),
            reason: format!("{field} at offset {offset}, the programs read it at {expected}"),
        }),
        _ => Ok(()),
    }
}

/// Checks that `sock_common` members sit at these distances from the one at `base`, as the
/// programs copy them in one read (`SockHead`, `SockHead6`).
fn check_adjacent(
    btf: &KernelBtf,
    base: u32,
    members: &[(&str, usize)],
) -> Result<(), LayoutError> {
    for &(name, distance) in members {
        let info = btf.member("sock", &format!("__sk_common.{name}"))?;
        if info.offset as usize != base as usize + distance {
            return Err(LayoutError::Member {
                what: format!("sock.__sk_common.{name}"),
                reason: format!(
                    "at offset {}, the programs read it at {}",
                    info.offset,
                    base as usize + distance
                ),
            });
        }
    }
    Ok(())
}

/// Checks that this kernel saves the syscall argument registers where the exit programs read
/// them (`SYSCALL_ARG_REGS`): the 8 bytes at each offset lie inside the register's member.
fn check_saved_registers(btf: &KernelBtf) -> Result<(), LayoutError> {
    for (register, offset) in SYSCALL_ARG_REGS {
        let info = btf.member("pt_regs", register)?;
        let (start, end) = (info.offset as usize, info.offset as usize + info.size);
        if (offset as usize) < start || offset as usize + 8 > end {
            return Err(LayoutError::Member {
                what: format!("pt_regs.{register}"),
                reason: format!(
                    "{} bytes at offset {}, the programs read 8 at {offset}",
                    info.size, info.offset
                ),
            });
        }
    }
    Ok(())
}

fn check_same(slot: &mut Option<u32>, value: u32, tracepoint: &str) -> Result<(), LayoutError> {
    match *slot {
        None => {
            *slot = Some(value);
            Ok(())
        }
        Some(v) if v == value => Ok(()),
        Some(v) => Err(LayoutError::Tracepoint {
            tracepoint: tracepoint.to_string(),
            reason: format!("field at offset {value}, other syscall tracepoints at {v}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYS_ENTER_READ: &str = "name: sys_enter_read
ID: 680
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:unsigned int fd;\toffset:16;\tsize:8;\tsigned:0;
\tfield:char * buf;\toffset:24;\tsize:8;\tsigned:0;
\tfield:size_t count;\toffset:32;\tsize:8;\tsigned:0;

print fmt: \"fd: 0x%08lx, buf: 0x%08lx, count: 0x%08lx\"
";

    #[test]
    fn parses_a_real_format_file() {
        let fields = parse_format(SYS_ENTER_READ);
        assert_eq!(fields.len(), 8);
        assert_eq!(
            fields[6],
            Field {
                name: "buf".into(),
                offset: 24,
                size: 8
            }
        );
        assert_eq!(enter_args_offset(&fields, 3), Ok(16));
        assert!(enter_args_offset(&fields, 4).is_err());
    }

    #[test]
    fn refuses_a_layout_it_does_not_understand() {
        let odd = SYS_ENTER_READ.replace("offset:24;\tsize:8", "offset:28;\tsize:4");
        let err = enter_args_offset(&parse_format(&odd), 2).unwrap_err();
        assert!(err.contains("argument 1 (buf)"), "{err}");
        let exit = "\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;";
        assert_eq!(exit_ret_offset(&parse_format(exit)), Ok(16));
        let bad = exit.replace("size:8", "size:4");
        assert!(exit_ret_offset(&parse_format(&bad)).is_err());
    }

    #[test]
    fn array_and_pointer_field_names() {
        let f = parse_format(
            "\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:const char *name;\toffset:24;\tsize:8;\tsigned:0;",
        );
        assert_eq!(f[0].name, "comm");
        assert_eq!(f[1].name, "name");
    }

    /// Reads this machine's kernel: skips with a sentence where there is no BTF.
    #[test]
    fn derives_socket_offsets_from_this_kernels_btf() {
        let path = Path::new(KernelBtf::DEFAULT_PATH);
        if !path.exists() {
            eprintln!("skipped: needs kernel BTF at {}", path.display());
            return;
        }
        let btf = KernelBtf::open(path).unwrap();
        let fam = btf.member("sock", "__sk_common.skc_family").unwrap();
        assert_eq!(fam.size, 2);
        // skc_daddr is the first member of sock_common on every kernel with BTF.
        assert_eq!(
            btf.member("sock", "__sk_common.skc_daddr").unwrap().offset,
            0
        );
        assert_eq!(btf.member("sock_common", "skc_v6_daddr").unwrap().size, 16);
        assert!(btf.member("sock", "no_such_member").is_err());
        check_saved_registers(&btf).expect("syscall arguments where the programs read them");
        assert!(btf.member("no_such_struct_xyz", "x").is_err());
        // The programs copy the addresses, ports and family in one read: a kernel whose
        // sock_common is laid out otherwise is refused, not misread.
        check_adjacent(&btf, 0, &[("skc_family", offset_of!(SockHead, family))])
            .expect("skc_family where SockHead has it");
        let err = check_adjacent(&btf, 0, &[("skc_family", 18)]).unwrap_err();
        assert!(err.to_string().contains("skc_family"), "{err}");
    }

    #[test]
    fn refuses_tracepoint_records_read_at_other_offsets() {
        assert!(check_constant(Some(16), TP_ARGS, "sys_enter_*", "the first argument").is_ok());
        let err = check_constant(Some(24), TP_ARGS, "sys_enter_*", "the first argument")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("at offset 24") && err.contains("at 16"),
            "{err}"
        );
    }
}
