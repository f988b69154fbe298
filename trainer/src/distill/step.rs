//! One distillation step on a batch: frozen teacher over the whole sequence,
//! student compress + decode, KL mix on the suffix, gradients into the adaptor.
//! In two parts: `prepare` uploads the batch, runs the teacher's first layers
//! and the scorer, and selects the kept positions on the host; [`StudentPass`]
//! does the rest without reading the host, so it can run as a CUDA graph
//! ([`super::step_graph`]).

use super::adaptor::Adaptor;
use super::baselines::Observer;
use super::config::DistillConfig;
use super::infer::pad_rows_to;
use super::loss::{kl_mix, KlOutput, KlValues};
use super::select::{validate_spans, Span};
use super::step_graph::StepGraphs;
use super::student::{
    decode, encode, encode_recomputable, gather_kept, Contexts, EncoderBackward, Kept, Suffixes,
};
use crate::error::{ModelError, Result};
use crate::model::{Input, Model};
use std::cell::Cell;
use tch::{Kind, Tensor};

/// One training sequence: a context (with compressible spans) and a suffix.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillExample {
    /// Context tokens (prefix, spans, text between spans).
    pub context: Vec<u32>,
    /// Compressible spans of the context, ordered and disjoint.
    pub spans: Vec<Span>,
    /// Tokens after the context (question, answer, or the next text).
    pub suffix: Vec<u32>,
    /// Retention ratio for this example's spans.
    pub ratio: f64,
    /// `[start, start + len)` of the answer within the suffix, for answer-only loss.
    pub answer: Option<(usize, usize)>,
    /// Where the answer's text occurs in the context (start, length): what
    /// the question asks about, a target of the selection loss with
    /// [`DistillConfig::select_answer_weight`]. Empty when unknown.
    pub context_answers: Vec<(usize, usize)>,
}

/// Result of one step on one batch.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// The loss (mean over supervised suffix tokens).
    pub loss: f64,
    /// Mean forward KL.
    pub forward_kl: f64,
    /// Mean reverse KL.
    pub reverse_kl: f64,
    /// Supervised tokens in the batch.
    pub tokens: usize,
    /// The selection loss (0 when [`DistillConfig::select_weight`] is 0).
    pub select_loss: f64,
}

/// The suffix positions `j` whose next token (`j + 1`) the loss supervises:
/// all but the last, or with `answer_only` those predicting the answer.
pub fn supervised_positions<'a>(
    ex: &'a DistillExample,
    cfg: &'a DistillConfig,
) -> impl Iterator<Item = usize> + 'a {
    (0..ex.suffix.len().saturating_sub(1)).filter(move |&j| match (cfg.answer_only, ex.answer) {
        (true, Some((s, n))) => (s..s + n).contains(&(j + 1)),
        _ => true,
    })
}

/// What a step does after its loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backward {
    /// Nothing: an evaluation (no gradients, no LoRA dropout).
    Off,
    /// Backpropagates through the activations the forward kept.
    Stored,
    /// Keeps no activations of the student's encoder (the largest part of
    /// the step's memory) and recomputes them one layer at a time in the
    /// backward: the memory of one layer for one more encoder forward.
    /// The gradients are those of [`Backward::Stored`].
    Recompute,
}

impl Backward {
    /// Whether the step computes gradients.
    pub fn trains(self) -> bool {
        self != Backward::Off
    }
}

/// Everything the step's device work reads after the scorer's selection,
/// uploaded before it starts. A captured step ([`super::step_graph`]) keeps one
/// of these as its static inputs and copies each new batch's into it.
#[derive(Debug)]
pub struct StepInputs {
    /// Context + suffix ids `[batch, lf]`.
    pub full_ids: Tensor,
    /// Context ids `[batch, lc]`.
    pub ctx_ids: Tensor,
    /// The teacher's states after the scorer's layer `[batch, lf, d]`.
    pub features: Tensor,
    /// Flat indices of the teacher's supervised rows.
    pub t_rows: Tensor,
    /// Flat indices of the student's supervised rows.
    pub s_rows: Tensor,
    /// The kept positions.
    pub kept: Kept,
    /// The suffixes.
    pub suffixes: Suffixes,
    /// The positions in `full_ids` of each example's suffix `[batch, lx]`
    /// (int64; padding repeats the first): the queries whose attention is the
    /// selection target.
    pub target_rows: Tensor,
    /// 1.0 at the real entries of `target_rows`, 0.0 at its padding `[batch, lx]`.
    pub target_weights: Tensor,
    /// 1.0 at the span positions the scorer chooses among (sinks excluded)
    /// `[batch, lc]`.
    pub choosable: Tensor,
    /// 1.0 at the context positions of each example's answer text
    /// ([`DistillExample::context_answers`]) `[batch, lc]`; only when the
    /// selection target uses them ([`DistillConfig::select_answer_weight`]).
    pub answer_positions: Option<Tensor>,
}

