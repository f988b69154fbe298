//! Multi-head attention with GQA, RoPE, optional QK-norm and the KV cache; on
//! request, its probabilities for an observer hook.

use super::cache::KvCache;
use super::hooks::{Hooks, Proj};
use super::linear::{Linear, Stacked};
use super::norm::RmsNorm;
use super::rope;
use crate::error::{ModelError, Result};
use std::cell::RefCell;
use tch::{Kind, Tensor};

/// Queries per chunk when attention probabilities are computed for an observer
/// ([`Hooks::observe_attention`]): bounds the extra memory to
/// `batch * heads * OBSERVE_CHUNK * keys` floats.
pub const OBSERVE_CHUNK: i64 = 256;

/// Which keys each query may see.
#[derive(Debug)]
pub enum AttnMask {
    /// Plain causal attention over a fresh sequence (no cache, no padding, no
    /// effective window): SDPA's `is_causal` fast path.
    Causal,
    /// Explicit boolean mask `[batch, 1, q_len, k_len]`, true = may attend.
    Explicit(Tensor),
}

/// Per-forward inputs shared by the layers of one attention kind.
#[derive(Debug)]
pub struct AttnInputs {
    /// RoPE cosines `[batch, 1, q_len, head_dim]`.
    pub cos: Tensor,
    /// RoPE sines, signed (`[-sin, sin]`, see [`rope::apply`]).
    pub sin: Tensor,
    /// The mask.
    pub mask: AttnMask,
    /// The explicit path's additive term for the last bias seen (that bias,
    /// and it as float32 `[batch, 1, q_len, k_len]` with `-inf` where the mask
    /// forbids): layers sharing one bias tensor build it once.
    pub prepared_bias: RefCell<Option<(Tensor, Tensor)>>,
}

impl AttnInputs {
    /// RoPE tables and mask, with nothing prepared yet.
    pub fn new(cos: Tensor, sin: Tensor, mask: AttnMask) -> Self {
        AttnInputs {
            cos,
            sin,
            mask,
            prepared_bias: RefCell::new(None),
        }
    }

    /// `bias` `[batch, keys]` as the additive term of the explicit attention
    /// over `tq` queries and `tk` keys: float32 `[batch, 1, tq, tk]`, `-inf`
    /// where the mask forbids.
    fn additive(&self, bias: &Tensor, tq: i64, tk: i64) -> Result<Tensor> {
        let mut memo = self.prepared_bias.borrow_mut();
        if let Some((src, add)) = memo.as_ref() {
            if src.data_ptr() == bias.data_ptr() && add.size()[2..] == [tq, tk] {
                return Ok(add.shallow_clone());
            }
        }
        let allowed = match &self.mask {
            AttnMask::Causal => Tensor::ones([tq, tk], (Kind::Bool, bias.device())).tril(tk - tq),
            AttnMask::Explicit(m) => m.shallow_clone(),
        };
        let add = bias
            .f_to_kind(Kind::Float)?
            .unsqueeze(1)
            .unsqueeze(1)
            .f_masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)?;
        *memo = Some((bias.shallow_clone(), add.shallow_clone()));
        Ok(add)
    }
}

/// One self-attention block.
#[derive(Debug)]
pub struct Attention {
    /// Query, key and value projections, stacked (parts 0, 1, 2).
    pub qkv: Stacked,
    /// Output projection.
    pub o_proj: Linear,
    /// Per-head RMSNorm of queries (Gemma 3).
    pub q_norm: Option<RmsNorm>,
    /// Per-head RMSNorm of keys (Gemma 3).
    pub k_norm: Option<RmsNorm>,
    /// Query heads.
    pub num_heads: i64,
    /// Key/value heads.
    pub num_kv_heads: i64,
    /// Width of a head.
    pub head_dim: i64,
    /// Multiplier of q·k.
    pub scale: f64,
}

