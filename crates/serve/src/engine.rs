//! Model work for the live pages: feature activations per token, the logit lens, and steered generation.
//!
//! One model, two cores: every request that runs the model goes through [`ModelQueue`], a single worker
//! thread fed by a bounded channel. A full queue answers at once ("busy") instead of piling up latency.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use anyhow::{Context as _, Result};
use saekit_circuits::TranscoderSet;
use saekit_model::{ChatMessage, GenerateOptions, HookPoint, Model, Sampling};
use saekit_sae::Sae;
pub use saekit_steer::FeatureEdit;
use saekit_steer::Positions;
use serde::{Deserialize, Serialize};

use crate::error::{ServeError, ServeResult};

/// The LM, the SAE and the hook point it reads.
pub struct Engine {
    /// The language model.
    pub model: Model,
    /// The SAE the live pages and steering use.
    pub sae: Sae,
    /// The hook point the SAE reads and steering edits.
    pub hook: HookPoint,
    /// The transcoder set the `/graph` page attributes through (see [`Engine::with_transcoders`]).
    pub transcoders: Option<TranscoderSet>,
}

/// A feature and its activation on one token (or its strongest over a text).
#[derive(Debug, Clone, Serialize)]
pub struct FeatureAct {
    /// The feature.
    pub id: u32,
    /// Its activation.
    pub act: f32,
}

/// One cell of the logit lens: the top token a layer's residual decodes to at one position.
#[derive(Debug, Clone, Serialize)]
pub struct LensCell {
    /// The token's text.
    pub token: String,
    /// Its probability.
    pub prob: f32,
}

/// What the live-text page shows for one text.
#[derive(Debug, Clone, Serialize)]
pub struct LiveResult {
    /// The text's tokens, as text.
    pub tokens: Vec<String>,
    /// Their ids.
    pub ids: Vec<u32>,
    /// The feature the page asked about, if any.
    pub feature: Option<u32>,
    /// The chosen feature's activation on each token (empty when none was chosen).
    pub feature_acts: Vec<f32>,
    /// The strongest features on each token, strongest first.
    pub top_features: Vec<Vec<FeatureAct>>,
    /// Features ranked by their strongest activation anywhere in the text.
    pub overall: Vec<FeatureAct>,
    /// `lens[layer][position]`: the top token the residual stream after that layer decodes to.
    pub lens: Vec<Vec<LensCell>>,
}

/// What the steering page shows: the same prompt continued without and with the edits.
#[derive(Debug, Clone, Serialize)]
pub struct SteerResult {
    /// The prompt as the model saw it (after the chat template when asked).
    pub prompt: String,
    /// The continuation without edits.
    pub baseline: String,
    /// The continuation with them.
    pub steered: String,
    /// Tokens generated without edits.
    pub baseline_tokens: usize,
    /// Tokens generated with them.
    pub steered_tokens: usize,
}

/// How a steering request generates.
#[derive(Debug, Clone, Deserialize)]
pub struct GenSettings {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// Sampling seed (the same for both generations).
    pub seed: u64,
    /// Wrap the prompt in the model's chat template.
    pub chat: bool,
    /// Longest prompt (in tokens, after the chat template) to generate from.
    pub max_prompt_tokens: usize,
}

impl Engine {
    /// The engine on the hook the SAE names (see [`Engine::with_hook`]).
    pub fn new(model: Model, sae: Sae) -> Result<Self> {
        Self::with_hook(model, sae, None)
    }

    /// As [`Engine::new`], on the hook the user named: an SAE without metadata (a Gemma Scope
    /// `params.npz`) names none, and one that names a different hook is refused.
    pub fn with_hook(model: Model, sae: Sae, asked_hook: Option<&str>) -> Result<Self> {
        let name = sae.hook_on("the SAE", &model.config().name, model.config().d_model, asked_hook)?;
        let hook: HookPoint =
            name.parse().with_context(|| format!("the SAE's hook name '{name}' is not a hook point"))?;
        hook.check(model.config().n_layers)?;
        Ok(Self { model, sae, hook, transcoders: None })
    }

    /// The engine with `set` for attribution graphs: one MLP-input -> MLP-output transcoder per block of
    /// this model, which must be of the Llama family (the frozen-attention linearisation's).
    pub fn with_transcoders(mut self, set: TranscoderSet) -> Result<Self> {
        saekit_circuits::replacement::check_set(&self.model, &set)?;
        self.model.rms_block_weights(0)?;
        self.transcoders = Some(set);
        Ok(self)
    }

    /// The hook point the SAE runs on.
    pub fn hook(&self) -> HookPoint {
        self.hook
    }

    /// Tokenise a request's text as a plain prompt (with the model's BOS).
    pub fn encode_text(&self, text: &str) -> ServeResult<Vec<u32>> {
        self.model.tokenizer().encode(text, true).map_err(ServeError::Internal)
    }

