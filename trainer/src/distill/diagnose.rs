//! Diagnosis of the scorer's training signal: the gradient the distillation
//! loss sends to each kept position's score through the score feed. With the
//! straight-through feed only kept positions receive one, so what the scorer
//! learns about a position depends on the sign of this gradient while kept.

use super::adaptor::Adaptor;
use super::config::DistillConfig;
use super::loss::kl_mix;
use super::step::{prepare, teacher_logits, DistillExample};
use super::student::{decode, encode, gather_kept};
use crate::error::Result;
use crate::model::Model;
use tch::{Device, Kind};

/// For each example, `(position, d loss / d score)` at every kept span
/// position, with the positions `force[i]` kept whatever their scores. The
/// loss is the batch's KL mix (mean over supervised tokens), as in training.
pub fn score_gradients(
    model: &Model,
    adaptor: &Adaptor,
    cfg: &DistillConfig,
    batch: &[DistillExample],
    force: &[Vec<usize>],
) -> Result<Vec<Vec<(usize, f64)>>> {
    let inp = prepare(model, adaptor, cfg, batch, Some(force))?;
    let teacher = teacher_logits(model, cfg, &inp)?;
    let lc = inp.ctx_ids.size2()?.1;
    let scores = tch::no_grad(|| adaptor.score(&inp.features.narrow(1, 0, lc)))
        .detach()
        .set_requires_grad(true);
    let full = tch::no_grad(|| encode(model, adaptor, &inp.ctx_ids, &inp.kept, false))?;
    let mut comp = gather_kept(&full, &inp.kept, &scores)?;
    let hidden = decode(model, &mut comp, &inp.suffixes, Some(cfg.score_feed))?;
    let student = model.logits(&hidden.flatten(0, 1).index_select(0, &inp.s_rows));
    let kl = kl_mix(
        &teacher,
        &student,
        cfg.kl_forward_weight,
        cfg.temperature,
        cfg.kl_rows_per_chunk(model.config().vocab_size),
    )?;
    (student * kl.grad.detach()).sum(Kind::Float).f_backward()?;
    let grad = scores.grad().to_device(Device::Cpu);
    let host = Vec::<f32>::try_from(grad.flatten(0, -1))?;
    Ok(inp
        .kept
        .selections
        .iter()
        .enumerate()
        .map(|(i, sel)| {
            sel.kept
                .iter()
                .zip(&sel.from_span)
                .filter(|(_, &fs)| fs)
                .map(|(&p, _)| (p, host[i * lc as usize + p] as f64))
                .collect()
        })
        .collect())
}
