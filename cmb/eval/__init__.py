"""Evaluation: matching detections to CMBs, sensitivity, FP/scan, FROC, CPM, reports."""
