//! One distillation step on a batch: frozen teacher over the whole sequence,
//! student compress + decode, KL mix on the suffix, gradients into the adaptor.

use super::adaptor::Adaptor;
use super::config::DistillConfig;
use super::infer::pad_rows;
use super::loss::{kl_mix, KlOutput, KlValues};
use super::select::{validate_spans, Span};
use super::student::{compress, decode, Contexts};
use crate::error::{ModelError, Result};
use crate::model::{Input, Model};
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

/// Runs the step: teacher under no_grad, student with autograd, loss, and
/// backward into the adaptor's gradients (accumulated; `grad_scale` multiplies
/// them, e.g. 1/accumulation steps). Base weights get no gradient.
pub fn distill_step(
    model: &Model,
    adaptor: &Adaptor,
    cfg: &DistillConfig,
    batch: &[DistillExample],
    grad_scale: f64,
    train: bool,
) -> Result<StepStats> {
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
    let full_ids = pad_rows(&full, vocab, device)?.0;
    let ctx_rows: Vec<Vec<u32>> = batch.iter().map(|e| e.context.clone()).collect();
    let suf_rows: Vec<Vec<u32>> = batch.iter().map(|e| e.suffix.clone()).collect();
    let ctx_ids = pad_rows(&ctx_rows, vocab, device)?.0;
    let suf_ids = pad_rows(&suf_rows, vocab, device)?.0;
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

    // Teacher: full cache, frozen. Its first `scorer_layer` layers give the
    // scorer's features; the remaining layers run on a second host thread
    // while this one launches the student's work. At small shapes the step is
    // bound by kernel launches, and two threads launch twice as fast; both use
    // the same CUDA stream, so each kernel computes what it would alone.
    let mut timer = super::phases::PhaseTimer::start(device);
    let layer = cfg.scorer_layer;
    let features =
        tch::no_grad(|| model.layer_states(Input::new(&full_ids).vocab_checked(), layer))?;
    let rest = TeacherRest {
        model: SharedModel(model),
        ids: full_ids.shallow_clone(),
        states: features.shallow_clone(),
        rows: t_rows.shallow_clone(),
        layer,
        threads: tch::get_num_threads(),
    };
    std::thread::scope(|scope| -> Result<StepStats> {
        let mut teacher = Teacher::Running(
            std::thread::Builder::new()
                .name("kvd-teacher".into())
                .spawn_scoped(scope, move || rest.logits())
                .map_err(|e| ModelError::Input(format!("cannot start the teacher thread: {e}")))?,
        );
        if super::phases::enabled() || !crate::ablate::on(crate::ablate::SpeedUp::TeacherThread) {
            // Phase timing (or the ablation) runs the teacher to its end first.
            teacher = Teacher::Done(teacher.join()?);
        }
        timer.mark("teacher");

        // Student.
        let student = (|| -> Result<Tensor> {
            let spans: Vec<Vec<Span>> = batch.iter().map(|e| e.spans.clone()).collect();
            let ratios: Vec<f64> = batch.iter().map(|e| e.ratio).collect();
            let contexts = Contexts {
                ids: &ctx_ids,
                len: &ctx_len,
                spans: &spans,
                ratios: &ratios,
            };
            let mut comp = compress(model, adaptor, contexts, &features, train)?;
            timer.skip(); // compress marks its own phases
            let hidden = decode(model, &mut comp, &suf_ids, &suf_len, Some(cfg.score_feed))?;
            Ok(model.logits(&hidden.flatten(0, 1).index_select(0, &s_rows)))
        })();
        // Joined even when the student failed, so its error is the one returned.
        let teacher_logits = teacher.join();
        let student_logits = student?;
        let teacher_logits = teacher_logits?;
        timer.mark("decoder");
        let kl = kl_mix(
            &teacher_logits,
            &student_logits,
            cfg.kl_forward_weight,
            cfg.temperature,
            cfg.kl_chunk_rows,
        )?;
        // Reading the loss waits for the device. Read after the backward is
        // launched, the host queues the backward while the device finishes the
        // forward; a non-finite loss still fails the step before the optimizer
        // (the trainer zeroes the gradients at the next step).
        let deferred = crate::ablate::on(crate::ablate::SpeedUp::DeferredLoss);
        let early = (!deferred).then(|| checked(&kl)).transpose()?;
        timer.mark("kl");
        let tokens = kl.grad.size()[0] as usize;
        if train {
            // d(sum(logits * g))/d logits = g: backpropagates the analytic KL gradient.
            let g = &kl.grad * grad_scale;
            (student_logits * g.detach())
                .sum(Kind::Float)
                .f_backward()?;
            timer.mark("backward");
        }
        let v = early.map_or_else(|| checked(&kl), Ok)?;
        Ok(StepStats {
            loss: v.loss,
            forward_kl: v.forward_kl,
            reverse_kl: v.reverse_kl,
            tokens,
        })
    })
}

/// The loss's value, refused when it is not finite.
fn checked(kl: &KlOutput) -> Result<KlValues> {
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

/// The teacher's layers after the scorer's, and its logits at the supervised rows.
struct TeacherRest<'a> {
    model: SharedModel<'a>,
    ids: Tensor,
    states: Tensor,
    rows: Tensor,
    layer: usize,
    threads: i32,
}

impl TeacherRest<'_> {
    fn logits(self) -> Result<Tensor> {
        // Intra-op thread counts are per thread: match the caller's.
        tch::set_num_threads(self.threads);
        let model = self.model.0;
        tch::no_grad(|| {
            let h = model.resume_hidden(
                Input::new(&self.ids).vocab_checked(),
                &self.states,
                self.layer,
            )?;
            Ok(model.logits(&h.flatten(0, 1).index_select(0, &self.rows)))
        })
    }
}

/// The teacher's logits, being computed or done.
enum Teacher<'s> {
    Running(std::thread::ScopedJoinHandle<'s, Result<Tensor>>),
    Done(Tensor),
}

impl Teacher<'_> {
    fn join(self) -> Result<Tensor> {
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
