//! Causal multi-head attention with grouped key/value heads and the KV cache both architectures share.

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::linalg::{softmax, Rope};

/// Keys and values of every layer for the tokens seen so far, one growing buffer per (sequence, kv head).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    batch: usize,
    /// False once a pass stopped before the last block: the deeper layers then miss those positions.
    complete: bool,
    /// Whether passes keep their attention patterns (what circuit tracing freezes), and the latest ones.
    record_patterns: bool,
    patterns: Vec<Vec<f32>>,
}

#[derive(Debug, Clone, Default)]
struct LayerKv {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    /// An empty cache for `n_layers` layers of `batch` sequences with `n_kv_heads` key/value heads each.
    pub fn new(n_layers: usize, batch: usize, n_kv_heads: usize) -> Self {
        let layer = LayerKv { k: vec![Vec::new(); batch * n_kv_heads], v: vec![Vec::new(); batch * n_kv_heads] };
        Self {
            layers: vec![layer; n_layers],
            len: 0,
            batch,
            complete: true,
            record_patterns: false,
            patterns: Vec::new(),
        }
    }

    /// Keep each layer's attention pattern of the passes that use this cache (see [`KvCache::pattern`]).
    pub fn record_patterns(&mut self) {
        self.record_patterns = true;
        self.patterns = vec![Vec::new(); self.layers.len()];
    }

    /// Layer `layer`'s attention probabilities in the latest pass, `[batch, n_heads, seq, n_ctx]` (`n_ctx` =
    /// cached plus new positions, zero where masked); `None` unless [`KvCache::record_patterns`] was called.
    pub fn pattern(&self, layer: usize) -> Option<&[f32]> {
        self.patterns.get(layer).map(|p| p.as_slice()).filter(|p| !p.is_empty())
    }

    /// Tokens already cached per sequence (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sequences the cache holds (the batch of the pass that filled it).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Whether every layer holds every cached position, so a later pass may continue from it.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    pub(crate) fn advance(&mut self, seq: usize, all_layers: bool) {
        self.len += seq;
        self.complete &= all_layers;
    }
}

/// Shapes of one attention call.
pub(crate) struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub pos_offset: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies every score (`head_dim^-1/2` unless the architecture says otherwise).
    pub scale: f32,
    /// `cap * tanh(score / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
    /// Attend only to the last `window` positions, the query's own included (sliding-window layers).
    pub window: Option<usize>,
}

impl AttnShape {
    /// Width of a `[q | k | v]` row.
    fn qkv_width(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    /// Plain causal attention over every earlier position, scaled by `head_dim^-1/2`.
    pub fn causal(batch: usize, seq: usize, pos_offset: usize, n_heads: usize, n_kv_heads: usize, hd: usize) -> Self {
        let scale = 1.0 / (hd as f32).sqrt();
        Self { batch, seq, pos_offset, n_heads, n_kv_heads, head_dim: hd, scale, softcap: None, window: None }
    }
}

/// Query rows whose scores one product computes: each block's keys end where its last row's causal
/// view does, so a prefill multiplies ~60% of the full `seq x seq` scores at 128 positions, not all.
const QUERY_BLOCK: usize = 32;

/// Append this chunk's keys and values (already rotated) to the cache of `layer`, then attend.
/// `qkv` rows are `[q (n_heads*hd) | k (n_kv*hd) | v (n_kv*hd)]`; `out` is `[rows, n_heads*hd]`.
pub(crate) fn attend(cache: &mut KvCache, layer: usize, qkv: &[f32], s: &AttnShape, out: &mut [f32]) {
    let (hd, q_dim) = (s.head_dim, s.n_heads * s.head_dim);
    append_kv(&mut cache.layers[layer], qkv, s);
    let lkv = &cache.layers[layer];
    let group = s.n_heads / s.n_kv_heads;
    let record = cache.record_patterns;
    // One (sequence, head) pair per task: scores = Q·Kᵀ and out = P·V as small GEMMs, query block by
    // query block. Positions a block's earlier rows cannot see yet are masked after the GEMM.
    let heads: Vec<(Vec<f32>, Vec<f32>)> = (0..s.batch * s.n_heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / s.n_heads, bh % s.n_heads);
            let kvh = b * s.n_kv_heads + h / group;
            head_attention(&qkv[b * s.seq * s.qkv_width() + h * hd..], &lkv.k[kvh], &lkv.v[kvh], s, record)
        })
        .collect();
    if record {
        cache.patterns[layer] = heads.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    }
    out.par_chunks_mut(q_dim).enumerate().for_each(|(row, out)| {
        let (b, t) = (row / s.seq, row % s.seq);
        for (h, out) in out.chunks_mut(hd).enumerate() {
            out.copy_from_slice(&heads[b * s.n_heads + h].0[t * hd..][..hd]);
        }
    });
}

