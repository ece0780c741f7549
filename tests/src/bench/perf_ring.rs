//! A perf ring for `bench_notify` that wakes its reader only at a
//! watermark (half the ring), opened by hand: aya opens every ring with a
//! wakeup per record (as cilium/ebpf's default reader does), and on a VM
//! that wakeup (an IPI per record) dominates the notify's cost. With this
//! ring the records are written and drained between test runs and nobody
//! is woken, so the figure is the cheapest notify that still writes its
//! record: the conservative basis of the tap's share.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};
use aya_obj::generated::{
    perf_event_attr, perf_event_mmap_page, perf_event_sample_format::PERF_SAMPLE_RAW,
    perf_sw_ids::PERF_COUNT_SW_BPF_OUTPUT, perf_type_id::PERF_TYPE_SOFTWARE,
};

/// `PERF_FLAG_FD_CLOEXEC` (include/uapi/linux/perf_event.h).
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;

pub struct WatermarkRing {
    fd: OwnedFd,
    page: *mut perf_event_mmap_page,
    len: usize,
}

impl WatermarkRing {
    /// A ring of `pages` data pages on `cpu`, waking at half its size.
    pub fn open(cpu: u32, pages: usize) -> Result<WatermarkRing> {
        // SAFETY: a zeroed perf_event_attr is the documented starting point.
        let mut attr: perf_event_attr = unsafe { std::mem::zeroed() };
        let page_size = page_size();
        attr.size = size_of::<perf_event_attr>() as u32;
        attr.type_ = PERF_TYPE_SOFTWARE as u32;
        attr.config = PERF_COUNT_SW_BPF_OUTPUT as u64;
        attr.sample_type = PERF_SAMPLE_RAW as u64;
        attr.__bindgen_anon_1.sample_period = 1;
        attr.set_watermark(1);
        attr.__bindgen_anon_2.wakeup_watermark = (pages * page_size / 2) as u32;
        // SAFETY: a valid attr; pid -1 with a CPU: every process on that CPU.
        let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr, -1, cpu as i32, -1, PERF_FLAG_FD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("perf_event_open of a BPF output event (CAP_PERFMON)");
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let len = (pages + 1) * page_size;
        // SAFETY: mapping the event's ring as the perf ABI describes.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the perf ring");
        }
        Ok(WatermarkRing { fd, page: base.cast(), len })
    }

    /// Puts this ring at `index` of the perf event array `map`.
    pub fn install(&self, map: BorrowedFd<'_>, index: u32) -> Result<()> {
        let value = self.fd.as_raw_fd() as u32;
        #[repr(C)]
        struct UpdateElem {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let attr = UpdateElem {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: &index as *const u32 as u64,
            value: &value as *const u32 as u64,
            flags: 0,
        };
        // SAFETY: BPF_MAP_UPDATE_ELEM (2) with pointers that outlive the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, 2, &attr, size_of::<UpdateElem>()) };
        if rc != 0 {
            bail!("putting the watermark ring into BENCH_EVENTS: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Bytes written since the last drain; then marks them read.
    pub fn drain(&mut self) -> u64 {
        // SAFETY: the control page of a live mapping; head is read with
        // acquire and tail written with release, as the perf ABI asks.
        unsafe {
            let head = std::ptr::addr_of!((*self.page).data_head);
            let tail = std::ptr::addr_of_mut!((*self.page).data_tail);
            let h = (*(head as *const std::sync::atomic::AtomicU64)).load(std::sync::atomic::Ordering::Acquire);
            let t = (*(tail as *const std::sync::atomic::AtomicU64)).load(std::sync::atomic::Ordering::Relaxed);
            (*(tail as *const std::sync::atomic::AtomicU64)).store(h, std::sync::atomic::Ordering::Release);
            h - t
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for WatermarkRing {
    fn drop(&mut self) {
        // SAFETY: unmapping what `open` mapped.
        unsafe { libc::munmap(self.page.cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}
