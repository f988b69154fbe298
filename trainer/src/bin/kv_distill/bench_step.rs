//! `kv-distill bench-step`: the full KV-Distill training step (teacher
//! forward, scorer, student encoder with routed LoRA, decoder, chunked KL,
//! backward, AdamW) at a given shape, timed: tokens/s (span + suffix tokens
//! per second), device memory, and MFU against a stated peak from the FLOP
//! count of `kvd_trainer::distill::flops`.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use kvd_trainer::distill::dump::write_step_inputs;
use kvd_trainer::distill::flops::step_flops;
use kvd_trainer::distill::{
    kept_count, Adaptor, DistillConfig, DistillExample, TrainConfig, Trainer,
};
use rand::{Rng, SeedableRng};

/// Arguments of `bench-step`.
#[derive(Args, Debug)]
pub(crate) struct BenchStepArgs {
    #[command(flatten)]
    model: super::BenchModelArgs,
    /// Compressed span tokens per example (after one BOS token).
    #[arg(long, default_value_t = 4096)]
    span: usize,
    /// Suffix tokens per example.
    #[arg(long, default_value_t = 256)]
    suffix: usize,
    /// Retention ratio.
    #[arg(long, default_value_t = 0.1)]
    ratio: f64,
    /// Examples per step (one micro-batch).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Distinct random batches of the shape, used in turn (with more than
    /// one, a captured step must take each step's inputs, not the first's).
    #[arg(long, default_value_t = 1)]
    batches: usize,
    /// Timed steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Peak FLOP/s for MFU [default: 801e12, bf16 matmul on one H200, shared/GPU.md].
    #[arg(long, default_value_t = 801e12)]
    peak_flops: f64,
    /// Write the inputs of the run to this directory, for the PyTorch reference
    /// (`bench/kvdistill_ref.py`): `adaptor.safetensors` (initial scorer and
    /// LoRA tensors) and `batch.json` before the first step, `losses.json` after.
    #[arg(long)]
    dump: Option<std::path::PathBuf>,
    /// Run the step's work after the selection as a CUDA graph (captured at
    /// the first step, replayed after; CUDA only).
    #[arg(long)]
    cuda_graphs: bool,
    /// Cut each step's batch into this many micro-batches (gradients
    /// accumulate; 1: the whole batch at once).
    #[arg(long, default_value_t = 1)]
    micro_batches: usize,
    /// Recompute the student encoder's activations in the backward instead
    /// of keeping them (less memory, one more encoder forward).
    #[arg(long)]
    recompute_encoder: bool,
    /// Turn these speed-ups off (comma-separated: fill_cache, teacher_thread,
    /// deferred_loss), to time the step without each; results are the same.
    #[arg(long, env = "KVD_ABLATE", default_value = "")]
    ablate: String,
    /// Time each phase of the step (synchronizing the device between phases)
    /// and report the mean seconds per phase.
    #[arg(long, env = "KVD_STEP_PHASES")]
    step_phases: bool,
    /// Count the operators libtorch dispatches per timed step ("ops"; with
    /// --step-phases also per phase, "phase_ops"): at small shapes a GPU
    /// step's time is their host-side dispatch.
    #[arg(long)]
    count_ops: bool,
    /// Profile the timed steps (libtorch's Kineto profiler: the device's
    /// kernels on CUDA, the operators on the CPU) and write the time per
    /// kernel or operator, per step, as Markdown tables to this file: the
    /// table `bench/kvdistill_ref.py --profile` gives for the reference.
    /// Device kernels are seen from every thread, CPU operators from the
    /// calling one (with `--ablate teacher_thread` the teacher's too).
    #[arg(long)]
    profile: Option<std::path::PathBuf>,
    /// Which method's step: reference (scorer on layer 3, LoRA on q,o of rank
    /// 8, the straight-through score feed, no selection loss: what the PyTorch
    /// reference `bench/kvdistill_ref.py` implements) or train (the method
    /// `train` and `worker` train by default: LoRA on q,k,v,o with K/V at every
    /// position, the σ(s) feed, sinks, the selection loss), to compare a
    /// training job's tokens/s with its own step.
    #[arg(long, default_value = "reference", value_parser = ["reference", "train"])]
    method: String,
}

