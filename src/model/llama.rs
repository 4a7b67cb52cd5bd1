//! A Llama-family decoder-only Transformer: RMSNorm, rotary embeddings, grouped-query attention,
//! SwiGLU MLP, optional biases, tied or untied embeddings, and Qwen3's per-head query/key norms:
//! families that differ from Llama by a switch are that switch here, not a file of their own. Tensor names follow Hugging Face
//! (`model.layers.0.self_attn.q_proj.weight`, ...), so the same code loads real checkpoints.
//!
//! One implementation serves training, inference and loaded models (run directories, Hugging Face
//! directories, GGUF files): [`Llama::assemble`] is where every one is put together. On the CPU
//! the heavy operations are our fused kernels with backward passes (`super::kernels`; candle's
//! own fused CPU kernels have none and would silently cut gradients); on other devices each
//! kernel's composed twin of differentiable candle primitives runs instead.

use super::config::LlamaConfig;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};

/// Per-layer key/value tensors for a batch of sequences being generated together.
/// Sequences of different prompt lengths are left-padded: `pad[b]` leading positions of row `b`
/// are masked out and positions are counted from the first real token.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pad: Vec<usize>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, batch: usize) -> Self {
        Self::with_padding(num_layers, vec![0; batch])
    }

    pub fn with_padding(num_layers: usize, pad: Vec<usize>) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            pad,
            len: 0,
        }
    }

    /// Positions cached so far (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch_size(&self) -> usize {
        self.pad.len()
    }

    /// Keeps rows `keep`, in that order (continuous batching: finished sequences leave), then
    /// drops leading positions that are padding in every remaining row.
    pub fn select_rows(&mut self, keep: &[usize]) -> Result<()> {
        if keep.is_empty() {
            candle_core::bail!("a cache keeps at least one row");
        }
        let pad: Vec<usize> = keep.iter().map(|&r| self.pad[r]).collect();
        let trim = pad.iter().copied().min().unwrap_or(0);
        for slot in self.layers.iter_mut() {
            if let Some((k, v)) = slot.take() {
                let index = Tensor::from_vec(
                    keep.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                    keep.len(),
                    k.device(),
                )?;
                let select = |t: &Tensor| -> Result<Tensor> {
                    t.index_select(&index, 0)?
                        .narrow(2, trim, self.len - trim)?
                        .contiguous()
                };
                *slot = Some((select(&k)?, select(&v)?));
            }
        }
        self.pad = pad.into_iter().map(|p| p - trim).collect();
        self.len -= trim;
        Ok(())
    }

    /// Appends the rows of `other` (continuous batching: a new sequence joins), left-padding the
    /// shorter side so that every row ends at the same position.
    pub fn append_rows(&mut self, other: KvCache) -> Result<()> {
        if self.layers.len() != other.layers.len() {
            candle_core::bail!("caches of different models");
        }
        let len = self.len.max(other.len);
        let (extra_self, extra_other) = (len - self.len, len - other.len);
        let left_pad = |t: Tensor, extra: usize| -> Result<Tensor> {
            if extra == 0 {
                return Ok(t);
            }
            let (b, h, _, d) = t.dims4()?;
            let zeros = Tensor::zeros((b, h, extra, d), t.dtype(), t.device())?;
            Tensor::cat(&[&zeros, &t], 2)
        };
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            match (mine.take(), theirs) {
                (Some((k, v)), Some((k2, v2))) => {
                    let k =
                        Tensor::cat(&[&left_pad(k, extra_self)?, &left_pad(k2, extra_other)?], 0)?;
                    let v =
                        Tensor::cat(&[&left_pad(v, extra_self)?, &left_pad(v2, extra_other)?], 0)?;
                    *mine = Some((k, v));
                }
                _ => candle_core::bail!("only filled caches can be joined"),
            }
        }
        self.pad = self
            .pad
            .iter()
            .map(|p| p + extra_self)
            .chain(other.pad.iter().map(|p| p + extra_other))
            .collect();
        self.len = len;
        Ok(())
    }
}