impl StepInputs {
    /// All device tensors, in a fixed order.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut t = vec![
            &self.full_ids,
            &self.ctx_ids,
            &self.features,
            &self.t_rows,
            &self.s_rows,
            &self.target_rows,
            &self.target_weights,
            &self.choosable,
        ];
        t.extend(&self.answer_positions);
        t.extend(self.kept.tensors());
        t.extend(self.suffixes.tensors());
        t
    }
}

thread_local! {
    /// This thread's pad multiple ([`with_pad_multiple`]; 1: the longest row).
    static PAD_MULTIPLE: Cell<usize> = const { Cell::new(1) };
}

/// Runs `f` with the steps of this thread padding their contexts (and whole
/// rows) up to a multiple of `m` positions, and their suffixes up to a
/// multiple of `min(m, 32)`: micro-batches of similar lengths then share
/// shapes (fewer new shapes for the device's allocator and kernels; CUDA
/// graphs can replay). The padding is masked: the same step up to rounding.
pub fn with_pad_multiple<T>(m: usize, f: impl FnOnce() -> T) -> T {
    let before = PAD_MULTIPLE.with(|p| p.replace(m.max(1)));
    let r = f();
    PAD_MULTIPLE.with(|p| p.set(before));
    r
}

/// How much one micro-batch's losses count in an optimizer step: the update
/// is the gradient of the global batch's mean losses however the batch is
/// split into ranks and micro-batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradScale {
    /// Multiplies the KL's gradient: the micro-batch's share of the global
    /// batch's supervised tokens (the KL is a mean over them).
    pub kl: f64,
    /// Multiplies the selection loss's gradient: the micro-batch's share of
    /// the global batch's examples (the selection loss is a mean over them).
    pub select: f64,
}

impl From<f64> for GradScale {
    /// The same scale for both losses (one micro-batch: 1).
    fn from(x: f64) -> Self {
        GradScale { kl: x, select: x }
    }
}

/// Runs the step: teacher under no_grad, student with autograd, loss, and
/// `backward` into the adaptor's gradients (accumulated; `grad_scale` multiplies
/// them, e.g. 1/accumulation steps, or each loss by its own share). Base weights get no gradient. With
/// `graphs`, the work after the scorer's selection replays a captured CUDA
/// graph when the batch's shapes were seen before.
pub fn distill_step(
    model: &Model,
    adaptor: &Adaptor,
    cfg: &DistillConfig,
    batch: &[DistillExample],
    grad_scale: impl Into<GradScale>,
    backward: Backward,
    graphs: Option<&mut StepGraphs>,
) -> Result<StepStats> {
    let grad_scale = grad_scale.into();
    let inputs = prepare(model, adaptor, cfg, batch, None)?;
    let tokens = inputs.s_rows.size()[0] as usize;
    let pass = StudentPass {
        model,
        adaptor,
        cfg,
        grad_scale,
        backward,
    };
    let v = match graphs {
        Some(g) => g.run(&pass, inputs)?,
        None => {
            // Reading the loss waits for the device. Read after the backward
            // is launched, the host queues the backward while the device
            // finishes the forward; a non-finite loss still fails the step
            // before the optimizer (the trainer zeroes the gradients at the
            // next step).
            let deferred = crate::ablate::on(crate::ablate::SpeedUp::DeferredLoss);
            let thread = crate::ablate::on(crate::ablate::SpeedUp::TeacherThread)
                && !super::phases::enabled();
            let kl = pass.run(&inputs, thread, !deferred)?;
            checked(&kl)?
        }
    };
    Ok(StepStats {
        loss: v.loss,
        forward_kl: v.forward_kl,
        reverse_kl: v.reverse_kl,
        tokens,
        select_loss: v.select_loss,
    })
}

