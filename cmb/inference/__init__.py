"""Whole-scan inference: stage-1 probability maps, candidates, stage-2 scoring."""
