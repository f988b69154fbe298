//! Inference: compress a batch of contexts (KV-Distill, a training-free baseline,
//! or no compression, all through the same selection and gather code), then
//! answer from the compressed caches: batched greedy generation and
//! teacher-forced scoring of a reference continuation.

use super::adaptor::Adaptor;
use super::baselines::{baseline_scores_reusing, Baseline};
use super::select::{select, Selection};
use super::student::{
    compress_forcing, decode, decode_step, gather_kept, scored_selection, with_forced, Compressed,
    Contexts, Kept, Suffixes,
};
use crate::error::{ModelError, Result};
use crate::model::{Input, KvCache, Model, NoHooks};
use tch::{Device, Kind, Tensor};

/// How contexts are compressed.
#[derive(Debug, Clone, Copy)]
pub enum Method<'a> {
    /// Keep everything (the teacher's cache).
    Full,
    /// The trained scorer and routed LoRA.
    KvDistill {
        /// The adaptor.
        adaptor: &'a Adaptor,
        /// Span pooling of the scores before top-k (`None`: the adaptor's).
        span_pool: Option<usize>,
    },
    /// The trained scorer's selection read by the frozen model: the
    /// teacher's cache at the kept positions, no LoRA and no score feed (a
    /// diagnosis separating what the scorer keeps from how the adaptor reads).
    ScorerOnly(&'a Adaptor),
    /// A question-agnostic training-free baseline.
    Baseline(Baseline),
}

impl<'a> Method<'a> {
    /// The adaptor of an adaptor's method (`kv_distill*`), else `None`.
    pub fn adaptor(&self) -> Option<&'a Adaptor> {
        match *self {
            Method::KvDistill { adaptor, .. } | Method::ScorerOnly(adaptor) => Some(adaptor),
            Method::Full | Method::Baseline(_) => None,
        }
    }

    /// KV-Distill with the adaptor's own settings.
    pub fn kv_distill(adaptor: &'a Adaptor) -> Self {
        Method::KvDistill {
            adaptor,
            span_pool: None,
        }
    }

    /// Short name used in tables and file metadata.
    pub fn name(&self) -> String {
        match self {
            Method::Full => "full".into(),
            Method::KvDistill {
                span_pool: Some(p), ..
            } => format!("kv_distill_pool{p}"),
            Method::KvDistill { .. } => "kv_distill".into(),
            Method::ScorerOnly(_) => SCORER_ONLY.into(),
            Method::Baseline(b) => b.name().into(),
        }
    }
}

/// [`Method::ScorerOnly`]'s name in tables and `eval --methods`.
pub const SCORER_ONLY: &str = "kv_distill_select";

/// Compresses right-padded contexts with `method` (no gradients). With
/// [`Method::Full`] every position is kept and the ratios are ignored.
pub fn compress_contexts(model: &Model, method: Method, ctx: Contexts) -> Result<Compressed> {
    compress_contexts_forcing(model, method, ctx, None)
}

/// [`compress_contexts`], keeping the context positions `force[i]` of each
/// example whatever the method's scores (within its budget): the oracle of a
/// diagnosis (e.g. force the answer's tokens: can the decoder then read them?).
pub fn compress_contexts_forcing(
    model: &Model,
    method: Method,
    ctx: Contexts,
    force: Option<&[Vec<usize>]>,
) -> Result<Compressed> {
    check_window(model, ctx.len)?;
    tch::no_grad(|| match method {
        Method::KvDistill { adaptor, .. } | Method::ScorerOnly(adaptor) => {
            let features =
                model.layer_states(Input::new(ctx.ids), adaptor.config().scorer_layer)?;
            adaptor_compress(model, method, ctx, force, &features, None)
        }
        Method::Full => {
            let mut full = model.new_cache();
            model.fill_cache(Input::new(ctx.ids), &mut full, &NoHooks)?;
            keep_all(&full, ctx, model.device())
        }
        Method::Baseline(baseline) => {
            BaselineScores::new(model, baseline, ctx, force, None)?.compress(model.device(), ctx)
        }
    })
}