/// A step that trains the scorer alone (the first
/// [`super::TrainConfig::select_warmup_steps`] of a run): the teacher, without
/// gradients, gives the selection target (its suffix's attention, plus the
/// answer's location with [`DistillConfig::select_answer_weight`]), and the
/// selection loss times `select_weight * grad_scale.select` is backpropagated into
/// the scorer. No student pass and no KL (the returned `loss` and KL are
/// NaN): about the cost of the teacher's forward, a fraction of a full step,
/// so the scorer learns what the suffix reads before the LoRA trains on what
/// it keeps.
pub fn select_step(
    model: &Model,
    adaptor: &Adaptor,
    cfg: &DistillConfig,
    batch: &[DistillExample],
    grad_scale: impl Into<GradScale>,
) -> Result<StepStats> {
    let grad_scale = grad_scale.into();
    if cfg.select_weight <= 0.0 {
        return Err(ModelError::Input(
            "a scorer-only step needs the selection loss (--select-weight above 0)".into(),
        ));
    }
    let inputs = prepare(model, adaptor, cfg, batch, None)?;
    let tokens = inputs.s_rows.size()[0] as usize;
    let mut timer = super::phases::PhaseTimer::start(model.device());
    let (_, attention) = TeacherRest::new(model, cfg, &inputs, true).hidden()?;
    let attention =
        attention.ok_or_else(|| ModelError::Input("the teacher gave no attention".into()))?;
    timer.mark("teacher");
    let lc = inputs.choosable.size2()?.1;
    let attention = attention.narrow(1, 0, lc);
    let target = match &inputs.answer_positions {
        Some(a) => with_answers(&attention, a, &inputs.choosable, cfg.select_answer_weight)?,
        None => attention,
    };
    let scores = adaptor.score(&inputs.features.narrow(1, 0, lc));
    let loss = selection_loss(&scores, &target, &inputs.choosable)?;
    let value = loss.f_double_value(&[])?;
    if !value.is_finite() {
        return Err(ModelError::Input(format!(
            "non-finite selection loss {value}"
        )));
    }
    loss.f_mul_scalar(cfg.select_weight * grad_scale.select)?
        .f_backward()?;
    timer.mark("backward");
    Ok(StepStats {
        loss: f64::NAN,
        forward_kl: f64::NAN,
        reverse_kl: f64::NAN,
        tokens,
        select_loss: value,
    })
}

