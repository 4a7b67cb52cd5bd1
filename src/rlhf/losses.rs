//! The arithmetic of RLHF, kept apart so it is tested on hand-computed numbers: generalised
//! advantage estimation, PPO's clipped objectives, KL estimators and the DPO loss.

use crate::train::reward::softplus;
use candle_core::{Result, Tensor};

/// Generalised advantage estimation over one trajectory (Schulman et al. 2016). The value after
/// the last step is 0 (the episode ends). Returns (advantages, returns = advantages + values).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lambda: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut next_value = 0.0;
    let mut running = 0.0;
    for t in (0..n).rev() {
        let delta = rewards[t] + gamma * next_value - values[t];
        running = delta + gamma * lambda * running;
        adv[t] = running;
        next_value = values[t];
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

fn mean_and_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt() + 1e-8)
}

/// Scales to mean 0 and standard deviation 1 (PPO's advantage whitening).
pub fn whiten(xs: &mut [f64]) {
    let (mean, sd) = mean_and_sd(xs);
    for x in xs {
        *x = (*x - mean) / sd;
    }
}

/// Divides by the standard deviation and keeps the mean: no value changes sign.
pub fn scale_to_unit_spread(xs: &mut [f64]) {
    let (_, sd) = mean_and_sd(xs);
    for x in xs {
        *x /= sd;
    }
}

/// KL(policy‖reference) estimators from log-probabilities of tokens sampled from the policy
/// (Schulman, "Approximating KL divergence"): k1 is unbiased but noisy and can be negative; k3 is
/// unbiased and never negative.
pub fn kl_k1(logp: f64, ref_logp: f64) -> f64 {
    logp - ref_logp
}

pub fn kl_k3(logp: f64, ref_logp: f64) -> f64 {
    let r = ref_logp - logp;
    r.exp() - r - 1.0
}

/// [`kl_k3`] on tensors, differentiable in `logp`.
pub fn kl_k3_tensor(logp: &Tensor, ref_logp: &Tensor) -> Result<Tensor> {
    let r = (ref_logp - logp)?;
    (r.exp()? - &r)? - 1.0
}

/// PPO's clipped surrogate per token (to minimise): max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), with
/// ρ = exp(logp − old_logp). Also returns ρ for statistics.
pub fn clipped_surrogate(
    logp: &Tensor,
    old_logp: &Tensor,
    advantages: &Tensor,
    clip: f64,
) -> Result<(Tensor, Tensor)> {
    let ratio = (logp - old_logp)?.exp()?;
    let unclipped = (advantages * &ratio)?.neg()?;
    let clipped = (advantages * ratio.clamp(1.0 - clip, 1.0 + clip)?)?.neg()?;
    Ok((unclipped.maximum(&clipped)?, ratio))
}

/// PPO's clipped value loss per token: ½·max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²).
pub fn clipped_value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    clip: f64,
) -> Result<Tensor> {
    let plain = (values - returns)?.sqr()?;
    let moved = (old_values + (values - old_values)?.clamp(-clip, clip)?)?;
    let clipped = (moved - returns)?.sqr()?;
    plain.maximum(&clipped)? * 0.5
}

/// DPO loss per pair (Rafailov et al. 2023): −log σ(β[(π_c − ref_c) − (π_r − ref_r)]) from summed
/// response log-probabilities. Also returns the implicit rewards β(π − ref) of chosen and rejected.
pub fn dpo_loss(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    beta: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let chosen = ((policy_chosen - ref_chosen)? * beta)?;
    let rejected = ((policy_rejected - ref_rejected)? * beta)?;
    let loss = softplus(&(&rejected - &chosen)?)?;
    Ok((loss, chosen, rejected))
}

