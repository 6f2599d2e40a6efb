"""Lightning callbacks of the calibration loop (expert activation cache, merged-weight anchoring, ...)."""
