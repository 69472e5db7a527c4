"""ROWS rows of width 576 (SmolLM2's d_model): sparse mixtures of 4,096 random directions, 16 per row
with exponential weights, seeded, written to PATH as a float32 .npy (the MPI benchmarks' data).

    python3 scripts/mpi-bench-data.py PATH ROWS
"""
import sys

import numpy as np

path, rows = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(7)
atoms = rng.standard_normal((4096, 576)).astype(np.float32)
x = np.zeros((rows, 576), np.float32)
for r0 in range(0, rows, 8192):
    codes = np.zeros((8192, 4096), np.float32)
    j = rng.integers(0, 4096, (8192, 16))
    np.put_along_axis(codes, j, rng.exponential(1.0, (8192, 16)).astype(np.float32), 1)
    x[r0:r0 + 8192] = (codes @ atoms)[: rows - r0]
np.save(path, x)
