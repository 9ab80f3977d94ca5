"""The LOTCV protocol (Rau et al.), one job per module:

- `run`: the order of steps over folds and the config builder (`Protocol`);
- `recipes`: a stage's config group as plain dataclasses; `trainer`: the Lightning Trainer from config;
- `members`: training one member (first round, health retries, hard-negative round);
- `mining`: mimics for stage 2; `detection`: out-of-fold candidates and scores;
- `scans`: scans, preprocessing and training volumes of a run; `settings`: the settings hash and seeds;
- `transfer`: a finished run scored on another labelled dataset.

The run folder's names live in `cmb.layout`.
"""
