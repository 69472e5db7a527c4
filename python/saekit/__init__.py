"""saekit: sparse autoencoders on a real language model, with a Rust core.

The API follows TransformerLens and SAELens habits::

    import saekit
    model = saekit.Model.load()                      # SmolLM2-135M-Instruct (run `saekit fetch-model` once)
    logits, cache = model.run_with_cache("The quick brown fox", names=["blocks.15.hook_resid_post"])
    sae = saekit.SAE.load("sae/")                    # saekit / SAELens / sparsify / Gemma Scope folders
    f = sae.encode(cache["blocks.15.hook_resid_post"])   # [batch, pos, d_sae]
    db = saekit.FeatureDb("features.sqlite")
    print(model.generate("Tell me about your weekend.", chat=True, sae=sae, db=db, steer={1504: "3x"}))

Everything is computed by the same Rust library as the `saekit` command line; numpy arrays go in and
out (weights are zero-copy read-only views). Heavy calls release the GIL; Ctrl-C raises
KeyboardInterrupt (training writes a checkpoint first). Errors say whose fault they are: ValueError for
arguments or files that do not fit, saekit.CorruptFileError (a ValueError) for a damaged file saekit wrote,
OSError for the disk (FileNotFoundError for a path that does not exist), RuntimeError for a failure
inside saekit.
"""

from ._saekit import (
    SAE,
    CorruptFileError,
    FeatureDb,
    Model,
    __version__,
    default_model_path,
    search,
    search_contrast,
    steering_features,
    train,
)

__all__ = [
    "Model",
    "SAE",
    "FeatureDb",
    "train",
    "search",
    "search_contrast",
    "steering_features",
    "default_model_path",
    "CorruptFileError",
    "__version__",
]
