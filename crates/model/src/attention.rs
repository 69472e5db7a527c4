//! Causal multi-head attention with grouped key/value heads and the KV cache both architectures share.

use rayon::prelude::*;

use crate::linalg::{dot, softmax};

/// Keys and values of every layer for the tokens seen so far, one growing buffer per (sequence, kv head).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    batch: usize,
}

#[derive(Debug, Clone, Default)]
struct LayerKv {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(n_layers: usize, batch: usize, n_kv_heads: usize) -> Self {
        let layer = LayerKv { k: vec![Vec::new(); batch * n_kv_heads], v: vec![Vec::new(); batch * n_kv_heads] };
        Self { layers: vec![layer; n_layers], len: 0, batch }
    }

    /// Tokens already cached per sequence (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub(crate) fn advance(&mut self, seq: usize) {
        self.len += seq;
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
}

/// Append this chunk's keys and values (already rotated) to the cache of `layer`, then attend.
/// `qkv` rows are `[q (n_heads*hd) | k (n_kv*hd) | v (n_kv*hd)]`; `out` is `[rows, n_heads*hd]`.
pub(crate) fn attend(cache: &mut KvCache, layer: usize, qkv: &[f32], s: &AttnShape, out: &mut [f32]) {
    let hd = s.head_dim;
    let q_dim = s.n_heads * hd;
    let kv_dim = s.n_kv_heads * hd;
    let width = q_dim + 2 * kv_dim;
    let lkv = &mut cache.layers[layer];
    for b in 0..s.batch {
        for h in 0..s.n_kv_heads {
            let (kbuf, vbuf) = (&mut lkv.k[b * s.n_kv_heads + h], &mut lkv.v[b * s.n_kv_heads + h]);
            debug_assert_eq!(kbuf.len(), s.pos_offset * hd, "KV cache out of step");
            for t in 0..s.seq {
                let row = &qkv[(b * s.seq + t) * width..][..width];
                kbuf.extend_from_slice(&row[q_dim + h * hd..][..hd]);
                vbuf.extend_from_slice(&row[q_dim + kv_dim + h * hd..][..hd]);
            }
        }
    }
    let lkv = &cache.layers[layer];
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(q_dim).enumerate().for_each(|(r, o)| {
        let (b, t) = (r / s.seq, r % s.seq);
        let n_ctx = s.pos_offset + t + 1;
        let qrow = &qkv[r * width..][..q_dim];
        let mut scores = vec![0f32; n_ctx];
        for h in 0..s.n_heads {
            let kvh = b * s.n_kv_heads + h / group;
            let (k, v) = (&lkv.k[kvh], &lkv.v[kvh]);
            let q = &qrow[h * hd..][..hd];
            for (j, sc) in scores.iter_mut().enumerate() {
                *sc = dot(q, &k[j * hd..][..hd]) * scale;
            }
            softmax(&mut scores);
            let oh = &mut o[h * hd..][..hd];
            oh.fill(0.0);
            for (j, p) in scores.iter().enumerate() {
                for (acc, x) in oh.iter_mut().zip(&v[j * hd..][..hd]) {
                    *acc += p * x;
                }
            }
        }
    });
}
