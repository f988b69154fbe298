//! The student's compression of a batch of contexts (scorer -> selection ->
//! encoder with routed LoRA -> gathered cache) and its decoder pass over the
//! suffix with the score feed. Training and inference share this code.

use super::adaptor::Adaptor;
use super::config::ScoreFeed;
use super::select::{select, Selection, Span};
use crate::error::{ModelError, Result};
use crate::model::{Hooks, Input, KvCache, Model};
use tch::{Device, Kind, Tensor};

/// A batch of compressed contexts.
#[derive(Debug)]
pub struct Compressed {
    /// Per-layer K/V of the kept positions, original positions, padded slots invalid.
    pub cache: KvCache,
    /// Per example, the kept positions.
    pub selections: Vec<Selection>,
    /// Score of each cache slot `[batch, slots]` (float32, differentiable).
    pub slot_scores: Tensor,
    /// 1.0 where the slot holds a scored span token, else 0 `[batch, slots]`.
    pub span_slot: Tensor,
    /// Context lengths (the next position of each example).
    pub ctx_len: Vec<usize>,
}

impl Compressed {
    /// A second handle on the batch: the caches share tensors, and appending to
    /// one (decoding) never changes the other.
    pub fn shallow_clone(&self) -> Compressed {
        Compressed {
            cache: self.cache.shallow_clone(),
            selections: self.selections.clone(),
            slot_scores: self.slot_scores.shallow_clone(),
            span_slot: self.span_slot.shallow_clone(),
            ctx_len: self.ctx_len.clone(),
        }
    }
}

/// A batch of contexts to compress.
#[derive(Debug, Clone, Copy)]
pub struct Contexts<'a> {
    /// Right-padded context tokens `[batch, lc]`.
    pub ids: &'a Tensor,
    /// Length of each context.
    pub len: &'a [usize],
    /// Compressible spans of each context.
    pub spans: &'a [Vec<Span>],
    /// Retention ratio of each context.
    pub ratios: &'a [f64],
}

/// Compresses `ctx` (ids from [`super::infer::pad_rows`], which checks them
/// against the vocabulary). `features` are the frozen model's states after
/// `scorer_layer` layers over (at least) the context positions, `[batch, >= lc, d]`.
pub fn compress(
    model: &Model,
    adaptor: &Adaptor,
    ctx: Contexts,
    features: &Tensor,
    train: bool,
) -> Result<Compressed> {
    let Contexts {
        ids: ctx_ids,
        len: ctx_len,
        spans,
        ratios,
    } = ctx;
    let (b, lc) = ctx_ids.size2()?;
    let bu = b as usize;
    if ctx_len.len() != bu || spans.len() != bu || ratios.len() != bu {
        return Err(ModelError::Input(
            "per-example lengths, spans and ratios must match the batch".into(),
        ));
    }
    let device = model.device();
    let mut timer = super::phases::PhaseTimer::start(device);
    let scores = adaptor.score(&features.narrow(1, 0, lc));
    let host: Vec<f32> =
        Vec::<f32>::try_from(scores.detach().to_device(Device::Cpu).flatten(0, -1))?;
    let mut selections = Vec::with_capacity(bu);
    for i in 0..bu {
        let row = &host[i * lc as usize..(i + 1) * lc as usize];
        selections.push(select(row, ctx_len[i], &spans[i], ratios[i])?);
    }
    // LoRA is active only at kept span positions.
    let mut lora_mask = vec![0f32; bu * lc as usize];
    for (i, s) in selections.iter().enumerate() {
        for (&p, &from_span) in s.kept.iter().zip(&s.from_span) {
            if from_span {
                lora_mask[i * lc as usize + p] = 1.0;
            }
        }
    }
    timer.mark("scorer");
    let hooks = adaptor.lora_hooks(&lora_mask, device, train);
    let mut full = model.new_cache();
    // Right padding: causal attention never lets a real token see padding.
    let input = Input::new(ctx_ids).vocab_checked();
    if !crate::ablate::on(crate::ablate::SpeedUp::FillCache) {
        let _ = model.forward_hidden_with(input, Some(&mut full), &hooks)?;
    } else {
        model.fill_cache(input, &mut full, &hooks)?;
    }
    timer.mark("encoder");
    let out = gather_kept(&full, selections, &scores, ctx_len);
    timer.mark("gather");
    out
}