/// A projection: dense (trainable, as chatforge trains) or quantized (GGUF weights kept in their
/// block format and multiplied quantized).
pub(super) enum Proj {
    Dense(Linear),
    Quantized {
        weight: candle_core::quantized::QMatMul,
        bias: Option<Tensor>,
    },
    /// Q4_1 or Q8_0 through our own kernel (candle's Q4_1 is scalar).
    Block {
        /// Shared with the embedding when a GGUF file ties them ([`Embedding::Rows`]).
        weight: std::sync::Arc<super::quant::QuantMatrix>,
        bias: Option<Tensor>,
    },
    /// A frozen projection plus a trained low-rank update ([`super::lora`]).
    Lora {
        base: Box<Proj>,
        a: Linear,
        b: Linear,
        scale: f64,
    },
}

fn add_bias(y: Tensor, bias: &Option<Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

impl Proj {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => add_bias(linear(x, l.weight())?, &l.bias().cloned()),
            Proj::Quantized { weight, bias } => {
                add_bias(super::quant::candle_forward(weight, x)?, bias)
            }
            Proj::Block { weight, bias } => add_bias(weight.forward(x)?, bias),
            Proj::Lora { base, a, b, scale } => super::lora::forward(base, a, b, *scale, x),
        }
    }

    /// The f32 weight `[out, in]` and bias this projection computes with: quantized weights
    /// dequantized, adapters merged.
    pub(super) fn dense_weight(&self) -> Result<(Tensor, Option<Tensor>)> {
        use candle_core::quantized::QMatMul;
        Ok(match self {
            Proj::Dense(l) => (l.weight().clone(), l.bias().cloned()),
            Proj::Quantized { weight, bias } => {
                let w = match weight {
                    QMatMul::QTensor(q) => q.dequantize(&q.device())?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.clone(),
                };
                (w.to_dtype(DType::F32)?, bias.clone())
            }
            Proj::Block { weight, bias } => (weight.dequantize(&Device::Cpu)?, bias.clone()),
            Proj::Lora { base, a, b, scale } => {
                let (w, bias) = base.dense_weight()?;
                let update = (b.weight().matmul(a.weight())? * *scale)?;
                ((w + update)?, bias)
            }
        })
    }
}

pub(super) struct Attention {
    pub(super) q: Proj,
    pub(super) k: Proj,
    pub(super) v: Proj,
    pub(super) o: Proj,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    /// Qwen3's RMSNorm of each query and key head before the rotation (`[head_dim]` weights).
    pub(super) qk_norm: Option<(Tensor, Tensor)>,
    pub(super) eps: f64,
    /// The multiplier of scores (1/sqrt(head size) unless the config says otherwise).
    pub(super) scale: f64,
    /// Local attention over this many positions (Gemma 3's sliding layers, Mistral).
    pub(super) window: Option<usize>,
}

/// The gate's activation: SiLU (SwiGLU, Llama), GELU's tanh approximation (GeGLU, Gemma) or
/// squared ReLU (`hidden_act` "relu2", the speedruns' switch; Hugging Face's name for it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Activation {
    Silu,
    GeluTanh,
    Relu2,
}

pub(super) struct Mlp {
    pub(super) gate: Proj,
    pub(super) up: Proj,
    pub(super) down: Proj,
    pub(super) activation: Activation,
}

pub(super) struct Block {
    pub(super) input_norm: Tensor,
    pub(super) attn: Attention,
    pub(super) post_norm: Tensor,
    pub(super) mlp: Mlp,
    /// Gemma's norms of the attention's and the MLP's outputs, before each residual sum.
    pub(super) output_norms: Option<(Tensor, Tensor)>,
}

/// The projections of one block, in Hugging Face's names: `self_attn.{q,k,v,o}_proj` and
/// `mlp.{gate,up,down}_proj`.
pub(super) const PROJECTIONS: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