/// An adaptor's method (`kv_distill*`) over contexts `ctx` at their ratios,
/// keeping the positions `force[i]` whatever the scores, from `features`
/// (the frozen model's states after the adaptor's scorer layer, [`Model::layer_states`])
/// and, for the scorer-only method, `full`, the frozen model's cache over
/// `ctx` ([`Model::fill_cache`]; made here when `None`). No gradients.
/// Other methods are refused.
pub fn adaptor_compress(
    model: &Model,
    method: Method,
    ctx: Contexts,
    force: Option<&[Vec<usize>]>,
    features: &Tensor,
    full: Option<&KvCache>,
) -> Result<Compressed> {
    check_window(model, ctx.len)?;
    tch::no_grad(|| match method {
        Method::KvDistill { adaptor, span_pool } => {
            compress_forcing(model, adaptor, ctx, features, false, force, span_pool)
        }
        Method::ScorerOnly(adaptor) => {
            let (scores, kept) = scored_selection(adaptor, ctx, features, force, None)?;
            let own;
            let full = match full {
                Some(f) => f,
                None => {
                    let mut c = model.new_cache();
                    model.fill_cache(Input::new(ctx.ids), &mut c, &NoHooks)?;
                    own = c;
                    &own
                }
            };
            // The frozen reader: no score enters the decoder.
            gather_kept(full, &kept, &scores.zeros_like())
        }
        other => Err(ModelError::Input(format!(
            "{} is not an adaptor's method",
            other.name()
        ))),
    })
}

/// A training-free method's score of every context position and the full
/// cache it came from: all its compression needs before the ratio, so one
/// pass over the contexts serves every ratio ([`BaselineScores::compress`]).
pub struct BaselineScores {
    /// `[batch * lc]` scores, row-major, on the host.
    host: Vec<f32>,
    lc: i64,
    full: KvCache,
}

impl BaselineScores {
    /// Runs `baseline` over `ctx` (its ratios are not read; no gradients),
    /// scoring the positions `force[i]` of each example above all others.
    /// `full`, the frozen model's cache over the same contexts
    /// ([`Model::fill_cache`]), spares the methods that read no attention
    /// their forward ([`baseline_scores_reusing`]).
    pub fn new(
        model: &Model,
        baseline: Baseline,
        ctx: Contexts,
        force: Option<&[Vec<usize>]>,
        full: Option<&KvCache>,
    ) -> Result<BaselineScores> {
        check_window(model, ctx.len)?;
        tch::no_grad(|| {
            let (scores, full) =
                baseline_scores_reusing(model, &baseline, ctx.ids, ctx.len, ctx.spans, full)?;
            let scores = match force {
                Some(f) => with_forced(&scores, f)?,
                None => scores,
            };
            let (_, lc) = scores.size2()?;
            let host = Vec::<f32>::try_from(scores.to_device(Device::Cpu).flatten(0, -1))?;
            Ok(BaselineScores { host, lc, full })
        })
    }

    /// The compressed caches of the scored contexts at `ctx.ratios` (the
    /// contexts of [`BaselineScores::new`]).
    pub fn compress(&self, device: Device, ctx: Contexts) -> Result<Compressed> {
        tch::no_grad(|| keep_top(&self.full, &self.host, self.lc, ctx, device))
    }
}

/// Keeps each context's top-`ratios[i]` span positions by the `host` scores
/// (`[batch * lc]`, row-major) and gathers their K/V from `full`. The scores
/// never enter the decoder: the slots get zero scores.
pub(crate) fn keep_top(
    full: &KvCache,
    host: &[f32],
    lc: i64,
    ctx: Contexts,
    device: Device,
) -> Result<Compressed> {
    let lcu = lc as usize;
    if host.len() != ctx.len.len() * lcu {
        return Err(ModelError::Input(format!(
            "{} scores for {} contexts of {lc} positions",
            host.len(),
            ctx.len.len()
        )));
    }
    let selections = (0..ctx.len.len())
        .map(|i| {
            select(
                &host[i * lcu..(i + 1) * lcu],
                ctx.len[i],
                &ctx.spans[i],
                ctx.ratios[i],
            )
        })
        .collect::<Result<Vec<Selection>>>()?;
    let b = ctx.len.len() as i64;
    let kept = Kept::new(selections, lc, ctx.len, device);
    gather_kept(full, &kept, &Tensor::zeros([b, lc], (Kind::Float, device)))
}

