//! Just enough of the kernel's BTF to find struct members and their sizes.
//!
//! The file is read once and its type records are indexed (4 bytes per type); names and members
//! are read from the raw bytes when asked for. Decoding every type of vmlinux into objects first,
//! as a general BTF library does, took 41 MiB at start-up for the 15 members the programs need.
//! Format: the kernel's Documentation/bpf/btf.rst (header, type section, string section).

use std::path::Path;

/// Offset and size of a member, found through any anonymous structs and unions.
#[derive(Debug)]
pub struct MemberInfo {
    pub offset: u32,
    pub size: usize,
}

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_LEN: usize = 12;

// BTF kinds.
const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const FWD: u32 = 7;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC: u32 = 12;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const FLOAT: u32 = 16;
const DECL_TAG: u32 = 17;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

/// One type record: its common part and where its kind-specific part starts.
#[derive(Clone, Copy, Debug)]
struct Rec {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` for INT, STRUCT, UNION, ENUM, ENUM64, DATASEC, FLOAT; a type id for the others.
    size_or_type: u32,
    /// Byte offset of the kind-specific data in `Btf::data`.
    body: usize,
}

/// The kernel's BTF, indexed.
pub struct Btf {
    data: Vec<u8>,
    strings: (usize, usize),
    /// Byte offset in `data` of each type's record; index 0 is `void`'s (unused).
    index: Vec<u32>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Btf({} types)", self.index.len() - 1)
    }
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let data = std::fs::read(path).map_err(|e| e.to_string())?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, String> {
        let u16_at = |at: usize| {
            data.get(at..at + 2)
                .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        };
        match u16_at(0) {
            Some(MAGIC) => {}
            Some(m) if m == MAGIC.swap_bytes() => {
                return Err("BTF of the other byte order".into());
            }
            _ => return Err("not BTF (bad magic)".into()),
        }
        let field = |at: usize| {
            ne_u32(&data, at)
                .map(|v| v as usize)
                .ok_or("truncated header")
        };
        let hdr_len = field(4)?;
        if hdr_len < HEADER_LEN {
            return Err(format!("header of {hdr_len} bytes"));
        }
        let (type_off, type_len) = (hdr_len + field(8)?, field(12)?);
        let (str_off, str_len) = (hdr_len + field(16)?, field(20)?);
        if type_off + type_len > data.len() || str_off + str_len > data.len() {
            return Err("sections beyond the end of the file".into());
        }
        if data.len() > u32::MAX as usize {
            return Err("BTF larger than 4 GiB".into());
        }
        let mut btf = Self {
            data,
            strings: (str_off, str_len),
            index: vec![0],
        };
        let mut at = type_off;
        while at < type_off + type_len {
            let rec = btf.rec_at(at)?;
            btf.index.push(at as u32);
            at = rec.body + body_len(&rec)?;
        }
        if at != type_off + type_len {
            return Err("type section ends inside a record".into());
        }
        Ok(btf)
    }

    fn u32_at(&self, at: usize) -> Result<u32, String> {
        ne_u32(&self.data, at).ok_or_else(|| "truncated type record".into())
    }

    fn rec_at(&self, at: usize) -> Result<Rec, String> {
        let info = self.u32_at(at + 4)?;
        Ok(Rec {
            name_off: self.u32_at(at)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32_at(at + 8)?,
            body: at + TYPE_LEN,
        })
    }

    fn rec(&self, id: u32) -> Result<Rec, String> {
        match self.index.get(id as usize) {
            Some(&at) if id != 0 => self.rec_at(at as usize),
            _ => Err(format!("no type {id}")),
        }
    }

    fn name(&self, off: u32) -> &str {
        let (start, len) = self.strings;
        let Some(bytes) = self.data.get(start + off as usize..start + len) else {
            return "";
        };
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).unwrap_or("")
    }

    /// The first struct named `name` that has members (not a forward declaration).
    fn find_struct(&self, name: &str) -> Option<u32> {
        (1..self.index.len() as u32).find(|&id| {
            self.rec(id)
                .is_ok_and(|r| r.kind == STRUCT && r.vlen > 0 && self.name(r.name_off) == name)
        })
    }

    /// Skips typedefs, qualifiers and type tags.
    fn strip(&self, mut id: u32) -> Result<u32, String> {
        for _ in 0..32 {
            let r = self.rec(id)?;
            match r.kind {
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = r.size_or_type,
                _ => return Ok(id),
            }
        }
        Err("type chain too long".into())
    }

    fn size_of(&self, id: u32) -> Result<usize, String> {
        let r = self.rec(id)?;
        Ok(match r.kind {
            INT | STRUCT | UNION | ENUM | ENUM64 => r.size_or_type as usize,
            PTR => 8,
            ARRAY => {
                let elem = self.strip(self.u32_at(r.body)?)?;
                self.u32_at(r.body + 8)? as usize * self.size_of(elem)?
            }
            kind => return Err(format!("unsized member type (kind {kind})")),
        })
    }

    /// Finds `name` directly in struct or union `id` or inside its anonymous members:
    /// (byte offset, the member's type with typedefs and qualifiers skipped).
    fn find(&self, id: u32, name: &str, depth: u32) -> Result<(u32, u32), String> {
        if depth > 16 {
            return Err("anonymous members nested too deep".into());
        }
        let r = self.rec(id)?;
        if r.kind != STRUCT && r.kind != UNION {
            return Err(format!(
                "{} is not a struct or union",
                self.name(r.name_off)
            ));
        }
        for i in 0..r.vlen {
            let at = r.body + i * 12;
            let mname = self.name(self.u32_at(at)?);
            let mty = self.strip(self.u32_at(at + 4)?)?;
            let raw = self.u32_at(at + 8)?;
            let (bit_offset, bitfield) = if r.kind_flag {
                (raw & 0xff_ffff, raw >> 24)
            } else {
                (raw, 0)
            };
            if mname == name {
                if bitfield != 0 || bit_offset % 8 != 0 {
                    return Err(format!("{name} is a bitfield"));
                }
                return Ok((bit_offset / 8, mty));
            }
            let nested = self.rec(mty)?.kind;
            if mname.is_empty()
                && (nested == STRUCT || nested == UNION)
                && let Ok((off, t)) = self.find(mty, name, depth + 1)
            {
                return Ok((bit_offset / 8 + off, t));
            }
        }
        Err(format!("no member {name}"))
    }

    /// `path` is a dotted member path inside `struct_name`, e.g. `__sk_common.skc_family`.
    pub fn member(&self, struct_name: &str, path: &str) -> Result<MemberInfo, String> {
        let mut current = self
            .find_struct(struct_name)
            .ok_or_else(|| format!("no struct {struct_name}"))?;
        let mut offset = 0;
        for name in path.split('.') {
            let (off, ty) = self.find(current, name, 0)?;
            offset += off;
            current = ty;
        }
        Ok(MemberInfo {
            offset,
            size: self.size_of(current)?,
        })
    }
}

/// The native-endian u32 at `at`, if the bytes are there.
fn ne_u32(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Bytes of a record's kind-specific data.
fn body_len(r: &Rec) -> Result<usize, String> {
    Ok(match r.kind {
        INT | VAR | DECL_TAG => 4,
        PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
        ARRAY => 12,
        STRUCT | UNION | DATASEC | ENUM64 => 12 * r.vlen,
        ENUM | FUNC_PROTO => 8 * r.vlen,
        kind => return Err(format!("unknown BTF kind {kind}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob from type records and a string section.
    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let type_bytes: Vec<u8> = types.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_ne_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [
            HEADER_LEN as u32,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        out.extend_from_slice(&type_bytes);
        out.extend_from_slice(strings);
        out
    }

    fn info(kind: u32, vlen: u32, kind_flag: bool) -> u32 {
        (kind << 24) | vlen | if kind_flag { 1 << 31 } else { 0 }
    }

    #[test]
    fn members_through_anonymous_unions_typedefs_and_arrays() {
        // Names: 1 "int", 5 "outer", 11 "a", 13 "arr", 17 "flag", 22 "u32t".
        let strings = b"\0int\0outer\0a\0arr\0flag\0u32t\0";
        #[rustfmt::skip]
        let types = [
            // 1: int, 4 bytes.
            1, info(INT, 0, false), 4, 32,
            // 2: typedef u32t -> 1.
            22, info(TYPEDEF, 0, false), 1,
            // 3: const -> 2.
            0, info(CONST, 0, false), 2,
            // 4: int[6] (index type 1).
            0, info(ARRAY, 0, false), 0, 3, 1, 6,
            // 5: anonymous union { u32t a at 0; int[6] arr at 0 }, 24 bytes.
            0, info(UNION, 2, false), 24, 11, 3, 0, 13, 4, 0,
            // 6: struct outer { int x at 0 (name "int" reused); anon union at 64 bits;
            //    bitfield flag: 3 bits at bit 256 }, 40 bytes, kind_flag set.
            5, info(STRUCT, 3, true), 40, 1, 1, 0, 0, 5, 64, 17, 1, (3 << 24) | 256,
        ];
        let btf = Btf::parse(blob(&types, strings)).unwrap();
        let a = btf.member("outer", "a").unwrap();
        assert_eq!((a.offset, a.size), (8, 4));
        let arr = btf.member("outer", "arr").unwrap();
        assert_eq!((arr.offset, arr.size), (8, 24));
        assert!(
            btf.member("outer", "flag")
                .unwrap_err()
                .contains("bitfield")
        );
        assert!(
            btf.member("outer", "nope")
                .unwrap_err()
                .contains("no member nope")
        );
        assert!(
            btf.member("inner", "a")
                .unwrap_err()
                .contains("no struct inner")
        );
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(Btf::parse(b"not btf at all, not at all".to_vec()).is_err());
        let mut truncated = blob(&[1, info(INT, 0, false), 4, 32], b"\0int\0");
        truncated.truncate(HEADER_LEN + 6);
        assert!(Btf::parse(truncated).is_err());
        let unknown = blob(&[1, info(31, 0, false), 4], b"\0int\0");
        assert!(
            Btf::parse(unknown)
                .unwrap_err()
                .contains("unknown BTF kind")
        );
    }

    /// The members the kernel programs read, as a general BTF library finds them in this
    /// machine's kernel: the same offsets and sizes. Skips with a sentence without kernel BTF.
    #[test]
    fn agrees_with_a_general_btf_library_on_this_kernel() {
        use btf_rs::Type;
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("skipped: needs kernel BTF at {}", path.display());
            return;
        }
        let ours = Btf::from_file(path).unwrap();
        let theirs = btf_rs::Btf::from_file(path).unwrap();
        let strip = |mut t: Type| loop {
            t = match &t {
                Type::Typedef(x) => theirs.resolve_chained_type(x).unwrap(),
                Type::Const(x) | Type::Volatile(x) | Type::Restrict(x) => {
                    theirs.resolve_chained_type(x).unwrap()
                }
                Type::TypeTag(x) => theirs.resolve_chained_type(x).unwrap(),
                _ => return t,
            }
        };
        fn find(
            btf: &btf_rs::Btf,
            strip: &dyn Fn(Type) -> Type,
            ty: &Type,
            name: &str,
        ) -> Option<(u32, Type)> {
            let (Type::Struct(s) | Type::Union(s)) = ty else {
                return None;
            };
            for m in &s.members {
                let mname = btf.resolve_name(m).unwrap_or_default();
                let mty = strip(btf.resolve_chained_type(m).ok()?);
                if mname == name {
                    return Some((m.bit_offset() / 8, mty));
                }
                if mname.is_empty()
                    && let Some((off, t)) = find(btf, strip, &mty, name)
                {
                    return Some((m.bit_offset() / 8 + off, t));
                }
            }
            None
        }
        let members = [
            ("task_struct", "files"),
            ("files_struct", "fdt"),
            ("fdtable", "max_fds"),
            ("fdtable", "fd"),
            ("file", "f_inode"),
            ("file", "private_data"),
            ("inode", "i_mode"),
            ("inode", "i_ino"),
            ("socket", "type"),
            ("socket", "sk"),
            ("sock", "sk_protocol"),
            ("sock", "__sk_common.skc_daddr"),
            ("sock", "__sk_common.skc_rcv_saddr"),
            ("sock", "__sk_common.skc_dport"),
            ("sock", "__sk_common.skc_num"),
            ("sock", "__sk_common.skc_family"),
            ("sock", "__sk_common.skc_v6_daddr"),
            ("sock", "__sk_common.skc_v6_rcv_saddr"),
            ("inet_sock", "inet_sport"),
            ("pt_regs", "di"),
        ];
        for (st, path) in members {
            let mut ty = theirs
                .resolve_types_by_name(st)
                .unwrap()
                .into_iter()
                .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
                .unwrap();
            let mut offset = 0;
            for name in path.split('.') {
                let (off, t) = find(&theirs, &strip, &ty, name).unwrap();
                offset += off;
                ty = t;
            }
            let size = match &ty {
                Type::Int(i) => i.size(),
                Type::Ptr(_) => 8,
                Type::Struct(s) | Type::Union(s) => s.size(),
                Type::Enum(e) => e.size(),
                other => panic!("{st}.{path}: {}", other.name()),
            };
            let m = ours.member(st, path).unwrap();
            assert_eq!((m.offset, m.size), (offset, size), "{st}.{path}");
        }
    }
}