impl Block {
    /// A block from its norms and its projections in [`PROJECTIONS`] order.
    pub(super) fn new(
        c: &LlamaConfig,
        input_norm: Tensor,
        post_norm: Tensor,
        p: [Proj; 7],
    ) -> Self {
        let [q, k, v, o, gate, up, down] = p;
        Block {
            input_norm,
            attn: Attention {
                q,
                k,
                v,
                o,
                heads: c.num_attention_heads,
                kv_heads: c.kv_heads(),
                head_dim: c.head_size(),
                qk_norm: None,
                eps: c.rms_norm_eps,
                scale: c.attention_scale(),
                window: None,
            },
            post_norm,
            mlp: Mlp {
                gate,
                up,
                down,
                activation: match c.hidden_act.as_str() {
                    "gelu_pytorch_tanh" => Activation::GeluTanh,
                    "relu2" => Activation::Relu2,
                    _ => Activation::Silu,
                },
            },
            output_norms: None,
        }
    }

    /// The block with norms on the attention's and the MLP's outputs (Gemma).
    pub(super) fn with_output_norms(mut self, attn_out: Tensor, mlp_out: Tensor) -> Self {
        self.output_norms = Some((attn_out, mlp_out));
        self
    }

    /// The block with per-head query and key norms (Qwen3).
    pub(super) fn with_qk_norm(mut self, q_norm: Tensor, k_norm: Tensor) -> Self {
        self.attn.qk_norm = Some((q_norm, k_norm));
        self
    }

    /// The projections in [`PROJECTIONS`] order, with their names.
    pub(super) fn projections_mut(&mut self) -> [((&'static str, &'static str), &mut Proj); 7] {
        let (a, m) = (&mut self.attn, &mut self.mlp);
        let [q, k, v, o, gate, up, down] = PROJECTIONS;
        [
            (q, &mut a.q),
            (k, &mut a.k),
            (v, &mut a.v),
            (o, &mut a.o),
            (gate, &mut m.gate),
            (up, &mut m.up),
            (down, &mut m.down),
        ]
    }
}

/// Where the logits come from.
pub(super) enum Head {
    /// The embedding, transposed (tied weights).
    Tied,
    /// Its own dense matrix (`lm_head.weight`).
    Dense(Tensor),
    /// A quantized matrix (GGUF), the embedding's or its own.
    Quantized(Proj),
}

/// The token embedding: a dense matrix (trained, or read from safetensors), or a GGUF file's
/// quantized rows, dequantized only as they are looked up. A 262k-token vocabulary (Gemma 3)
/// would otherwise take 670 MB as f32, and seconds to fill, for rows a prompt barely touches.
pub(super) enum Embedding {
    Dense(Tensor),
    /// The rows of the tied output head (Q4_1 or Q8_0), so the file's matrix is held once.
    Rows(std::sync::Arc<super::quant::QuantMatrix>),
    Quantized {
        blocks: Vec<u8>,
        dtype: candle_core::quantized::GgmlDType,
        rows: usize,
        cols: usize,
    },
}

impl Embedding {
    /// The rows of `ids` (any shape), as `[ids, cols]`.
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        let (blocks, dtype, rows, cols) = match self {
            Embedding::Dense(t) => return t.index_select(ids, 0),
            Embedding::Rows(m) => return m.rows(&ids.flatten_all()?.to_vec1::<u32>()?),
            Embedding::Quantized {
                blocks,
                dtype,
                rows,
                cols,
            } => (blocks, *dtype, *rows, *cols),
        };
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let mut out = Vec::new();
        for id in ids.flatten_all()?.to_vec1::<u32>()? {
            let id = id as usize;
            if id >= rows {
                candle_core::bail!("token id {id} is outside the embedding's {rows} rows");
            }
            let row = &blocks[id * row_bytes..(id + 1) * row_bytes];
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                row,
                vec![1, cols],
                &Device::Cpu,
            )?;
            out.push(q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?);
        }
        Tensor::cat(&out, 0)
    }

    /// The whole matrix as f32 (for export, or a tied head).
    fn dense(&self) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => Ok(t.clone()),
            Embedding::Rows(m) => m.dequantize(&Device::Cpu),
            Embedding::Quantized {
                blocks,
                dtype,
                rows,
                cols,
            } => candle_core::quantized::ggml_file::qtensor_from_ggml(
                *dtype,
                blocks,
                vec![*rows, *cols],
                &Device::Cpu,
            )?
            .dequantize(&Device::Cpu)?
            .to_dtype(DType::F32),
        }
    }
}