impl Attention {
    /// Runs attention of layer `layer` for `x` `[batch, seq, hidden]`; appends this
    /// layer's K/V to `cache` when given and attends over everything cached.
    pub fn forward(
        &self,
        x: &Tensor,
        inputs: &AttnInputs,
        cache: Option<&mut KvCache>,
        layer: usize,
        hooks: &dyn Hooks,
    ) -> Result<Tensor> {
        let (b, t, d) = x.size3()?;
        // The projections see `[batch * seq, hidden]`: a linear map over a 2-D
        // input is one matrix product, where a 3-D one adds a reshape and a
        // view around it (and their autograd nodes), four projections a layer.
        let rows = x.f_reshape([b * t, d])?;
        let (q, k, v) = self.project(&rows, (b, t), inputs, layer, hooks, true)?;
        let q = q.ok_or_else(|| ModelError::Input("attention: no queries projected".into()))?;
        hooks.observe_qkv(layer, &q, &k, &v)?;
        let q = rope::apply(&q, &inputs.cos, &inputs.sin);
        let (k, v) = match cache {
            Some(cache) => cache.append_layer(layer, &k, &v)?,
            None => (k, v),
        };
        let bias = hooks.attn_bias(layer);
        if hooks.wants_attention(layer) {
            self.observe(&q, &k, &inputs.mask, bias.as_ref(), layer, hooks)?;
        }
        let out = match &bias {
            Some(bias) => self.attend_explicit(&q, &k, &v, inputs, bias)?,
            None => self.attend(&q, &k, &v, &inputs.mask)?,
        };
        let out = out
            .transpose(1, 2)
            .f_reshape([b * t, self.num_heads * self.head_dim])?;
        Ok(self
            .o_proj
            .forward_hooked(&out, layer, Proj::O, hooks)
            .f_view([b, t, -1])?)
    }

    /// Appends layer `layer`'s K/V for `x` to `cache` and nothing else: the
    /// queries, the attention itself and the output projection are skipped.
    pub fn append_kv(
        &self,
        x: &Tensor,
        inputs: &AttnInputs,
        cache: &mut KvCache,
        layer: usize,
        hooks: &dyn Hooks,
    ) -> Result<()> {
        let (b, t, d) = x.size3()?;
        let rows = x.f_reshape([b * t, d])?;
        let (_, k, v) = self.project(&rows, (b, t), inputs, layer, hooks, false)?;
        let _ = cache.append_layer(layer, &k, &v)?;
        Ok(())
    }

