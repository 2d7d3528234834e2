//! GPU memory in use, read through NVML (`libnvidia-ml.so.1`, which comes with the NVIDIA driver) when it
//! can be loaded. libtorch's allocator statistics are not reachable through tch, and NVML also counts
//! memory the caching allocator holds, which is what decides whether a job fits on its GPU.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

#[repr(C)]
#[derive(Default)]
struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

type Init = unsafe extern "C" fn() -> c_int;
type HandleByIndex = unsafe extern "C" fn(c_uint, *mut *mut c_void) -> c_int;
type MemoryInfo = unsafe extern "C" fn(*mut c_void, *mut NvmlMemory) -> c_int;

struct Nvml {
    handle_by_index: HandleByIndex,
    memory_info: MemoryInfo,
}

fn symbol(lib: *mut c_void, name: &CStr) -> Option<*mut c_void> {
    // SAFETY: `lib` is a live handle from dlopen and `name` is NUL-terminated.
    let ptr = unsafe { libc::dlsym(lib, name.as_ptr() as *const c_char) };
    (!ptr.is_null()).then_some(ptr)
}

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| {
        // SAFETY: dlopen with a NUL-terminated name; the library stays loaded for the process.
        let lib = unsafe { libc::dlopen(c"libnvidia-ml.so.1".as_ptr(), libc::RTLD_NOW) };
        if lib.is_null() {
            return None;
        }
        let init = symbol(lib, c"nvmlInit_v2")?;
        let handle_by_index = symbol(lib, c"nvmlDeviceGetHandleByIndex_v2")?;
        let memory_info = symbol(lib, c"nvmlDeviceGetMemoryInfo")?;
        // SAFETY: the symbols have these signatures in every NVML since CUDA 5 (nvml.h).
        unsafe {
            let init: Init = std::mem::transmute::<*mut c_void, Init>(init);
            if init() != 0 {
                return None;
            }
            Some(Nvml {
                handle_by_index: std::mem::transmute::<*mut c_void, HandleByIndex>(handle_by_index),
                memory_info: std::mem::transmute::<*mut c_void, MemoryInfo>(memory_info),
            })
        }
    })
    .as_ref()
}

/// Bytes of memory in use on GPU `index` (NVML's numbering, which is CUDA's inside a container that
/// sees only its own GPUs); None without NVML or such a device.
pub fn memory_used(index: usize) -> Option<u64> {
    let nvml = nvml()?;
    let index = c_uint::try_from(index).ok()?;
    let mut device = std::ptr::null_mut();
    let mut memory = NvmlMemory::default();
    // SAFETY: NVML is initialised; both out-pointers point at live, correctly laid out values.
    unsafe {
        if (nvml.handle_by_index)(index, &mut device) != 0 {
            return None;
        }
        if (nvml.memory_info)(device, &mut memory) != 0 {
            return None;
        }
    }
    Some(memory.used)
}

#[cfg(test)]
mod tests {
    #[test]
    fn answers_without_panicking_with_or_without_a_gpu() {
        // Without a driver this is None; with one, a plausible size.
        if let Some(used) = super::memory_used(0) {
            assert!(used < 1 << 50);
        }
        assert_eq!(super::memory_used(usize::MAX), None);
    }
}
