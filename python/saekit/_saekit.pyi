"""Type stubs of the compiled extension (see saekit/__init__.py)."""

from os import PathLike
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, PathLike]
_Ids = Union[Sequence[int], Sequence[Sequence[int]], npt.NDArray[np.integer]]
_Input = Union[str, Sequence[str], _Ids]

__version__: str

class CorruptFileError(ValueError):
    """A file saekit wrote is damaged (a checksum mismatch, a truncated or inconsistent file); the message
    names it. Delete it and write it again (a run's checkpoint: restart the run)."""

def default_model_path() -> str:
    """The model file used when none is named: $SAEKIT_MODEL, else the fetched SmolLM2 GGUF."""

class Model:
    """A transformer language model with TransformerLens hook names (hook_embed,
    blocks.{L}.hook_resid_pre/attn_out/resid_mid/mlp_out/resid_post, ln_final.hook_normalized)."""

    @staticmethod
    def load(path: Optional[_Path] = None) -> "Model":
        """Load a .gguf file or a Hugging Face folder; None loads the default model.
        FileNotFoundError if it is missing, ValueError if it is not a model saekit can run."""
    @property
    def cfg(self) -> Dict[str, Any]:
        """model_name, arch, n_layers, d_model, n_heads, d_mlp, d_vocab, n_ctx, source."""
    def to_tokens(self, text: Union[str, Sequence[str]], prepend_bos: bool = True) -> npt.NDArray[np.int64]:
        """Token ids [batch, pos]; a list of texts must tokenize to equal lengths. prepend_bos adds the
        model's own leading special tokens (BOS when the model uses one), as `saekit activations` does."""
    def to_string(self, ids: _Ids) -> Union[str, List[str]]:
        """The text of [pos] ids, or a list of texts for [batch, pos]."""
    def run_with_cache(
        self,
        input: _Input,
        names: Optional[Sequence[str]] = None,
        prepend_bos: bool = True,
        return_logits: bool = False,
    ) -> Tuple[Optional[npt.NDArray[np.float32]], Dict[str, npt.NDArray[np.float32]]]:
        """(logits, cache): cache[name] is float32 [batch, pos, d_model]. Without return_logits the
        forward pass stops after the deepest hook named and logits is None; with it, logits are
        [batch, pos, d_vocab]. names=None caches every hook point."""
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        chat: bool = False,
        system: Optional[str] = None,
        temperature: float = 0.0,
        top_p: float = 0.95,
        seed: int = 0,
        sae: Optional[Union["SAE", _Path]] = None,
        steer: Optional[Mapping[int, Union[float, str]]] = None,
        add: Optional[Mapping[int, Union[float, str]]] = None,
        ablate: Optional[Sequence[int]] = None,
        db: Optional[Union["FeatureDb", _Path]] = None,
        hook: Optional[str] = None,
        steer_first: bool = False,
    ) -> str:
        """The continuation of prompt (greedy at temperature 0). With sae: steer clamps features keeping
        the SAE error term ("10x" = 10 times the feature's max activation in db), add adds
        coeff * W_dec[f], ablate clamps to 0; position 0 (an attention sink) is left alone unless
        steer_first. Ctrl-C raises KeyboardInterrupt."""

class SAE:
    """A sparse autoencoder in raw activation space; immutable, weights are read-only numpy views."""

    @staticmethod
    def load(path: _Path) -> "SAE":
        """A saekit / SAELens (v6, legacy) / sparsify folder or a Gemma Scope params.npz."""
    def save(self, path: _Path) -> None:
        """Write a SAELens v6 folder (cfg.json, sae_weights.safetensors)."""
    @property
    def cfg(self) -> Dict[str, Any]:
        """d_in, d_sae, architecture ("topk" | "jumprelu" | "standard"), k, apply_b_dec_to_input, dtype, metadata."""
    @property
    def d_in(self) -> int: ...
    @property
    def d_sae(self) -> int: ...
    @property
    def W_enc(self) -> npt.NDArray[np.float32]:
        """[d_in, d_sae], a transposed view (no copy) that keeps the SAE alive."""
    @property
    def W_dec(self) -> npt.NDArray[np.float32]:
        """[d_sae, d_in], a view (no copy)."""
    @property
    def b_enc(self) -> npt.NDArray[np.float32]:
        """[d_sae], a view (no copy)."""
    @property
    def b_dec(self) -> npt.NDArray[np.float32]:
        """[d_in], a view (no copy)."""
    @property
    def threshold(self) -> Optional[npt.NDArray[np.float32]]:
        """[d_sae] JumpReLU thresholds, None for other architectures."""
    def encode(self, x: npt.NDArray[np.float32], sparse: bool = False) -> Any:
        """Feature activations of float32 C-contiguous x [..., d_in]: dense [..., d_sae]; sparse=True gives
        a scipy.sparse.csr_matrix [N, d_sae] (rows flattened) when scipy is installed, else
        (indices int64 [2, nnz], values float32 [nnz]) as torch.sparse_coo_tensor takes them.
        TypeError for a wrong dtype, ValueError for a wrong shape or a non-contiguous array."""
    def decode(self, f: Any) -> npt.NDArray[np.float32]:
        """Reconstruction [..., d_in] of dense float32 [..., d_sae] codes or a scipy sparse matrix [N, d_sae]."""