    /// `y` `[batch * seq, n * head_dim]` (projection `which` of `rows`) with
    /// what `hooks` add, as `[batch, n, seq, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn heads(
        &self,
        y: Tensor,
        which: Proj,
        n: i64,
        rows: &Tensor,
        (b, t): (i64, i64),
        layer: usize,
        hooks: &dyn Hooks,
    ) -> Result<Tensor> {
        let mut y = hooks.adjust_linear(layer, which, rows, y);
        if which == Proj::V {
            // Values go into caches and autograd's saved tensors as they
            // are: a column view of the stacked product would keep all of it
            // alive (queries and keys too), so an unadjusted one is copied
            // out (a no-op for the new tensor an adaptor's term makes).
            y = y.f_contiguous()?;
        }
        Ok(y.f_view([b, t, n, self.head_dim])?.transpose(1, 2))
    }

    /// The queries (normed where the family does, before RoPE; only `with_q`)
    /// and the new keys (normed, with RoPE) and values of `rows` `[batch *
    /// seq, hidden]`, from one stacked projection.
    fn project(
        &self,
        rows: &Tensor,
        bt: (i64, i64),
        inputs: &AttnInputs,
        layer: usize,
        hooks: &dyn Hooks,
        with_q: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let kv = self.num_kv_heads;
        let mut parts = self.qkv.forward(rows)?.into_iter();
        if !with_q {
            // The whole product all the same (see `Stacked::forward`).
            let _ = parts.next();
        }
        let mut next = || {
            parts.next().ok_or_else(|| {
                ModelError::Input("attention: a stacked projection part is missing".into())
            })
        };
        let q = match with_q {
            true => {
                let q = self.heads(next()?, Proj::Q, self.num_heads, rows, bt, layer, hooks)?;
                Some(match &self.q_norm {
                    Some(n) => n.forward(&q),
                    None => q,
                })
            }
            false => None,
        };
        let mut k = self.heads(next()?, Proj::K, kv, rows, bt, layer, hooks)?;
        let v = self.heads(next()?, Proj::V, kv, rows, bt, layer, hooks)?;
        if let Some(n) = &self.k_norm {
            k = n.forward(&k);
        }
        Ok((q, rope::apply(&k, &inputs.cos, &inputs.sin), v))
    }

    /// Attention with an additive per-key bias `[batch, keys]`, computed explicitly
    /// (matmul, bias and mask, float32 softmax, matmul) so gradients reach the bias.
    /// Used for short query blocks (the KV-Distill decoder over a suffix).
    fn attend_explicit(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        inputs: &AttnInputs,
        bias: &Tensor,
    ) -> Result<Tensor> {
        let rep = self.num_heads / self.num_kv_heads;
        let (k, v) = if rep > 1 {
            (
                k.repeat_interleave_self_int(rep, 1, None),
                v.repeat_interleave_self_int(rep, 1, None),
            )
        } else {
            (k.shallow_clone(), v.shallow_clone())
        };
        let (tq, tk) = (q.size()[2], k.size()[2]);
        // Where allowed, `x * scale + bias` as before; elsewhere `-inf`.
        let logits = q.matmul(&k.transpose(2, 3)).to_kind(Kind::Float) * self.scale
            + inputs.additive(bias, tq, tk)?;
        let probs = logits.softmax(-1, Kind::Float).to_kind(q.kind());
        Ok(probs.f_matmul(&v)?)
    }

    /// Hands `hooks` the float32 attention probabilities of `q` over `k` under
    /// `mask` (and `bias`), [`OBSERVE_CHUNK`] queries at a time. Keys are shared
    /// by their GQA group through a view, not copied.
    fn observe(
        &self,
        q: &Tensor,
        k: &Tensor,
        mask: &AttnMask,
        bias: Option<&Tensor>,
        layer: usize,
        hooks: &dyn Hooks,
    ) -> Result<()> {
        let (b, h, tq, d) = q.size4()?;
        let (_, kv, tk, _) = k.size4()?;
        let rep = h / kv;
        // [b, kv, 1, d, tk]: every query head of a group against its KV head.
        let kt = k.to_kind(Kind::Float).unsqueeze(2).transpose(3, 4);
        let bias = bias.map(|x| x.to_kind(Kind::Float).unsqueeze(1).unsqueeze(1));
        // The observed queries: the rows the hook names, else all in order.
        let rows = hooks.attention_rows(layer);
        let nq = match &rows {
            Some(r) => r.size2()?.1,
            None => tq,
        };
        let mut start = 0;
        while start < nq {
            let n = OBSERVE_CHUNK.min(nq - start);
            let (qc, allowed) = match &rows {
                None => {
                    let allowed = match mask {
                        AttnMask::Causal => {
                            Tensor::ones([n, tk], (Kind::Bool, q.device())).tril(tk - tq + start)
                        }
                        AttnMask::Explicit(m) => m.narrow(2, start, n),
                    };
                    (q.narrow(2, start, n), allowed)
                }
                Some(r) => {
                    // [b, 1, n, 1]: each row's query positions.
                    let pos = r.narrow(1, start, n).view([b, 1, n, 1]);
                    let qc = q.f_gather(2, &pos.expand([b, h, n, d], false), false)?;
                    let allowed = match mask {
                        AttnMask::Causal => Tensor::arange(tk, (Kind::Int64, q.device()))
                            .view([1, 1, 1, tk])
                            .f_le_tensor(&(pos + (tk - tq)))?,
                        AttnMask::Explicit(m) => {
                            let m = m.expand([b, m.size()[1], tq, tk], false);
                            let (mb, mh) = (m.size()[0], m.size()[1]);
                            m.f_gather(2, &pos.expand([mb, mh, n, tk], false), false)?
                        }
                    };
                    (qc, allowed)
                }
            };
            let qc = qc.to_kind(Kind::Float).f_reshape([b, kv, rep, n, d])?;
            let mut logits = qc.f_matmul(&kt)?.f_reshape([b, h, n, tk])? * self.scale;
            if let Some(bias) = &bias {
                logits += bias;
            }
            let probs = logits
                .f_masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)?
                .softmax(-1, Kind::Float);
            hooks.observe_attention(layer, start, &probs)?;
            start += n;
        }
        Ok(())
    }

    /// Softmax attention of `q` over `k`/`v` through libtorch's SDPA (GQA-aware).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask) -> Result<Tensor> {
        let gqa = self.num_heads != self.num_kv_heads;
        let (m, causal) = match mask {
            AttnMask::Causal => (None, true),
            AttnMask::Explicit(m) => (Some(m), false),
        };
        Ok(Tensor::f_scaled_dot_product_attention(
            q, k, v, m, 0.0, causal, self.scale, gqa,
        )?)
    }
}
