//! The device the golden tests run the model on: the CPU unless `VLM_TEST_DEVICE=cuda`
//! (a `--features cuda` build on a GPU machine, see scripts/gpu-check.sh).

use std::sync::OnceLock;

use candle_core::Device;

/// One device per test process: candle treats two `Device::new_cuda(0)` as different devices.
pub fn test_device() -> Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE
        .get_or_init(|| match std::env::var("VLM_TEST_DEVICE").as_deref() {
            Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
            Ok("cuda") => vlm_server::device::cuda(0)
                .expect("VLM_TEST_DEVICE=cuda needs a GPU and a build with `--features cuda`"),
            Ok(other) => panic!("VLM_TEST_DEVICE={other:?}: expected `cpu` or `cuda`"),
        })
        .clone()
}
