#!/usr/bin/env python3
"""On paper: `saekit train` on a cluster of boxes like the measuring one, from one measured run.

Inputs are measured (one process, the same d_in / batch / k): the training rate at one d_sae, which gives the
compute seconds per (token x latent); and a per-collective latency. Per step of B tokens, with S latent shards
per replica and R = machines / S data-parallel replicas, each rank:
  - computes B_group x D/S (every rank of a shard group sees the group's batch, B_group = B / R tokens);
  - all-gathers the top-k candidates: B_group x k x S x 8 bytes (value + index) received;
  - all-reduces the decoder's partial reconstruction: ring, 2 (S-1)/S x B_group x d_in x 4 bytes;
  - all-reduces its shard's gradients across the R replicas: ring, 2 (R-1)/R x (2 d_in + 1) D/S x 4 bytes
    (dense: the bound; only rows the batch touched need to travel);
  - holds weights, gradients and Adam's two moments: 4 x (2 d_in + 2) D/S x 4 bytes.
Throughput is B / (compute + communication): no overlap of the two is assumed.
Where it breaks: latency-bound collectives when B_group x k is small, stragglers (every step waits for the
slowest rank), and the dense gradient all-reduce, which grows with D/S while compute per rank does not shrink.

Usage: python3 scripts/mpi-cost-model.py --rate TOKENS_PER_S --at-d-sae 16384 [--batch 4096] [--k 32]
       [--d-in 576] [--latency-us 30] [--mem-gib 24] [--markdown]
"""
import argparse


def step(a, d_sae, machines, shards, gbps):
    replicas = machines // shards
    b_group = a.batch / replicas
    per_rank = d_sae / shards
    compute = b_group * per_rank * a.sec_per_token_latent
    link = gbps * 1e9 / 8
    lat = a.latency_us * 1e-6
    gather = (b_group * a.k * shards * 8) / link + lat * max(shards - 1, 0)
    decoder = (2 * (shards - 1) / shards * b_group * a.d_in * 4) / link + 2 * lat * max(shards - 1, 0)
    grads = 0.0
    if replicas > 1:
        grads = (2 * (replicas - 1) / replicas * (2 * a.d_in + 1) * per_rank * 4) / link + 2 * lat * (replicas - 1)
    comm = gather + decoder + grads
    mem = 4 * (2 * a.d_in + 2) * per_rank * 4 / 2**30
    return {"tokens_per_s": a.batch / (compute + comm), "comm_share": comm / (compute + comm), "mem_gib": mem}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, required=True, help="measured tokens/s of one process")
    ap.add_argument("--at-d-sae", type=int, required=True, help="the d_sae of that measurement")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--latency-us", type=float, default=30.0, help="per message on the network")
    ap.add_argument("--mem-gib", type=float, default=24.0, help="memory of one machine")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    a.sec_per_token_latent = 1.0 / (a.rate * a.at_d_sae)
    rows = []
    for d_sae in (1 << 20, 1 << 22, 1 << 24):
        for machines in (8, 32, 64):
            for gbps in (10, 100):
                # the best split of the machines into shards x replicas that fits in memory
                best = None
                for shards in (s for s in range(1, machines + 1) if machines % s == 0):
                    r = step(a, d_sae, machines, shards, gbps)
                    if r["mem_gib"] <= 0.8 * a.mem_gib and (best is None or r["tokens_per_s"] > best[1]["tokens_per_s"]):
                        best = (shards, r)
                rows.append((d_sae, machines, gbps, best))
    largest = max(d for d in range(1 << 20, 1 << 30, 1 << 20) if 4 * (2 * a.d_in + 2) * d / 32 * 4 / 2**30 <= 0.8 * a.mem_gib)
    print("| d_sae | machines | link | shards x replicas | tokens/s | communication share | memory per rank |")
    print("|---|---|---|---|---|---|---|")
    for d_sae, m, g, best in rows:
        if best is None:
            print(f"| {d_sae >> 20}M | {m} | {g} Gb/s | does not fit | | | |")
            continue
        s, r = best
        print(f"| {d_sae >> 20}M | {m} | {g} Gb/s | {s} x {m // s} | {r['tokens_per_s']:,.0f} | "
              f"{100 * r['comm_share']:.0f}% | {r['mem_gib']:.1f} GiB |")
    print(f"\nLargest dictionary 32 such machines hold (all ranks sharding latents, 80% of memory): "
          f"{largest / 2**20:.0f}M latents")


if __name__ == "__main__":
    main()