/// Checks the batch, uploads it, runs the teacher's first `scorer_layer`
/// layers and the scorer, and selects the kept positions (reading the scores
/// to the host).
/// With `force`, the context positions `force[i]` of example i are kept
/// whatever their scores (a diagnosis).
pub(crate) fn prepare(
    model: &Model,
    adaptor: &Adaptor,
    cfg: &DistillConfig,
    batch: &[DistillExample],
    force: Option<&[Vec<usize>]>,
) -> Result<StepInputs> {
    if batch.is_empty() {
        return Err(ModelError::Input("empty batch".into()));
    }
    for (i, ex) in batch.iter().enumerate() {
        if ex.context.is_empty() || ex.suffix.len() < 2 {
            return Err(ModelError::Input(format!(
                "example {i}: needs a non-empty context and a suffix of at least 2 tokens"
            )));
        }
        validate_spans(&ex.spans, ex.context.len())
            .map_err(|e| ModelError::Input(format!("example {i}: {e}")))?;
    }
    let full_len: Vec<usize> = batch
        .iter()
        .map(|e| e.context.len() + e.suffix.len())
        .collect();
    super::infer::check_window(model, &full_len)?;
    let device = model.device();
    let ctx_len: Vec<usize> = batch.iter().map(|e| e.context.len()).collect();
    let suf_len: Vec<usize> = batch.iter().map(|e| e.suffix.len()).collect();
    let full: Vec<Vec<u32>> = batch
        .iter()
        .map(|e| [e.context.as_slice(), e.suffix.as_slice()].concat())
        .collect();
    let vocab = model.config().vocab_size;
    // Padded to the longest row, or with a pad multiple up to the next
    // multiple (suffixes: of at most 32), within the model's window.
    let m = PAD_MULTIPLE.with(Cell::get);
    let window = model.config().max_position_embeddings;
    let to = |lens: &[usize], m: usize| {
        let longest = lens.iter().copied().max().unwrap_or(0);
        (longest.div_ceil(m) * m).min(window).max(longest)
    };
    let full_ids = pad_rows_to(&full, vocab, device, to(&full_len, m))?.0;
    let ctx_rows: Vec<Vec<u32>> = batch.iter().map(|e| e.context.clone()).collect();
    let suf_rows: Vec<Vec<u32>> = batch.iter().map(|e| e.suffix.clone()).collect();
    let ctx_ids = pad_rows_to(&ctx_rows, vocab, device, to(&ctx_len, m))?.0;
    let suf_ids = pad_rows_to(&suf_rows, vocab, device, to(&suf_len, m.min(32)))?.0;
    let lf = full_ids.size()[1];
    let lx = suf_ids.size()[1];

    // Supervised rows: suffix position j predicts suffix token j + 1.
    let (mut s_rows, mut t_rows) = (Vec::new(), Vec::new());
    for (i, ex) in batch.iter().enumerate() {
        for j in supervised_positions(ex, cfg) {
            s_rows.push(i as i64 * lx + j as i64);
            t_rows.push(i as i64 * lf + (ctx_len[i] + j) as i64);
        }
    }
    if s_rows.is_empty() {
        return Err(ModelError::Input(
            "no supervised suffix tokens in the batch".into(),
        ));
    }
    let s_rows = Tensor::from_slice(&s_rows).to_device(device);
    let t_rows = Tensor::from_slice(&t_rows).to_device(device);

    // The scorer reads the teacher's states after its first `scorer_layer`
    // layers; the selection reads the scores on the host.
    let mut timer = super::phases::PhaseTimer::start(device);
    let layer = cfg.scorer_layer;
    let lc = ctx_ids.size2()?.1;
    let (features, scores) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
        let f = model.layer_states(Input::new(&full_ids).vocab_checked(), layer)?;
        let s = adaptor.score(&f.narrow(1, 0, lc));
        Ok((f, s))
    })?;
    let spans: Vec<Vec<Span>> = batch.iter().map(|e| e.spans.clone()).collect();
    let ratios: Vec<f64> = batch.iter().map(|e| e.ratio).collect();
    let contexts = Contexts {
        ids: &ctx_ids,
        len: &ctx_len,
        spans: &spans,
        ratios: &ratios,
    };
    let scores = match force {
        Some(f) => super::student::with_forced(&scores, f)?,
        None => scores,
    };
    let kept = Kept::select(&scores, contexts, cfg.sinks, cfg.train_span_pool)?;
    timer.mark("scorer");
    let (lxu, lcu) = (lx as usize, lc as usize);
    let mut rows = vec![0i64; batch.len() * lxu];
    let mut weights = vec![0f32; batch.len() * lxu];
    let mut choosable = vec![0f32; batch.len() * lcu];
    for (i, ex) in batch.iter().enumerate() {
        for j in 0..lxu {
            rows[i * lxu + j] = (ctx_len[i] + j.min(suf_len[i] - 1)) as i64;
        }
        weights[i * lxu..i * lxu + suf_len[i]].fill(1.0);
        for &(s, n) in &ex.spans {
            let from = s + cfg.sinks.min(n);
            choosable[i * lcu + from..i * lcu + s + n].fill(1.0);
        }
    }
    let answers = (cfg.select_weight > 0.0 && cfg.select_answer_weight > 0.0).then(|| {
        let mut answers = vec![0f32; batch.len() * lcu];
        for (i, ex) in batch.iter().enumerate() {
            for &(s, n) in &ex.context_answers {
                let end = (s + n).min(ctx_len[i]);
                if s < end {
                    answers[i * lcu + s..i * lcu + end].fill(1.0);
                }
            }
        }
        answers
    });
    let b = batch.len() as i64;
    Ok(StepInputs {
        target_rows: Tensor::from_slice(&rows).view([b, lx]).to_device(device),
        target_weights: Tensor::from_slice(&weights).view([b, lx]).to_device(device),
        choosable: Tensor::from_slice(&choosable)
            .view([b, lc])
            .to_device(device),
        answer_positions: answers.map(|a| Tensor::from_slice(&a).view([b, lc]).to_device(device)),
        suffixes: Suffixes::new(suf_ids, &suf_len, &ctx_len)?,
        full_ids,
        ctx_ids,
        features,
        t_rows,
        s_rows,
        kept,
    })
}

