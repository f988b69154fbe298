//! The student's compression of a batch of contexts (scorer -> selection ->
//! encoder with routed LoRA -> gathered cache) and its decoder pass over the
//! suffix with the score feed. Training and inference share this code.

use super::adaptor::Adaptor;
use super::config::ScoreFeed;
use super::select::{select, span_mean_pool, Selection, Span};
use crate::error::{ModelError, Result};
use crate::model::{Input, KeyBias, KvCache, Model, Recomputable};
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
    /// A score feed that changes the forward pass ([`ScoreFeed::in_forward`]):
    /// every later decoder pass over this cache applies it to the kept span
    /// slots, as training did.
    pub feed: Option<ScoreFeed>,
}

impl Compressed {
    /// The per-key attention bias for a decoder pass of `new` tokens over
    /// this cache with `feed` (the cache's own feed when `None`): the fed
    /// scores on the kept span slots, 0 on every other key. `None` when no
    /// feed applies.
    pub fn feed_bias(&self, feed: Option<ScoreFeed>, new: i64) -> Result<Option<Tensor>> {
        let Some(feed) = feed.or(self.feed) else {
            return Ok(None);
        };
        let s = &self.slot_scores;
        let fed = match feed {
            ScoreFeed::StraightThrough => s - s.detach(),
            ScoreFeed::Direct => s.shallow_clone(),
            ScoreFeed::LogSigmoid => s.f_log_sigmoid()?,
        };
        let (b, slots) = s.size2()?;
        let later = self.cache.len() - slots + new;
        let zeros = Tensor::f_zeros([b, later], (Kind::Float, s.device()))?;
        Ok(Some(Tensor::f_cat(&[fed * &self.span_slot, zeros], 1)?))
    }

