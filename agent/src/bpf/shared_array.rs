//! A `BPF_F_MMAPABLE` array mapped into the agent: the flow table, the
//! world-port table and the flow config are read and written as memory, no
//! syscall per entry.
//!
//! The kernel writes these arrays while we read them. Every access goes
//! through a raw pointer with a volatile load or store of one naturally
//! aligned integer (single-copy atomic on every architecture the agent
//! ships for), never through a Rust reference to the shared memory.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::{Map, MapData};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SharedArrayError {
    #[error("map {map} is not an array")]
    NotAnArray { map: &'static str },
    #[error("map {map} has {found}-byte values, this agent expects {expected}: pins of another build? remove them")]
    ValueSize { map: &'static str, found: u32, expected: usize },
    #[error("cannot read the properties of map {map}")]
    Info {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot map {map} into memory (created without BPF_F_MMAPABLE? remove its pin)")]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A mapping of `entries` values of type `T`.
pub struct SharedArray<T> {
    base: NonNull<T>,
    entries: u32,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory; all access is through
// volatile loads and stores of integers (see the module comment).
unsafe impl<T> Send for SharedArray<T> {}
unsafe impl<T> Sync for SharedArray<T> {}

impl<T> SharedArray<T> {
    /// Maps the array `map` (named `name` for errors).
    pub fn map(map: &Map, name: &'static str) -> Result<SharedArray<T>, SharedArrayError> {
        let Map::Array(data) = map else {
            return Err(SharedArrayError::NotAnArray { map: name });
        };
        SharedArray::from_data(data, name)
    }

    pub fn from_data(data: &MapData, name: &'static str) -> Result<SharedArray<T>, SharedArrayError> {
        let info = data.info().map_err(|source| SharedArrayError::Info { map: name, source })?;
        if info.value_size() as usize != size_of::<T>() || !size_of::<T>().is_multiple_of(8) {
            return Err(SharedArrayError::ValueSize { map: name, found: info.value_size(), expected: size_of::<T>() });
        }
        let entries = info.max_entries();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let bytes = (entries as usize * size_of::<T>()).div_ceil(page) * page;
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's fd; checked below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(SharedArrayError::Mmap { map: name, source: std::io::Error::last_os_error() });
        }
        let base = NonNull::new(ptr.cast::<T>())
            .ok_or(SharedArrayError::Mmap { map: name, source: std::io::Error::other("mmap returned NULL") })?;
        Ok(SharedArray { base, entries, bytes })
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Pointer to entry `index`, `None` past the end. Use it only with
    /// [`load`]/[`store`] on integer fields.
    pub fn entry(&self, index: u32) -> Option<*mut T> {
        // SAFETY: in bounds of the mapping.
        (index < self.entries).then(|| unsafe { self.base.as_ptr().add(index as usize) })
    }
}

impl<T> Drop for SharedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `from_data`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// A volatile load of an integer in shared memory.
///
/// # Safety
/// `p` points into a live [`SharedArray`] mapping and is aligned.
pub unsafe fn load<V: Copy>(p: *const V) -> V {
    // SAFETY: the caller's promise.
    unsafe { std::ptr::read_volatile(p) }
}

/// A volatile store of an integer in shared memory.
///
/// # Safety
/// As [`load`].
pub unsafe fn store<V: Copy>(p: *mut V, v: V) {
    // SAFETY: the caller's promise.
    unsafe { std::ptr::write_volatile(p, v) }
}