pub struct Llama {
    pub config: LlamaConfig,
    pub(super) embed: Embedding,
    pub(super) layers: Vec<Block>,
    pub(super) norm: Tensor,
    pub(super) lm_head: Option<Tensor>,
    /// A quantized output projection (GGUF); used instead of `lm_head`/`embed` for logits.
    pub(super) quant_head: Option<Proj>,
    pub(super) inv_freq: Vec<f64>,
    /// The rotary frequencies of the sliding-window layers where they have their own base (Gemma 3).
    pub(super) local_inv_freq: Option<Vec<f64>>,
    pub(super) device: Device,
    pub(super) dtype: DType,
}

/// A tensor by its Hugging Face name under `vb`, created with [`initial_value`] when fresh.
fn param<S: Into<candle_core::Shape>>(
    vb: &VarBuilder,
    c: &LlamaConfig,
    shape: S,
    name: &str,
) -> Result<Tensor> {
    let full = format!("{}.{name}", vb.prefix());
    vb.get_with_hints(shape, name, initial_value(c, &full))
}

fn projection(
    vb: &VarBuilder,
    c: &LlamaConfig,
    inp: usize,
    out: usize,
    bias: bool,
    name: &str,
) -> Result<Proj> {
    let vb = vb.pp(name);
    let w = param(&vb, c, (out, inp), "weight")?;
    let b = if bias {
        Some(param(&vb, c, out, "bias")?)
    } else {
        None
    };
    Ok(Proj::Dense(Linear::new(w, b)))
}

/// Rotary inverse frequencies for base `theta`, one per pair of head dimensions.
pub(super) fn inverse_frequencies(c: &LlamaConfig, theta: f64) -> Vec<f64> {
    let hd = c.head_size();
    (0..hd / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / hd as f64))
        .collect()
}

/// A norm weight as the model multiplies by it: Gemma stores each as an offset from one.
fn norm_weight(c: &LlamaConfig, stored: Tensor) -> Result<Tensor> {
    if c.is_gemma3() {
        stored + 1.0
    } else {
        Ok(stored)
    }
}

use super::kernels::{
    cached_attention, causal_softmax, fused_ok, gated, head_nll, linear, rms_norm, rope,
    rope_attention, soft_cap_composed, token_nll, Gate,
};

/// Which keys each query of a layer sees.
enum Visible {
    /// Causal attention and nothing else: the fused kernels apply it.
    Causal,
    /// A mask `[rows, 1, T, S]` of 0 and −∞ (padding, a window), added to the scores.
    Mask(Tensor),
    /// Each query's visible key positions (row after row): for [`cached_attention`], which
    /// decoding on the CPU uses so that a token's numbers do not depend on its batch.
    Ranges(Vec<std::ops::Range<usize>>),
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        visible: &Visible,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let scale = self.scale;
        let (mut q, mut k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        if let Some((qn, kn)) = &self.qk_norm {
            // Each head's vector is normalised on its own: rows of `d`, whatever the layout.
            q = rms_norm(&q, qn, self.eps)?;
            k = rms_norm(&k, kn, self.eps)?;
        }
        if cache.is_none() && matches!(visible, Visible::Causal) {
            // Training and plain scoring: rotation and attention as one node on the projections'
            // layout (see kernels::rope_attention).
            let out = rope_attention(&q, &k, &v, (cos, sin), (h, kvh), scale)?;
            return self.o.forward(&out);
        }
        let heads = |x: Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
        let q = (rope(&heads(q, h)?, cos, sin)? * scale)?;
        let k = rope(&heads(k, kvh)?, cos, sin)?;
        let v = heads(v, kvh)?;
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        if let Visible::Ranges(ranges) = visible {
            return self
                .o
                .forward(&cached_attention(&q, &k, &v, ranges.clone())?);
        }
        let s = k.dim(2)?;
        // Grouped-query attention without copying keys: the `rep` query heads that share a key/value
        // head are stacked along the time axis and multiplied against that head once.
        let rep = h / kvh;
        let qg = q.reshape((b, kvh, rep * t, d))?;
        let scores = qg.matmul(&k.t()?)?.reshape((b, h, t, s))?;
        // Without padding the mask is plain causal and the fused kernel applies it.
        let probs = match visible {
            Visible::Mask(m) => candle_nn::ops::softmax(&scores.broadcast_add(m)?, D::Minus1)?,
            _ => causal_softmax(&scores)?,
        };
        let out = probs
            .reshape((b, kvh, rep * t, s))?
            .matmul(&v)?
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?;
        self.o.forward(&out)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.gate.forward(x)?, self.up.forward(x)?);
        let h = match self.activation {
            Activation::Silu => gated(&gate, &up, Gate::Silu)?,
            Activation::Relu2 => gated(&gate, &up, Gate::Relu2)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        self.down.forward(&h)
    }
}

