//! A dense projection `y = x Wᵀ + b` with the weight in PyTorch layout `[out, in]`.

use super::hooks::{Hooks, Proj};
use tch::Tensor;

/// Dense layer without activation.
#[derive(Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    weight: Tensor,
    /// `Wᵀ` `[in_features, out_features]`: a transposed view of `weight`
    /// (no copy), made once, so a 2-D input's projection is a single matrix
    /// product (`aten::linear` would dispatch a transpose and a `matmul`
    /// around it on every call).
    weight_t: Tensor,
    /// `[out_features]`, if the layer has a bias.
    bias: Option<Tensor>,
}

impl Linear {
    /// The layer of `weight` `[out, in]` and `bias` `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let weight_t = weight.tr();
        Linear {
            weight,
            weight_t,
            bias,
        }
    }

    /// The weight `[out_features, in_features]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out_features]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Applies the projection to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match (x.dim(), &self.bias) {
            (2, None) => x.mm(&self.weight_t),
            (2, Some(b)) => b.addmm(x, &self.weight_t),
            _ => x.linear(&self.weight, self.bias.as_ref()),
        }
    }

    /// The projection plus whatever `hooks` add for projection `which` of `layer`.
    pub fn forward_hooked(
        &self,
        x: &Tensor,
        layer: usize,
        which: Proj,
        hooks: &dyn Hooks,
    ) -> Tensor {
        hooks.adjust_linear(layer, which, x, self.forward(x))
    }
}

/// Projections of one input stacked into one matrix product: `x [W₁; W₂; …]ᵀ`,
/// split into the parts' outputs. One product reads the input once and
/// launches once where separate ones would each do both (and their
/// backward adds the input gradients up); each part's [`Linear`] is a view of
/// the stacked weight, not a copy.
#[derive(Debug)]
pub struct Stacked {
    /// All parts' rows: `[Σ out, in]`.
    all: Linear,
    /// Part `i` alone, a view of `all`'s rows.
    parts: Vec<Linear>,
    /// Output width of each part.
    sizes: Vec<i64>,
}

impl Stacked {
    /// Stacks `parts` (weight `[out_i, in]`, optional bias `[out_i]`; all with
    /// a bias or none) into one weight.
    pub fn new(parts: Vec<(Tensor, Option<Tensor>)>) -> crate::error::Result<Self> {
        let sizes: Vec<i64> = parts.iter().map(|(w, _)| w.size()[0]).collect();
        let with_bias = parts.iter().filter(|(_, b)| b.is_some()).count();
        if with_bias != 0 && with_bias != parts.len() {
            return Err(crate::error::ModelError::Input(
                "stacked projections: some have a bias and some not".into(),
            ));
        }
        let weights: Vec<&Tensor> = parts.iter().map(|(w, _)| w).collect();
        let weight = Tensor::f_cat(&weights, 0)?;
        let bias = match with_bias {
            0 => None,
            _ => {
                let biases: Vec<&Tensor> = parts.iter().filter_map(|(_, b)| b.as_ref()).collect();
                Some(Tensor::f_cat(&biases, 0)?)
            }
        };
        let mut parts = Vec::with_capacity(sizes.len());
        let mut start = 0;
        for &n in &sizes {
            parts.push(Linear::new(
                weight.narrow(0, start, n),
                bias.as_ref().map(|b| b.narrow(0, start, n)),
            ));
            start += n;
        }
        Ok(Stacked {
            all: Linear::new(weight, bias),
            parts,
            sizes,
        })
    }

    /// Part `i`'s projection (a view of the stacked weight).
    pub fn part(&self, i: usize) -> &Linear {
        &self.parts[i]
    }

    /// Every part's output for `x` `[rows, in]`, one matrix product; each
    /// output a column view of the product. (A caller that needs only some
    /// parts still takes the whole product: a narrower one would round
    /// differently, and the same inputs must give the same outputs on every
    /// path, e.g. a cache filled with or without the last layer's queries.)
    pub fn forward(&self, x: &Tensor) -> crate::error::Result<Vec<Tensor>> {
        Ok(self.all.forward(x).f_split_with_sizes(&self.sizes, -1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn rand(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Double, Device::Cpu))
    }

    /// The stacked product gives each part's own projection, its input
    /// gradient is the separate projections' summed, and the parts' weights
    /// are views of the one stacked weight.
    #[test]
    fn stacked_projections_equal_separate_ones() {
        tch::manual_seed(0);
        for bias in [false, true] {
            let parts: Vec<(Tensor, Option<Tensor>)> = [6, 2, 3]
                .iter()
                .map(|&n| (rand(&[n, 5]), bias.then(|| rand(&[n]))))
                .collect();
            let separate: Vec<Linear> = parts
                .iter()
                .map(|(w, b)| Linear::new(w.copy(), b.as_ref().map(|b| b.copy())))
                .collect();
            let stacked = Stacked::new(parts).unwrap();
            let x = rand(&[4, 5]).set_requires_grad(true);
            let ys = stacked.forward(&x).unwrap();
            assert_eq!(ys.len(), 3);
            for (y, lin) in ys.iter().zip(&separate) {
                assert!(y.allclose(&lin.forward(&x), 1e-12, 1e-12, false));
            }
            // Input gradient of a loss that weighs every part differently.
            let loss = |ys: Vec<Tensor>| {
                ys.iter()
                    .enumerate()
                    .map(|(i, y)| (y * (i as f64 + 1.0)).sin().sum(Kind::Double))
                    .fold(Tensor::zeros([], (Kind::Double, Device::Cpu)), |a, b| a + b)
            };
            let g_stacked =
                Tensor::run_backward(&[loss(stacked.forward(&x).unwrap())], &[&x], false, false);
            let g_separate = Tensor::run_backward(
                &[loss(separate.iter().map(|l| l.forward(&x)).collect())],
                &[&x],
                false,
                false,
            );
            assert!(g_stacked[0].allclose(&g_separate[0], 1e-10, 1e-12, false));
            // The parts share the stacked weight's storage, rows in order.
            let base = stacked.all.weight().data_ptr() as usize;
            let row = 5 * std::mem::size_of::<f64>();
            for (i, start) in [0usize, 6, 8].into_iter().enumerate() {
                assert_eq!(
                    stacked.part(i).weight().data_ptr() as usize,
                    base + start * row
                );
                assert!(stacked.part(i).weight().equal(separate[i].weight()));
            }
        }
    }

    #[test]
    fn stacking_refuses_a_bias_on_some_parts_only() {
        let parts = vec![(rand(&[2, 3]), Some(rand(&[2]))), (rand(&[2, 3]), None)];
        let err = Stacked::new(parts).unwrap_err().to_string();
        assert!(err.contains("some have a bias"), "{err}");
    }
}
