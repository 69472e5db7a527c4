"""Split the reference harvest ($SAEKIT_REF/acts) into train.npy / eval.npy exactly as bench_sae.py does:
the first 90% of windows train, the rest eval. Usage: python split_acts.py ACTS_DIR OUT_DIR"""
import json
import sys

import numpy as np

src, out = sys.argv[1], sys.argv[2]
a = np.load(src + "/acts_L15_f32.npy", mmap_mode="r")
man = json.load(open(src + "/manifest.json"))
n_train_win = int(round(man["n_windows"] * 0.9))
wp = np.load(src + "/acts_L15_window_pos_i32.npy")
split = int(np.searchsorted(wp[:, 0], n_train_win))
np.save(out + "/train.npy", np.ascontiguousarray(a[:split]))
np.save(out + "/eval.npy", np.ascontiguousarray(a[split:]))
print("train rows", split, "eval rows", a.shape[0] - split)