/// Gathers the kept positions of each example from `full` (a cache over the
/// right-padded contexts) into a compressed cache whose padded slots are invalid
/// and whose next position is each context's length. `scores` `[batch, lc]` give
/// the kept slots' scores (for the score feed).
pub fn gather_kept(
    full: &KvCache,
    selections: Vec<Selection>,
    scores: &Tensor,
    ctx_len: &[usize],
) -> Result<Compressed> {
    let bu = selections.len();
    let b = bu as i64;
    let device = scores.device();
    let slots = selections
        .iter()
        .map(|s| s.kept.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut idx = vec![0i64; bu * slots];
    let mut valid = vec![false; bu * slots];
    let mut span_slot = vec![0f32; bu * slots];
    for (i, s) in selections.iter().enumerate() {
        for (j, (&p, &fs)) in s.kept.iter().zip(&s.from_span).enumerate() {
            idx[i * slots + j] = p as i64;
            valid[i * slots + j] = true;
            span_slot[i * slots + j] = if fs { 1.0 } else { 0.0 };
        }
    }
    let shape = [b, slots as i64];
    let idx = Tensor::from_slice(&idx).view(shape).to_device(device);
    let valid = Tensor::from_slice(&valid).view(shape).to_device(device);
    let mut cache = full.gather(&idx)?;
    cache.and_valid(&valid)?;
    let next: Vec<i64> = ctx_len.iter().map(|&l| l as i64).collect();
    cache.set_next_positions(Tensor::from_slice(&next).to_device(device))?;
    Ok(Compressed {
        cache,
        selections,
        slot_scores: scores.gather(1, &idx, false),
        span_slot: Tensor::from_slice(&span_slot).view(shape).to_device(device),
        ctx_len: ctx_len.to_vec(),
    })
}

/// Adds a fixed per-key bias to every layer's attention.
struct BiasHooks {
    bias: Tensor,
}

impl Hooks for BiasHooks {
    fn attn_bias(&self, _layer: usize) -> Option<Tensor> {
        Some(self.bias.shallow_clone())
    }
}

/// Runs the frozen decoder over right-padded suffixes `suf_ids` `[batch, lx]`
/// (from [`super::infer::pad_rows`], which checks them against the vocabulary) of
/// lengths `suf_len`, continuing each context at its original next position and
/// attending to `compressed.cache` (consumed: the suffix is appended to it), with
/// the score feed on the kept span slots (none at inference, where the
/// straight-through feed is zero anyway). Returns final hidden states `[batch, lx, d]`.
pub fn decode(
    model: &Model,
    compressed: &mut Compressed,
    suf_ids: &Tensor,
    suf_len: &[usize],
    feed: Option<ScoreFeed>,
) -> Result<Tensor> {
    let (b, lx) = suf_ids.size2()?;
    let device = model.device();
    let mut pos = Vec::with_capacity((b * lx) as usize);
    let mut valid = Vec::with_capacity((b * lx) as usize);
    for (&start, &len) in compressed.ctx_len.iter().zip(suf_len) {
        for j in 0..lx as usize {
            pos.push((start + j) as i64);
            valid.push(j < len);
        }
    }
    let pos = Tensor::from_slice(&pos).view([b, lx]).to_device(device);
    let valid = Tensor::from_slice(&valid).view([b, lx]).to_device(device);
    let input = Input::new(suf_ids)
        .with_positions(&pos)
        .with_valid(&valid)
        .vocab_checked();
    let s = &compressed.slot_scores;
    let fed = match feed {
        None => return model.forward_hidden(input, Some(&mut compressed.cache)),
        Some(ScoreFeed::StraightThrough) => s - s.detach(),
        Some(ScoreFeed::Direct) => s.shallow_clone(),
    };
    let bias = Tensor::cat(
        &[
            fed * &compressed.span_slot,
            Tensor::zeros([b, lx], (Kind::Float, device)),
        ],
        1,
    );
    let hooks = BiasHooks { bias };
    model.forward_hidden_with(input, Some(&mut compressed.cache), &hooks)
}