class FeatureDb:
    """The feature database of `saekit analyze` (SQLite, read-only)."""

    def __init__(self, path: _Path) -> None: ...
    def feature(self, id: int) -> Dict[str, Any]:
        """The record: density, max_act, mean_act, explanation, top_contexts [{tokens, acts, peak, max_act,
        text, pieces}], quantiles (their contexts likewise), histogram, promoted, suppressed, neighbours.
        `text` is the window as text and `pieces` [{text, act, first, len}] its tokens with characters split
        across tokens joined (act: the highest of theirs); `tokens` shows such bytes as \xNN. ValueError for
        an unknown id."""
    def features(
        self, sort: str = "density", limit: int = 50, offset: int = 0, descending: bool = True
    ) -> List[Dict[str, Any]]:
        """Summaries {id, density, max_act, top_tokens} sorted by "density", "max_act" or "id"."""
    def search(self, query: str, limit: int = 30) -> List[Dict[str, Any]]:
        """Features whose contexts, promoted tokens or explanation match the words (or a feature id)."""
    @property
    def info(self) -> Dict[str, Any]: ...
    def __len__(self) -> int: ...

def train(
    acts: Optional[Union[npt.NDArray[np.float32], _Path]] = None,
    out: Optional[_Path] = None,
    arch: Optional[str] = None,
    d_sae: Optional[int] = None,
    k: Optional[int] = None,
    tokens: Optional[Union[int, str]] = None,
    resume: Optional[_Path] = None,
    hook: str = "",
    progress: bool = True,
    **config: Any,
) -> Dict[str, Any]:
    """Train an SAE as `saekit train` does (defaults: arch "topk", d_sae 16384, k 32, tokens "2M") and
    return its metrics. acts: a float32 array [N, d_in] (written once to out/train_acts.npy), a .npy
    path or an activation store folder (hook picks one of a multi-hook store). **config: any TrainConfig
    field (lr, batch_size, seed, l1_coefficient, ...; `saekit train --print-config` lists them).
    resume=out continues bit-identically. Ctrl-C writes a checkpoint, then raises KeyboardInterrupt."""

def search(
    model: Model,
    sae: Union[SAE, _Path],
    text: str,
    per_token: int = 3,
    top: int = 15,
    db: Optional[Union[FeatureDb, _Path]] = None,
    hook: Optional[str] = None,
) -> Dict[str, Any]:
    """Features on text: {"tokens": [{token, id, features: [(id, act)]}], "overall": [{id, max_act,
    sum_act, n_tokens, frac_of_db_max}]}, as `saekit search SAE --text`."""

def search_contrast(
    model: Model,
    sae: Union[SAE, _Path],
    pos: Sequence[str],
    neg: Sequence[str],
    max_tokens: int = 256,
    hook: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Features ranked by AUROC of their per-text max activation between pos and neg (best for pos
    first): [{id, auroc, freq_pos, freq_neg, z, mean_pos, mean_neg}]."""

def steering_features(
    model: Model,
    sae: Union[SAE, _Path],
    pos: Sequence[str],
    neg: Sequence[str],
    db: Union[FeatureDb, _Path],
    candidates: int = 16,
    times: float = 3.0,
    max_tokens: int = 256,
    hook: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Features to steer toward pos, as `saekit search --pos --neg --db DB --steer N`: the `candidates`
    best by AUROC that fired in db, each clamped at `times` x its max activation while the model reads
    four neutral chat prompts and its own answers, ordered by `lift`, the mean log-probability the clamp
    adds to pos's tokens over neg's: search_contrast's fields plus {lift, max_act}, best first. Clamp
    the first with model.generate(..., sae=sae, db=db, steer={id: f"{times}x"})."""