/// Device memory in use (bytes), from the CUDA driver: torch's cache included.
fn device_memory_used() -> Option<u64> {
    std::panic::catch_unwind(|| cudarc::driver::result::mem_get_info().ok())
        .ok()
        .flatten()
        .map(|(free, total)| (total - free) as u64)
}

/// The process's peak resident memory (bytes), from /proc (Linux): on the
/// CPU, the step's activations are most of it.
fn host_peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs `bench-step`; prints one JSON line.
pub(crate) fn run_bench_step(a: BenchStepArgs) -> Result<()> {
    kvd_trainer::ablate::turn_off(&kvd_trainer::ablate::SpeedUp::parse_list(&a.ablate)?);
    kvd_trainer::distill::phases::set_enabled(a.step_phases);
    if a.count_ops {
        kvd_trainer::op_count::start()?;
    }
    let (model, name) = a.model.load()?;
    let (device, kind) = (model.device(), model.kind());
    if a.micro_batches == 0 || a.micro_batches > a.batch {
        bail!("--micro-batches must lie in 1..=--batch ({})", a.batch);
    }
    if a.span == 0 || a.suffix < 2 || a.batch == 0 || a.iters == 0 || a.batches == 0 {
        bail!(
            "--span must be positive, --suffix at least 2, --batch, --batches and --iters positive"
        );
    }
    if a.dump.is_some() && a.batches > 1 {
        bail!("--dump needs --batches 1: the PyTorch reference steps on one batch");
    }
    let vocab = model.config().vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(3..vocab)).collect() };
    let batches: Vec<Vec<DistillExample>> = (0..a.batches)
        .map(|_| {
            (0..a.batch)
                .map(|_| {
                    let mut context = vec![1u32];
                    context.extend(tokens(a.span));
                    DistillExample {
                        context,
                        spans: vec![(1, a.span)],
                        suffix: tokens(a.suffix),
                        ratio: a.ratio,
                        answer: None,
                        context_answers: Vec::new(),
                    }
                })
                .collect()
        })
        .collect();
    let distill = match a.method.as_str() {
        "train" => super::distill_cmds::MethodArgs::train_defaults()?.distill_config()?,
        _ => DistillConfig::default(),
    };
    let adaptor = Adaptor::new(model.config(), distill.clone(), device, 0)?;
    let train_cfg = trainer_cfg(a.iters);
    let mut trainer = Trainer::new(&adaptor, train_cfg.clone())?;
    if a.cuda_graphs {
        trainer.use_cuda_graphs(device, 1)?;
    }
    trainer.recompute_encoder(a.recompute_encoder);
    let sync = || kvd_trainer::device::synchronize(device);
    if let Some(dir) = &a.dump {
        write_step_inputs(
            dir,
            &name,
            model.config(),
            &adaptor,
            &distill,
            &train_cfg,
            &batches[0],
        )?;
    }
    let cut = a.batch.div_ceil(a.micro_batches);
    let micro: Vec<Vec<Vec<DistillExample>>> = batches
        .into_iter()
        .map(|b| b.chunks(cut).map(<[DistillExample]>::to_vec).collect())
        .collect();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let mut peak_mem = 0u64;
    let mut ops_before = kvd_trainer::op_count::read();
    let mut profile = None;
    let mut profiled = None;
    for i in 0..a.iters + 2 {
        if i == 2 {
            if a.profile.is_some() {
                sync();
                profile = Some(kvd_trainer::kernel_profile::Profile::start(
                    device.is_cuda(),
                )?);
                profiled = Some(Instant::now());
            }
            let _ = kvd_trainer::distill::phases::take();
            ops_before = kvd_trainer::op_count::read();
            kvd_trainer::op_count::count_names(a.count_ops);
            let _ = kvd_trainer::op_count::take_names();
        }
        sync();
        let t0 = Instant::now();
        let s = trainer.train_step(&model, &adaptor, &micro[i % micro.len()])?;
        sync();
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
        losses.push(s.loss);
        if device.is_cuda() {
            peak_mem = peak_mem.max(device_memory_used().unwrap_or(0));
        }
    }
    let wall_us = profiled.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e6);
    let profile_rows = profile.map(|p| p.stop()).transpose()?;
    let iters = a.iters as u64;
    let ops = kvd_trainer::op_count::read().since(ops_before).per(iters);
    // The 30 most frequent operators per timed step (--count-ops).
    let top_ops: Vec<(String, u64)> = kvd_trainer::op_count::take_names()
        .into_iter()
        .take(30)
        .map(|(n, c)| (n, c / iters.max(1)))
        .collect();
    // Mean seconds (and operators, --count-ops) per timed step of each phase
    // (--step-phases), else empty.
    let timed = kvd_trainer::distill::phases::take_with_ops();
    let phases: std::collections::BTreeMap<&str, f64> = timed
        .iter()
        .map(|(&k, v)| (k, v.0 / a.iters as f64))
        .collect();
    let phase_ops: std::collections::BTreeMap<&str, _> = timed
        .iter()
        .filter(|_| a.count_ops)
        .map(|(&k, v)| (k, v.1.per(iters)))
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let kept = 1 + kept_count(a.span, a.ratio);
    let flops = step_flops(
        model.config(),
        &distill,
        a.batch,
        a.span + 1,
        kept,
        a.suffix,
    );
    let tokens_per_step = (a.batch * (a.span + a.suffix)) as f64;
    let line = serde_json::json!({
        "model": name, "device": format!("{device:?}"), "dtype": format!("{kind:?}"),
        "span": a.span, "suffix": a.suffix, "ratio": a.ratio, "batch": a.batch,
        "batches": a.batches, "micro_batches": a.micro_batches,
        "median_s": median, "tokens_per_s": tokens_per_step / median,
        "step_tflop": flops.total() / 1e12, "flops": flops,
        "mfu": flops.total() / median / a.peak_flops,
        "device_memory_gib": peak_mem as f64 / (1u64 << 30) as f64,
        "host_peak_rss_gib": host_peak_rss().unwrap_or(0) as f64 / (1u64 << 30) as f64,
        "recompute_encoder": a.recompute_encoder, "method": a.method,
        "losses": losses, "phases_s": phases,
        "ops": a.count_ops.then_some(ops), "phase_ops": phase_ops, "top_ops": top_ops,
        "cuda_graphs": a.cuda_graphs,
        "graph_replays": trainer.cuda_graphs().map_or(0, |g| g.replays()),
        "profile_device_ms": profile_rows.as_ref().filter(|_| device.is_cuda()).map(|rows| {
            rows.iter().filter(|r| r.device == "cuda").map(|r| r.total_us).sum::<f64>()
                / 1e3 / a.iters as f64
        }),
    });
    if let (Some(path), Some(rows)) = (&a.profile, &profile_rows) {
        use kvd_trainer::kernel_profile::table;
        let mut text = format!(
            "# bench-step profile: {name}, {device:?}, {kind:?}, span {} + suffix {} x {}, r = {}, \
             method {}, cuda graphs {}, {} timed steps, median {:.3} ms\n\n",
            a.span, a.suffix, a.batch, a.ratio, a.method, a.cuda_graphs, a.iters, median * 1e3
        );
        if device.is_cuda() {
            text += &table(rows, "cuda", a.iters, 60, wall_us);
            text += "\n";
        }
        text += &table(rows, "cpu", a.iters, 40, wall_us);
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(dir) = &a.dump {
        let out = serde_json::json!({ "losses": losses });
        std::fs::write(dir.join("losses.json"), out.to_string())
            .with_context(|| format!("writing {}", dir.display()))?;
    }
    println!("{line}");
    Ok(())
}

/// The optimizer settings of `bench-step`: 2 warm-up steps + `iters` timed ones.
fn trainer_cfg(iters: usize) -> TrainConfig {
    TrainConfig {
        total_steps: iters + 2,
        warmup_steps: 1,
        ..TrainConfig::default()
    }
}