/// 1 − Var(returns − values) / Var(returns): how much of the return the value head explains.
pub fn explained_variance(values: &[f64], returns: &[f64]) -> f64 {
    let var = |xs: &mut dyn Iterator<Item = f64>| {
        let v: Vec<f64> = xs.collect();
        let n = v.len().max(1) as f64;
        let m = v.iter().sum::<f64>() / n;
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n
    };
    let vr = var(&mut returns.iter().copied());
    if vr == 0.0 {
        return f64::NAN;
    }
    1.0 - var(&mut returns.iter().zip(values).map(|(r, v)| r - v)) / vr
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn gae_on_a_four_step_trajectory() {
        // δ = [0, 0, 0, 0.5]; A_t = δ_t + γλ A_{t+1} with γ=1, λ=0.5.
        let (adv, ret) = gae(&[0.0, 0.0, 0.0, 1.0], &[0.5; 4], 1.0, 0.5);
        for (a, b) in adv.iter().zip([0.0625, 0.125, 0.25, 0.5]) {
            assert!(close(*a, b), "{adv:?}");
        }
        for (a, b) in ret.iter().zip([0.5625, 0.625, 0.75, 1.0]) {
            assert!(close(*a, b), "{ret:?}");
        }
        // λ = 1 gives Monte Carlo returns whatever the values: discounted sums of rewards.
        let (_, ret) = gae(&[0.0, 0.0, 0.0, 1.0], &[0.3, -2.0, 7.0, 0.1], 0.9, 1.0);
        for (a, b) in ret.iter().zip([0.729, 0.81, 0.9, 1.0]) {
            assert!(close(*a, b), "{ret:?}");
        }
        // λ = 0 gives one-step TD errors.
        let (adv, _) = gae(&[1.0, 2.0], &[0.5, 1.0], 1.0, 0.0);
        assert!(close(adv[0], 1.5) && close(adv[1], 1.0), "{adv:?}");
    }

    #[test]
    fn clipped_objective_inside_and_outside_the_range() {
        let d = Device::Cpu;
        // (ratio, advantage) → expected loss, expected d loss / d logp.
        let cases = [
            (1.1f64, 1.0, -1.1, -1.1), // inside the range: plain −Aρ
            (1.5, 1.0, -1.2, 0.0),     // above 1+ε with A>0: clipped, no gradient
            (0.5, -1.0, 0.8, 0.0),     // below 1−ε with A<0: clipped, no gradient
            (1.5, -1.0, 1.5, 1.5),     // above 1+ε with A<0: the pessimistic unclipped term
            (0.5, 1.0, -0.5, -0.5),    // below 1−ε with A>0: unclipped
        ];
        for (ratio, a, want, want_grad) in cases {
            let logp = Var::new(&[ratio.ln() as f32], &d).unwrap();
            let old = Tensor::new(&[0.0f32], &d).unwrap();
            let adv = Tensor::new(&[a as f32], &d).unwrap();
            let (loss, r) = clipped_surrogate(logp.as_tensor(), &old, &adv, 0.2).unwrap();
            let l = loss.sum_all().unwrap();
            let got = l.to_scalar::<f32>().unwrap() as f64;
            assert!(close(got, want), "ratio {ratio}, A {a}: {got} vs {want}");
            let g = l.backward().unwrap();
            let grad = g.get(&logp).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
            assert!(
                (grad - want_grad).abs() < 1e-4,
                "ratio {ratio}, A {a}: grad {grad}"
            );
            assert!(close(r.to_vec1::<f32>().unwrap()[0] as f64, ratio));
        }
    }

    #[test]
    fn clipped_value_loss_takes_the_larger_error() {
        let d = Device::Cpu;
        let t = |x: f32| Tensor::new(&[x], &d).unwrap();
        // V moved 1.0 → 2.0 (clip 0.2 keeps 1.2); return 3: max((2−3)², (1.2−3)²)/2 = 1.62.
        let l = clipped_value_loss(&t(2.0), &t(1.0), &t(3.0), 0.2).unwrap();
        assert!(close(l.to_vec1::<f32>().unwrap()[0] as f64, 1.62));
        // Moved towards the return past the clip: still the larger (clipped) error counts.
        let l = clipped_value_loss(&t(2.9), &t(1.0), &t(3.0), 0.2).unwrap();
        assert!(close(
            l.to_vec1::<f32>().unwrap()[0] as f64,
            0.5 * 1.8f64.powi(2)
        ));
    }

    #[test]
    fn kl_estimators_are_unbiased_and_k3_is_never_negative() {
        assert!(close(kl_k1(0.5f64.ln(), 0.25f64.ln()), 2f64.ln()));
        assert!(close(
            kl_k3(0.5f64.ln(), 0.25f64.ln()),
            0.5 + 2f64.ln() - 1.0
        ));
        // Expectations under p, computed exactly, equal KL(p‖q).
        let p = [0.5f64, 0.3, 0.2];
        let q = [0.2f64, 0.2, 0.6];
        let kl: f64 = p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum();
        let e1: f64 = p
            .iter()
            .zip(&q)
            .map(|(a, b)| a * kl_k1(a.ln(), b.ln()))
            .sum();
        let e3: f64 = p
            .iter()
            .zip(&q)
            .map(|(a, b)| a * kl_k3(a.ln(), b.ln()))
            .sum();
        assert!(close(e1, kl) && close(e3, kl), "{kl} {e1} {e3}");
        for (a, b) in p.iter().zip(&q) {
            assert!(kl_k3(a.ln(), b.ln()) >= 0.0);
        }
        let d = Device::Cpu;
        let lp = Tensor::new(&[0.5f32.ln()], &d).unwrap();
        let rl = Tensor::new(&[0.25f32.ln()], &d).unwrap();
        let k = kl_k3_tensor(&lp, &rl).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        assert!(close(k, kl_k3(0.5f64.ln(), 0.25f64.ln())));
    }

    #[test]
    fn dpo_loss_matches_hand_computed_values() {
        let d = Device::Cpu;
        let t = |x: f32| Tensor::new(&[x], &d).unwrap();
        let (loss, c, r) = dpo_loss(&t(-10.0), &t(-11.0), &t(-12.0), &t(-10.0), 0.1).unwrap();
        // β[(−10+12) − (−11+10)] = 0.3; −log σ(0.3) = log(1 + e^−0.3).
        let want = (1.0 + (-0.3f64).exp()).ln();
        assert!(close(loss.to_vec1::<f32>().unwrap()[0] as f64, want));
        assert!(close(c.to_vec1::<f32>().unwrap()[0] as f64, 0.2));
        assert!(close(r.to_vec1::<f32>().unwrap()[0] as f64, -0.1));
    }

    #[test]
    fn whitening_and_explained_variance() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        whiten(&mut x);
        assert!(close(x.iter().sum::<f64>(), 0.0));
        assert!(close(x.iter().map(|v| v * v).sum::<f64>() / 4.0, 1.0));
        let r = [1.0, 2.0, 3.0];
        assert!(close(explained_variance(&r, &r), 1.0));
        assert!(close(explained_variance(&[2.0, 2.0, 2.0], &r), 0.0));
    }

    /// Per-token advantages of three answers to one prompt: a short one scored a little above
    /// the others' mean, a long one well above, a short one well below. Whitening subtracts
    /// a mean the long answer dominates and turns the short good answer's advantage negative;
    /// scaling alone keeps every sign.
    #[test]
    fn scaling_keeps_the_sign_that_whitening_flips_for_short_answers() {
        let mut tokens = vec![0.2, 0.2];
        tokens.extend([0.5; 10]);
        tokens.push(-0.7);
        let (mut whitened, mut scaled) = (tokens.clone(), tokens.clone());
        whiten(&mut whitened);
        scale_to_unit_spread(&mut scaled);
        assert!(whitened[0] < 0.0, "{whitened:?}");
        for (s, t) in scaled.iter().zip(&tokens) {
            assert_eq!(s.signum(), t.signum());
        }
        let (mean, sd) = mean_and_sd(&scaled);
        assert!(close(sd, 1.0) && mean > 0.0, "{mean} {sd}");
    }
}