/// The step's device work after the selection: the teacher's remaining layers
/// and logits, the student (scorer with gradient, encoder with routed LoRA,
/// gather, decoder), the KL mix and the backward. It reads the host only for
/// shapes, so a CUDA graph can capture it.
pub struct StudentPass<'a> {
    /// The frozen model.
    pub model: &'a Model,
    /// The trained adaptor.
    pub adaptor: &'a Adaptor,
    /// Method settings.
    pub cfg: &'a DistillConfig,
    /// Multiplies the gradients (each loss's by its own share).
    pub grad_scale: GradScale,
    /// Whether and how to backpropagate (training also enables LoRA dropout).
    pub backward: Backward,
}

impl StudentPass<'_> {
    /// Runs the pass on `inp`. With `thread`, the teacher's layers run on a
    /// second host thread while this one launches the student's: at small
    /// shapes the step is bound by kernel launches, and two threads launch
    /// twice as fast; both use the same CUDA stream, so each kernel computes
    /// what it would alone. With `read_early`, the loss is read (and refused
    /// when not finite) before the backward.
    pub fn run(&self, inp: &StepInputs, thread: bool, read_early: bool) -> Result<KlOutput> {
        let (model, adaptor, cfg) = (self.model, self.adaptor, self.cfg);
        let mut timer = super::phases::PhaseTimer::start(model.device());
        let rest = TeacherRest::new(model, cfg, inp, cfg.select_weight > 0.0);
        std::thread::scope(|scope| -> Result<KlOutput> {
            let teacher = if thread {
                Teacher::Running(
                    std::thread::Builder::new()
                        .name("kvd-teacher".into())
                        .spawn_scoped(scope, move || rest.logits())
                        .map_err(|e| {
                            ModelError::Input(format!("cannot start the teacher thread: {e}"))
                        })?,
                )
            } else {
                Teacher::Done(rest.logits()?)
            };
            timer.mark("teacher");
            let mut encoder_backward: Option<EncoderBackward> = None;
            let student = (|| -> Result<(Tensor, Tensor)> {
                let lc = inp.ctx_ids.size2()?.1;
                let scores = adaptor.score(&inp.features.narrow(1, 0, lc));
                let full = match self.backward {
                    Backward::Recompute => {
                        let (full, back) =
                            encode_recomputable(model, adaptor, &inp.ctx_ids, &inp.kept)?;
                        encoder_backward = Some(back);
                        full
                    }
                    b => encode(model, adaptor, &inp.ctx_ids, &inp.kept, b.trains())?,
                };
                timer.mark("encoder");
                let mut comp = gather_kept(&full, &inp.kept, &scores)?;
                timer.mark("gather");
                let hidden = decode(model, &mut comp, &inp.suffixes, Some(cfg.score_feed))?;
                let logits = model.logits(&hidden.flatten(0, 1).index_select(0, &inp.s_rows));
                Ok((logits, scores))
            })();
            // Joined even when the student failed, so its error is the one returned.
            let teacher_out = teacher.join();
            let (student_logits, scores) = student?;
            let (teacher_logits, target) = teacher_out?;
            timer.mark("decoder");
            let mut kl = kl_mix(
                &teacher_logits,
                &student_logits,
                cfg.kl_forward_weight,
                cfg.temperature,
                cfg.kl_rows_per_chunk(model.config().vocab_size),
            )?;
            let select = match &target {
                Some(t) => {
                    let lc = inp.choosable.size2()?.1;
                    let attention = t.narrow(1, 0, lc);
                    let target = match &inp.answer_positions {
                        Some(a) => {
                            with_answers(&attention, a, &inp.choosable, cfg.select_answer_weight)?
                        }
                        None => attention,
                    };
                    Some(selection_loss(&scores, &target, &inp.choosable)?)
                }
                None => None,
            };
            kl.select = select.as_ref().map(|l| l.detach());
            if read_early {
                checked(&kl)?;
            }
            timer.mark("kl");
            if self.backward.trains() {
                // d(sum(logits * g))/d logits = g: backpropagates the analytic KL gradient.
                let g = &kl.grad * self.grad_scale.kl;
                let mut total = (student_logits * g.detach()).sum(Kind::Float);
                if let Some(l) = &select {
                    total += l * (cfg.select_weight * self.grad_scale.select);
                }
                total.f_backward()?;
                if let Some(back) = encoder_backward {
                    back.backward()?;
                }
                timer.mark("backward");
            }
            Ok(kl)
        })
    }
}

