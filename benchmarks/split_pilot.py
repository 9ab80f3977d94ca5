"""Pilot (seeds 0-1): stage-1 hits and candidates per scan with components split at saddles (`inference.split_dynamic`), on a run's held-out scans.

    python benchmarks/split_pilot.py runs/RUN
"""
import sys, json, time, numpy as np
from pathlib import Path
from omegaconf import open_dict
from cmb import user_cache_dir
from cmb.eval.evaluate import load_run_config
from cmb.protocol.run import Protocol
from cmb.inference.candidates import extract_candidates, candidate_points
from cmb.eval.matching import hit_sets
from cmb.protocol.mining import scan_truth
run = Path(sys.argv[1]); hs = [None, 0.05, 0.1, 0.2, 0.3]
cfg = load_run_config(run)
with open_dict(cfg):
    cfg.paths.run_dir = str(run); cfg.paths.cache_dir = str(user_cache_dir())
p = Protocol(cfg)
tot = {h: [0, 0, 0, 0.0] for h in hs}; n_cmb = 0; n_scans = 0
for f in json.load(open(run / 'splits.json'))['folds']:
    um = p.unet_map(p.members('unet', f['fold']))
    for s in f['test']:
        scan, pre = p.store.load(s); prob = um(pre); n_cmb += len(scan.centroids_vox); n_scans += 1
        for h in hs:
            t = time.perf_counter()
            c = extract_candidates(prob, 0.2, scan.affine, s, split_dynamic=h, with_peak_point=True)
            dt = time.perf_counter() - t
            hits = hit_sets(candidate_points(c), scan_truth(scan), 2.5)
            pk = hit_sets(np.array([x.peak_point for x in c]).reshape(-1, 3), scan_truth(scan), 2.5)
            found = set(x for hh in hits for x in hh); foundp = found | set(x for hh in pk for x in hh)
            tot[h][0] += len(found); tot[h][1] += len(foundp); tot[h][2] += len(c); tot[h][3] += dt
        print(s, {h: tot[h][:3] for h in hs}, flush=True)
for h in hs:
    print(f"h={h}: CMBs hit at candidate point {tot[h][0]}/{n_cmb}, at point or peak {tot[h][1]}, candidates/scan {tot[h][2]/n_scans:.1f}, extract s/scan {tot[h][3]/n_scans:.2f}")