    /// A second handle on the batch: the caches share tensors, and appending to
    /// one (decoding) never changes the other.
    pub fn shallow_clone(&self) -> Compressed {
        Compressed {
            cache: self.cache.shallow_clone(),
            selections: self.selections.clone(),
            slot_scores: self.slot_scores.shallow_clone(),
            span_slot: self.span_slot.shallow_clone(),
            ctx_len: self.ctx_len.clone(),
            feed: self.feed,
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

/// The kept positions of a batch: chosen on the host, uploaded once, so the
/// device work that uses them (encoder, gather) never waits for the host.
#[derive(Debug)]
pub struct Kept {
    /// Per example, the kept positions.
    pub selections: Vec<Selection>,
    /// Context lengths.
    pub ctx_len: Vec<usize>,
    /// Flat `[batch * lc]` indices of the kept span positions, ascending: the
    /// rows the LoRA adaptor routes to.
    pub lora_rows: Tensor,
    /// The position each cache slot holds `[batch, slots]` (0 in padded slots).
    pub index: Tensor,
    /// Whether a slot holds a kept position `[batch, slots]`.
    pub valid: Tensor,
    /// 1.0 where the slot holds a scored span position, else 0 `[batch, slots]`.
    pub span_slot: Tensor,
    /// Each context's next position (its length) `[batch]`.
    pub next: Tensor,
}

impl Kept {
    /// Uploads `selections` of contexts right-padded to `lc` positions.
    pub fn new(selections: Vec<Selection>, lc: i64, ctx_len: &[usize], device: Device) -> Kept {
        let bu = selections.len();
        let slots = selections
            .iter()
            .map(|s| s.kept.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut index = vec![0i64; bu * slots];
        let mut valid = vec![false; bu * slots];
        let mut span_slot = vec![0f32; bu * slots];
        let mut lora_rows = Vec::new();
        for (i, s) in selections.iter().enumerate() {
            for (j, (&p, &fs)) in s.kept.iter().zip(&s.from_span).enumerate() {
                index[i * slots + j] = p as i64;
                valid[i * slots + j] = true;
                if fs {
                    span_slot[i * slots + j] = 1.0;
                    lora_rows.push(i as i64 * lc + p as i64);
                }
            }
        }
        let shape = [bu as i64, slots as i64];
        let up = |t: Tensor| t.to_device(device);
        let next: Vec<i64> = ctx_len.iter().map(|&l| l as i64).collect();
        Kept {
            selections,
            ctx_len: ctx_len.to_vec(),
            lora_rows: up(Tensor::from_slice(&lora_rows)),
            index: up(Tensor::from_slice(&index).view(shape)),
            valid: up(Tensor::from_slice(&valid).view(shape)),
            span_slot: up(Tensor::from_slice(&span_slot).view(shape)),
            next: up(Tensor::from_slice(&next)),
        }
    }

    /// Keeps the top-scored positions of each context's spans by `scores`
    /// `[batch, lc]` (read to the host: this waits for the device), ranked
    /// after a span-local average pool of half-width `pool` (0: the raw
    /// scores); the first `sinks` positions of each span are kept whatever
    /// their scores.
    pub fn select(scores: &Tensor, ctx: Contexts, sinks: usize, pool: usize) -> Result<Kept> {
        let (b, lc) = ctx.ids.size2()?;
        let bu = b as usize;
        if ctx.len.len() != bu || ctx.spans.len() != bu || ctx.ratios.len() != bu {
            return Err(ModelError::Input(
                "per-example lengths, spans and ratios must match the batch".into(),
            ));
        }
        let host: Vec<f32> =
            Vec::<f32>::try_from(scores.detach().to_device(Device::Cpu).flatten(0, -1))?;
        let mut selections = Vec::with_capacity(bu);
        let mut host = host;
        for i in 0..bu {
            let row = &mut host[i * lc as usize..(i + 1) * lc as usize];
            span_mean_pool(row, &ctx.spans[i], pool);
            for &(s, n) in &ctx.spans[i] {
                row.get_mut(s..s + sinks.min(n))
                    .into_iter()
                    .flatten()
                    .for_each(|x| *x = f32::INFINITY);
            }
            selections.push(select(row, ctx.len[i], &ctx.spans[i], ctx.ratios[i])?);
        }
        Ok(Kept::new(selections, lc, ctx.len, scores.device()))
    }

    /// The device tensors (for copying into a captured step's inputs).
    pub fn tensors(&self) -> [&Tensor; 5] {
        [
            &self.lora_rows,
            &self.index,
            &self.valid,
            &self.span_slot,
            &self.next,
        ]
    }
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
    compress_forcing(model, adaptor, ctx, features, train, None, None)
}

/// [`compress`], keeping `force[i]` (context positions of example i) whatever
/// their scores, within the budget: the oracle of a diagnosis. `span_pool`
/// overrides the adaptor's pooling of the scores before top-k.
pub fn compress_forcing(
    model: &Model,
    adaptor: &Adaptor,
    ctx: Contexts,
    features: &Tensor,
    train: bool,
    force: Option<&[Vec<usize>]>,
    span_pool: Option<usize>,
) -> Result<Compressed> {
    let mut timer = super::phases::PhaseTimer::start(model.device());
    let (scores, kept) = scored_selection(adaptor, ctx, features, force, span_pool)?;
    timer.mark("scorer");
    let full = encode(model, adaptor, ctx.ids, &kept, train)?;
    timer.mark("encoder");
    let mut out = gather_kept(&full, &kept, &scores)?;
    let feed = adaptor.config().score_feed;
    out.feed = feed.in_forward().then_some(feed);
    timer.mark("gather");
    Ok(out)
}

/// The adaptor's scores `[batch, lc]` of the contexts from the scorer layer's
/// `features` (`force`d positions at +inf) and the positions they keep, ranked
/// after the span pool (`None`: the adaptor's own) with the adaptor's sinks.
pub fn scored_selection(
    adaptor: &Adaptor,
    ctx: Contexts,
    features: &Tensor,
    force: Option<&[Vec<usize>]>,
    span_pool: Option<usize>,
) -> Result<(Tensor, Kept)> {
    let lc = ctx.ids.size2()?.1;
    let mut scores = adaptor.score(&features.narrow(1, 0, lc));
    if let Some(force) = force {
        scores = with_forced(&scores, force)?;
    }
    let pool = span_pool.unwrap_or(adaptor.config().span_pool);
    let kept = Kept::select(&scores, ctx, adaptor.config().sinks, pool)?;
    Ok((scores, kept))
}

/// `scores` `[batch, lc]` with +inf at the positions `force[i]` of row i.
pub fn with_forced(scores: &Tensor, force: &[Vec<usize>]) -> Result<Tensor> {
    let (b, lc) = scores.size2()?;
    let mut mask = vec![false; (b * lc) as usize];
    for (i, f) in force.iter().enumerate().take(b as usize) {
        for &p in f.iter().filter(|&&p| (p as i64) < lc) {
            mask[i * lc as usize + p] = true;
        }
    }
    let mask = Tensor::from_slice(&mask)
        .view([b, lc])
        .to_device(scores.device());
    Ok(scores.f_masked_fill(&mask, f64::INFINITY)?)
}

/// The student's encoder: the frozen model over right-padded contexts
/// `ctx_ids` with the LoRA adaptor at the kept span positions; returns the
/// cache of every position (no host reads or uploads).
pub fn encode(
    model: &Model,
    adaptor: &Adaptor,
    ctx_ids: &Tensor,
    kept: &Kept,
    train: bool,
) -> Result<KvCache> {
    let hooks = adaptor.lora_hooks(kept.lora_rows.shallow_clone(), train);
    let mut full = model.new_cache();
    // Right padding: causal attention never lets a real token see padding.
    let input = Input::new(ctx_ids).vocab_checked();
    if !crate::ablate::on(crate::ablate::SpeedUp::FillCache) {
        let _ = model.forward_hidden_with(input, Some(&mut full), &hooks)?;
    } else {
        model.fill_cache(input, &mut full, &hooks)?;
    }
    Ok(full)
}

/// [`encode`] without keeping the encoder's activations: returns the cache
/// of every position, whose K/V collect their gradients in the loss's
/// backward, and the [`EncoderBackward`] that carries those gradients into
/// the adaptor by recomputing one layer at a time. Needs LoRA dropout 0 (a
/// recomputed layer must compute what the first pass did).
pub fn encode_recomputable<'a>(
    model: &'a Model,
    adaptor: &'a Adaptor,
    ctx_ids: &Tensor,
    kept: &Kept,
) -> Result<(KvCache, EncoderBackward<'a>)> {
    if adaptor.config().lora.dropout > 0.0 {
        return Err(ModelError::Input(format!(
            "recomputing the encoder needs LoRA dropout 0 (it is {}): a recomputed layer must draw what the first pass drew",
            adaptor.config().lora.dropout
        )));
    }
    let rows = kept.lora_rows.shallow_clone();
    let mut full = model.new_cache();
    let input = Input::new(ctx_ids).vocab_checked();
    let saved = model.fill_cache_recomputable(
        input,
        &mut full,
        &adaptor.lora_hooks(rows.shallow_clone(), true),
    )?;
    let back = EncoderBackward {
        model,
        adaptor,
        rows,
        cache: full.shallow_clone(),
        saved,
    };
    Ok((full, back))
}

/// The second half of [`encode_recomputable`]'s backward.
#[derive(Debug)]
pub struct EncoderBackward<'a> {
    model: &'a Model,
    adaptor: &'a Adaptor,
    rows: Tensor,
    cache: KvCache,
    saved: Recomputable,
}

impl EncoderBackward<'_> {
    /// After the loss's backward: accumulates the encoder's share of the
    /// adaptor's gradients ([`Model::backward_recomputed`]).
    pub fn backward(self) -> Result<()> {
        let hooks = self.adaptor.lora_hooks(self.rows, true);
        self.model
            .backward_recomputed(self.saved, &self.cache, &hooks)
    }
}

/// Gathers the kept positions of each example from `full` (a cache over the
/// right-padded contexts) into a compressed cache whose padded slots are invalid
/// and whose next position is each context's length. `scores` `[batch, lc]` give
/// the kept slots' scores (for the score feed).
pub fn gather_kept(full: &KvCache, kept: &Kept, scores: &Tensor) -> Result<Compressed> {
    let mut cache = full.gather(&kept.index)?;
    cache.and_valid(&kept.valid)?;
    cache.set_next_positions(kept.next.shallow_clone())?;
    Ok(Compressed {
        cache,
        selections: kept.selections.clone(),
        slot_scores: scores.f_gather(1, &kept.index, false)?,
        span_slot: kept.span_slot.shallow_clone(),
        ctx_len: kept.ctx_len.clone(),
        feed: None,
    })
}

/// Right-padded suffixes `[batch, lx]` (from [`super::infer::pad_rows`], which
/// checks them against the vocabulary) with their positions (each continuing
/// its context) and validity, uploaded for [`decode`].
#[derive(Debug)]
pub struct Suffixes {
    /// Token ids `[batch, lx]`.
    pub ids: Tensor,
    /// Positions `[batch, lx]`.
    pub positions: Tensor,
    /// Whether each position is a real token (not padding) `[batch, lx]`.
    pub valid: Tensor,
}

impl Suffixes {
    /// Suffixes `ids` of lengths `len` after contexts of lengths `ctx_len`.
    pub fn new(ids: Tensor, len: &[usize], ctx_len: &[usize]) -> Result<Suffixes> {
        let (b, lx) = ids.size2()?;
        let mut pos = Vec::with_capacity((b * lx) as usize);
        let mut valid = Vec::with_capacity((b * lx) as usize);
        for (&start, &n) in ctx_len.iter().zip(len) {
            for j in 0..lx as usize {
                pos.push((start + j) as i64);
                valid.push(j < n);
            }
        }
        let device = ids.device();
        Ok(Suffixes {
            positions: Tensor::from_slice(&pos).view([b, lx]).to_device(device),
            valid: Tensor::from_slice(&valid).view([b, lx]).to_device(device),
            ids,
        })
    }