/// Every position of each context in `full` (the frozen model's cache over
/// `ctx`; its ratios are not read) as a compressed cache: the uncompressed
/// reference.
pub fn keep_all(full: &KvCache, ctx: Contexts, device: Device) -> Result<Compressed> {
    let (b, lc) = ctx.ids.size2()?;
    let ones = vec![1.0; b as usize];
    let every = Contexts {
        ratios: &ones,
        ..ctx
    };
    keep_top(full, &vec![0f32; (b * lc) as usize], lc, every, device)
}

/// Refuses contexts longer than the model window.
pub fn check_window(model: &Model, lens: &[usize]) -> Result<()> {
    let window = model.config().max_position_embeddings;
    match lens.iter().position(|&l| l > window) {
        Some(i) => Err(ModelError::Input(format!(
            "example {i}: the context has {} tokens, longer than the model window of {window}",
            lens[i]
        ))),
        None => Ok(()),
    }
}

/// Right-pads `rows` into `[batch, max_len]` int64 on `device`, with lengths;
/// every id must be below `vocab` (the error names the row and position).
pub fn pad_rows(rows: &[Vec<u32>], vocab: usize, device: Device) -> Result<(Tensor, Vec<usize>)> {
    pad_rows_to(rows, vocab, device, 0)
}

/// [`pad_rows`] to at least `len` positions (more when a row is longer).
pub fn pad_rows_to(
    rows: &[Vec<u32>],
    vocab: usize,
    device: Device,
    len: usize,
) -> Result<(Tensor, Vec<usize>)> {
    let l = rows.iter().map(Vec::len).max().unwrap_or(1).max(len).max(1);
    let mut flat = vec![0i64; rows.len() * l];
    for (i, r) in rows.iter().enumerate() {
        for (j, &t) in r.iter().enumerate() {
            if t as usize >= vocab {
                return Err(ModelError::Input(format!(
                    "row {i}, position {j}: token id {t} outside the vocabulary [0, {vocab})"
                )));
            }
            flat[i * l + j] = t as i64;
        }
    }
    let ids = Tensor::from_slice(&flat)
        .view([rows.len() as i64, l as i64])
        .to_device(device);
    Ok((ids, rows.iter().map(Vec::len).collect()))
}

/// Greedy generation for every example of `comp` (consumed: prompts and answers
/// are appended to its cache): `prompts[i]` follows context i at its original
/// next position; at most `max_new` tokens, a row stops at any `stop` token
/// (not included in the output).
pub fn generate_batch(
    model: &Model,
    comp: &mut Compressed,
    prompts: &[Vec<u32>],
    max_new: usize,
    stop: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    if b != comp.ctx_len.len() || prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::Input(
            "generation needs one non-empty prompt per compressed context".into(),
        ));
    }
    let device = model.device();
    tch::no_grad(|| {
        let (ids, lens) = pad_rows(prompts, model.config().vocab_size, device)?;
        let suffixes = Suffixes::new(ids, &lens, &comp.ctx_len)?;
        let hidden = decode(model, comp, &suffixes, None)?;
        let last: Vec<i64> = lens.iter().map(|&l| l as i64 - 1).collect();
        let last = Tensor::from_slice(&last).to_device(device);
        let d = hidden.size()[2];
        let h = hidden.gather(
            1,
            &last.view([b as i64, 1, 1]).expand([b as i64, 1, d], false),
            false,
        );
        let mut next_pos: Vec<i64> = comp
            .ctx_len
            .iter()
            .zip(&lens)
            .map(|(&c, &l)| (c + l) as i64)
            .collect();
        let mut tokens = model.logits(&h.squeeze_dim(1)).argmax(-1, false);
        let mut out = vec![Vec::new(); b];
        let mut done = vec![max_new == 0; b];
        for step in 0..max_new {
            let host = Vec::<i64>::try_from(tokens.to_device(Device::Cpu))?;
            for (i, &t) in host.iter().enumerate() {
                if done[i] {
                    continue;
                }
                if stop.contains(&(t as u32)) {
                    done[i] = true;
                } else {
                    out[i].push(t as u32);
                }
            }
            if step + 1 == max_new || done.iter().all(|&d| d) {
                break;
            }
            let pos = Tensor::from_slice(&next_pos)
                .view([b as i64, 1])
                .to_device(device);
            let h = decode_step(model, comp, &tokens.view([b as i64, 1]), &pos)?;
            tokens = model.logits(&h.squeeze_dim(1)).argmax(-1, false);
            next_pos.iter_mut().for_each(|p| *p += 1);
        }
        Ok(out)
    })
}

