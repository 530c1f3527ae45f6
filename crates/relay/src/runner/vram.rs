//! GPU memory for `stream_heartbeat`, read through NVML when a GPU is present.
//!
//! NVML is loaded at run time (`libnvidia-ml.so`), so the runner builds and runs everywhere; on a
//! machine without an NVIDIA driver [`Vram::probe`] answers `None` and heartbeats omit the fields,
//! as the spec asks.

use nvml_wrapper::Nvml;

/// A handle on GPU 0's memory counters.
pub struct Vram {
    nvml: Nvml,
}

impl Vram {
    /// Opens NVML, or `None` when there is no driver or no GPU.
    pub fn probe() -> Option<Vram> {
        let nvml = Nvml::init().ok()?;
        let count = nvml.device_count().ok()?;
        (count > 0).then_some(Vram { nvml })
    }

    /// `(allocated_mb, reserved_mb)`: memory this process holds on GPU 0 (device-wide use when the
    /// driver does not attribute memory to processes), and memory in use on the device.
    pub fn read(&self) -> Option<(f64, f64)> {
        let device = self.nvml.device_by_index(0).ok()?;
        let info = device.memory_info().ok()?;
        let pid = std::process::id();
        let ours = device
            .running_compute_processes()
            .ok()
            .and_then(|procs| procs.into_iter().find(|p| p.pid == pid))
            .and_then(|p| match p.used_gpu_memory {
                nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) => Some(bytes),
                nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
            })
            .unwrap_or(info.used);
        Some((mb(ours), mb(info.used)))
    }

    /// The GPU's name, for the runner's start-up log.
    pub fn device_name(&self) -> Option<String> {
        self.nvml.device_by_index(0).ok()?.name().ok()
    }
}

/// MiB with one decimal, as the seed reports torch's `memory_allocated` / `memory_reserved`.
fn mb(bytes: u64) -> f64 {
    (bytes as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0
}
