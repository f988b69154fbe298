//! One decoder layer: attention and MLP with residuals, in Llama (pre-norm)
//! or Gemma 3 (pre- and post-norm "sandwich") arrangement.

use super::attention::{Attention, AttnInputs};
use super::cache::KvCache;
use super::hooks::Hooks;
use super::linear::Stacked;
use super::load::Loader;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use crate::config::{Arch, LayerKind, ModelConfig};
use crate::error::Result;
use tch::Tensor;

/// A transformer block.
#[derive(Debug)]
pub struct DecoderLayer {
    /// Attention kind (full or sliding window).
    pub kind: LayerKind,
    /// Norm before attention.
    pub input_norm: RmsNorm,
    /// Self-attention.
    pub attn: Attention,
    /// Norm after attention (Gemma 3 only).
    pub post_attn_norm: Option<RmsNorm>,
    /// Norm before the MLP.
    pub pre_mlp_norm: RmsNorm,
    /// The MLP.
    pub mlp: Mlp,
    /// Norm after the MLP (Gemma 3 only).
    pub post_mlp_norm: Option<RmsNorm>,
}

impl DecoderLayer {
    /// Loads layer `i` from `ld` (names relative to the model prefix).
    pub fn load(ld: &Loader, cfg: &ModelConfig, i: usize) -> Result<Self> {
        let p = format!("layers.{i}");
        let (d, h, kv, hd, ff) = (
            cfg.hidden_size as i64,
            cfg.num_heads as i64,
            cfg.num_kv_heads as i64,
            cfg.head_dim as i64,
            cfg.intermediate_size as i64,
        );
        let gemma = cfg.arch == Arch::Gemma3;
        let norm = |name: &str, dim: i64| -> Result<RmsNorm> {
            Ok(RmsNorm::new(
                ld.weight(&format!("{p}.{name}.weight"), &[dim])?,
                cfg.rms_norm_eps,
                cfg.arch.norm_plus_one(),
            ))
        };
        let attn = Attention {
            qkv: Stacked::new(vec![
                ld.linear_parts(&format!("{p}.self_attn.q_proj"), h * hd, d, cfg.qkv_bias)?,
                ld.linear_parts(&format!("{p}.self_attn.k_proj"), kv * hd, d, cfg.qkv_bias)?,
                ld.linear_parts(&format!("{p}.self_attn.v_proj"), kv * hd, d, cfg.qkv_bias)?,
            ])?,
            o_proj: ld.linear(&format!("{p}.self_attn.o_proj"), d, h * hd, cfg.o_bias)?,
            q_norm: if gemma {
                Some(norm("self_attn.q_norm", hd)?)
            } else {
                None
            },
            k_norm: if gemma {
                Some(norm("self_attn.k_norm", hd)?)
            } else {
                None
            },
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
            scale: cfg.attn_scale,
        };
        let mlp = Mlp {
            gate_up: Stacked::new(vec![
                ld.linear_parts(&format!("{p}.mlp.gate_proj"), ff, d, cfg.mlp_bias)?,
                ld.linear_parts(&format!("{p}.mlp.up_proj"), ff, d, cfg.mlp_bias)?,
            ])?,
            down_proj: ld.linear(&format!("{p}.mlp.down_proj"), d, ff, cfg.mlp_bias)?,
            activation: cfg.activation,
        };
        Ok(DecoderLayer {
            kind: cfg.layer_kinds[i],
            input_norm: norm("input_layernorm", d)?,
            attn,
            post_attn_norm: if gemma {
                Some(norm("post_attention_layernorm", d)?)
            } else {
                None
            },
            pre_mlp_norm: if gemma {
                norm("pre_feedforward_layernorm", d)?
            } else {
                norm("post_attention_layernorm", d)?
            },
            mlp,
            post_mlp_norm: if gemma {
                Some(norm("post_feedforward_layernorm", d)?)
            } else {
                None
            },
        })
    }

    /// Every weight tensor of the layer.
    pub fn weights(&self) -> Vec<&Tensor> {
        let a = &self.attn;
        let m = &self.mlp;
        let mut out = vec![self.input_norm.weight(), self.pre_mlp_norm.weight()];
        for n in [
            &self.post_attn_norm,
            &self.post_mlp_norm,
            &a.q_norm,
            &a.k_norm,
        ]
        .into_iter()
        .flatten()
        {
            out.push(n.weight());
        }
        for l in [
            a.qkv.part(0),
            a.qkv.part(1),
            a.qkv.part(2),
            &a.o_proj,
            m.gate_up.part(0),
            m.gate_up.part(1),
            &m.down_proj,
        ] {
            out.push(l.weight());
            out.extend(l.bias());
        }
        out
    }

    /// Appends block number `layer`'s K/V for `x` to `cache`, skipping the
    /// attention and the MLP (their output feeds only later layers).
    pub fn append_kv(
        &self,
        x: &Tensor,
        inputs: &AttnInputs,
        cache: &mut KvCache,
        layer: usize,
        hooks: &dyn Hooks,
    ) -> Result<()> {
        let normed = self.input_norm.forward(x);
        self.attn.append_kv(&normed, inputs, cache, layer, hooks)
    }

    /// Runs block number `layer` on `x` `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        inputs: &AttnInputs,
        cache: Option<&mut KvCache>,
        layer: usize,
        hooks: &dyn Hooks,
    ) -> Result<Tensor> {
        let normed = self.input_norm.forward(x);
        let mut h = self.attn.forward(&normed, inputs, cache, layer, hooks)?;
        if let Some(n) = &self.post_attn_norm {
            h = n.forward(&h);
        }
        let x = x + h;
        let mut h = self
            .mlp
            .forward(&self.pre_mlp_norm.forward(&x), layer, hooks)?;
        if let Some(n) = &self.post_mlp_norm {
            h = n.forward(&h);
        }
        Ok(x + h)
    }
}