/// Teacher-forced scores of reference continuations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForcedScore {
    /// Mean negative log-likelihood (nats/token) of the scored tokens.
    pub nll: f64,
    /// Mean KL(teacher || this) over the scored tokens (0 without a teacher).
    pub kl: f64,
}

/// Log-probabilities at the rows of `suffixes` that predict the scored tokens
/// `[start, start + len)` of each suffix (`targets` returns those tokens).
fn scored_rows(
    model: &Model,
    comp: &mut Compressed,
    suffixes: &[Vec<u32>],
    scored: &[(usize, usize)],
) -> Result<(Tensor, Vec<i64>, Vec<usize>)> {
    let device = model.device();
    let (ids, lens) = pad_rows(suffixes, model.config().vocab_size, device)?;
    let lx = ids.size()[1];
    let hidden = decode(
        model,
        comp,
        &Suffixes::new(ids, &lens, &comp.ctx_len)?,
        None,
    )?;
    let (mut rows, mut targets, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (&(s, n), suf)) in scored.iter().zip(suffixes).enumerate() {
        if s == 0 || s + n > suf.len() || n == 0 {
            return Err(ModelError::Input(format!(
                "example {i}: scored tokens [{s}, {}) must lie in the suffix after its first token",
                s + n
            )));
        }
        for (j, &t) in suf.iter().enumerate().skip(s).take(n) {
            rows.push(i as i64 * lx + j as i64 - 1);
            targets.push(t as i64);
        }
        counts.push(n);
    }
    let rows = Tensor::from_slice(&rows).to_device(device);
    let logp = model
        .logits(&hidden.flatten(0, 1).index_select(0, &rows))
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float);
    Ok((logp, targets, counts))
}

/// Teacher log-probabilities for [`forced_scores`]: the same rows from a full cache.
pub fn teacher_logprobs(
    model: &Model,
    full: &mut Compressed,
    suffixes: &[Vec<u32>],
    scored: &[(usize, usize)],
) -> Result<Tensor> {
    tch::no_grad(|| Ok(scored_rows(model, full, suffixes, scored)?.0))
}

