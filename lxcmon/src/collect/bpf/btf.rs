//! A minimal reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): byte offsets of struct
//! members (through anonymous structs and unions) and enum values, which the BPF programs get as
//! globals because Rust BPF has no CO-RE relocations.

use std::collections::HashMap;

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF has no {0}")]
    Missing(String),
}

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    ty: u32,
    /// Bit offset from the start of the enclosing struct/union.
    bit_offset: u32,
}

#[derive(Debug, Clone)]
enum Type {
    Composite {
        name: u32,
        size: u32,
        members: Vec<Member>,
    },
    Enum {
        name: u32,
        values: Vec<(u32, i64)>,
    },
    /// typedef / const / volatile / restrict / type tag: refers to another type.
    Alias {
        ty: u32,
    },
    Other,
}

/// Parsed BTF: types by id (from 1) and the string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<String, Vec<u32>>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]))
            .ok_or(BtfError::Malformed("too short"))?;
        if magic != BTF_MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let tsec = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        let mut types = vec![Type::Other]; // id 0 is void
        let mut pos = 0usize;
        while pos < tsec.len() {
            let name = u32_at(tsec, pos)?;
            let info = u32_at(tsec, pos + 4)?;
            let size_or_type = u32_at(tsec, pos + 8)?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                KIND_INT => {
                    pos += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    pos += 12;
                    Type::Other
                }
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        let off = u32_at(tsec, m + 8)?;
                        members.push(Member {
                            name: u32_at(tsec, m)?,
                            ty: u32_at(tsec, m + 4)?,
                            bit_offset: if kind_flag { off & 0xff_ffff } else { off },
                        });
                    }
                    pos += vlen * 12;
                    Type::Composite {
                        name,
                        size: size_or_type,
                        members,
                    }
                }
                KIND_ENUM => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let e = pos + i * 8;
                        values.push((u32_at(tsec, e)?, i64::from(u32_at(tsec, e + 4)? as i32)));
                    }
                    pos += vlen * 8;
                    Type::Enum { name, values }
                }
                KIND_ENUM64 => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let e = pos + i * 12;
                        let lo = u64::from(u32_at(tsec, e + 4)?);
                        let hi = u64::from(u32_at(tsec, e + 8)?);
                        values.push((u32_at(tsec, e)?, ((hi << 32) | lo) as i64));
                    }
                    pos += vlen * 12;
                    Type::Enum { name, values }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias { ty: size_or_type }
                }
                KIND_FUNC_PROTO => {
                    pos += vlen * 8;
                    Type::Other
                }
                KIND_VAR | KIND_DECL_TAG => {
                    pos += 4;
                    Type::Other
                }
                KIND_DATASEC => {
                    pos += vlen * 12;
                    Type::Other
                }
                // PTR, FWD, FUNC, FLOAT: no extra data.
                2 | 7 | 12 | 16 => Type::Other,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            types.push(ty);
        }
        let mut this = Self {
            types,
            strings,
            by_name: HashMap::new(),
        };
        let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
        for (id, t) in this.types.iter().enumerate() {
            let name = match t {
                Type::Composite { name, .. } | Type::Enum { name, .. } => *name,
                _ => continue,
            };
            if name != 0 {
                by_name
                    .entry(this.str(name).to_string())
                    .or_default()
                    .push(id as u32);
            }
        }
        this.by_name = by_name;
        Ok(this)
    }

    pub fn from_sys_fs() -> std::io::Result<Self> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux")?;
        Self::parse(&data).map_err(std::io::Error::other)
    }

    fn str(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Alias { ty } => id = *ty,
                t => return Some(t),
            }
        }
        None
    }

    /// Bit offset of `field` in the composite type `id`, looking into anonymous members.
    fn find_in(&self, id: u32, field: &str, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        let Type::Composite { members, .. } = self.resolve(id)? else {
            return None;
        };
        for m in members {
            if m.name != 0 && self.str(m.name) == field {
                return Some((m.bit_offset, m.ty));
            }
        }
        for m in members.iter().filter(|m| m.name == 0) {
            if let Some((off, ty)) = self.find_in(m.ty, field, depth + 1) {
                return Some((m.bit_offset + off, ty));
            }
        }
        None
    }

    /// Byte offset of `path` (`member` or `member.sub`) in `struct <name>` (or union).
    pub fn member_offset(&self, name: &str, path: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing(format!("member {name}.{path}"));
        let ids = self.by_name.get(name).ok_or_else(missing)?;
        'ids: for &id in ids {
            if !matches!(self.types.get(id as usize), Some(Type::Composite { members, .. }) if !members.is_empty())
            {
                continue;
            }
            let mut cur = id;
            let mut bits = 0u32;
            for part in path.split('.') {
                match self.find_in(cur, part, 0) {
                    Some((off, ty)) => {
                        bits += off;
                        cur = ty;
                    }
                    None => continue 'ids,
                }
            }
            if bits & 7 != 0 {
                return Err(BtfError::Missing(format!(
                    "byte-aligned member {name}.{path}"
                )));
            }
            return Ok(bits / 8);
        }
        Err(missing())
    }

    /// Size in bytes of `struct <name>` (the first non-empty definition).
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .find_map(|&id| match self.types.get(id as usize) {
                Some(Type::Composite { size, members, .. }) if !members.is_empty() => Some(*size),
                _ => None,
            })
            .ok_or_else(|| BtfError::Missing(format!("struct {name}")))
    }

    /// The value of `variant` in `enum <name>`.
    pub fn enum_value(&self, name: &str, variant: &str) -> Result<i64, BtfError> {
        let missing = || BtfError::Missing(format!("enum value {name}::{variant}"));
        for &id in self.by_name.get(name).ok_or_else(missing)? {
            if let Some(Type::Enum { values, .. }) = self.types.get(id as usize) {
                if let Some((_, v)) = values.iter().find(|(n, _)| self.str(*n) == variant) {
                    return Ok(*v);
                }
            }
        }
        Err(missing())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF bytes: `struct s { int a; union { long b; struct { int c; int d; }; }; }` and
    /// `enum e { X = 6 }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0c\0d\0long\0e\0X\0";
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .map(|p| p as u32 + 1)
                .unwrap_or(0)
        };
        let mut t: Vec<u32> = Vec::new();
        // 1: int (size 4)
        t.extend([s("int"), KIND_INT << 24, 4, 32]);
        // 2: long (size 8)
        t.extend([s("long"), KIND_INT << 24, 8, 64]);
        // 3: anonymous struct { int c; int d; }
        t.extend([0, (KIND_STRUCT << 24) | 2, 8, s("c"), 1, 0, s("d"), 1, 32]);
        // 4: anonymous union { long b; struct 3; }
        t.extend([0, (KIND_UNION << 24) | 2, 8, s("b"), 2, 0, 0, 3, 0]);
        // 5: struct s { int a; union 4 (at 64 bits); }
        t.extend([s("s"), (KIND_STRUCT << 24) | 2, 16, s("a"), 1, 0, 0, 4, 64]);
        // 6: enum e { X = 6 }
        t.extend([s("e"), (KIND_ENUM << 24) | 1, 4, s("X"), 6]);
        let tbytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend(BTF_MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        for v in [
            24u32,
            0,
            tbytes.len() as u32,
            tbytes.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(v.to_le_bytes());
        }
        out.extend(tbytes);
        out.extend(strings);
        out
    }

    #[test]
    fn offsets_through_anonymous_members() {
        let btf = Btf::parse(&sample()).expect("parse");
        assert_eq!(btf.member_offset("s", "a").expect("a"), 0);
        assert_eq!(btf.member_offset("s", "b").expect("b"), 8);
        assert_eq!(btf.member_offset("s", "c").expect("c"), 8);
        assert_eq!(btf.member_offset("s", "d").expect("d"), 12);
        assert!(btf.member_offset("s", "zz").is_err());
        assert_eq!(btf.enum_value("e", "X").expect("X"), 6);
        assert_eq!(btf.struct_size("s").expect("size"), 16);
    }

    #[test]
    fn reads_the_running_kernel_when_present() {
        let Ok(btf) = Btf::from_sys_fs() else {
            return; // no kernel BTF here: nothing to compare against
        };
        // `struct list_head { next; prev; }` is the same on every kernel with BTF.
        assert_eq!(btf.member_offset("list_head", "next").expect("next"), 0);
        assert_eq!(btf.member_offset("list_head", "prev").expect("prev"), 8);
        assert_eq!(btf.struct_size("list_head").expect("size"), 16);
    }
}