/// The selection loss: cross-entropy between the teacher's attention
/// `target` `[batch, lc]` restricted to the `choosable` positions (normalised
/// per example) and the softmax of `scores` over those positions, averaged
/// over the batch. Every choosable position gets a gradient, kept or not.
pub fn selection_loss(scores: &Tensor, target: &Tensor, choosable: &Tensor) -> Result<Tensor> {
    let off = choosable.f_le(0.5)?;
    let t = target.f_mul(choosable)?;
    let p = &t
        / t.f_sum_dim_intlist([1].as_slice(), true, Kind::Float)?
            .f_clamp_min(1e-12)?;
    let logq = scores
        .f_masked_fill(&off, -1e9)?
        .f_log_softmax(1, Kind::Float)?
        .f_masked_fill(&off, 0.0)?;
    Ok((p.detach() * logq)
        .f_sum_dim_intlist([1].as_slice(), false, Kind::Float)?
        .f_mean(Kind::Float)?
        .f_neg()?)
}

/// The selection target with the answer's location: the teacher's attention
/// `attention` over the `choosable` positions, normalised per example, plus
/// `weight` times the choosable `answers` positions, normalised per example
/// (0 for an example without them). `weight` 0: the attention as it is.
pub fn with_answers(
    attention: &Tensor,
    answers: &Tensor,
    choosable: &Tensor,
    weight: f64,
) -> Result<Tensor> {
    if weight == 0.0 {
        return Ok(attention.shallow_clone());
    }
    let per_row = |t: &Tensor| -> Result<Tensor> {
        let t = t.f_mul(choosable)?;
        let sum = t
            .f_sum_dim_intlist([1].as_slice(), true, Kind::Float)?
            .f_clamp_min(1e-12)?;
        Ok(t.f_div(&sum)?)
    };
    Ok(per_row(attention)?.f_add(&per_row(answers)?.f_mul_scalar(weight)?)?)
}

/// The loss's value, refused when it is not finite.
pub(crate) fn checked(kl: &KlOutput) -> Result<KlValues> {
    let v = kl.values()?;
    if !v.loss.is_finite() {
        return Err(ModelError::Input(format!(
            "non-finite loss {} (forward KL {}, reverse KL {})",
            v.loss, v.forward_kl, v.reverse_kl
        )));
    }
    Ok(v)
}

/// `&Model` for the teacher's thread.
struct SharedModel<'a>(&'a Model);

// SAFETY: the teacher's thread only reads the model's tensors (libtorch
// tensors may be read from several threads at once; their reference counts
// are atomic), and the scope joins it before the borrow ends.
unsafe impl Send for SharedModel<'_> {}

/// The teacher's logits at the supervised rows of `inp` (no selection target).
pub(crate) fn teacher_logits(
    model: &Model,
    cfg: &DistillConfig,
    inp: &StepInputs,
) -> Result<Tensor> {
    Ok(TeacherRest::new(model, cfg, inp, false).logits()?.0)
}

/// The teacher's layers after the scorer's, and its logits at the supervised rows.
struct TeacherRest<'a> {
    model: SharedModel<'a>,
    ids: Tensor,
    states: Tensor,
    rows: Tensor,
    /// With the selection loss: the suffix queries whose attention is its
    /// target (positions and weights, [`StepInputs::target_rows`]).
    queries: Option<(Tensor, Tensor)>,
    layer: usize,
    threads: i32,
}

