//! Each fused kernel against its composed twin, in value and gradient.

use super::*;
use candle_core::{Device, Var};

fn randn(shape: &[usize], seed: u64) -> Var {
    let mut rng = crate::util::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Checks that fused and composed versions agree in value and in the gradient of a weighted sum.
fn agree(inputs: &[&Var], fused: impl Fn() -> Tensor, composed: impl Fn() -> Tensor) {
    let (yf, yc) = (fused(), composed());
    assert!(
        max_diff(&yf, &yc) < 1e-9,
        "values differ by {}",
        max_diff(&yf, &yc)
    );
    let weights = randn(yf.dims(), 99);
    let gf = (yf * weights.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gc = (yc * weights.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let (a, b) = (
            gf.get(v.as_tensor()).unwrap(),
            gc.get(v.as_tensor()).unwrap(),
        );
        assert!(
            max_diff(a, b) < 1e-9,
            "gradient {i} differs by {}",
            max_diff(a, b)
        );
    }
}

#[test]
fn causal_softmax_matches_composed_with_and_without_offset() {
    for (t, s) in [(5, 5), (3, 7), (1, 4)] {
        let x = randn(&[2, 3, t, s], 1);
        agree(
            &[&x],
            || causal_softmax(x.as_tensor()).unwrap(),
            || causal_softmax_composed(x.as_tensor()).unwrap(),
        );
    }
}

#[test]
fn rms_norm_matches_composed() {
    let x = randn(&[3, 4, 8], 2);
    let w = randn(&[8], 3);
    agree(
        &[&x, &w],
        || rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
        || rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
    );
}

#[test]
fn rope_matches_composed_for_shared_and_per_row_tables() {
    let x = randn(&[2, 3, 5, 8], 4);
    for rows in [1, 2] {
        let c = randn(&[rows, 1, 5, 4], 5).as_tensor().detach();
        let s = randn(&[rows, 1, 5, 4], 6).as_tensor().detach();
        agree(
            &[&x],
            || rope(x.as_tensor(), &c, &s).unwrap(),
            || rope_composed(x.as_tensor(), &c, &s).unwrap(),
        );
    }
}

#[test]
fn cross_entropy_matches_composed_and_rejects_bad_targets() {
    let logits = randn(&[6, 11], 7);
    let targets = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &Device::Cpu).unwrap();
    agree(
        &[&logits],
        || token_nll(logits.as_tensor(), &targets).unwrap(),
        || token_nll_composed(logits.as_tensor(), &targets).unwrap(),
    );
    let bad = Tensor::new(&[0u32, 3, 11, 5, 5, 1], &Device::Cpu).unwrap();
    assert!(token_nll(logits.as_tensor(), &bad).is_err());
}

type AttentionFn =
    fn(&Tensor, &Tensor, &Tensor, (&Tensor, &Tensor), (usize, usize), f64) -> Result<Tensor>;

#[test]
fn rope_attention_matches_composed_with_grouped_heads() {
    let (t, d) = (6, 4);
    let c = randn(&[1, 1, t, d / 2], 13).as_tensor().detach();
    let s = randn(&[1, 1, t, d / 2], 14).as_tensor().detach();
    for (h, kvh) in [(2, 2), (4, 2), (3, 1)] {
        let q = randn(&[2, t, h * d], 10);
        let k = randn(&[2, t, kvh * d], 11);
        let v = randn(&[2, t, kvh * d], 12);
        let run = |f: AttentionFn| {
            f(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                (&c, &s),
                (h, kvh),
                0.5,
            )
            .unwrap()
        };
        agree(
            &[&q, &k, &v],
            || run(rope_attention),
            || run(rope_attention_composed),
        );
    }
}

#[test]
fn linear_matches_composed_for_any_leading_shape() {
    let w = randn(&[5, 7], 20);
    for dims in [vec![3, 7], vec![2, 3, 7]] {
        let x = randn(&dims, 21);
        agree(
            &[&x, &w],
            || linear(x.as_tensor(), w.as_tensor()).unwrap(),
            || linear_composed(x.as_tensor(), w.as_tensor()).unwrap(),
        );
    }
    // One output row and one output column take gemm's vector paths.
    let (x1, w1) = (randn(&[1, 7], 26), randn(&[1, 7], 27));
    agree(
        &[&x1, &w1],
        || linear(x1.as_tensor(), w1.as_tensor()).unwrap(),
        || linear_composed(x1.as_tensor(), w1.as_tensor()).unwrap(),
    );
    let wrong = randn(&[5, 6], 22);
    assert!(linear(randn(&[3, 7], 23).as_tensor(), wrong.as_tensor()).is_err());
}

#[test]
fn head_nll_matches_composed_and_rejects_bad_targets() {
    let h = randn(&[2, 3, 6], 24);
    let w = randn(&[11, 6], 25);
    let targets = Tensor::new(&[[0u32, 3, 10], [5, 5, 1]], &Device::Cpu).unwrap();
    // Without a cap, and with one small enough to bend these logits (they reach about ±6).
    for cap in [None, Some(2.0)] {
        agree(
            &[&h, &w],
            || head_nll(h.as_tensor(), w.as_tensor(), &targets, cap).unwrap(),
            || head_nll_composed(h.as_tensor(), w.as_tensor(), &targets, cap).unwrap(),
        );
    }
    let plain = head_nll(h.as_tensor(), w.as_tensor(), &targets, None).unwrap();
    let capped = head_nll(h.as_tensor(), w.as_tensor(), &targets, Some(2.0)).unwrap();
    assert!(max_diff(&plain, &capped) > 0.1, "the cap changed nothing");
    let bad = Tensor::new(&[[0u32, 3, 11], [5, 5, 1]], &Device::Cpu).unwrap();
    assert!(head_nll(h.as_tensor(), w.as_tensor(), &bad, None).is_err());
    let short = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
    assert!(head_nll(h.as_tensor(), w.as_tensor(), &short, None).is_err());
}

#[test]
fn exp_f32_is_within_two_ulp_and_keeps_the_edge_cases() {
    let mut worst = 0.0f64;
    let mut x = -87.0f32;
    while x < 88.7 {
        let exact = (x as f64).exp();
        worst = worst.max(((exp_f32(x) as f64) - exact).abs() / exact);
        x += 0.000_731;
    }
    assert!(worst < 2.5e-7, "relative error {worst}");
    assert_eq!(exp_f32(0.0), 1.0);
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(-100.0), 0.0);
    assert_eq!(exp_f32(89.0), f32::INFINITY);
    assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
    assert!(exp_f32(f32::NAN).is_nan());
    // The lane-folded reductions agree with the plain ones, remainders included.
    let row: Vec<f32> = (0..21)
        .map(|i| ((i * 7919) % 23) as f32 * 0.37 - 4.0)
        .collect();
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert_eq!(row_max(&row), max);
    let plain: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    assert!((exp_sum(&row, max) - plain).abs() < 1e-5 * plain);
    let mut out = vec![0.0f32; row.len()];
    assert!((exp_into(&row, max, &mut out) - plain).abs() < 1e-5 * plain);
}

#[test]
fn gated_activations_match_composed() {
    let g = randn(&[4, 9], 8);
    let u = randn(&[4, 9], 9);
    for gate in [Gate::Silu, Gate::Relu2] {
        agree(
            &[&g, &u],
            || gated(g.as_tensor(), u.as_tensor(), gate).unwrap(),
            || gated_composed(g.as_tensor(), u.as_tensor(), gate).unwrap(),
        );
    }
}