    /// Per-token SAE activations for `text`, plus the logit lens when `lens` is set.
    pub fn live(&self, ids: &[u32], feature: Option<u32>, top_k: usize, lens: bool) -> ServeResult<LiveResult> {
        let cfg = self.model.config();
        let d = cfg.d_model;
        let mut points = vec![self.hook];
        if lens {
            points.extend((0..cfg.n_layers).map(HookPoint::ResidPost));
        }
        let cache = self.model.run_with_cache(ids, 1, &points)?;
        let x =
            cache.get(&self.hook).ok_or_else(|| ServeError::internal(format!("hook {} not captured", self.hook)))?;
        let codes = self.sae.encode(x);
        let seq = ids.len();
        let mut feature_acts = Vec::new();
        let mut top_features = Vec::with_capacity(seq);
        let mut overall = std::collections::HashMap::<u32, f32>::new();
        for (r, &id) in ids.iter().enumerate() {
            let (idx, val) = codes.row(r);
            if let Some(f) = feature {
                feature_acts.push(idx.iter().zip(val).find(|(i, _)| **i == f).map_or(0.0, |(_, v)| *v));
            }
            let mut row: Vec<FeatureAct> =
                idx.iter().zip(val).filter(|(_, v)| **v > 0.0).map(|(&id, &act)| FeatureAct { id, act }).collect();
            row.sort_by(|a, b| b.act.total_cmp(&a.act));
            row.truncate(top_k);
            // position 0 and special tokens are attention sinks with ~100x the usual norm: they would top
            // every ranking
            if r > 0 && !self.model.tokenizer().is_special(id) {
                for fa in &row {
                    let e = overall.entry(fa.id).or_insert(0.0);
                    *e = e.max(fa.act);
                }
            }
            top_features.push(row);
        }
        let mut overall: Vec<FeatureAct> = overall.into_iter().map(|(id, act)| FeatureAct { id, act }).collect();
        overall.sort_by(|a, b| b.act.total_cmp(&a.act).then(a.id.cmp(&b.id)));
        overall.truncate(20);

        let mut lens_rows = Vec::new();
        if lens {
            // all layers' rows through the unembedding in a few large GEMMs rather than one small one per layer
            let v = cfg.vocab_size;
            let mut normed = Vec::with_capacity(cfg.n_layers * seq * d);
            for l in 0..cfg.n_layers {
                let h = cache
                    .get(&HookPoint::ResidPost(l))
                    .ok_or_else(|| ServeError::internal(format!("layer {l} not captured")))?;
                normed.extend(self.final_norm(h, d));
            }
            let mut cells = Vec::with_capacity(cfg.n_layers * seq);
            for block in normed.chunks(512 * d) {
                let logits = self.model.unembed(block);
                cells.extend(logits.chunks(v).map(|lg| {
                    let (best, max) =
                        lg.iter()
                            .enumerate()
                            .fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b });
                    let z: f32 = lg.iter().map(|&x| (x - max).exp()).sum();
                    LensCell { token: self.model.tokenizer().token_text(best as u32), prob: 1.0 / z }
                }));
            }
            let mut it = cells.into_iter();
            for _ in 0..cfg.n_layers {
                lens_rows.push(it.by_ref().take(seq).collect());
            }
        }
        Ok(LiveResult {
            tokens: ids.iter().map(|&i| self.model.tokenizer().token_text(i)).collect(),
            ids: ids.to_vec(),
            feature,
            feature_acts,
            top_features,
            overall,
            lens: lens_rows,
        })
    }

    /// RMS-normalise rows with the final norm's gain (Llama); GPT-2's LayerNorm is approximated without bias.
    fn final_norm(&self, h: &[f32], d: usize) -> Vec<f32> {
        let eps = self.model.config().norm_eps;
        let gain = self.model.final_norm_gain();
        let mut out = h.to_vec();
        for row in out.chunks_mut(d) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let s = 1.0 / (ms + eps).sqrt();
            for (j, v) in row.iter_mut().enumerate() {
                *v *= s * gain.map_or(1.0, |g| g[j]);
            }
        }
        out
    }

    /// The prompt as the model sees it (through the chat template when `chat`) and its token ids.
    pub fn prompt_ids(&self, prompt: &str, chat: bool) -> ServeResult<(String, Vec<u32>)> {
        if chat {
            let text = self.chat_text(&[ChatMessage::user(prompt)])?;
            // the template writes its own BOS-like markers
            Ok((text.clone(), self.model.tokenizer().encode(&text, false).map_err(ServeError::Internal)?))
        } else {
            Ok((prompt.to_string(), self.encode_text(prompt)?))
        }
    }

    /// Messages rendered by the chat template; a template that refuses them (one without a template,
    /// one that raises on the order of the roles) refuses the request.
    fn chat_text(&self, messages: &[ChatMessage]) -> ServeResult<String> {
        let text = self.model.tokenizer().apply_chat_template(messages);
        text.map_err(|e| ServeError::Unprocessable(format!("{e:#}")))
    }

    /// Render chat messages with the model's chat template and tokenise them (the template writes its own
    /// BOS-like markers), as `saekit generate --chat` does.
    pub fn chat_prompt_ids(&self, messages: &[ChatMessage]) -> ServeResult<Vec<u32>> {
        let text = self.chat_text(messages)?;
        self.model.tokenizer().encode(&text, false).map_err(ServeError::Internal)
    }

    /// Generate with `edits` applied (position 0 left alone, as everywhere in serve and by default in
    /// `saekit generate`), calling `on_token` with each new token and its logits; see
    /// [`Model::generate_streaming`].
    pub fn generate_streaming(
        &self,
        ids: &[u32],
        edits: &[FeatureEdit],
        opts: &GenerateOptions,
        on_token: impl FnMut(u32, &[f32]) -> bool,
    ) -> ServeResult<saekit_model::Generation> {
        saekit_steer::validate(&self.model, &self.sae, self.hook, edits)?;
        let mut hooks = saekit_model::Hooks::new();
        saekit_steer::add_steering_hook(&mut hooks, &self.sae, self.hook, edits, Positions::SkipFirst);
        Ok(self.model.generate_streaming(ids, opts, &mut hooks, on_token)?)
    }

    /// Generate from the same prompt and seed without and with `edits` (clamping keeps the SAE error term;
    /// position 0, the attention sink the SAE never saw, is left alone).
    pub fn steer(&self, prompt: &str, edits: &[FeatureEdit], s: &GenSettings) -> ServeResult<SteerResult> {
        let (text, ids) = self.prompt_ids(prompt, s.chat)?;
        if ids.len() > s.max_prompt_tokens {
            let (n, limit) = (ids.len(), s.max_prompt_tokens);
            return Err(ServeError::Unprocessable(format!("the prompt is {n} tokens; the limit is {limit}")));
        }
        let opts = GenerateOptions {
            max_new_tokens: s.max_new_tokens,
            sampling: if s.temperature > 0.0 {
                Sampling::TopP { temperature: s.temperature, top_p: 0.95 }
            } else {
                Sampling::Greedy
            },
            seed: s.seed,
            stop_at_eos: true,
        };
        let c = saekit_steer::compare(&self.model, &self.sae, self.hook, edits, Positions::SkipFirst, &ids, &opts)?;
        Ok(SteerResult {
            prompt: text,
            baseline_tokens: c.baseline.generated_ids.len(),
            steered_tokens: c.steered.generated_ids.len(),
            baseline: c.baseline.text,
            steered: c.steered.text,
        })
    }
}