impl Llama {
    /// Builds the model from a VarBuilder: fresh weights ([`initial_value`]) from a VarMap, or stored
    /// weights from safetensors.
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        config
            .validate("model config")
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let c = config;
        let (hid, hd) = (c.hidden_size, c.head_size());
        let m = vb.pp("model");
        let embed = param(&m.pp("embed_tokens"), c, (c.vocab_size, hid), "weight")?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = m.pp(format!("layers.{i}"));
            let dims = |group: &str, name: &str| match (group, name) {
                (_, "q_proj") => (hid, c.num_attention_heads * hd, c.attention_bias),
                (_, "k_proj" | "v_proj") => (hid, c.kv_heads() * hd, c.attention_bias),
                (_, "o_proj") => (c.num_attention_heads * hd, hid, false),
                (_, "down_proj") => (c.intermediate_size, hid, c.mlp_bias),
                _ => (hid, c.intermediate_size, c.mlp_bias),
            };
            let mut projections = Vec::with_capacity(PROJECTIONS.len());
            for (group, name) in PROJECTIONS {
                let (inp, out, bias) = dims(group, name);
                projections.push(projection(&l.pp(group), c, inp, out, bias, name)?);
            }
            let projections: [Proj; 7] = projections
                .try_into()
                .unwrap_or_else(|_| unreachable!("seven projections"));
            let norm = |vb: &VarBuilder, name: &str, n: usize| {
                norm_weight(c, param(&vb.pp(name), c, n, "weight")?)
            };
            // Llama's `post_attention_layernorm` is the MLP's input norm; Gemma names that
            // `pre_feedforward_layernorm` and uses the first name for the attention's output.
            let mlp_norm = match c.is_gemma3() {
                true => "pre_feedforward_layernorm",
                false => "post_attention_layernorm",
            };
            let mut block = Block::new(
                c,
                norm(&l, "input_layernorm", hid)?,
                norm(&l, mlp_norm, hid)?,
                projections,
            );
            if c.qk_norm() {
                let a = l.pp("self_attn");
                block = block.with_qk_norm(norm(&a, "q_norm", hd)?, norm(&a, "k_norm", hd)?);
            }
            if c.is_gemma3() {
                block = block.with_output_norms(
                    norm(&l, "post_attention_layernorm", hid)?,
                    norm(&l, "post_feedforward_layernorm", hid)?,
                );
            }
            layers.push(block);
        }
        let norm = norm_weight(c, param(&m.pp("norm"), c, hid, "weight")?)?;
        let head = if c.tie_word_embeddings {
            Head::Tied
        } else {
            Head::Dense(param(&vb.pp("lm_head"), c, (c.vocab_size, hid), "weight")?)
        };
        Ok(Llama::assemble(
            c.clone(),
            Embedding::Dense(embed),
            layers,
            norm,
            head,
        ))
    }

    /// The one place a `Llama` is put together, from weights made ([`Llama::new`]) or read
    /// (GGUF): the rotary table, device and dtype follow from the parts.
    pub(super) fn assemble(
        config: LlamaConfig,
        embed: Embedding,
        mut layers: Vec<Block>,
        norm: Tensor,
        head: Head,
    ) -> Llama {
        let (lm_head, quant_head) = match head {
            Head::Tied => (None, None),
            Head::Dense(t) => (Some(t), None),
            Head::Quantized(p) => (None, Some(p)),
        };
        for (i, layer) in layers.iter_mut().enumerate() {
            layer.attn.window = config.sliding_window_of(i);
        }
        Llama {
            inv_freq: inverse_frequencies(&config, config.rope_theta),
            local_inv_freq: config
                .family
                .rope_local_base_freq
                .map(|theta| inverse_frequencies(&config, theta)),
            device: match &embed {
                Embedding::Dense(t) => t.device().clone(),
                Embedding::Quantized { .. } | Embedding::Rows(_) => Device::Cpu,
            },
            dtype: match &embed {
                Embedding::Dense(t) => t.dtype(),
                Embedding::Quantized { .. } | Embedding::Rows(_) => DType::F32,
            },
            config,
            embed,
            layers,
            norm,
            lm_head,
            quant_head,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every weight under its Hugging Face name, as f32: what `model.safetensors` holds for this
    /// model (quantized weights dequantized, LoRA adapters merged).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.dense()?)];
        let mut proj = |name: String, p: &Proj| -> Result<()> {
            let (w, b) = p.dense_weight()?;
            out.push((format!("{name}.weight"), w));
            if let Some(b) = b {
                out.push((format!("{name}.bias"), b));
            }
            Ok(())
        };
        let mut norms = Vec::new();
        // Stored as the family stores them (Gemma: offsets from one).
        let stored = |w: &Tensor| -> Result<Tensor> {
            match self.config.is_gemma3() {
                true => w - 1.0,
                false => Ok(w.clone()),
            }
        };
        let mlp_norm = match self.config.is_gemma3() {
            true => "pre_feedforward_layernorm",
            false => "post_attention_layernorm",
        };
        for (i, l) in self.layers.iter().enumerate() {
            let at = format!("model.layers.{i}");
            proj(format!("{at}.self_attn.q_proj"), &l.attn.q)?;
            proj(format!("{at}.self_attn.k_proj"), &l.attn.k)?;
            proj(format!("{at}.self_attn.v_proj"), &l.attn.v)?;
            proj(format!("{at}.self_attn.o_proj"), &l.attn.o)?;
            proj(format!("{at}.mlp.gate_proj"), &l.mlp.gate)?;
            proj(format!("{at}.mlp.up_proj"), &l.mlp.up)?;
            proj(format!("{at}.mlp.down_proj"), &l.mlp.down)?;
            norms.push((
                format!("{at}.input_layernorm.weight"),
                stored(&l.input_norm)?,
            ));
            if let Some((qn, kn)) = &l.attn.qk_norm {
                norms.push((format!("{at}.self_attn.q_norm.weight"), stored(qn)?));
                norms.push((format!("{at}.self_attn.k_norm.weight"), stored(kn)?));
            }
            norms.push((format!("{at}.{mlp_norm}.weight"), stored(&l.post_norm)?));
            if let Some((an, mn)) = &l.output_norms {
                norms.push((format!("{at}.post_attention_layernorm.weight"), stored(an)?));
                norms.push((
                    format!("{at}.post_feedforward_layernorm.weight"),
                    stored(mn)?,
                ));
            }
        }
        if !self.config.tie_word_embeddings {
            match (&self.lm_head, &self.quant_head) {
                (Some(w), _) => out.push(("lm_head.weight".into(), w.clone())),
                (None, Some(q)) => out.push(("lm_head.weight".into(), q.dense_weight()?.0)),
                (None, None) => {}
            }
        }
        out.extend(norms);
        out.push(("model.norm.weight".into(), stored(&self.norm)?));
        Ok(out)
    }

    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.layers.len(), batch)
    }

    pub fn new_padded_cache(&self, pad: Vec<usize>) -> KvCache {
        KvCache::with_padding(self.layers.len(), pad)
    }

    /// cos/sin tables for the given positions, shaped [rows, 1, T, D/2].
    fn rope_tables(&self, positions: &[Vec<usize>], freqs: &[f64]) -> Result<(Tensor, Tensor)> {
        let rows = positions.len();
        let t = positions[0].len();
        let half = freqs.len();
        let mut cos = Vec::with_capacity(rows * t * half);
        let mut sin = Vec::with_capacity(rows * t * half);
        for row in positions {
            for &p in row {
                for &f in freqs {
                    let a = p as f64 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let mk = |v: Vec<f64>| {
            Tensor::from_vec(v, (rows, 1, t, half), &self.device)?.to_dtype(self.dtype)
        };
        Ok((mk(cos)?, mk(sin)?))
    }

    /// Hidden states after the final norm, [B, T, hidden]. With a cache, `ids` continue the cached
    /// sequences and their keys/values are appended.
    pub fn hidden(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (offset, pad) = match cache.as_deref() {
            Some(c) => {
                if c.batch_size() != b {
                    candle_core::bail!("cache holds {} sequences, input has {b}", c.batch_size());
                }
                (c.len, c.pad.clone())
            }
            None => (0, vec![0; b]),
        };
        let total = offset + t;
        if total > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence of {total} tokens exceeds the model's context of {}",
                self.config.max_position_embeddings
            );
        }
        let padded = pad.iter().any(|&p| p > 0);
        // Without padding every row has the same positions and mask: build them once and broadcast.
        let rows: Vec<usize> = if padded { (0..b).collect() } else { vec![0] };
        let positions: Vec<Vec<usize>> = rows
            .iter()
            .map(|&r| (offset..total).map(|p| p.saturating_sub(pad[r])).collect())
            .collect();
        let global = self.rope_tables(&positions, &self.inv_freq)?;
        let local = match &self.local_inv_freq {
            Some(freqs) => Some(self.rope_tables(&positions, freqs)?),
            None => None,
        };
        // What a layer's queries see: with a cache on the CPU, each query's range of keys;
        // otherwise nothing beyond causality when that is all (the fused kernels apply it),
        // else a mask for padding and, for local layers, the window.
        let ranges = cache.is_some() && fused_ok(&self.norm);
        let visible_for = |window: Option<usize>| -> Result<Visible> {
            let window = window.filter(|&w| total > w);
            let reach = window.unwrap_or(usize::MAX);
            // A padding query sees itself only, so its (unused) output stays finite.
            let first = |r: usize, q: usize| {
                if q < pad[r] {
                    q
                } else {
                    pad[r].max((q + 1).saturating_sub(reach))
                }
            };
            if ranges {
                let seen = (0..b)
                    .flat_map(|r| (offset..total).map(move |q| first(r, q)..q + 1))
                    .collect();
                return Ok(Visible::Ranges(seen));
            }
            if !padded && window.is_none() {
                return Ok(Visible::Causal);
            }
            let mut m = Vec::with_capacity(rows.len() * t * total);
            for &r in &rows {
                for q in offset..total {
                    let seen = first(r, q)..q + 1;
                    m.extend((0..total).map(|j| {
                        if seen.contains(&j) {
                            0.0f32
                        } else {
                            f32::NEG_INFINITY
                        }
                    }));
                }
            }
            let m = Tensor::from_vec(m, (rows.len(), 1, t, total), &self.device)?;
            Ok(Visible::Mask(m.to_dtype(self.dtype)?))
        };
        let mut visibles: Vec<(Option<usize>, Visible)> = Vec::new();
        let mut x =
            self.embed
                .lookup(&ids.flatten_all()?)?
                .reshape((b, t, self.config.hidden_size))?;
        if let Some(scale) = self.config.embedding_scale() {
            x = (x * scale)?;
        }
        let eps = self.config.rms_norm_eps;
        let out_norm = |y: Tensor, w: Option<&Tensor>| match w {
            Some(w) => rms_norm(&y, w, eps),
            None => Ok(y),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let window = layer.attn.window;
            if !visibles.iter().any(|(w, _)| *w == window) {
                visibles.push((window, visible_for(window)?));
            }
            let visible = visibles
                .iter()
                .find(|(w, _)| *w == window)
                .map(|(_, v)| v)
                .expect("pushed above");
            let (cos, sin) = match (&local, window) {
                (Some(l), Some(_)) => l,
                _ => &global,
            };
            let norms = layer.output_norms.as_ref();
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let h = rms_norm(&x, &layer.input_norm, eps)?;
            let a = layer.attn.forward(&h, cos, sin, visible, slot)?;
            x = (x + out_norm(a, norms.map(|n| &n.0))?)?;
            let h = rms_norm(&x, &layer.post_norm, eps)?;
            x = (&x + out_norm(layer.mlp.forward(&h)?, norms.map(|n| &n.1))?)?;
        }
        if let Some(c) = cache {
            c.len = total;
        }
        rms_norm(&x, &self.norm, eps)
    }

    /// Vocabulary logits for hidden states of any leading shape.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = match &self.quant_head {
            Some(q) => q.forward(hidden)?,
            None => linear(hidden, &self.head_weight()?)?,
        };
        soft_cap_composed(logits, self.config.family.final_logit_softcapping)
    }

    /// The dense output matrix: its own, or the embedding's.
    fn head_weight(&self) -> Result<Tensor> {
        match (&self.lm_head, &self.embed) {
            (Some(w), _) => Ok(w.clone()),
            (None, Embedding::Dense(e)) => Ok(e.clone()),
            (None, Embedding::Quantized { .. } | Embedding::Rows(_)) => {
                candle_core::bail!("a quantized embedding has no dense head")
            }
        }
    }

    /// Logits [B, T, vocab].
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.logits(&self.hidden(ids, cache)?)
    }

    /// Logits of the last position only, [B, vocab]: what generation needs.
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.hidden(ids, cache)?;
        let t = h.dim(1)?;
        self.logits(&h.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    /// Per-token negative log-likelihood of `targets` given `ids`, [B, T].
    pub fn token_nll(&self, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.hidden_token_nll(&self.hidden(ids, None)?, targets)
    }

    /// Per-token negative log-likelihood of `targets` [B, T] from hidden states [B, T, hidden]
    /// (for callers that also read the hidden states, such as a value head).
    pub fn hidden_token_nll(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, t) = targets.dims2()?;
        if self.quant_head.is_none() {
            let cap = self.config.family.final_logit_softcapping;
            return head_nll(hidden, &self.head_weight()?, targets, cap)?.reshape((b, t));
        }
        let logits = self
            .logits(hidden)?
            .reshape((b * t, self.config.vocab_size))?;
        token_nll(&logits, &targets.flatten_all()?)?.reshape((b, t))
    }

    /// Mean next-token cross-entropy.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.token_nll(ids, targets)?.mean_all()
    }
}

