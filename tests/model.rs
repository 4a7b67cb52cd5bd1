//! Model correctness: autodiff gradients against finite differences, and KV-cache generation against
//! full recomputation.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use chatforge::model::{Llama, LlamaConfig};
use chatforge::util::Rng;

fn tiny_config(tied: bool, bias: bool) -> LlamaConfig {
    let mut c = LlamaConfig::small(13, 16);
    c.hidden_size = 8;
    c.intermediate_size = 12;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c.tie_word_embeddings = tied;
    c.attention_bias = bias;
    c
}

fn random_ids(rng: &mut Rng, b: usize, t: usize, vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

/// Sets every tensor (norm weights and biases included) to random values so that no gradient
/// vanishes by symmetry.
fn randomize(varmap: &VarMap, rng: &mut Rng, dtype: DType) {
    for (_, var) in varmap.data().lock().unwrap().iter() {
        let n = var.elem_count();
        let v: Vec<f64> = (0..n).map(|_| rng.normal() * 0.5).collect();
        let t = Tensor::from_vec(v, var.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        var.set(&t).unwrap();
    }
}

fn check_gradients(tied: bool, bias: bool) {
    let cfg = tiny_config(tied, bias);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let model = Llama::new(&cfg, vb).unwrap();
    let mut rng = Rng::new(42);
    randomize(&varmap, &mut rng, DType::F64);
    let ids = random_ids(&mut rng, 2, 6, cfg.vocab_size);
    let targets = random_ids(&mut rng, 2, 6, cfg.vocab_size);
    let loss = model.loss(&ids, &targets).unwrap();
    let grads = loss.backward().unwrap();
    let vars: Vec<(String, candle_core::Var)> = {
        let data = varmap.data().lock().unwrap();
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let expected = 1 + 2 * (4 + 3 + 2) + 1 + usize::from(!tied) + if bias { 2 * 3 } else { 0 };
    assert_eq!(vars.len(), expected);
    let eps = 1e-6;
    for (name, var) in &vars {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let analytic: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
        let original: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for i in 0..original.len() {
            let loss_at = |delta: f64| {
                let mut v = original.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                model
                    .loss(&ids, &targets)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
            diff += (numeric - analytic[i]).powi(2);
            norm += numeric.powi(2) + analytic[i].powi(2);
        }
        var.set(&Tensor::from_vec(original, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let rel = diff.sqrt() / norm.sqrt().max(1e-12);
        assert!(norm > 1e-12, "{name}: gradient is zero");
        assert!(rel < 1e-3, "{name}: relative error {rel:e}");
    }
}

#[test]
fn gradients_match_finite_differences_untied_with_biases() {
    check_gradients(false, true);
}

#[test]
fn gradients_match_finite_differences_tied() {
    check_gradients(true, false);
}

fn small_model(seed: u64) -> (Llama, VarMap) {
    let mut cfg = tiny_config(true, false);
    cfg.vocab_size = 50;
    cfg.hidden_size = 32;
    cfg.max_position_embeddings = 64;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Llama::new(&cfg, vb).unwrap();
    randomize(&varmap, &mut Rng::new(seed), DType::F32);
    (model, varmap)
}

fn argmax(logits: &Tensor) -> Vec<u32> {
    logits
        .argmax(candle_core::D::Minus1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn kv_cache_generation_equals_full_recomputation() {
    let (model, _vm) = small_model(3);
    let mut rng = Rng::new(9);
    let prompt = random_ids(&mut rng, 1, 5, 50);
    // Greedy with the cache.
    let mut cache = model.new_cache(1);
    let mut next = argmax(&model.forward_last(&prompt, Some(&mut cache)).unwrap());
    let mut cached = vec![next[0]];
    for _ in 0..20 {
        let inp = Tensor::new(&[[next[0]]], &Device::Cpu).unwrap();
        next = argmax(&model.forward_last(&inp, Some(&mut cache)).unwrap());
        cached.push(next[0]);
    }
    // Greedy recomputing the whole sequence every step.
    let mut seq: Vec<u32> = prompt.flatten_all().unwrap().to_vec1().unwrap();
    let mut full = Vec::new();
    for _ in 0..21 {
        let inp = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let t = argmax(&model.forward_last(&inp, None).unwrap())[0];
        full.push(t);
        seq.push(t);
    }
    assert_eq!(cached, full);
}

#[test]
fn left_padded_batch_matches_sequences_run_alone() {
    let (model, _vm) = small_model(5);
    let a: Vec<u32> = vec![3, 7, 1, 9, 4, 2];
    let b: Vec<u32> = vec![8, 6, 5];
    let alone = |s: &[u32]| {
        let inp = Tensor::new(s, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        model.forward_last(&inp, None).unwrap().squeeze(0).unwrap()
    };
    let pad = a.len() - b.len();
    let mut rows = a.clone();
    rows.extend(std::iter::repeat_n(0, pad).chain(b.iter().copied()));
    let batch = Tensor::from_vec(rows, (2, a.len()), &Device::Cpu).unwrap();
    let mut cache = model.new_padded_cache(vec![0, pad]);
    let out = model.forward_last(&batch, Some(&mut cache)).unwrap();
    for (i, s) in [&a, &b].iter().enumerate() {
        let d = (out.get(i).unwrap() - alone(s))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "row {i}");
    }
    // One more decode step on the padded batch still matches.
    let step = Tensor::new(&[[1u32], [2u32]], &Device::Cpu).unwrap();
    let out = model.forward_last(&step, Some(&mut cache)).unwrap();
    let mut a2 = a.clone();
    a2.push(1);
    let mut b2 = b.clone();
    b2.push(2);
    for (i, s) in [&a2, &b2].iter().enumerate() {
        let d = (out.get(i).unwrap() - alone(s))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "row {i} after a step");
    }
}

#[test]
fn context_overflow_is_an_error_not_a_panic() {
    let (model, _vm) = small_model(1);
    let ids = Tensor::zeros((1, 65), DType::U32, &Device::Cpu).unwrap();
    let err = model.forward(&ids, None).unwrap_err().to_string();
    assert!(err.contains("exceeds"), "{err}");
}