    /// The device tensors (for copying into a captured step's inputs).
    pub fn tensors(&self) -> [&Tensor; 3] {
        [&self.ids, &self.positions, &self.valid]
    }
}

/// Runs the frozen decoder over `suffixes`, attending to `compressed.cache`
/// (consumed: the suffix is appended to it), with the score feed `feed` on the
/// kept span slots (at inference `None`: the cache's own feed, if its feed
/// changes the forward pass). Returns final hidden states `[batch, lx, d]`.
/// No host reads or uploads.
pub fn decode(
    model: &Model,
    compressed: &mut Compressed,
    suffixes: &Suffixes,
    feed: Option<ScoreFeed>,
) -> Result<Tensor> {
    let input = Input::new(&suffixes.ids)
        .with_positions(&suffixes.positions)
        .with_valid(&suffixes.valid)
        .vocab_checked();
    forward_fed(model, compressed, input, feed)
}

/// One decoding step of `ids` `[batch, 1]` at `positions` over `compressed`
/// (appended to its cache), applying the cache's own score feed.
pub fn decode_step(
    model: &Model,
    compressed: &mut Compressed,
    ids: &Tensor,
    positions: &Tensor,
) -> Result<Tensor> {
    forward_fed(
        model,
        compressed,
        Input::new(ids).with_positions(positions),
        None,
    )
}

/// `input` through the model over `compressed`'s cache, with the feed's bias.
fn forward_fed(
    model: &Model,
    compressed: &mut Compressed,
    input: Input,
    feed: Option<ScoreFeed>,
) -> Result<Tensor> {
    let new = input.ids.size2()?.1;
    match compressed.feed_bias(feed, new)? {
        None => model.forward_hidden(input, Some(&mut compressed.cache)),
        Some(bias) => model.forward_hidden_with(input, Some(&mut compressed.cache), &KeyBias(bias)),
    }
}