/// How a fresh tensor is initialised, by Hugging Face name: GPT-2 style normal(0, 0.02), residual
/// output projections scaled by 1/sqrt(2·layers), norms at one, biases at zero.
pub fn initial_value(config: &LlamaConfig, name: &str) -> Init {
    if let Some(init) = super::lora::initial_value(config, name) {
        init
    } else if name.ends_with("norm.weight") {
        Init::Const(1.0)
    } else if name.ends_with(".bias") {
        Init::Const(0.0)
    } else if name.contains("o_proj") || name.contains("down_proj") {
        Init::Randn {
            mean: 0.0,
            stdev: 0.02 / (2.0 * config.num_hidden_layers as f64).sqrt(),
        }
    } else {
        Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        }
    }
}

/// Re-draws every tensor of a fresh model from a seeded generator (candle's CPU generator cannot be
/// seeded), so a seed fixes the initial weights. With `zero_outputs` the blocks' output
/// projections and an untied head start at zero (modded-nanogpt's start: each block begins as the
/// identity); they are drawn all the same, so every other tensor matches the plain start.
pub fn seeded_init(
    config: &LlamaConfig,
    varmap: &candle_nn::VarMap,
    rng: &mut crate::util::Rng,
    zero_outputs: bool,
) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let n = var.elem_count();
        let values: Vec<f32> = match initial_value(config, name) {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| (mean + stdev * rng.normal()) as f32)
                .collect(),
            _ => unreachable!("initial_value only uses Const and Randn"),
        };
        let output = ["o_proj.weight", "down_proj.weight", "lm_head.weight"];
        let values = match zero_outputs && output.iter().any(|o| name.ends_with(o)) {
            true => vec![0.0; n],
            false => values,
        };
        let t = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// Number of elements over all tensors in a VarMap.
pub fn parameter_count(varmap: &candle_nn::VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}
