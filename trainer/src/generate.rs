//! Autoregressive generation with the KV cache: greedy or sampled, with stop
//! tokens; and perplexity of a token sequence.

use crate::error::{ModelError, Result};
use crate::model::{Input, KvCache, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Always the most likely token.
    Greedy,
    /// Sampling from the temperature-scaled, top-k / top-p truncated distribution.
    Sample {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Keep only the k most likely tokens (0: all).
        top_k: usize,
        /// Keep the smallest set of tokens whose probability reaches p (1.0: all).
        top_p: f64,
        /// RNG seed, for reproducible samples.
        seed: u64,
    },
}

/// Options of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Generation stops after producing any of these (the stop token is included in the output).
    pub stop_tokens: Vec<u32>,
}

/// Generates a continuation of `prompt`, continuing `cache` if given (the
/// prompt then follows the cached context). Calls `on_token` for each new token.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    cache: Option<&mut KvCache>,
    opts: &GenerateOptions,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    generate_with_bias(model, prompt, cache, None, opts, on_token)
}

/// [`generate`] with `bias` `[1, n]` added to the attention logits of the
/// cache's first `n` entries in every decoder pass (a compressed cache's
/// score feed, [`crate::distill::cache_file::CompressedCache::feed_bias`]).
pub fn generate_with_bias(
    model: &Model,
    prompt: &[u32],
    cache: Option<&mut KvCache>,
    bias: Option<&Tensor>,
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(ModelError::Input(
            "generation needs a non-empty prompt".into(),
        ));
    }
    if let Sampling::Sample {
        temperature, top_p, ..
    } = opts.sampling
    {
        if temperature <= 0.0 || !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
            return Err(ModelError::Input(format!(
                "sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})"
            )));
        }
    }
    let mut own_cache;
    let cache = match cache {
        Some(c) => c,
        None => {
            own_cache = model.new_cache();
            &mut own_cache
        }
    };
    let mut rng = match opts.sampling {
        Sampling::Sample { seed, .. } => StdRng::seed_from_u64(seed),
        Sampling::Greedy => StdRng::seed_from_u64(0),
    };
    let device = model.device();
    // Positions past the model window are refused, and generation stops there.
    let window = model.config().max_position_embeddings;
    let start = match cache.next_positions() {
        Some(next) => next.max().f_int64_value(&[])? as usize,
        None => 0,
    };
    if start + prompt.len() > window {
        return Err(ModelError::Input(format!(
            "the prompt has {} tokens{}: {} positions, more than the model window of {window}",
            prompt.len(),
            if start > 0 {
                format!(" after a context of {start}")
            } else {
                String::new()
            },
            start + prompt.len()
        )));
    }
    let max_new = opts.max_new_tokens.min(window - start - prompt.len());
    if max_new < opts.max_new_tokens {
        tracing::debug!(max_new, window, "new tokens bounded by the model window");
    }
    let mut next_input: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut out = Vec::new();
    tch::no_grad(|| -> Result<()> {
        while out.len() < max_new {
            let ids = Tensor::from_slice(&next_input)
                .unsqueeze(0)
                .to_device(device);
            let hidden = match bias {
                None => model.forward_hidden(Input::new(&ids), Some(&mut *cache))?,
                Some(b) => {
                    let later = cache.len() + ids.size()[1] - b.size()[1];
                    let zeros = Tensor::f_zeros([1, later], (Kind::Float, b.device()))?;
                    let hooks =
                        crate::model::KeyBias(Tensor::f_cat(&[b.shallow_clone(), zeros], 1)?);
                    model.forward_hidden_with(Input::new(&ids), Some(&mut *cache), &hooks)?
                }
            };
            let last = hidden.select(1, -1);
            let logits = model.logits(&last).squeeze_dim(0).to_kind(Kind::Float);
            let token = choose(&logits, &opts.sampling, &mut rng)?;
            out.push(token);
            on_token(token);
            if opts.stop_tokens.contains(&token) {
                break;
            }
            next_input = vec![token as i64];
        }
        Ok(())
    })?;
    Ok(out)
}

/// Picks the next token from float32 logits `[vocab]`.
fn choose(logits: &Tensor, sampling: &Sampling, rng: &mut StdRng) -> Result<u32> {
    match *sampling {
        Sampling::Greedy => Ok(logits.argmax(0, false).int64_value(&[]) as u32),
        Sampling::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } => {
            let probs = (logits / temperature)
                .softmax(0, Kind::Float)
                .to_device(tch::Device::Cpu);
            let probs: Vec<f32> = Vec::<f32>::try_from(&probs)?;
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_unstable_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            if top_k > 0 {
                order.truncate(top_k);
            }
            let mut kept = Vec::with_capacity(order.len());
            let mut mass = 0.0f64;
            for i in order {
                kept.push(i);
                mass += probs[i] as f64;
                if mass >= top_p {
                    break;
                }
            }
            let total: f64 = kept.iter().map(|&i| probs[i] as f64).sum();
            let mut u = rng.random::<f64>() * total;
            for &i in &kept {
                u -= probs[i] as f64;
                if u <= 0.0 {
                    return Ok(i as u32);
                }
            }
            Ok(*kept.last().unwrap_or(&0) as u32)
        }
    }
}

/// Mean negative log-likelihood (nats/token) of `ids[1..]` given their prefixes,
/// computed in float32 over chunks of positions so the full logits never exist at once.
pub fn mean_nll(model: &Model, ids: &[u32]) -> Result<f64> {
    if ids.len() < 2 {
        return Err(ModelError::Input(
            "perplexity needs at least two tokens".into(),
        ));
    }
    let device = model.device();
    let t: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    tch::no_grad(|| {
        let input = Tensor::from_slice(&t).unsqueeze(0).to_device(device);
        let hidden = model.forward_hidden(Input::new(&input), None)?;
        let n = ids.len() as i64 - 1;
        let targets = input.narrow(1, 1, n);
        let mut total = 0.0f64;
        const CHUNK: i64 = 128;
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            let logits = model
                .logits(&hidden.narrow(1, start, len))
                .to_kind(Kind::Float);
            let logp = logits.log_softmax(-1, Kind::Float);
            let tgt = targets.narrow(1, start, len).unsqueeze(-1);
            total -= logp
                .gather(-1, &tgt, false)
                .sum(Kind::Double)
                .double_value(&[]);
            start += len;
        }
        Ok(total / n as f64)
    })
}

/// Perplexity `exp(mean_nll)` of `ids`.
pub fn perplexity(model: &Model, ids: &[u32]) -> Result<f64> {
    Ok(mean_nll(model, ids)?.exp())
}