impl<'a> TeacherRest<'a> {
    /// The rest of the teacher's pass over `inp` (with `target`, also the
    /// selection target's attention), on this thread's intra-op threads.
    fn new(model: &'a Model, cfg: &DistillConfig, inp: &StepInputs, target: bool) -> Self {
        TeacherRest {
            model: SharedModel(model),
            ids: inp.full_ids.shallow_clone(),
            states: inp.features.shallow_clone(),
            rows: inp.t_rows.shallow_clone(),
            queries: target.then(|| {
                (
                    inp.target_rows.shallow_clone(),
                    inp.target_weights.shallow_clone(),
                )
            }),
            layer: cfg.scorer_layer,
            threads: tch::get_num_threads(),
        }
    }

    /// The teacher's logits at the supervised rows, and with the selection
    /// loss its attention target `[batch, lc]` (over all its positions; the
    /// loss keeps the span's).
    fn logits(self) -> Result<(Tensor, Option<Tensor>)> {
        let ((model, h), target) = self.hidden()?;
        Ok((tch::no_grad(|| model.logits(&h)), target))
    }

    /// The teacher's final hidden states at the supervised rows (with the
    /// model), and the selection target as in [`TeacherRest::logits`]: what
    /// a scorer-only step needs, without the output head's product over the
    /// vocabulary.
    fn hidden(self) -> Result<((&'a Model, Tensor), Option<Tensor>)> {
        // Intra-op thread counts are per thread: match the caller's.
        tch::set_num_threads(self.threads);
        let model = self.model.0;
        tch::no_grad(|| {
            let input = Input::new(&self.ids).vocab_checked();
            let (h, target) = match self.queries {
                None => (model.resume_hidden(input, &self.states, self.layer)?, None),
                Some((rows, weights)) => {
                    let keys = self.ids.size2()?.1;
                    let obs =
                        Observer::weighted_rows(rows, weights, keys, model.config().num_layers);
                    let h = model.resume_hidden_with(input, &self.states, self.layer, &obs)?;
                    (h, Some(obs.total()))
                }
            };
            Ok(((model, h.flatten(0, 1).index_select(0, &self.rows)), target))
        })
    }
}

/// The teacher's logits (and selection target), being computed or done.
enum Teacher<'s> {
    Running(std::thread::ScopedJoinHandle<'s, Result<TeacherOut>>),
    Done(TeacherOut),
}

/// The teacher's logits and optional selection target.
type TeacherOut = (Tensor, Option<Tensor>);

impl Teacher<'_> {
    fn join(self) -> Result<TeacherOut> {
        match self {
            Teacher::Done(t) => Ok(t),
            Teacher::Running(h) => h.join().map_err(|p| {
                let why = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                ModelError::Input(format!("the teacher thread panicked: {why}"))
            })?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pad multiple pads contexts and whole rows to its next multiple and
    /// suffixes to one of at most 32, for the closure's duration only.
    #[test]
    fn a_pad_multiple_pads_contexts_and_suffixes() {
        let model = Model::tiny_random(2, 5);
        let mc = model.config().clone();
        let dc = DistillConfig {
            scorer_layer: 1,
            ..Default::default()
        };
        let adaptor = Adaptor::new(&mc, dc.clone(), tch::Device::Cpu, 7).unwrap();
        let ex = DistillExample {
            context: (3..40).collect(),
            spans: vec![(2, 30)],
            suffix: (5..14).collect(),
            ratio: 0.25,
            answer: None,
            context_answers: Vec::new(),
        };
        let widths = || {
            let p = prepare(&model, &adaptor, &dc, std::slice::from_ref(&ex), None).unwrap();
            (
                p.ctx_ids.size()[1],
                p.full_ids.size()[1],
                p.suffixes.ids.size()[1],
            )
        };
        assert_eq!(widths(), (37, 46, 9));
        assert_eq!(with_pad_multiple(64, widths), (64, 64, 32));
        assert_eq!(with_pad_multiple(8, widths), (40, 48, 16));
        assert_eq!(widths(), (37, 46, 9), "back to the longest row");
    }
}