type Job = Box<dyn FnOnce(&Engine) + Send>;

/// A single worker thread that owns the engine, fed by a bounded queue.
pub struct ModelQueue {
    tx: SyncSender<Job>,
    /// Jobs that may wait while one runs.
    pub capacity: usize,
}

impl ModelQueue {
    /// Start the worker thread that owns `engine`.
    pub fn start(engine: Engine, capacity: usize) -> Result<Self> {
        let (tx, rx) = sync_channel::<Job>(capacity);
        std::thread::Builder::new()
            .name("saekit-model".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&engine);
                }
            })
            .context("cannot start the model worker thread")?;
        Ok(Self { tx, capacity })
    }

    /// Queue `f` on the worker and return at once: `Busy` when `capacity` jobs are already waiting, else a
    /// receiver for its result (streaming handlers answer before the job has finished).
    pub fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> ServeResult<T> + Send + 'static,
    ) -> ServeResult<tokio::sync::oneshot::Receiver<ServeResult<T>>> {
        let (otx, orx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |e| {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(e)))
                .unwrap_or_else(|_| Err(ServeError::internal("the model worker panicked")));
            let _ = otx.send(r);
        });
        match self.tx.try_send(job) {
            Ok(()) => Ok(orx),
            Err(TrySendError::Full(_)) => Err(ServeError::Busy(self.capacity)),
            Err(TrySendError::Disconnected(_)) => Err(ServeError::internal("the model worker has stopped")),
        }
    }

    /// Run `f` on the worker; `Busy` at once when `capacity` jobs are already waiting.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> ServeResult<T> + Send + 'static,
    ) -> ServeResult<T> {
        let orx = self.submit(f)?;
        orx.await.unwrap_or_else(|_| Err(ServeError::internal("the model worker dropped the request")))
    }
}
