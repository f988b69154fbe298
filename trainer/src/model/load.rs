//! Typed weight access during model construction: name prefix, dtype, device
//! and shape checks in one place.

use super::linear::Linear;
use crate::error::{ModelError, Result};
use crate::weights::WeightSource;
use tch::{Device, Kind, Tensor};

/// Loads weights from a source into tensors of one kind on one device.
pub struct Loader<'a> {
    src: &'a dyn WeightSource,
    prefix: String,
    kind: Kind,
    device: Device,
}

impl<'a> Loader<'a> {
    /// A loader for names under `prefix` (e.g. `"model."`).
    pub fn new(src: &'a dyn WeightSource, prefix: &str, kind: Kind, device: Device) -> Self {
        Loader {
            src,
            prefix: prefix.to_string(),
            kind,
            device,
        }
    }

    /// The same source and settings under another prefix.
    pub fn with_prefix(&self, prefix: &str) -> Loader<'a> {
        Loader::new(self.src, prefix, self.kind, self.device)
    }

    /// Whether the source has `name` (under the prefix).
    pub fn contains(&self, name: &str) -> bool {
        self.src.contains(&format!("{}{name}", self.prefix))
    }

    /// Loads `name` (under the prefix), checks its shape, converts kind and device.
    pub fn weight(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let t = self
            .src
            .load(&full, shape)?
            .ok_or_else(|| ModelError::MissingWeight {
                path: self.src.path().to_path_buf(),
                name: full.clone(),
            })?;
        if t.size() != shape {
            return Err(ModelError::WeightShape {
                path: self.src.location(&full),
                name: full,
                got: t.size(),
                expected: shape.to_vec(),
            });
        }
        Ok(t.f_to_kind(self.kind)?.f_to_device(self.device)?)
    }

    /// Loads `{name}.weight` `[out, in]` and, if `bias`, `{name}.bias` `[out]`.
    pub fn linear(&self, name: &str, out: i64, inp: i64, bias: bool) -> Result<Linear> {
        let (weight, bias) = self.linear_parts(name, out, inp, bias)?;
        Ok(Linear::new(weight, bias))
    }

    /// The weight and bias of [`Loader::linear`], unwrapped (for [`super::linear::Stacked`]).
    pub fn linear_parts(
        &self,
        name: &str,
        out: i64,
        inp: i64,
        bias: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        Ok((
            self.weight(&format!("{name}.weight"), &[out, inp])?,
            if bias {
                Some(self.weight(&format!("{name}.bias"), &[out])?)
            } else {
                None
            },
        ))
    }
}
