//! Choosing the device and floating-point kind from user-facing names.

use crate::error::{ModelError, Result};
use tch::{Device, Kind};

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`; `auto` picks CUDA when available.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => Err(ModelError::Input(format!(
                "unknown device `{other}` (use auto, cpu, cuda or cuda:N)"
            ))),
        },
    }
}

/// Waits until `device` has finished all queued work (a no-op on the CPU).
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn cuda(i: usize) -> Result<Device> {
    let n = tch::Cuda::device_count() as usize;
    if i >= n {
        return Err(ModelError::Input(format!(
            "CUDA device {i} requested but {n} visible (is libtorch_cuda linked and a GPU present?)"
        )));
    }
    Ok(Device::Cuda(i))
}

/// Parses `auto`, `f32`, `bf16` or `f16`; `auto` is bf16 on CUDA and f32 on CPU.
pub fn parse_kind(name: &str, device: Device) -> Result<Kind> {
    match name {
        "auto" if device.is_cuda() => Ok(Kind::BFloat16),
        "auto" | "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        other => Err(ModelError::Input(format!(
            "unknown dtype `{other}` (use auto, f32, bf16 or f16)"
        ))),
    }
}