/// Add this chunk's keys and values to the cache, one (sequence, kv head) buffer per task.
fn append_kv(lkv: &mut LayerKv, qkv: &[f32], s: &AttnShape) {
    let (hd, width) = (s.head_dim, s.qkv_width());
    let (k_at, v_at) = (s.n_heads * hd, (s.n_heads + s.n_kv_heads) * hd);
    lkv.k.par_iter_mut().zip(lkv.v.par_iter_mut()).enumerate().for_each(|(i, (kbuf, vbuf))| {
        let (b, h) = (i / s.n_kv_heads, i % s.n_kv_heads);
        debug_assert_eq!(kbuf.len(), s.pos_offset * hd, "KV cache out of step");
        for row in qkv[b * s.seq * width..].chunks(width).take(s.seq) {
            kbuf.extend_from_slice(&row[k_at + h * hd..][..hd]);
            vbuf.extend_from_slice(&row[v_at + h * hd..][..hd]);
        }
    });
}

/// One head of one sequence: its output `[seq, hd]` and, when `record`, its pattern `[seq, n_ctx]`.
/// `q` starts at the head's first query (rows `s.qkv_width()` apart); `k` and `v` are the cache's.
fn head_attention(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, record: bool) -> (Vec<f32>, Vec<f32>) {
    let (hd, width, n_ctx) = (s.head_dim, s.qkv_width(), s.pos_offset + s.seq);
    let mut o = vec![0f32; s.seq * hd];
    let mut pattern = if record { vec![0f32; s.seq * n_ctx] } else { Vec::new() };
    let mut scores = Vec::new();
    for t0 in (0..s.seq).step_by(QUERY_BLOCK) {
        let rows = QUERY_BLOCK.min(s.seq - t0);
        let n_vis = s.pos_offset + t0 + rows; // the keys the block's last row sees
        scores.resize(rows * n_vis, 0.0);
        small_gemm(rows, n_vis, hd, &q[t0 * width..], 1, width, k, hd, 1, &mut scores, s.scale);
        for (r, row) in scores.chunks_mut(n_vis).enumerate() {
            let visible = s.pos_offset + t0 + r + 1;
            let first = s.window.map_or(0, |w| visible.saturating_sub(w));
            if let Some(cap) = s.softcap {
                row[first..visible].iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
            }
            softmax(&mut row[first..visible]);
            row[..first].fill(0.0);
            row[visible..].fill(0.0);
            if record {
                pattern[(t0 + r) * n_ctx..][..n_vis].copy_from_slice(row);
            }
        }
        small_gemm(rows, hd, n_vis, &scores, 1, n_vis, v, 1, hd, &mut o[t0 * hd..], 1.0);
    }
    (o, pattern)
}

/// Rotate the query and key heads of every `[q | k | v]` row in place (the first `rotary_dims` of each head).
pub(crate) fn rotate_qk(qkv: &mut [f32], rope: &Rope, c: &ModelConfig, seq: usize, pos_offset: usize) {
    let hd = c.head_dim;
    let width = c.q_dim() + 2 * c.kv_dim();
    let n_rot = c.n_heads + c.n_kv_heads;
    let rot = c.details.rotary_dims;
    qkv.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
        let pos = pos_offset + r % seq;
        for head in row[..n_rot * hd].chunks_mut(hd) {
            rope.apply(&mut head[..rot], pos);
        }
    });
}

/// `c[m, n] = scale * a[m, k] · b[k, n]` on one thread (callers parallelise over heads); `a` and `b` are
/// addressed through (column, row) strides so Kᵀ needs no copy.
#[allow(clippy::too_many_arguments)]
fn small_gemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_cs: usize,
    a_rs: usize,
    b: &[f32],
    b_cs: usize,
    b_rs: usize,
    c: &mut [f32],
    scale: f32,
) {
    assert!(c.len() >= m * n);
    assert!(m == 0 || k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(n == 0 || k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts bound every element gemm reads or writes through these strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
