"""inference/mtp"""
