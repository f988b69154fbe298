//! The explicit per-layer KV cache passed to [`crate::model::Model::forward`].
//!
//! Keys are stored after RoPE, together with the absolute position of every
//! entry. Positions are kept explicitly (not implied by the index) so that a
//! cache can hold an arbitrary subset of a sequence — e.g. the kept positions
//! of a compressed context — and decoding continues at the original positions.

use crate::error::{ModelError, Result};
use tch::{Kind, Tensor};

/// Keys and values of one layer, `[batch, kv_heads, len, head_dim]`.
#[derive(Debug)]
pub struct LayerKv {
    /// Keys (RoPE applied).
    pub k: Tensor,
    /// Values.
    pub v: Tensor,
}

/// A KV cache for every layer plus the positions and validity of its entries.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// `[batch, len]` int64 absolute positions of the cached entries.
    positions: Option<Tensor>,
    /// `[batch, len]` bool, false for padding entries; `None` means all valid.
    valid: Option<Tensor>,
    /// `[batch]` next position when it is not one past the largest cached one
    /// (a compressed context whose last positions were dropped).
    next: Option<Tensor>,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            positions: None,
            valid: None,
            next: None,
        }
    }

    /// A cache from per-layer K/V `[batch, kv_heads, len, head_dim]`, positions
    /// `[batch, len]`, optional validity and next positions `[batch]`.
    pub fn from_parts(
        layers: Vec<LayerKv>,
        positions: Tensor,
        valid: Option<Tensor>,
        next: Option<Tensor>,
    ) -> Result<Self> {
        let (b, len) = positions.size2()?;
        for (i, l) in layers.iter().enumerate() {
            let (kb, _, kl, _) = l.k.size4()?;
            if (kb, kl) != (b, len) || l.k.size() != l.v.size() {
                return Err(ModelError::Input(format!(
                    "layer {i}: K {:?} / V {:?} do not match positions [{b}, {len}]",
                    l.k.size(),
                    l.v.size()
                )));
            }
        }
        if valid.as_ref().is_some_and(|v| v.size() != [b, len]) {
            return Err(ModelError::Input(
                "validity does not match positions".into(),
            ));
        }
        if next.as_ref().is_some_and(|n| n.size() != [b]) {
            return Err(ModelError::Input(
                "next positions do not match the batch".into(),
            ));
        }
        Ok(KvCache {
            layers: layers.into_iter().map(Some).collect(),
            positions: Some(positions),
            valid,
            next,
        })
    }

    /// A copy sharing the tensors (appending to either never affects the other).
    pub fn shallow_clone(&self) -> Self {
        let sc = |t: &Option<Tensor>| t.as_ref().map(Tensor::shallow_clone);
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.as_ref().map(|l| LayerKv {
                        k: l.k.shallow_clone(),
                        v: l.v.shallow_clone(),
                    })
                })
                .collect(),
            positions: sc(&self.positions),
            valid: sc(&self.valid),
            next: sc(&self.next),
        }
    }

    /// Number of layers this cache is for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Number of cached entries per sequence (0 when empty).
    pub fn len(&self) -> i64 {
        self.positions.as_ref().map_or(0, |p| p.size()[1])
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions of the cached entries, `[batch, len]`.
    pub fn positions(&self) -> Option<&Tensor> {
        self.positions.as_ref()
    }

    /// Validity of the cached entries, `[batch, len]` (None: all valid).
    pub fn valid(&self) -> Option<&Tensor> {
        self.valid.as_ref()
    }

    /// Cached K/V of layer `i`.
    pub fn layer(&self, i: usize) -> Option<&LayerKv> {
        self.layers.get(i).and_then(Option::as_ref)
    }

    /// The next position of each sequence, `[batch]`: one past the largest cached
    /// position, or past the end of the source context for a compressed cache.
    pub fn next_positions(&self) -> Option<Tensor> {
        let past_max = self
            .positions
            .as_ref()
            .map(|p| p.amax([1].as_slice(), false) + 1);
        match (&self.next, past_max) {
            (Some(n), Some(m)) => Some(n.maximum(&m)),
            (Some(n), None) => Some(n.shallow_clone()),
            (None, m) => m,
        }
    }

    /// Sets where the next token of each sequence goes, `[batch]` (e.g. the
    /// original context length after compression dropped its last positions).
    pub fn set_next_positions(&mut self, next: Tensor) -> Result<()> {
        if next.size() != [self.batch()] {
            return Err(ModelError::Input(format!(
                "next positions {:?} do not match the batch {}",
                next.size(),
                self.batch()
            )));
        }
        self.next = Some(next);
        Ok(())
    }

    /// Appends K/V of layer `i`; returns the layer's full K/V after appending.
    pub fn append_layer(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(i)
            .ok_or_else(|| ModelError::Input(format!("cache has no layer {i}")))?;
        let (k_all, v_all) = match slot.take() {
            None => (k.shallow_clone(), v.shallow_clone()),
            Some(old) => (
                Tensor::f_cat(&[&old.k, k], 2)?,
                Tensor::f_cat(&[&old.v, v], 2)?,
            ),
        };
        *slot = Some(LayerKv {
            k: k_all.shallow_clone(),
            v: v_all.shallow_clone(),
        });
        Ok((k_all, v_all))
    }

    /// Makes every layer's K/V a leaf of autograd (detached, requiring its
    /// gradient): after a backward through computations that read them,
    /// their `grad()` holds the loss's gradient with respect to them.
    pub fn make_leaves(&mut self) -> Result<()> {
        for (i, slot) in self.layers.iter_mut().enumerate() {
            let l = slot
                .as_mut()
                .ok_or_else(|| ModelError::Input(format!("layer {i} of the cache is empty")))?;
            l.k = l.k.detach().set_requires_grad(true);
            l.v = l.v.detach().set_requires_grad(true);
        }
        Ok(())
    }

    /// Records the positions (and validity) of entries just appended to every layer.
    pub fn append_positions(&mut self, positions: &Tensor, valid: Option<&Tensor>) -> Result<()> {
        let new_len = positions.size()[1];
        let old_len = self.len();
        let batch = positions.size()[0];
        self.valid = match (self.valid.take(), valid) {
            (None, None) => None,
            (old, new) => {
                let dev = positions.device();
                let old = old.unwrap_or_else(|| Tensor::ones([batch, old_len], (Kind::Bool, dev)));
                let new = match new {
                    Some(v) => v.shallow_clone(),
                    None => Tensor::ones([batch, new_len], (Kind::Bool, dev)),
                };
                Some(Tensor::f_cat(&[old, new], 1)?)
            }
        };
        self.positions = Some(match self.positions.take() {
            None => positions.shallow_clone(),
            Some(old) => Tensor::f_cat(&[&old, positions], 1)?,
        });
        Ok(())
    }

    /// A new cache holding, for every layer, the entries at `index` (`[batch, k]`
    /// int64 indices into this cache's entries), with their original positions.
    pub fn gather(&self, index: &Tensor) -> Result<KvCache> {
        let positions = self
            .positions
            .as_ref()
            .ok_or_else(|| ModelError::Input("cannot gather from an empty cache".into()))?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let layer = layer
                .as_ref()
                .ok_or_else(|| ModelError::Input(format!("layer {i} of the cache is empty")))?;
            let (b, h, _, d) = layer.k.size4()?;
            let n = index.size()[1];
            let idx = index.view([b, 1, n, 1]).expand([b, h, n, d], false);
            layers.push(Some(LayerKv {
                k: layer.k.f_gather(2, &idx, false)?,
                v: layer.v.f_gather(2, &idx, false)?,
            }));
        }
        Ok(KvCache {
            layers,
            next: self.next_positions(),
            positions: Some(positions.f_gather(1, index, false)?),
            valid: match &self.valid {
                Some(v) => Some(v.f_gather(1, index, false)?),
                None => None,
            },
        })
    }

    /// Marks entries invalid where `mask` (`[batch, len]` bool) is false; such
    /// entries are never attended to.
    pub fn and_valid(&mut self, mask: &Tensor) -> Result<()> {
        if mask.size() != [self.batch(), self.len()] {
            return Err(ModelError::Input(format!(
                "validity mask {:?} does not match the cache [{}, {}]",
                mask.size(),
                self.batch(),
                self.len()
            )));
        }
        self.valid = Some(match self.valid.take() {
            Some(v) => v.f_logical_and(mask)?,
            None => mask.shallow_clone(),
        });
        Ok(())
    }

    /// Batch size (0 when empty).
    pub fn batch(&self) -> i64 {
        self.positions.as_ref().map_or(0, |p| p.size()[0])
    }

    /// Bytes held by the cached keys and values.
    pub fn memory_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| {
                let el = l.k.kind().elt_size_in_bytes();
                (l.k.numel() + l.v.numel()) * el
            })
            .sum()
    }
}
