//! Opening the compute device.

use candle_core::{Device, Result};

/// CUDA device `ordinal`, set up for the way this crate uses it: every op of a model runs on
/// one thread's stream (candle's per-thread stream), so cudarc's cross-stream event tracking
/// can never order anything, yet it creates and destroys two CUDA events per allocation —
/// hundreds per decode step, on the host's critical path. It is turned off unless
/// `VLM_CUDA_EVENT_TRACKING=1` (kept to measure the difference).
pub fn cuda(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device
        && std::env::var("VLM_CUDA_EVENT_TRACKING").as_deref() != Ok("1")
    {
        // SAFETY: the crate never shares a buffer between streams (see above); tensors made
        // before this call (none: the device is new) would keep their events.
        unsafe { d.disable_event_tracking() };
    }
    Ok(device)
}