/// Per example: NLL of the scored suffix tokens given the compressed context,
/// and the KL from `teacher` (from [`teacher_logprobs`]) when given. Consumes
/// `comp` (the suffixes are appended to its cache).
pub fn forced_scores(
    model: &Model,
    comp: &mut Compressed,
    suffixes: &[Vec<u32>],
    scored: &[(usize, usize)],
    teacher: Option<&Tensor>,
) -> Result<Vec<ForcedScore>> {
    tch::no_grad(|| {
        let (logp, targets, counts) = scored_rows(model, comp, suffixes, scored)?;
        let t = Tensor::from_slice(&targets)
            .to_device(model.device())
            .unsqueeze(1);
        let nll = Vec::<f32>::try_from(
            logp.gather(1, &t, false)
                .neg()
                .squeeze_dim(1)
                .to_device(Device::Cpu),
        )?;
        let kl = match teacher {
            Some(lt) => {
                if lt.size() != logp.size() {
                    return Err(ModelError::Input(format!(
                        "teacher rows {:?} do not match the student's {:?}",
                        lt.size(),
                        logp.size()
                    )));
                }
                let k = (lt.exp() * (lt - &logp)).sum_dim_intlist(-1, false, Kind::Float);
                Vec::<f32>::try_from(k.to_device(Device::Cpu))?
            }
            None => vec![0.0; nll.len()],
        };
        let mut out = Vec::with_capacity(counts.len());
        let mut at = 0;
        for n in counts {
            let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
            out.push(ForcedScore {
                nll: mean(&nll[at..at + n]),
                kl: mean(&kl[at..at + n]),
            });
            at += n;
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_rows_pads_right_and_checks_the_vocabulary() {
        let rows = vec![vec![1u32, 2, 3], vec![4]];
        let (ids, lens) = pad_rows(&rows, 5, Device::Cpu).unwrap();
        assert_eq!(lens, [3, 1]);
        assert_eq!(ids.size(), [2, 3]);
        let flat = Vec::<i64>::try_from(ids.flatten(0, -1)).unwrap();
        assert_eq!(flat, [1, 2, 3, 4, 0, 0]);
        let e = pad_rows(&[vec![0u32], vec![1, 7]], 5, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("row 1, position 1: token id 7 outside the vocabulary [0, 5)"),
            "{e}"
        );
    }

    /// `kv_distill_select` keeps what the adaptor's scorer keeps and reads it
    /// with the frozen model: the teacher's K/V at those positions, no score
    /// feed, where `kv_distill` (LoRA B non-zero here) reads different K/V.
    #[test]
    fn scorer_only_keeps_the_scorer_positions_with_the_frozen_cache() {
        let model = Model::tiny_random(3, 5);
        let cfg = model.config().clone();
        let dc = super::super::DistillConfig {
            scorer_layer: 1,
            ..Default::default()
        };
        let adaptor = Adaptor::new(&cfg, dc, Device::Cpu, 7).unwrap();
        tch::no_grad(|| {
            for (name, t) in adaptor.named_trainable() {
                if name.ends_with(".b") {
                    t.shallow_clone().copy_(&(t.randn_like() * 0.5));
                }
            }
        });
        let (lens, l) = ([12usize, 9], 12i64);
        let ids = Tensor::randint_low(3, 200, [2, l], (Kind::Int64, Device::Cpu));
        let spans = vec![vec![(2usize, 10usize)], vec![(1, 8)]];
        let ctx = Contexts {
            ids: &ids,
            len: &lens,
            spans: &spans,
            ratios: &[0.3, 0.5],
        };
        let select_only = compress_contexts(&model, Method::ScorerOnly(&adaptor), ctx).unwrap();
        let adapted = compress_contexts(&model, Method::kv_distill(&adaptor), ctx).unwrap();
        assert_eq!(Method::ScorerOnly(&adaptor).name(), SCORER_ONLY);
        assert!(select_only.feed.is_none());
        for (a, b) in select_only.selections.iter().zip(&adapted.selections) {
            assert_eq!(a.kept, b.kept);
            assert!(a.kept.len() < 12, "{:?}", a.kept);
        }
        let mut full = model.new_cache();
        model
            .fill_cache(Input::new(&ids), &mut full, &NoHooks)
            .unwrap();
        let kept = Kept::new(select_only.selections.clone(), l, &lens, Device::Cpu);
        let want = full.gather(&kept.index).unwrap();
        let valid = kept.valid.unsqueeze(1).unsqueeze(-1);
        let masked = |t: &Tensor| t.where_self(&valid, &t.zeros_like());
        for layer in 0..3 {
            let (got, exp, ad) = (
                select_only.cache.layer(layer).unwrap(),
                want.layer(layer).unwrap(),
                adapted.cache.layer(layer).unwrap(),
            );
            assert!(masked(&got.k).allclose(&masked(&exp.k), 1e-6, 1e-6, false));
            assert!(masked(&got.v).allclose(&masked(&exp.v), 1e-6, 1e-6, false));
            if layer > 0 {
                assert!(!masked(&ad.v).allclose(&masked(&exp.v), 1e-3, 1e-3, false));
            }
        }
    }
}
