//! Just enough of a BTF reader to find what the tap needs in the running
//! kernel: the byte offset of `id` in `struct bpf_map`, whether the hooked
//! function exists, and the BTF ID of the one kfunc the direct-read tap
//! calls with the feature flag that says the kernel accepts that call. Offsets differ between kernels and configs, so
//! they are read, never hard-coded.

use std::path::Path;

use thiserror::Error;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC: u32 = 12;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF at {path}: {source}; the tap needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")]
    Read { path: String, source: std::io::Error },
    #[error("kernel BTF at {path} is malformed: {what}")]
    Malformed { path: String, what: &'static str },
    #[error("kernel BTF has no `{0}`; this kernel is not supported by the tap")]
    Missing(String),
}

/// A kernel BTF blob, parsed lazily.
pub struct KernelBtf {
    path: String,
    data: Vec<u8>,
    type_off: usize,
    type_len: usize,
    str_off: usize,
    str_len: usize,
}

/// One parsed type: its kind, name and member area.
struct TypeEntry {
    kind: u32,
    name_off: u32,
    vlen: usize,
    kind_flag: bool,
    /// Offset of the member list within `data`.
    members_at: usize,
}

impl KernelBtf {
    pub fn load(path: &Path) -> Result<KernelBtf, BtfError> {
        let display = path.display().to_string();
        let data = std::fs::read(path).map_err(|source| BtfError::Read { path: display.clone(), source })?;
        Self::parse(display, data)
    }

    fn parse(path: String, data: Vec<u8>) -> Result<KernelBtf, BtfError> {
        let malformed = |what| BtfError::Malformed { path: path.clone(), what };
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            return Err(malformed("bad magic (not little-endian BTF)"));
        }
        let rd = |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]) as usize;
        let hdr_len = rd(4);
        let (type_off, type_len, str_off, str_len) = (rd(8), rd(12), rd(16), rd(20));
        let base = hdr_len;
        if base + type_off + type_len > data.len() || base + str_off + str_len > data.len() {
            return Err(malformed("sections outside the file"));
        }
        Ok(KernelBtf { type_off: base + type_off, type_len, str_off: base + str_off, str_len, data, path })
    }

    fn u32_at(&self, o: usize) -> u32 {
        u32::from_le_bytes([self.data[o], self.data[o + 1], self.data[o + 2], self.data[o + 3]])
    }

    fn name(&self, off: u32) -> &[u8] {
        let start = self.str_off + off as usize;
        let end = self.str_off + self.str_len;
        if start >= end {
            return b"";
        }
        let s = &self.data[start..end];
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    /// All types in ID order (ID 1 first).
    fn types(&self) -> Result<Vec<TypeEntry>, BtfError> {
        let mut out = Vec::new();
        let mut at = self.type_off;
        let end = self.type_off + self.type_len;
        while at + 12 <= end {
            let name_off = self.u32_at(at);
            let info = self.u32_at(at + 4);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
                _ => return Err(BtfError::Malformed { path: self.path.clone(), what: "unknown type kind" }),
            };
            out.push(TypeEntry { kind, name_off, vlen, kind_flag: info >> 31 == 1, members_at: at + 12 });
            at += 12 + extra;
        }
        Ok(out)
    }

    /// Whether a global function of this name exists (the tap's hook).
    pub fn has_function(&self, name: &str) -> Result<bool, BtfError> {
        Ok(self.types()?.iter().any(|t| t.kind == KIND_FUNC && self.name(t.name_off) == name.as_bytes()))
    }

    /// BTF ID of the function `name` (what a kfunc call's immediate holds).
    pub fn function_id(&self, name: &str) -> Result<Option<u32>, BtfError> {
        let types = self.types()?;
        Ok(types
            .iter()
            .position(|t| t.kind == KIND_FUNC && self.name(t.name_off) == name.as_bytes())
            .map(|i| i as u32 + 1))
    }

    /// Whether `enum name` has the enumerator `value` (the kernel announces
    /// verifier features that way, for example `enum bpf_features`).
    pub fn enum_has_value(&self, name: &str, value: &str) -> Result<bool, BtfError> {
        let types = self.types()?;
        Ok(types
            .iter()
            .filter(|t| t.kind == KIND_ENUM && self.name(t.name_off) == name.as_bytes())
            .any(|t| (0..t.vlen).any(|i| self.name(self.u32_at(t.members_at + 8 * i)) == value.as_bytes())))
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous
    /// struct and union members.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let types = self.types()?;
        let st = types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == name.as_bytes() && t.vlen > 0)
            .ok_or_else(|| BtfError::Missing(format!("struct {name}")))?;
        self.find_member(&types, st, member.as_bytes(), 0, 0)
            .ok_or_else(|| BtfError::Missing(format!("struct {name}.{member}")))
    }

    fn find_member(&self, types: &[TypeEntry], t: &TypeEntry, member: &[u8], base_bits: u32, depth: u8) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for i in 0..t.vlen {
            let at = t.members_at + 12 * i;
            let m_name = self.u32_at(at);
            let m_type = self.u32_at(at + 4);
            let raw = self.u32_at(at + 8);
            let bits = base_bits + if t.kind_flag { raw & 0x00ff_ffff } else { raw };
            if self.name(m_name) == member {
                return bits.is_multiple_of(8).then_some(bits / 8);
            }
            if m_name == 0 {
                let inner = types.get((m_type as usize).checked_sub(1)?)?;
                if (inner.kind == KIND_STRUCT || inner.kind == KIND_UNION)
                    && let Some(off) = self.find_member(types, inner, member, bits, depth + 1)
                {
                    return Some(off);
                }
            }
        }
        None
    }
}
